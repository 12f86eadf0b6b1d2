"""The data-poisoning baselines CorruptEncoder is compared with.

* SSL-Backdoor (Saha et al., CVPR 2022): a trigger patch pasted at a random position in the
  central band of target-class images.
* PoisonedEncoder (Liu et al., USENIX Security 2022) as a backdoor: a triggered random
  (background) image concatenated side by side with a reference image.
* CTRL (Li et al., ICCV 2023): an invisible frequency-domain trigger — in YUV space, add
  `magnitude` (100, CTRL's own default) to two DCT coefficients of the U and V channels in
  every `window`×`window` block — on target-class images.

Every poison is written at its images' native resolution (no square resize: pre-training
cuts its views from it as it is); each writes PNGs and a manifest in the same format as
`corruptencoder.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.fft import dctn, idctn

from sslbackdoor.attacks.corruptencoder import (
    PoisonRecord,
    read_rgb,
    resize_rgb,
    save_png,
    write_manifest,
)
from sslbackdoor.errors import UserInputError

# ITU-R BT.601 RGB ↔ YUV.
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.14713, -0.28886, 0.436],
                       [0.615, -0.51499, -0.10001]])
YUV_TO_RGB = np.linalg.inv(RGB_TO_YUV)


class BaselineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["ssl-backdoor", "poisonedencoder", "ctrl"]
    count: int = Field(..., ge=1)
    seed: int = 0
    ctrl_magnitude: float = Field(100.0, gt=0, description="CTRL: added DCT magnitude (0–255 "
                                                            "scale; 100 in CTRL's code)")
    ctrl_window: int = Field(32, ge=4, description="CTRL: DCT block size")
    ctrl_positions: list[tuple[int, int]] = Field(default=[(15, 15), (31, 31)],
                                                  description="CTRL: coefficient indices per block")


def paste_central(image: np.ndarray, trigger: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Paste trigger [s,s,3] at a random place inside the central band [H/4, 3H/4]."""
    height, width = image.shape[:2]
    size = trigger.shape[0]
    if size > min(height, width):
        raise UserInputError(f"a {size}px trigger is larger than a {height}×{width} image")
    top = int(rng.integers(*_band(height, size)))
    left = int(rng.integers(*_band(width, size)))
    out = image.copy()
    out[top:top + size, left:left + size] = trigger
    return out, (left, top, size, size)


def _band(extent: int, size: int) -> tuple[int, int]:
    """[low, high) of top-left positions keeping the patch in the central half."""
    low, high = extent // 4, 3 * extent // 4 - size
    if high < low:  # the patch is wider than the band: centre it
        low = high = (extent - size) // 2
    return low, high + 1


def ctrl_trigger(image: np.ndarray, magnitude: float, window: int,
                 positions: list[tuple[int, int]]) -> np.ndarray:
    """CTRL's frequency trigger on uint8 [H,W,3]; blocks are min(window, H, W) square."""
    yuv = image.astype(np.float64) @ RGB_TO_YUV.T
    height, width = image.shape[:2]
    block = min(window, height, width)
    for channel in (1, 2):
        for top in range(0, height - block + 1, block):
            for left in range(0, width - block + 1, block):
                patch = dctn(yuv[top:top + block, left:left + block, channel], norm="ortho")
                for row, col in positions:
                    patch[min(row, block - 1), min(col, block - 1)] += magnitude
                yuv[top:top + block, left:left + block, channel] = idctn(patch, norm="ortho")
    return np.clip(np.round(yuv @ YUV_TO_RGB.T), 0, 255).astype(np.uint8)


def poisonedencoder_pair(reference: np.ndarray, background: np.ndarray, trigger: np.ndarray,
                         rng: np.random.Generator
                         ) -> tuple[np.ndarray, tuple[int, int, int, int], str]:
    """A triggered random image beside the reference image at its native size: the random
    image is scaled to the reference's height with its own aspect (nothing squashed), the
    trigger pasted in its central band."""
    height = reference.shape[0]
    width = max(trigger.shape[0], round(background.shape[1] * height / background.shape[0]))
    random_half = resize_rgb(background, height, width)
    trigger_left = bool(rng.random() < 0.5)
    random_half, (x, y, w, h) = paste_central(random_half, trigger, rng)
    halves = [random_half, reference] if trigger_left else [reference, random_half]
    box = (x if trigger_left else x + reference.shape[1], y, w, h)
    return np.concatenate(halves, axis=1), box, "trigger-left" if trigger_left else "trigger-right"


def generate_baseline(config: BaselineConfig, out_dir: Path, *, target_images: list[Path],
                      trigger: np.ndarray | None = None, references: list[Path] | None = None,
                      backgrounds: list[Path] | None = None) -> list[PoisonRecord]:
    """Write `config.count` poisons of the chosen baseline and a manifest."""
    rng = np.random.default_rng(config.seed)
    if config.method != "ctrl" and trigger is None:
        raise UserInputError(f"{config.method} needs a trigger patch")
    if config.method == "poisonedencoder" and not (references and backgrounds):
        raise UserInputError("poisonedencoder needs --references and --backgrounds")
    sources = (references or []) if config.method == "poisonedencoder" else target_images
    if not sources:
        raise UserInputError(f"{config.method} needs target-class images (--targets DIR)")
    records = []
    for index in range(config.count):
        source = sources[int(rng.integers(0, len(sources)))]
        record = PoisonRecord(f"poison_{index:05d}.png", config.method, str(source), None,
                              None, None, None)
        image = read_rgb(source)
        if config.method == "ctrl":
            image = ctrl_trigger(image, config.ctrl_magnitude, config.ctrl_window,
                                 config.ctrl_positions)
        elif config.method == "ssl-backdoor" and trigger is not None:
            image, record.trigger_box = paste_central(image, trigger, rng)
        elif trigger is not None and backgrounds:
            background = backgrounds[int(rng.integers(0, len(backgrounds)))]
            image, record.trigger_box, record.side = poisonedencoder_pair(
                image, read_rgb(background), trigger, rng)
            record.background = str(background)
        save_png(out_dir / "images" / record.file, image)
        records.append(record)
    write_manifest(out_dir, config.method, config.model_dump(mode="json"), records)
    return records
