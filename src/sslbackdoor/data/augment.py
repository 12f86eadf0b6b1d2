"""Augmentations on float image tensors in [0, 1] (applied before normalisation)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def reference_augmentation() -> v2.Compose:
    """BadEncoder's augmentation of reference inputs in L1 (no crop): flip p=0.5,
    ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2."""
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ])


def augment_each(images: torch.Tensor, transform: v2.Compose) -> torch.Tensor:
    """Apply `transform` independently to every image of [B,3,H,W] (fresh randomness each)."""
    return torch.stack([transform(image) for image in images])

