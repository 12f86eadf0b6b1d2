"""SimCLR (Chen et al. 2020) as BadEncoder pre-trains its CIFAR10/STL10 encoders.

* `nt_xent_loss`: the NT-Xent loss, a pure function on projections [2N,D] whose rows i and
  i+N are the two views of one image (temperature 0.5 in BadEncoder).
* `projection_head`: Linear(d,512,no bias)-BN-ReLU-Linear(512,128); without BatchNorm
  (`batch_norm=False`) it is MoCo v2's Linear(d,512)-ReLU-Linear(512,128).
* `SimCLRViews`: the augmentation RandomResizedCrop(S) → flip → ColorJitter(0.4,0.4,0.4,0.1)
  p=0.8 → grayscale p=0.2 (→ Gaussian blur σ∈[0.1,2] with `blur_p`, MoCo v2's aug-plus),
  applied to a whole batch at once. Crops are drawn from each image's own size: a batch
  may be a uint8 tensor of equal-sized images or `NativeImages` of any sizes, whose views
  are cut from the native image and only then resized to S, as torchvision does. Random parameters are drawn
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
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from torch import nn
from torchvision.ops import roi_align

from sslbackdoor.data.native import NativeImages
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


def projection_head(feature_dim: int, hidden_dim: int = 512, out_dim: int = 128,
                    batch_norm: bool = True) -> nn.Module:
    """The MLP head g: [B,feature_dim] → [B,out_dim]; SimCLR's with BatchNorm, MoCo v2's
    (Linear with bias, ReLU, Linear) without."""
    if not batch_norm:
        return nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                             nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(nn.Linear(feature_dim, hidden_dim, bias=False),
                         nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class SimCLRModel(nn.Module):
    """Encoder f plus projection head g: forward(images [B,3,H,W] in [0,1]) → z [B,out]."""

    def __init__(self, encoder: Encoder, hidden_dim: int = 512, out_dim: int = 128,
                 head_batch_norm: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = projection_head(encoder.feature_dim, hidden_dim, out_dim, head_batch_norm)

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
    blur_p: float = Field(0.0, ge=0, le=1, description="Gaussian blur probability (MoCo v2 "
                                                       "aug-plus: 0.5)")
    blur_sigma: tuple[float, float] = Field((0.1, 2.0), description="blur σ range in pixels "
                                                                    "of the view")

    @model_serializer(mode="wrap")
    def _omit_unused_blur(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Configs without blur dump (and so hash) exactly as before blur existed: cached and
        # shipped encoders keep their keys.
        data: dict[str, object] = handler(self)
        if self.blur_p == 0 and tuple(self.blur_sigma) == (0.1, 2.0):
            data.pop("blur_p", None)
            data.pop("blur_sigma", None)
        return data


@dataclass
class ViewParams:
    """Random parameters of B views (all CPU tensors).

    boxes: float [B,4] crop (top, left, height, width) in pixels of the source image;
    flip, jitter, gray: bool [B]; factors: float [B,4] (brightness, contrast, saturation,
    hue); order: int64 [B,4], a permutation of the four jitter operations per view;
    blur: float [B] Gaussian σ in view pixels, 0 for no blur (None: no view is blurred).
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor | None = None

    def __getitem__(self, index: slice | torch.Tensor) -> ViewParams:
        return ViewParams(self.boxes[index], self.flip[index], self.jitter[index],
                          self.factors[index], self.order[index], self.gray[index],
                          None if self.blur is None else self.blur[index])


ImageSize = int | torch.Tensor  # one size for every image, or float [B] per image


def crop_boxes(count: int, height: ImageSize, width: ImageSize, scale: tuple[float, float],
               ratio: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop.get_params for `count` images at once → float [count,4] boxes.

    height/width: the images' sizes (an int, or float [count] per image). Ten tries per
    image as torchvision; images with no valid try get the central crop with the ratio
    clamped to `ratio`.
    """
    tries = 10
    img_h, img_w = _per_image(height, count), _per_image(width, count)
    area = (img_h * img_w)[:, None] * torch.empty(count, tries).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                   generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    valid = (w > 0) & (w <= img_w[:, None]) & (h > 0) & (h <= img_h[:, None])
    first = torch.argmax(valid.int(), dim=1)  # index of the first valid try
    h = h.gather(1, first[:, None])[:, 0]
    w = w.gather(1, first[:, None])[:, 0]
    top = torch.floor(torch.rand(count, generator=generator) * (img_h - h + 1))
    left = torch.floor(torch.rand(count, generator=generator) * (img_w - w + 1))
    boxes = torch.stack([top, left, h, w], dim=1)
    fallback = ~valid.any(dim=1)
    if fallback.any():
        boxes[fallback] = _central_boxes(img_h[fallback], img_w[fallback], ratio)
    return boxes


def _per_image(size: ImageSize, count: int) -> torch.Tensor:
    return torch.as_tensor(size, dtype=torch.float32).expand(count).clone()


def localized_boxes(first: torch.Tensor, height: ImageSize, width: ImageSize,
                    scale: tuple[float, float], ratio: tuple[float, float],
                    generator: torch.Generator, enlarge: float = 0.2) -> torch.Tensor:
    """Boxes [B,4] for second views inside the first views' boxes [B,4] enlarged by
    `enlarge` of their size per side (margins truncated to whole pixels, clipped to the
    image): CorruptEncoder's localized cropping, batched, as the official loader. The area
    is uniform between the official minimum view area, scale[0] of the image, and the
    enlarged region's area; aspect in `ratio`; after ten failed tries the second box has
    the first box's size, at a random place in the region."""
    count, tries = first.shape[0], 10
    img_h, img_w = _per_image(height, count), _per_image(width, count)
    top, left, h, w = first.unbind(1)
    region_top = (top - torch.floor(enlarge * h)).clamp(min=0)
    region_left = (left - torch.floor(enlarge * w)).clamp(min=0)
    region_h = torch.minimum(top + h + torch.floor(enlarge * h), img_h) - region_top
    region_w = torch.minimum(left + w + torch.floor(enlarge * w), img_w) - region_left
    region_area = (region_h * region_w)[:, None]
    low = (scale[0] * img_h * img_w)[:, None] / region_area
    area = region_area * (low + (1 - low) * torch.rand(count, tries, generator=generator))
    aspect = torch.exp(torch.empty(count, tries).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    crop_w, crop_h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    valid = ((crop_h > 0) & (crop_h <= region_h[:, None]) & (crop_w > 0)
             & (crop_w <= region_w[:, None]))
    pick = torch.argmax(valid.int(), dim=1)[:, None]
    found = valid.any(dim=1)
    crop_h = torch.where(found, crop_h.gather(1, pick)[:, 0], h)
    crop_w = torch.where(found, crop_w.gather(1, pick)[:, 0], w)
    crop_top = region_top + torch.floor(torch.rand(count, generator=generator)
                                        * (region_h - crop_h + 1))
    crop_left = region_left + torch.floor(torch.rand(count, generator=generator)
                                          * (region_w - crop_w + 1))
    return torch.stack([crop_top, crop_left, crop_h, crop_w], dim=1)


def _central_boxes(height: torch.Tensor, width: torch.Tensor,
                   ratio: tuple[float, float]) -> torch.Tensor:
    """torchvision's fallback crop of images of sizes float [n] → boxes [n,4]."""
    in_ratio = width / height
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    w = torch.where(wide, torch.round(height * ratio[1]), width)
    h = torch.where(narrow, torch.round(width / ratio[0]), height)
    return torch.stack([torch.floor((height - h) / 2), torch.floor((width - w) / 2), h, w], dim=1)


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

    def sample(self, count: int, height: ImageSize, width: ImageSize,
               generator: torch.Generator) -> ViewParams:
        """Draw the random parameters of `count` views of height×width images (sizes: an
        int, or float [count] per image)."""
        c = self.config
        boxes = crop_boxes(count, height, width, c.crop_scale, c.crop_ratio, generator)
        flip = torch.rand(count, generator=generator) < c.flip_p
        jitter = torch.rand(count, generator=generator) < c.jitter_p
        low = torch.tensor([max(0.0, 1 - s) for s in c.jitter[:3]] + [-c.jitter[3]])
        high = torch.tensor([1 + s for s in c.jitter[:3]] + [c.jitter[3]])
        factors = low + (high - low) * torch.rand(count, 4, generator=generator)
        order = torch.argsort(torch.rand(count, 4, generator=generator), dim=1)
        gray = torch.rand(count, generator=generator) < c.grayscale_p
        blur = None
        if c.blur_p > 0:  # drawn only when used: configs without blur keep their views
            sigma = torch.empty(count).uniform_(*c.blur_sigma, generator=generator)
            blur = torch.where(torch.rand(count, generator=generator) < c.blur_p, sigma, 0.0)
        return ViewParams(boxes, flip, jitter, factors, order, gray, blur)

    def sample_pairs(self, count: int, height: ImageSize, width: ImageSize,
                     generator: torch.Generator) -> ViewParams:
        """Parameters of 2·count views: rows i and count+i are the two views of image i
        (with `localized_crop`, the second box lies near the first, and as the official
        loader the two views swap places with probability 0.5)."""
        if isinstance(height, torch.Tensor):
            height, width = height.repeat(2), torch.as_tensor(width).repeat(2)
        params = self.sample(2 * count, height, width, generator)
        if self.config.localized_crop:
            c = self.config
            own_h = height[:count] if isinstance(height, torch.Tensor) else height
            own_w = width[:count] if isinstance(width, torch.Tensor) else width
            second = localized_boxes(params.boxes[:count], own_h, own_w, c.crop_scale,
                                     c.crop_ratio, generator)
            swap = (torch.rand(count, generator=generator) < 0.5)[:, None]
            first = params.boxes[:count].clone()
            params.boxes[:count] = torch.where(swap, second, first)
            params.boxes[count:] = torch.where(swap, first, second)
        return params

    def apply(self, images: torch.Tensor | NativeImages, params: ViewParams) -> torch.Tensor:
        """Views of images [B,3,H,W] (uint8, or float in [0,1]) or of B `NativeImages`
        with params of B views."""
        if isinstance(images, NativeImages):
            out = native_resized_crop(images, params.boxes, params.flip, self.image_size)
        else:
            if images.dtype == torch.uint8:
                images = images.float().div_(255.0)
            out = resized_crop(images.contiguous(), params.boxes, params.flip, self.image_size)
        out = color_jitter(out, params.factors, params.order, params.jitter)
        gray = params.gray.to(out.device)
        if bool(gray.any()):
            out[gray] = grayscale(out[gray]).expand(-1, 3, -1, -1)
        if params.blur is not None and bool((params.blur > 0).any()):
            out = gaussian_blur(out, params.blur.to(out.device))
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        params = self.sample(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, params)


def native_resized_crop(images: NativeImages, boxes: torch.Tensor, flip: torch.Tensor,
                        size: int) -> torch.Tensor:
    """Views of B images of any sizes → float [B,3,size,size]: each crop box is cut from
    its native image, then resized, one batched `roi_align` per image size. Each output
    pixel averages ⌈crop/size⌉² bilinear samples of its cell: a crop that grows is sampled
    bilinearly (as `resized_crop`), one that shrinks is box-filtered rather than aliased
    (an aliased shrink would distort a small trigger); then mirrored where flip is set."""
    out = torch.empty(len(images), 3, size, size, device=images.device)
    boxes = boxes.to(torch.float32)
    for group, members in images.by_group():
        top, left, h, w = boxes[members].unbind(1)
        rois = torch.stack([images.rows[members].float(), left, top, left + w, top + h], dim=1)
        views = roi_align(group.float().div_(255.0), rois.to(group.device), output_size=size,
                          spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        out[members.to(out.device)] = views
    mirrored = flip.to(out.device)
    if bool(mirrored.any()):
        out[mirrored] = out[mirrored].flip(-1)
    return out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur float [B,3,H,W] with a separable Gaussian of σ [B] per image (0: unchanged),
    edges replicated; the kernel reaches 3σ of the largest σ."""
    radius = max(1, math.ceil(3 * float(sigma.max())))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe = sigma.clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (taps[None] / safe) ** 2)
    kernel = torch.where((sigma > 0)[:, None], kernel, (taps == 0).to(images.dtype)[None])
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # [3B,taps]
    batch, channels, height, width = images.shape
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"),
                    kernel[:, None, None, :], groups=batch * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"),
                    kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)
