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


Box = tuple[int, int, int, int]  # top, left, height, width


def localized_crop_boxes(height: int, width: int, *, scale: tuple[float, float] = (0.2, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), enlarge: float = 0.2,
                         tries: int = 10) -> tuple[Box, Box]:
    """The two crop boxes of CorruptEncoder's localized cropping defense.

    View 1 is an ordinary RandomResizedCrop box (torchvision's own `get_params`, so its
    fallback behaviour matches). View 2 must lie inside view 1 enlarged by `enlarge` of its
    size on each side (clipped to the image), with area ≥ scale[0] of the image and aspect
    in `ratio`; after `tries` failures view 2 is view 1. Uses torch's global RNG.
    """
    probe = torch.empty(1, height, width)
    top, left, box_h, box_w = v2.RandomResizedCrop.get_params(probe, list(scale), list(ratio))
    first = (top, left, box_h, box_w)
    region_top = max(0, top - round(enlarge * box_h))
    region_left = max(0, left - round(enlarge * box_w))
    region_h = min(height, top + box_h + round(enlarge * box_h)) - region_top
    region_w = min(width, left + box_w + round(enlarge * box_w)) - region_left
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(tries):
        area = height * width * float(torch.empty(1).uniform_(scale[0], scale[1]))
        aspect = float(torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]))))
        crop_w, crop_h = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if 0 < crop_h <= region_h and 0 < crop_w <= region_w:
            crop_top = region_top + int(torch.randint(0, region_h - crop_h + 1, (1,)))
            crop_left = region_left + int(torch.randint(0, region_w - crop_w + 1, (1,)))
            return first, (crop_top, crop_left, crop_h, crop_w)
    return first, first
