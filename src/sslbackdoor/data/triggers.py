"""Backdoor triggers as data: a mask and a pattern applied to raw pixels.

A trigger is applied *before* normalisation, on images in [0, 1]:

    x' = (1 - m) ⊙ x + m ⊙ p

where m ∈ [0,1]^{1×H×W} is the mask (1 inside a replaced patch, α for a blended one) and
p ∈ [0,1]^{3×H×W} the pattern. The BadEncoder reference trigger (a 10×10 white square at
rows/cols 21–30 of a 32×32 image, pixel replacement) is `TriggerSpec(size=10,
position="bottom-right", margin=1)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbackdoor.data.images import read_rgb_image
from sslbackdoor.errors import UserInputError

Position = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"]


class TriggerSpec(BaseModel):
    """Declarative description of a square patch trigger.

    `size` and `margin` are in pixels of the image the trigger is applied to; `row`/`col`
    (top-left corner) override `position` when both are given.
    """

    model_config = ConfigDict(extra="forbid")

    size: int = Field(10, ge=1, description="side of the square patch in pixels")
    position: Position = "bottom-right"
    margin: int = Field(1, ge=0, description="gap to the image border for corner positions")
    row: int | None = Field(None, ge=0)
    col: int | None = Field(None, ge=0)
    pattern: Literal["white", "black", "random", "checkerboard", "image"] = "white"
    image: Path | None = Field(None, description="pattern image file when pattern='image'")
    mode: Literal["replace", "blend"] = "replace"
    alpha: float = Field(1.0, gt=0.0, le=1.0, description="mask value for mode='blend'")
    seed: int = Field(0, description="seed of the random pattern")

    @model_validator(mode="after")
    def _check(self) -> TriggerSpec:
        if self.pattern == "image" and self.image is None:
            raise ValueError("pattern='image' needs `image: PATH`")
        if (self.row is None) != (self.col is None):
            raise ValueError("give both `row` and `col`, or neither")
        return self


class Trigger:
    """A concrete trigger for one image size.

    Attributes:
        mask: float tensor [1, H, W] in [0, 1].
        pattern: float tensor [3, H, W] in [0, 1].
    """

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        if mask.dim() != 3 or mask.shape[0] != 1:
            raise UserInputError(f"trigger mask must be [1,H,W], got {tuple(mask.shape)}")
        if pattern.shape != (3, *mask.shape[1:]):
            raise UserInputError(f"trigger pattern must be [3,H,W] matching the mask "
                                 f"{tuple(mask.shape)}, got {tuple(pattern.shape)}")
        self.mask = mask.float().clamp(0, 1)
        self.pattern = pattern.float().clamp(0, 1)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.mask.shape[1]), int(self.mask.shape[2])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on float images [B,3,H,W] (or [3,H,W]) in [0,1]."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise UserInputError(f"trigger is for {self.image_size[0]}×{self.image_size[1]} "
                                 f"images but got {images.shape[-2]}×{images.shape[-1]}")
        mask = self.mask.to(images.device, images.dtype)
        pattern = self.pattern.to(images.device, images.dtype)
        return images * (1 - mask) + pattern * mask

    def apply_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on uint8 images, returning uint8 (exact for replace triggers)."""
        stamped = self.apply(images.float() / 255.0)
        return (stamped * 255.0).round().clamp(0, 255).to(torch.uint8)

    def area_fraction(self) -> float:
        return float(self.mask.mean())

    @classmethod
    def from_spec(cls, spec: TriggerSpec, image_size: int | tuple[int, int]) -> Trigger:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        row, col = _top_left(spec, height, width)
        mask = torch.zeros(1, height, width)
        mask[:, row:row + spec.size, col:col + spec.size] = spec.alpha if spec.mode == "blend" else 1.0
        pattern = torch.zeros(3, height, width)
        pattern[:, row:row + spec.size, col:col + spec.size] = patch_pattern(spec)
        return cls(mask, pattern)

    @classmethod
    def from_reference_npz(cls, path: Path) -> Trigger:
        """Load the BadEncoder reference code's trigger file (keys `t`, `tm`).

        `t` is float 1×H×W×3 in [0,255] (the pattern inside the patch, 0 outside); `tm`
        is 1 outside the patch and 0 inside; the reference applies `x·tm + t` to uint8.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                t, tm = np.asarray(data["t"], dtype=np.float64), np.asarray(data["tm"], dtype=np.float64)
        except FileNotFoundError:
            raise UserInputError(f"trigger file not found: {path}") from None
        except (KeyError, ValueError, OSError) as exc:
            raise UserInputError(f"{path} is not a reference trigger .npz with keys 't' and "
                                 f"'tm' ({exc})") from None
        if t.shape != tm.shape or t.ndim != 4 or t.shape[0] != 1 or t.shape[3] != 3:
            raise UserInputError(f"{path}: expected 't' and 'tm' of shape 1×H×W×3, got "
                                 f"{t.shape} and {tm.shape}")
        mask = torch.from_numpy(1.0 - tm[0, :, :, :1]).permute(2, 0, 1)
        pattern = torch.from_numpy(t[0] / 255.0).permute(2, 0, 1)
        return cls(mask.float(), pattern.float())


def _top_left(spec: TriggerSpec, height: int, width: int) -> tuple[int, int]:
    if spec.size > min(height, width):
        raise UserInputError(f"trigger size {spec.size} is larger than the {height}×{width} "
                             f"image; valid sizes are 1..{min(height, width)}")
    if spec.row is not None and spec.col is not None:
        row, col = spec.row, spec.col
    else:
        far_row = height - spec.size - spec.margin
        far_col = width - spec.size - spec.margin
        row, col = {
            "bottom-right": (far_row, far_col),
            "bottom-left": (far_row, spec.margin),
            "top-right": (spec.margin, far_col),
            "top-left": (spec.margin, spec.margin),
            "center": ((height - spec.size) // 2, (width - spec.size) // 2),
        }[spec.position]
    if row < 0 or col < 0 or row + spec.size > height or col + spec.size > width:
        raise UserInputError(f"a {spec.size}px trigger at row {row}, col {col} does not fit a "
                             f"{height}×{width} image; reduce size or margin")
    return row, col


def patch_pattern(spec: TriggerSpec) -> torch.Tensor:
    """The trigger patch itself: float [3,size,size] in [0,1]."""
    size = spec.size
    if spec.pattern == "white":
        return torch.ones(3, size, size)
    if spec.pattern == "black":
        return torch.zeros(3, size, size)
    if spec.pattern == "random":
        generator = torch.Generator().manual_seed(spec.seed)
        return (torch.rand(3, size, size, generator=generator) > 0.5).float()
    if spec.pattern == "checkerboard":
        idx = torch.arange(size)
        board = ((idx[:, None] + idx[None, :]) % 2).float()
        return board.expand(3, size, size).clone()
    assert spec.image is not None
    img = read_rgb_image(spec.image, "trigger image").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
