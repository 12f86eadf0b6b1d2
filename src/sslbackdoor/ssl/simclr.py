"""SimCLR (Chen et al. 2020) as BadEncoder pre-trains its CIFAR10/STL10 encoders.

* `nt_xent_loss`: the NT-Xent loss, a pure function on projections [2N,D] whose rows i and
  i+N are the two views of one image (temperature 0.5 in BadEncoder).
* `projection_head`: Linear(d,512,no bias)-BN-ReLU-Linear(512,128).
* `SimCLRViews`: the augmentation RandomResizedCrop(S) → flip → ColorJitter(0.4,0.4,0.4,0.1)
  p=0.8 → grayscale p=0.2, applied to a whole batch at once. Random parameters are drawn
  first (`sample`) and applied second (`apply`), so that processes of a distributed run
  draw the parameters of the global batch and each applies its own slice — exactly the
  views a single process would make.

Differences from torchvision's per-image transforms, by design: the crop is resampled
bilinearly with `grid_sample` (no antialiasing when a crop is shrunk, which at 32 px is
rare since crops are mostly enlarged); everything else matches torchvision's formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslbackdoor.models.encoders import Encoder

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def nt_xent_loss(projections: torch.Tensor, temperature: float = 0.5,
                 anchors: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent: mean over anchor rows i of −log(exp(s_ip/τ) / Σ_{k≠i} exp(s_ik/τ)).

    Args:
        projections: [2N,D]; rows i and i+N are positives, every other row a negative;
            rows are L2-normalised here (s = cosine similarity).
        temperature: τ.
        anchors: optional int64 [M] row indices to average over (default: all 2N rows).
            A distributed process passes its own rows, so that the mean over processes of
            their losses is the single-process loss.
    Returns:
        scalar float32 loss.
    """
    z = F.normalize(projections.float(), dim=1)
    total = z.shape[0]
    if total % 2:
        raise ValueError(f"NT-Xent needs an even number of rows (two views), got {total}")
    rows = torch.arange(total, device=z.device) if anchors is None else anchors.to(z.device)
    logits = (z[rows] @ z.T) / temperature  # [M, 2N]
    own = torch.zeros_like(logits, dtype=torch.bool)
    own[torch.arange(rows.numel(), device=z.device), rows] = True
    logits = logits.masked_fill(own, float("-inf"))
    return F.cross_entropy(logits, (rows + total // 2) % total)


def projection_head(feature_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> nn.Module:
    """SimCLR's MLP head g: [B,feature_dim] → [B,out_dim]."""
    return nn.Sequential(nn.Linear(feature_dim, hidden_dim, bias=False),
                         nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class SimCLRModel(nn.Module):
    """Encoder f plus projection head g: forward(images [B,3,H,W] in [0,1]) → z [B,out]."""

    def __init__(self, encoder: Encoder, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = projection_head(encoder.feature_dim, hidden_dim, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images).float())


class AugmentConfig(BaseModel):
    """SimCLR augmentation; defaults are BadEncoder's pre-training transform."""

    model_config = ConfigDict(extra="forbid")

    crop_scale: tuple[float, float] = Field((0.08, 1.0), description="area fraction range")
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="aspect ratio range")
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter: tuple[float, float, float, float] = Field(
        (0.4, 0.4, 0.4, 0.1), description="brightness, contrast, saturation, hue")
    jitter_p: float = Field(0.8, ge=0, le=1)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    localized_crop: bool = Field(False, description="CorruptEncoder's defense: view 2 is "
                                                    "cropped inside view 1 enlarged by 20%")


@dataclass
class ViewParams:
    """Random parameters of B views (all CPU tensors).

    boxes: float [B,4] crop (top, left, height, width) in pixels of the source image;
    flip, jitter, gray: bool [B]; factors: float [B,4] (brightness, contrast, saturation,
    hue); order: int64 [B,4], a permutation of the four jitter operations per view.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor

    def __getitem__(self, index: slice | torch.Tensor) -> ViewParams:
        return ViewParams(self.boxes[index], self.flip[index], self.jitter[index],
                          self.factors[index], self.order[index], self.gray[index])


def crop_boxes(count: int, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop.get_params for `count` images at once → float [count,4] boxes.

    Ten tries per image as torchvision; images with no valid try get the central crop
    with the ratio clamped to `ratio`.
    """
    tries = 10
    area = height * width * torch.empty(count, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                   generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(valid.int(), dim=1)  # index of the first valid try
    h = h.gather(1, first[:, None])[:, 0]
    w = w.gather(1, first[:, None])[:, 0]
    top = torch.floor(torch.rand(count, generator=generator) * (height - h + 1))
    left = torch.floor(torch.rand(count, generator=generator) * (width - w + 1))
    boxes = torch.stack([top, left, h, w], dim=1)
    fallback = ~valid.any(dim=1)
    if fallback.any():
        boxes[fallback] = _central_box(height, width, ratio)
    return boxes


def localized_boxes(first: torch.Tensor, height: int, width: int, scale: tuple[float, float],
                    ratio: tuple[float, float], generator: torch.Generator,
                    enlarge: float = 0.2) -> torch.Tensor:
    """Boxes [B,4] for second views inside the first views' boxes [B,4] enlarged by
    `enlarge` of their size per side (clipped to the image): CorruptEncoder's localized
    cropping, batched. Area ≥ scale[0] of the
    image, aspect in `ratio`; after ten failed tries the second box is the first."""
    top, left, h, w = first.unbind(1)
    region_top = (top - torch.round(enlarge * h)).clamp(min=0)
    region_left = (left - torch.round(enlarge * w)).clamp(min=0)
    region_h = (top + h + torch.round(enlarge * h)).clamp(max=height) - region_top
    region_w = (left + w + torch.round(enlarge * w)).clamp(max=width) - region_left
    count, tries = first.shape[0], 10
    area = height * width * torch.empty(count, tries).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(count, tries).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    crop_w, crop_h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    valid = ((crop_h > 0) & (crop_h <= region_h[:, None]) & (crop_w > 0)
             & (crop_w <= region_w[:, None]))
    pick = torch.argmax(valid.int(), dim=1)[:, None]
    crop_h, crop_w = crop_h.gather(1, pick)[:, 0], crop_w.gather(1, pick)[:, 0]
    crop_top = region_top + torch.floor(torch.rand(count, generator=generator)
                                        * (region_h - crop_h + 1))
    crop_left = region_left + torch.floor(torch.rand(count, generator=generator)
                                          * (region_w - crop_w + 1))
    second = torch.stack([crop_top, crop_left, crop_h, crop_w], dim=1)
    return torch.where(valid.any(dim=1, keepdim=True), second, first)


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> torch.Tensor:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return torch.tensor([(height - h) // 2, (width - w) // 2, h, w], dtype=torch.float32)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor,
                 size: int) -> torch.Tensor:
    """Crop boxes [B,4] of float images [B,3,H,W], resize to size×size (bilinear) and
    mirror where flip [B] is set → [B,3,size,size]."""
    height, width = images.shape[-2:]
    boxes = boxes.to(images.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    sign = 1.0 - 2.0 * flip.to(images.device, torch.float32)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [images.shape[0], 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of [B,3,H,W] → [B,1,H,W] (torchvision's weights)."""
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor·images + (1−factor)·other, clamped to [0,1]; factor [B]."""
    ratio = factor.view(-1, 1, 1, 1)
    return (ratio * images + (1 - ratio) * other).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [B,3,H,W] by factor [B] turns (in [-0.5, 0.5])."""
    # A grey image (R=G=B everywhere) has saturation 0 and keeps its pixels exactly.
    colour = (images.amax(1) != images.amin(1)).flatten(1).any(1)
    if not bool(colour.any()):
        return images
    out = images.clone()
    hsv = rgb_to_hsv(images[colour])
    hue = (hsv[:, 0] + factor[colour].view(-1, 1, 1)) % 1.0
    out[colour] = hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1))
    return out


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] RGB in [0,1] → HSV with hue in [0,1) (torchvision's formulas)."""
    r, g, b = images.unbind(1)
    maxc, minc = images.amax(1), images.amin(1)
    equal = maxc == minc
    ones = torch.ones_like(maxc)
    saturation = (maxc - minc) / torch.where(equal, ones, maxc)
    span = torch.where(equal, ones, maxc - minc)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    hue = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack([hue, saturation, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] HSV (hue in [0,1)) → RGB in [0,1].

    Channel n ∈ (5, 3, 1) for (R, G, B) is V − V·S·clamp(min(k, 4−k), 0, 1) with
    k = (n + 6·hue) mod 6: the sector formula without a per-pixel gather (2× faster).
    """
    hue, saturation, value = hsv.unbind(1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=hsv.device).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    value, saturation = value.unsqueeze(1), saturation.unsqueeze(1)
    return (value - value * saturation * ramp).clamp_(0, 1)


BLEND_OPS = (adjust_brightness, adjust_contrast, adjust_saturation)  # jitter ops 0, 1, 2
HUE = 3


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 active: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-image factors [B,4] (brightness, contrast, saturation, hue)
    applied in per-image order [B,4] to the images where active [B] is set; float
    [B,3,H,W] → same.

    The three blend operations run on the whole batch with factor 1 (exactly the
    identity) for images not due for them at a position; only hue works on a subset.
    """
    factors, order, active = (t.to(images.device) for t in (factors, order, active))
    out = images
    for position in range(4):
        due = torch.where(active, order[:, position], -1)
        for op_index, op in enumerate(BLEND_OPS):
            chosen = due == op_index
            if bool(chosen.any()):
                out = op(out, torch.where(chosen, factors[:, op_index], 1.0))
        rows = torch.nonzero(due == HUE).flatten()
        if rows.numel():
            out = out.index_copy(0, rows, adjust_hue(out[rows], factors[rows, HUE]))
    return out


class SimCLRViews:
    """Batched SimCLR views of uint8 or float [B,3,H,W] images → float [B,3,S,S] in [0,1]."""

    def __init__(self, image_size: int, config: AugmentConfig | None = None) -> None:
        self.image_size = image_size
        self.config = config or AugmentConfig()

    def sample(self, count: int, height: int, width: int,
               generator: torch.Generator) -> ViewParams:
        """Draw the random parameters of `count` views of height×width images."""
        c = self.config
        boxes = crop_boxes(count, height, width, c.crop_scale, c.crop_ratio, generator)
        flip = torch.rand(count, generator=generator) < c.flip_p
        jitter = torch.rand(count, generator=generator) < c.jitter_p
        low = torch.tensor([max(0.0, 1 - s) for s in c.jitter[:3]] + [-c.jitter[3]])
        high = torch.tensor([1 + s for s in c.jitter[:3]] + [c.jitter[3]])
        factors = low + (high - low) * torch.rand(count, 4, generator=generator)
        order = torch.argsort(torch.rand(count, 4, generator=generator), dim=1)
        gray = torch.rand(count, generator=generator) < c.grayscale_p
        return ViewParams(boxes, flip, jitter, factors, order, gray)

    def sample_pairs(self, count: int, height: int, width: int,
                     generator: torch.Generator) -> ViewParams:
        """Parameters of 2·count views: rows i and count+i are the two views of image i
        (with `localized_crop`, the second box lies near the first)."""
        params = self.sample(2 * count, height, width, generator)
        if self.config.localized_crop:
            c = self.config
            params.boxes[count:] = localized_boxes(params.boxes[:count], height, width,
                                                   c.crop_scale, c.crop_ratio, generator)
        return params

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Views of images [B,3,H,W] (uint8, or float in [0,1]) with params of B views."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        out = resized_crop(images.contiguous(), params.boxes, params.flip, self.image_size)
        out = color_jitter(out, params.factors, params.order, params.jitter)
        gray = params.gray.to(out.device)
        if bool(gray.any()):
            out[gray] = grayscale(out[gray]).expand(-1, 3, -1, -1)
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        params = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)
