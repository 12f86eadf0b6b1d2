"""How good is a pre-trained encoder: the weighted kNN monitor and a linear probe.

The kNN monitor is the one of InstDisc (Wu et al. 2018) used by the SimCLR/MoCo CIFAR
code and BadEncoder: L2-normalised backbone features, the k most cosine-similar training
features vote for their labels with weight exp(similarity / t) (k=200, t=0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslbackdoor.downstream.features import encode
from sslbackdoor.downstream.probe import ProbeConfig, predict, train_probe
from sslbackdoor.metrics import accuracy
from sslbackdoor.models.encoders import Encoder


def knn_scores(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               num_classes: int, k: int = 200, temperature: float = 0.5,
               chunk: int = 1024) -> torch.Tensor:
    """Weighted-vote class scores [M,C] of queries [M,D] against bank [N,D] with labels [N].

    Both feature sets must already be L2-normalised; k is capped at N.
    """
    k = min(k, bank.shape[0])
    labels = bank_labels.to(bank.device)
    out = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start:start + chunk] @ bank.T  # [m, N]
        weights, index = similarity.topk(k, dim=1)  # [m, k]
        votes = torch.zeros(weights.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, labels[index], (weights / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def knn_predict(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                num_classes: int, k: int = 200, temperature: float = 0.5) -> torch.Tensor:
    """Top-1 kNN predictions [M] (see `knn_scores`)."""
    return knn_scores(queries, bank, bank_labels, num_classes, k, temperature).argmax(1).cpu()


@dataclass
class LabeledImages:
    """Images (uint8 [N,3,S,S]) with labels [N] and the number of classes."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int


def knn_accuracy(encoder: Encoder, train: LabeledImages, test: LabeledImages,
                 device: torch.device, k: int = 200, temperature: float = 0.5,
                 precision: str = "bf16") -> float:
    """kNN top-1 accuracy of `encoder` on `test` with `train` as the feature bank."""
    bank = encode(encoder, train.images, device, precision=precision)
    queries = encode(encoder, test.images, device, precision=precision)
    predictions = knn_predict(queries, bank, train.labels, train.num_classes, k, temperature)
    return accuracy(predictions, test.labels)


def linear_probe_accuracy(encoder: Encoder, train: LabeledImages, test: LabeledImages,
                          device: torch.device, probe: ProbeConfig, seed: int = 0,
                          precision: str = "bf16") -> float:
    """Test accuracy of a linear classifier on frozen, L2-normalised features that are
    standardised per dimension with the training statistics (an affine map, so the
    classifier stays linear in the features; it only makes Adam converge in a few epochs)."""
    train_features = encode(encoder, train.images, device, precision=precision)
    mean, std = train_features.mean(0), train_features.std(0).clamp_min(1e-6)
    classifier = train_probe((train_features - mean) / std, train.labels, train.num_classes,
                             probe.model_copy(update={"kind": "linear"}), seed)
    test_features = encode(encoder, test.images, device, precision=precision)
    return accuracy(predict(classifier, (test_features - mean) / std), test.labels)
