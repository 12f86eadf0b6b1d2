"""BadEncoder's augmentation of reference inputs, drawn per image, applied to a batch at once.

The augmentation (`data.augment.reference_augmentation`): horizontal flip p=0.5; with
p=0.8 ColorJitter(0.4, 0.4, 0.4, 0.1), i.e. brightness, contrast and saturation factors
uniform in [0.6, 1.4] and a hue shift uniform in [−0.1, 0.1], applied in a random order;
grayscale p=0.2. `augment_each` runs torchvision's transforms image by image in Python:
128 images of 32 px took 1.9–3.5 s on the 2-core CPU (measured under load), more than an
encoder step, and the reference code's L1 needs one augmented reference per shadow image
every step (`BadEncoderConfig.reference_augmentations`). Here every image still gets its own
draw, and the same formulas as torchvision's (blend and clamp, ITU-R 601-2 luma, a hue
rotation in HSV) run on the whole batch with per-image factors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

FLIP_P, JITTER_P, GRAY_P = 0.5, 0.8, 0.2
STRENGTH, HUE = 0.4, 0.1
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


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
    for position in range(4):
        for operation, function in enumerate(OPERATIONS):
            chosen = (draw.jitter & (draw.order[:, position] == operation)).to(images.device)
            if bool(chosen.any()):
                out[chosen] = function(out[chosen], draw.factors[:, operation].to(images.device)[chosen])
    return torch.where(_per_image(draw.gray, images), grayscale(out).expand_as(out), out)


def _per_image(flags: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return flags.to(images.device).view(-1, 1, 1, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma [B,1,H,W] of RGB images [B,3,H,W]."""
    red, green, blue = images.unbind(dim=1)
    return (LUMA[0] * red + LUMA[1] * green + LUMA[2] * blue).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    ratio = factors.view(-1, 1, 1, 1)
    return (ratio * images + (1 - ratio) * other).clamp(0, 1)


def brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factors)


def contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factors)


def saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factors)


def hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by its shift (a fraction of the colour circle)."""
    h, s, v = rgb_to_hsv(images).unbind(dim=1)
    return hsv_to_rgb(torch.stack([(h + shifts.view(-1, 1, 1)) % 1.0, s, v], dim=1))


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB in [0,1] → HSV with hue in [0,1) (Pillow's and torchvision's formula)."""
    red, green, blue = images.unbind(dim=1)
    low, high = torch.aminmax(images, dim=1)
    grey = high == low  # hue and saturation are 0 where all channels are equal
    span = high - low
    s = span / torch.where(grey, torch.ones_like(high), high)
    divisor = torch.where(grey, torch.ones_like(span), span)
    rc, gc, bc = (high - red) / divisor, (high - green) / divisor, (high - blue) / divisor
    h = torch.where(high == red, bc - gc, torch.where(high == green, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(grey, torch.zeros_like(h), h)
    return torch.stack([(h / 6.0 + 1.0) % 1.0, s, high], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = images.unbind(dim=1)
    sector = torch.floor(h * 6)
    fraction = h * 6 - sector
    sector = sector.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * fraction)).clamp(0, 1)
    t = (v * (1 - s * (1 - fraction))).clamp(0, 1)
    candidates = torch.stack([v, p, q, t], dim=1)  # [B,4,H,W]
    # for each sector, which of (v, p, q, t) is red, green, blue
    select = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]],
                          device=images.device)
    index = select[:, sector].movedim(0, 1)  # [B,3,H,W]
    return candidates.gather(1, index)


OPERATIONS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    brightness, contrast, saturation, hue)
