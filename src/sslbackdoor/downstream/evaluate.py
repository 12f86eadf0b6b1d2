"""The papers' evaluation: CA, BA, ASR-B and ASR of downstream classifiers.

For each downstream task a classifier is trained on the frozen features of the clean
encoder and another on those of the backdoored encoder, with the same seed and data;
both are then tested on clean and triggered test inputs.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.features import dataset_tensors, encode
from sslbackdoor.downstream.probe import ProbeConfig, predict, train_probe
from sslbackdoor.errors import UserInputError
from sslbackdoor.metrics import accuracy, attack_success_rate
from sslbackdoor.models.encoders import Encoder

# Official benchmark splits can share a few exact images (stray duplicates, not a leak), so
# the bar scales with the test set rather than being a fixed count.
LEAK_TOLERANCE = 0.01


@dataclass
class TaskData:
    """A downstream task's images (uint8 [N,3,S,S]) and labels, loaded once."""

    name: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    provenance: dict[str, str]


def load_task(dataset: str, image_size: int, *, root: str | Path | None = None,
              train_limit: int | None = None, test_limit: int | None = None,
              seed: int = 0, download: bool = False) -> TaskData:
    """A task's train and test images; refused if they are (or overlap like) one split."""
    check_two_splits(dataset)
    train = load_dataset(dataset, "train", image_size=image_size, root=root, limit=train_limit,
                         seed=seed, download=download)
    test = load_dataset(dataset, "test", image_size=image_size, root=root, limit=test_limit,
                        seed=seed, download=download)
    train_images, train_labels = dataset_tensors(train)
    test_images, test_labels = dataset_tensors(test)
    check_split_leakage(dataset, train_images, test_images)
    return TaskData(dataset, list(train.classes), train_images, train_labels, test_images,
                    test_labels, {"train": train.provenance, "test": test.provenance})


def check_two_splits(dataset: str) -> None:
    """Refuse `npz:FILE` where a train and a test split are needed: both would be that file."""
    from sslbackdoor.data.torchvision_sources import NPZ_LAYOUT

    kind, _, arg = dataset.partition(":")
    path = Path(arg).expanduser()
    if kind == "npz" and path.is_file():
        raise UserInputError(f"{dataset}: one .npz file is one split, and here a classifier is "
                             f"trained on a train split and tested on a test split; expected "
                             f"{NPZ_LAYOUT}")


def image_hashes(images: torch.Tensor) -> list[bytes]:
    """blake2b of each uint8 image's bytes (exact duplicates share a hash)."""
    rows = images.contiguous().reshape(images.shape[0], -1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def tolerated_overlap(test_size: int) -> int:
    """Stray duplicates a train/test pair may share: 1% of the test set, at least 1."""
    return max(1, int(test_size * LEAK_TOLERANCE))


def check_split_leakage(name: str, train_images: torch.Tensor, test_images: torch.Tensor) -> int:
    """Count test images whose exact pixels are also a training image: warn (one line) on
    stray duplicates, refuse more than `tolerated_overlap`, since then CA/BA/ASR would be
    measured partly on training images. Returns the count."""
    if train_images.shape[0] == 0 or test_images.shape[0] == 0:
        return 0
    train = set(image_hashes(train_images))
    overlap = sum(digest in train for digest in image_hashes(test_images))
    tolerated = tolerated_overlap(test_images.shape[0])
    where = (f"{name}: {overlap} of its {test_images.shape[0]} test images also appear in its "
             f"{train_images.shape[0]} training images")
    if overlap > tolerated:
        raise UserInputError(f"{where}, more than the {tolerated} stray duplicate(s) tolerated "
                             f"(1% of the test set, at least 1); "
                             f"the splits leak: give separate train and test data")
    if overlap:
        print(f"warning: {where} (identical pixels); tolerated as stray duplicates",
              file=sys.stderr, flush=True)
    return overlap


def check_target_class(task: str, classes: Sequence[str], target_class: int) -> None:
    if not 0 <= target_class < len(classes):
        raise UserInputError(f"target class {target_class} is out of range for {task}: "
                             f"valid 0..{len(classes) - 1} ({', '.join(classes[:12])}"
                             f"{'…' if len(classes) > 12 else ''})")


@dataclass
class EncoderOnTask:
    """One encoder's downstream classifier on one task."""

    accuracy: float
    asr: float | None
    asr_all: float | None
    # [N,D] normalised triggered-test features, for similarity plots
    triggered_features: torch.Tensor | None = field(default=None, repr=False)


def evaluate_encoder(encoder: Encoder, task: TaskData, probe: ProbeConfig, device: torch.device,
                     *, seed: int = 0, trigger: Trigger | None = None,
                     target_class: int | None = None, precision: str = "bf16") -> EncoderOnTask:
    """Train the downstream classifier on `encoder`'s features and test it."""
    train_features = encode(encoder, task.train_images, device, precision=precision)
    test_features = encode(encoder, task.test_images, device, precision=precision)
    classifier = train_probe(train_features, task.train_labels, len(task.classes), probe, seed)
    result = EncoderOnTask(accuracy(predict(classifier, test_features), task.test_labels),
                           None, None, None)
    if trigger is not None and target_class is not None:
        triggered = encode(encoder, task.test_images, device, trigger=trigger, precision=precision)
        predictions = predict(classifier, triggered)
        result.asr = attack_success_rate(predictions, task.test_labels, target_class)
        result.asr_all = attack_success_rate(predictions, task.test_labels, target_class,
                                             exclude_target=False)
        result.triggered_features = triggered
    return result
