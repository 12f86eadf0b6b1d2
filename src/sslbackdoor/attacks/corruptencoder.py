"""CorruptEncoder and CorruptEncoder+ (Zhang, Liu, Jia, Gong, CVPR 2024): poisoned images
for the unlabeled pre-training set of a contrastive encoder.

One poison combines a reference object (an image of the target class with its mask), a
natural background and a trigger patch, laid out so that one random crop likely covers the
object and another the trigger: the canvas is as tall as the object and `area_ratio` times
as wide (`canvas="object-height"`, the paper's; `canvas="square"` is for pipelines that
resize every image to a square, see `PoisonLayout`); the object sits at the left or right
edge (x within `object_margin`·W of it); the trigger lands in the free part, at least
`trigger_gap`·W beyond the object and vertically in [0.25·H, 0.75·H − size].
CorruptEncoder+ replaces a `support_ratio` fraction of the poisons by *support poisons*: a
real target-class support image and a full reference image resized to the same size and
concatenated side by side in random order, with no trigger.

Every poison is drawn from one seeded generator and described in a manifest, so a poison
set is reproducible and auditable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from sslbackdoor.engine import atomic_write, atomic_write_text
from sslbackdoor.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


class PoisonLayout(BaseModel):
    """Layout parameters; defaults are the paper's.

    `canvas` chooses the canvas shape (W_o × H_o is the object after `crop_to_object`):

    * "object-height" (the paper's): H = H_o, W = area_ratio·W_o; the object spans the
      full height. A pipeline that later resizes every image to a square (this project's
      data loaders do) scales such a canvas by different factors along x and y, squashing
      the object horizontally by W/H = area_ratio·W_o/H_o (2× for a square object) —
      `output_size` keeps only the trigger square, not the object.
    * "square": a square canvas of side S = max(area_ratio·W_o, H_o). The object keeps its
      own size at the left or right edge, inside the full-height strip of width W_o on its
      side (at a random height when S > H_o, spanning the full height when S = H_o); the
      free part beside it is at least (area_ratio − 1)·W_o wide, so the object still covers
      at most 1/area_ratio of the width. Resizing a square to a square is the same factor
      along both axes, so neither object nor trigger is distorted.
    """

    model_config = ConfigDict(extra="forbid")

    canvas: Literal["object-height", "square"] = Field(
        "object-height", description="object-height: H = object height, W = area_ratio × "
                                     "object width (paper); square: side = max(area_ratio × "
                                     "object width, object height), nothing squashed when "
                                     "resized to a square")
    area_ratio: float = Field(2.0, ge=1.2, le=4.0, description="canvas width / object width")
    object_margin: float = Field(0.05, ge=0, le=0.2, description="max object offset from its edge, × W")
    trigger_gap: float = Field(0.125, ge=0, le=0.5, description="min trigger distance beyond the object, × W")
    max_object_width: int = Field(400, ge=8, description="objects wider than this are downscaled")
    object_height: int | None = Field(None, ge=8, description="resize objects to this height (small scale)")
    mask_blur: float = Field(1.0, ge=0, description="Gaussian blur radius of the paste mask")
    output_size: int | None = Field(
        None, ge=8, description="resize the canvas to this square size before the trigger is "
                                "pasted, so the trigger stays square in a pipeline that "
                                "resizes every image to a square")


@dataclass
class ReferenceObject:
    """A target-class image with its object mask. image: uint8 [H,W,3]; mask: bool [H,W]."""

    name: str
    image: np.ndarray
    mask: np.ndarray


@dataclass
class PoisonRecord:
    """What the manifest says about one poison (boxes are (x, y, width, height))."""

    file: str
    kind: str
    reference: str
    background: str | None
    object_box: tuple[int, int, int, int] | None
    trigger_box: tuple[int, int, int, int] | None
    side: str | None


def derive_mask(image: np.ndarray, tolerance: float = 30.0) -> np.ndarray:
    """Object mask of an image on a plain background: pixels far from the border colour.

    image: uint8 [H,W,3] → bool [H,W] (largest connected component, holes filled).
    """
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    distance = np.linalg.norm(image.astype(np.float32) - np.median(border, axis=0), axis=2)
    mask = largest_component(distance > tolerance)
    if not mask.any():
        raise UserInputError("could not derive an object mask: the image has no object that "
                             "differs from its border colour; supply a mask file")
    return ndimage.binary_fill_holes(mask)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def crop_to_object(obj: ReferenceObject, layout: PoisonLayout) -> ReferenceObject:
    """Crop image and mask to the bounding box of the mask's largest component; cap size."""
    mask = largest_component(obj.mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise UserInputError(f"reference {obj.name}: its mask is empty")
    image = obj.image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    mask = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = mask.shape
    scale = 1.0
    if layout.object_height is not None:
        scale = layout.object_height / height
    if width * scale > layout.max_object_width:
        scale = layout.max_object_width / width
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            size, Image.Resampling.BILINEAR)) > 127
    return ReferenceObject(obj.name, np.ascontiguousarray(image), mask)


def read_rgb(path: Path) -> np.ndarray:
    try:
        return np.asarray(Image.open(path).convert("RGB"))
    except OSError as exc:
        raise UserInputError(f"cannot read image {path}: {exc}") from None


def image_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise UserInputError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.stem.endswith("_mask"))
    if not files:
        raise UserInputError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_reference_objects(folder: Path, derive_missing_masks: bool = True) -> list[ReferenceObject]:
    """Reference images `NAME.ext` with masks `NAME_mask.png` beside them (or in `masks/`).

    Without a mask file, a mask is derived for images on a plain background.
    """
    objects = []
    for path in image_files(folder, "references"):
        mask_path = next((p for p in (folder / f"{path.stem}_mask.png",
                                      folder / "masks" / f"{path.stem}.png") if p.is_file()), None)
        image = read_rgb(path)
        if mask_path is not None:
            mask = np.asarray(Image.open(mask_path).convert("L")) > 127
            if mask.shape != image.shape[:2]:
                raise UserInputError(f"mask {mask_path} is {mask.shape}, image is {image.shape[:2]}")
        elif derive_missing_masks:
            mask = derive_mask(image)
        else:
            raise UserInputError(f"no mask for {path} (expected {path.stem}_mask.png)")
        objects.append(ReferenceObject(path.name, image, mask))
    return objects


def fit_background(background: np.ndarray, height: int, width: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Upscale only if too small (keeping aspect), then a random crop of height×width."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw, 1.0)
    if scale > 1.0:
        size = (int(np.ceil(bw * scale)), int(np.ceil(bh * scale)))
        background = np.asarray(Image.fromarray(background).resize(size, Image.Resampling.BILINEAR))
        bh, bw = background.shape[:2]
    top = int(rng.integers(0, bh - height + 1))
    left = int(rng.integers(0, bw - width + 1))
    return background[top:top + height, left:left + width].copy()


def corruptencoder_poison(obj: ReferenceObject, background: np.ndarray, trigger: np.ndarray,
                          layout: PoisonLayout, rng: np.random.Generator
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """One poisoned image (uint8 [H,W,3]) and its layout: object, side and trigger box.

    trigger: uint8 [s,s,3] patch, pasted opaquely.
    """
    height_obj, width_obj = obj.mask.shape
    width = round(layout.area_ratio * width_obj)
    height = height_obj
    if layout.canvas == "square":
        width = height = max(width, height_obj)
    size = trigger.shape[0]
    canvas = fit_background(background, height, width, rng)
    side = "left" if rng.random() < 0.5 else "right"
    offset = int(rng.integers(0, int(layout.object_margin * width) + 1))
    x = offset if side == "left" else width - width_obj - offset
    y = int(rng.integers(0, height - height_obj + 1)) if height > height_obj else 0
    alpha = Image.fromarray(obj.mask.astype(np.uint8) * 255)
    if layout.mask_blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(layout.mask_blur))
    weight = (np.asarray(alpha, dtype=np.float32) / 255.0)[:, :, None]
    region = canvas[y:y + height_obj, x:x + width_obj].astype(np.float32)
    canvas[y:y + height_obj, x:x + width_obj] = np.round(
        weight * obj.image + (1 - weight) * region).astype(np.uint8)
    if layout.output_size is not None:
        # Resize before the trigger is pasted, so the trigger keeps its size and shape.
        scale_x, scale_y = layout.output_size / width, layout.output_size / height
        canvas = resize_rgb(canvas, layout.output_size, layout.output_size)
        x, width_obj = round(x * scale_x), round(width_obj * scale_x)
        y, height_obj = round(y * scale_y), round(height_obj * scale_y)
        width = height = layout.output_size
    tx, ty = trigger_position(x, width_obj, side, width, height, size, layout, rng)
    canvas[ty:ty + size, tx:tx + size] = trigger
    return canvas, {"object_box": (x, y, width_obj, height_obj),
                    "trigger_box": (tx, ty, size, size), "side": side}


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of uint8 [H,W,3] to [height,width,3]."""
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def trigger_position(x: int, width_obj: int, side: str, width: int, height: int, size: int,
                     layout: PoisonLayout, rng: np.random.Generator) -> tuple[int, int]:
    """Trigger top-left in the free part: ≥ gap beyond the object, vertically in the middle."""
    gap = round(layout.trigger_gap * width)
    if side == "left":
        low, high = x + width_obj + gap, width - size
    else:
        low, high = 0, x - gap - size
    if high < low or size > height:
        raise UserInputError(f"a {size}px trigger does not fit beside a {width_obj}×{height} "
                             f"object on a {width}px canvas; use a smaller trigger or a larger "
                             f"area_ratio")
    # Centre of the free part, as the paper recommends, jittered within the allowed range.
    centre = (low + high) // 2
    spread = max(1, (high - low) // 4)
    tx = int(np.clip(centre + rng.integers(-spread, spread + 1), low, high))
    top_low, top_high = int(0.25 * height), max(int(0.25 * height), int(0.75 * height) - size)
    ty = int(rng.integers(top_low, top_high + 1)) if top_high + size <= height else (height - size) // 2
    return tx, ty


def support_poison(reference: np.ndarray, support: np.ndarray, rng: np.random.Generator,
                   output_size: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """CorruptEncoder+ support poison: support and reference images side by side, no trigger."""
    height, width = reference.shape[:2]
    resized = resize_rgb(support, height, width)
    support_first = bool(rng.random() < 0.5)
    pair = np.concatenate((resized, reference) if support_first else (reference, resized), axis=1)
    if output_size is not None:
        pair = resize_rgb(pair, output_size, output_size)
    return pair, {"side": "support-left" if support_first else "support-right"}


class PoisonConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(..., ge=1, description="number of poisoned images")
    support_ratio: float = Field(0.0, ge=0, le=1, description="CorruptEncoder+ support fraction")
    seed: int = 0
    layout: PoisonLayout = PoisonLayout()


def generate_corruptencoder(references: list[ReferenceObject], backgrounds: list[Path],
                            trigger: np.ndarray, config: PoisonConfig, out_dir: Path,
                            supports: list[Path] | None = None) -> list[PoisonRecord]:
    """Write `config.count` poisons as PNGs under out_dir/images plus out_dir/manifest.json."""
    if len(backgrounds) < 1:
        raise UserInputError("CorruptEncoder needs at least one background image")
    support_count = round(config.support_ratio * config.count)
    if support_count and not supports:
        raise UserInputError("--support-ratio > 0 needs support images of the target class "
                             "(--supports DIR)")
    supports = supports or []
    rng = np.random.default_rng(config.seed)
    objects = [crop_to_object(obj, config.layout) for obj in references]
    background_order = rng.permutation(max(config.count, len(backgrounds))) % len(backgrounds)
    records = []
    for index in range(config.count):
        choice = int(rng.integers(0, len(objects)))
        name = f"poison_{index:05d}.png"
        if index < support_count:
            support_path = supports[int(rng.integers(0, len(supports)))]
            image, info = support_poison(references[choice].image, read_rgb(support_path), rng,
                                         config.layout.output_size)
            record = PoisonRecord(name, "support", objects[choice].name, str(support_path), None,
                                  None, info["side"])
        else:
            background = backgrounds[int(background_order[index])]
            image, info = corruptencoder_poison(objects[choice], read_rgb(background), trigger,
                                                config.layout, rng)
            record = PoisonRecord(name, "corruptencoder", objects[choice].name, str(background),
                                  info["object_box"], info["trigger_box"], info["side"])
        save_png(out_dir / "images" / name, image)
        records.append(record)
    write_manifest(out_dir, "corruptencoder+" if support_count else "corruptencoder",
                   config.model_dump(mode="json"), records)
    return records


def save_png(path: Path, image: np.ndarray) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def write_manifest(out_dir: Path, method: str, config: dict[str, Any],
                   records: list[PoisonRecord]) -> None:
    manifest = {"method": method, "config": config, "count": len(records),
                "poisons": [asdict(r) for r in records]}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))
