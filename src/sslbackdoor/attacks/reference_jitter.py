"""BadEncoder's augmentation of reference inputs, drawn per image, applied to a batch at once.

The augmentation (`data.augment.reference_augmentation`): horizontal flip p=0.5; with
p=0.8 ColorJitter(0.4, 0.4, 0.4, 0.1), i.e. brightness, contrast and saturation factors
uniform in [0.6, 1.4] and a hue shift uniform in [−0.1, 0.1], applied in a random order;
grayscale p=0.2. `augment_each` runs torchvision's transforms image by image in Python:
128 images of 32 px took 1.9–3.5 s on the 2-core CPU (measured under load), more than an
encoder step, and the reference code's L1 needs one augmented reference per shadow image
every step (`BadEncoderConfig.reference_augmentations`). Here every image still gets its own
draw, and the same formulas as torchvision's (blend and clamp, ITU-R 601-2 luma, a hue
rotation in HSV) run on the whole batch with per-image factors, through the SimCLR views'
own batched ColorJitter (`ssl.simclr.color_jitter`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslbackdoor.ssl.simclr import color_jitter, grayscale

FLIP_P, JITTER_P, GRAY_P = 0.5, 0.8, 0.2
STRENGTH, HUE = 0.4, 0.1


@dataclass
class JitterDraw:
    """Per-image random choices for a batch of B images."""

    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B] bool: ColorJitter applied at all
    order: torch.Tensor  # [B,4] a permutation of 0..3 (brightness, contrast, saturation, hue)
    factors: torch.Tensor  # [B,4] brightness, contrast, saturation factors, hue shift
    gray: torch.Tensor  # [B] bool


def draw_jitter(count: int, generator: torch.Generator | None = None) -> JitterDraw:
    """Independent draws for `count` images (torch's global RNG unless `generator`)."""
    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    flip = torch.rand(count, generator=generator) < FLIP_P
    jitter = torch.rand(count, generator=generator) < JITTER_P
    order = torch.argsort(torch.rand(count, 4, generator=generator), dim=1)
    factors = torch.stack([uniform(1 - STRENGTH, 1 + STRENGTH) for _ in range(3)]
                          + [uniform(-HUE, HUE)], dim=1)
    gray = torch.rand(count, generator=generator) < GRAY_P
    return JitterDraw(flip, jitter, order, factors, gray)


def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images [B,3,H,W] float in [0,1], each with its own random augmentation."""
    return apply_jitter(images, draw_jitter(images.shape[0], generator))


def apply_jitter(images: torch.Tensor, draw: JitterDraw) -> torch.Tensor:
    """Flip, then the jitter operations in each image's drawn order, then grayscale."""
    out = torch.where(_per_image(draw.flip, images), images.flip(-1), images)
    out = color_jitter(out, draw.factors, draw.order, draw.jitter)
    return torch.where(_per_image(draw.gray, images), grayscale(out).expand_as(out), out)


def _per_image(flags: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return flags.to(images.device).view(-1, 1, 1, 1)
