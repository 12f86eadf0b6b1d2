"""The papers' metrics as pure functions on predictions.

CA  = accuracy of the clean encoder's downstream classifier on clean test inputs.
BA  = accuracy of the backdoored encoder's classifier on clean test inputs.
ASR = fraction of triggered test inputs the backdoored encoder's classifier assigns to
      the target class; ASR-B is the same with the clean encoder's classifier.

Two ASR conventions exist: CorruptEncoder and most later work exclude test inputs whose
true label is the target (`asr`); the BadEncoder reference code counts all (`asr_all`).
"""

from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions [N] equal to labels [N]."""
    _check_same_length(predictions, labels)
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((predictions == labels).float().mean())


def attack_success_rate(predictions: torch.Tensor, labels: torch.Tensor, target: int,
                        exclude_target: bool = True) -> float:
    """Fraction of triggered inputs predicted as `target`.

    Args:
        predictions: [N] predicted classes of the triggered test inputs.
        labels: [N] their true classes.
        exclude_target: drop inputs whose true class is `target` (the default convention).
    """
    _check_same_length(predictions, labels)
    keep = labels != target if exclude_target else torch.ones_like(labels, dtype=torch.bool)
    if not bool(keep.any()):
        raise ValueError(f"no test input outside target class {target}")
    return float((predictions[keep] == target).float().mean())


def empirical_cdf(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted values and their cumulative fractions, for plotting a CDF."""
    ordered, _ = torch.sort(values.flatten().float())
    fractions = torch.arange(1, ordered.numel() + 1, dtype=torch.float32) / max(ordered.numel(), 1)
    return ordered, fractions


def _check_same_length(predictions: torch.Tensor, labels: torch.Tensor) -> None:
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels "
                         f"{tuple(labels.shape)} differ in shape")
