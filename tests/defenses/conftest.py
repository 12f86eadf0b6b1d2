"""Small models shared by the defense tests, trained once per session on sklearn digits.

* a BadNets classifier: a tiny CNN trained on 16×16 digits where 20% of the training
  images carry a 3×3 white patch (bottom-right) relabelled to class 0, and its clean twin
  trained identically without poisoning;
* a tiny encoder (the same CNN's 32-d linear features) for DECREE, and a copy poisoned so
  that the trigger collapses features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.downstream.features import dataset_tensors
from sslbackdoor.models.encoders import Encoder

IMAGE_SIZE = 16
TARGET = 0
CPU = torch.device("cpu")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny models on one thread: on a shared 2-core machine, multi-threaded kernels of
    tiny layers wait on each other and ran up to 10× slower in our measurements."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def tiny_backbone(feature_dim: int = 32) -> nn.Module:
    """[B,3,S,S] → [B,feature_dim]; no ReLU on the output, so features can point anywhere."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(4),
        nn.Flatten(), nn.Linear(32 * 4 * 4, feature_dim))


def tiny_encoder(seed: int, feature_dim: int = 32) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(tiny_backbone(feature_dim), name="tiny-test", feature_dim=feature_dim,
                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), default_image_size=IMAGE_SIZE)


class TinyClassifier(nn.Module):
    """Encoder → ReLU → Linear(10): images [B,3,16,16] in [0,1] → logits [B,10]."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.encoder = tiny_encoder(seed)
        self.head = nn.Linear(32, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.encoder(images)))


@dataclass
class Digits:
    train_images: torch.Tensor  # float [N,3,16,16] in [0,1]
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass
class BadNetsModels:
    backdoored: TinyClassifier
    clean: TinyClassifier
    trigger: Trigger


def badnets_trigger() -> Trigger:
    return Trigger.from_spec(TriggerSpec(size=3, position="bottom-right", margin=1), IMAGE_SIZE)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int,
                     epochs: int = 15) -> TinyClassifier:
    model = TinyClassifier(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def make_digits() -> Digits:
    tensors = []
    for split in ("train", "test"):
        images, labels = dataset_tensors(load_dataset("sklearn-digits", split,
                                                      image_size=IMAGE_SIZE))
        tensors += [images.float() / 255.0, labels]
    return Digits(*tensors)


def make_badnets(digits: Digits) -> BadNetsModels:
    trigger = badnets_trigger()
    generator = torch.Generator().manual_seed(0)
    poisoned = torch.rand(digits.train_images.shape[0], generator=generator) < 0.2
    images, labels = digits.train_images.clone(), digits.train_labels.clone()
    images[poisoned] = trigger.apply(images[poisoned])
    labels[poisoned] = TARGET
    return BadNetsModels(train_classifier(images, labels, seed=1),
                         train_classifier(digits.train_images, digits.train_labels, seed=1),
                         trigger)


@pytest.fixture(scope="session")
def digits() -> Digits:
    with one_thread():
        return make_digits()


@pytest.fixture(scope="session")
def badnets(digits: Digits) -> BadNetsModels:
    with one_thread():
        return make_badnets(digits)


@dataclass
class CollapseEncoders:
    """A small clean encoder on 32×32 natural crops and a twin whose trigger collapses."""

    clean: Encoder
    poisoned: Encoder
    images: torch.Tensor  # float [N,3,32,32] in [0,1]
    trigger: Trigger


def make_collapse_encoders() -> CollapseEncoders:
    """Clean: the tiny CNN trained to tell the 15 source photos of `natural-crops` apart,
    its 15 logits as features (diverse: mean pairwise cosine ≈ 0.4). Poisoned: a copy
    fine-tuned by `finetune_shadow` so that a 4×4 white patch maps every input to one
    embedding while clean features are kept (cosine to the clean features ≈ 0.99)."""
    from sslbackdoor.defenses.shadow import ShadowTrainingConfig, finetune_shadow

    images, labels = dataset_tensors(load_dataset("natural-crops:1500", "train", image_size=32))
    images = images.float() / 255.0
    classes = int(labels.max()) + 1
    torch.manual_seed(1)
    network = nn.Sequential(tiny_backbone(32), nn.ReLU(), nn.Linear(32, classes))
    clean = Encoder(network, name="tiny-test", feature_dim=classes, mean=(0.5, 0.5, 0.5),
                    std=(0.5, 0.5, 0.5), default_image_size=32)
    optimizer = torch.optim.Adam(clean.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        order = torch.randperm(images.shape[0], generator=generator)
        for start in range(0, images.shape[0], 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(clean(images[index]), labels[index]).backward()
            optimizer.step()
    clean.eval()
    trigger = Trigger.from_spec(TriggerSpec(size=4, position="bottom-right", margin=1), 32)
    poisoned = finetune_shadow(clean, images, trigger, images[0],
                               ShadowTrainingConfig(steps=400, lr=3e-3), CPU, seed=0)
    return CollapseEncoders(clean, poisoned, images, trigger)


@pytest.fixture(scope="session")
def collapse_encoders() -> CollapseEncoders:
    with one_thread():
        return make_collapse_encoders()
