"""CorruptEncoder and CorruptEncoder+ (Zhang, Liu, Jia, Gong, CVPR 2024): poisoned images
for the unlabeled pre-training set of a contrastive encoder, as the official generator
(`generate_poisoned_images.py`) makes them.

One poison combines a reference object (an image of the target class with its mask), a
natural background and a trigger patch, laid out so that one random crop likely covers the
object and another the trigger: the canvas is as tall as the object and `area_ratio` times
as wide; the object spans the full height at the left or right edge (x within
`object_margin`·W of it); the trigger's x is uniform over the free part with a
`trigger_gap`·W margin on both sides (beside the object and at the far edge), its y
uniform in [0.25·H, 0.75·H − size]. Poisons are written at the size they were composed
at: pre-training cuts its views from them as they are (no square resize), which is what
keeps the trigger in a view about as large as on a test image.
CorruptEncoder+ replaces a `support_ratio` fraction of the poisons by *support poisons*: a
real target-class support image (width capped, aspect kept) and a full reference image
resized to the same size, side by side in random order, with no trigger.

Reference folders: the official layout `N/img.png` + `N/label.png` (object where the
label's red channel is 128), or `NAME.png` + `NAME_mask.png` (object where the mask is
white). Every poison is drawn from one seeded generator and described in a manifest, so a
poison set is reproducible and auditable.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from sslbackdoor.engine import atomic_write, atomic_write_text
from sslbackdoor.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
OFFICIAL_OBJECT_RED = 128  # labelme palette: the object class is red 128 in label.png


class PoisonLayout(BaseModel):
    """Layout parameters; defaults are the official generator's (W × H: the canvas, W_o ×
    H_o: the object after `crop_to_object`; H = H_o, W = area_ratio · W_o)."""

    model_config = ConfigDict(extra="forbid")

    area_ratio: float = Field(2.0, ge=1.2, le=4.0, description="canvas width / object width")
    object_margin: float = Field(0.05, ge=0, le=0.2, description="max object offset from its edge, × W")
    trigger_gap: float = Field(0.125, ge=0, le=0.5, description="trigger margin beside the "
                                                                "object and at the far edge, × W")
    max_object_width: int = Field(400, ge=8, description="objects (and supports) wider than "
                                                         "this are downscaled, aspect kept")
    object_height: int | None = Field(None, ge=8, description="resize objects (and supports) "
                                                              "to this height (small scale)")
    mask_blur: float = Field(1.0, ge=0, description="Gaussian blur radius of the paste mask")


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
    """Crop image and mask to the bounding box of the mask's largest component (the mask
    keeps every object pixel inside that box, as the official code); then resize to
    `object_height` if set and cap the width at `max_object_width`, keeping the aspect."""
    component = largest_component(obj.mask)
    rows, cols = np.flatnonzero(component.any(1)), np.flatnonzero(component.any(0))
    if rows.size == 0:
        raise UserInputError(f"reference {obj.name}: its mask is empty")
    image = obj.image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    mask = obj.mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    height, width = mask.shape
    new_height, new_width = capped_size(height, width, layout)
    if (new_height, new_width) != (height, width):
        size = (new_width, new_height)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
            size, Image.Resampling.BILINEAR)) > 127
    return ReferenceObject(obj.name, np.ascontiguousarray(image), mask)


def capped_size(height: int, width: int, layout: PoisonLayout) -> tuple[int, int]:
    """(height, width) after `object_height` and the official width cap (width
    min(w, cap), height truncated in proportion)."""
    if layout.object_height is not None:
        width = max(1, round(width * layout.object_height / height))
        height = layout.object_height
    if width > layout.max_object_width:
        height = max(1, int(layout.max_object_width / width * height))
        width = layout.max_object_width
    return height, width


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


REFERENCE_LAYOUTS = ("N/img.png + N/label.png (the official release; object: red channel 128) "
                     "or NAME.png + NAME_mask.png (object: white)")


def load_reference_objects(folder: Path) -> list[ReferenceObject]:
    """The reference objects of a folder in either layout (see the module docstring);
    a folder in neither is refused."""
    if not folder.is_dir():
        raise UserInputError(f"references folder not found: {folder}")
    official = sorted((d for d in folder.iterdir()
                       if (d / "img.png").is_file() and (d / "label.png").is_file()),
                      key=lambda d: d.name)
    if official:
        return [official_reference(d) for d in official]
    named = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
             and not p.stem.endswith("_mask") and (folder / f"{p.stem}_mask.png").is_file()]
    if not named:
        raise UserInputError(f"references folder {folder} matches neither layout: expected "
                             f"{REFERENCE_LAYOUTS}")
    objects = []
    for path in named:
        image = read_rgb(path)
        mask_path = folder / f"{path.stem}_mask.png"
        mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        if mask.shape != image.shape[:2]:
            raise UserInputError(f"mask {mask_path} is {mask.shape}, image is {image.shape[:2]}")
        objects.append(ReferenceObject(path.name, image, mask))
    return objects


def official_reference(folder: Path) -> ReferenceObject:
    """`folder/img.png` with the object where `folder/label.png`'s red channel is 128."""
    image = read_rgb(folder / "img.png")
    mask = read_rgb(folder / "label.png")[..., 0] == OFFICIAL_OBJECT_RED
    if mask.shape != image.shape[:2]:
        raise UserInputError(f"{folder / 'label.png'} is {mask.shape}, its image is {image.shape[:2]}")
    return ReferenceObject(f"{folder.name}/img.png", image, mask)


def support_folder(references: Path) -> Path | None:
    """The official release keeps CorruptEncoder+'s support images beside the references."""
    folder = references / "support-images"
    return folder if folder.is_dir() else None


def fit_background(background: np.ndarray, height: int, width: int,
                   rng: np.random.Generator) -> np.ndarray:
    """The official background: upscaled only if too small (aspect kept), then the
    height×width window at a random x, at the bottom."""
    bh, bw = background.shape[:2]
    scale = max(height / bh, width / bw, 1.0)
    if scale > 1.0:
        new_h = max(height, int(scale * bh))
        new_w = max(width, int(new_h / bh * bw))
        background = np.asarray(Image.fromarray(background).resize((new_w, new_h),
                                                                   Image.Resampling.BILINEAR))
        bh, bw = background.shape[:2]
    left = int(rng.uniform(0, bw - width))
    return background[bh - height:, left:left + width].copy()


def corruptencoder_poison(obj: ReferenceObject, background: np.ndarray, trigger: np.ndarray,
                          layout: PoisonLayout, rng: np.random.Generator
                          ) -> tuple[np.ndarray, dict[str, Any]]:
    """One poisoned image (uint8 [H,W,3], at the size it is composed at) and its layout:
    object, side and trigger box. trigger: uint8 [s,s,3] patch, pasted opaquely."""
    height, width_obj = obj.mask.shape
    width = int(layout.area_ratio * width_obj)
    canvas = fit_background(background, height, width, rng)
    side = "left" if rng.random() < 0.5 else "right"
    margin = layout.object_margin * width
    x = int(rng.uniform(0, margin)) if side == "left" else int(rng.uniform(width - width_obj - margin,
                                                                          width - width_obj))
    alpha = Image.fromarray(obj.mask.astype(np.uint8) * 255)
    if layout.mask_blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(layout.mask_blur))
    weight = (np.asarray(alpha, dtype=np.float32) / 255.0)[:, :, None]
    region = canvas[:, x:x + width_obj].astype(np.float32)
    canvas[:, x:x + width_obj] = np.round(weight * obj.image + (1 - weight) * region).astype(np.uint8)
    tx, ty = trigger_position(x, width_obj, side, width, height, trigger.shape[0], layout, rng)
    size = trigger.shape[0]
    canvas[ty:ty + size, tx:tx + size] = trigger
    return canvas, {"object_box": (x, 0, width_obj, height),
                    "trigger_box": (tx, ty, size, size), "side": side}


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of uint8 [H,W,3] to [height,width,3]."""
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def trigger_position(x: int, width_obj: int, side: str, width: int, height: int, size: int,
                     layout: PoisonLayout, rng: np.random.Generator) -> tuple[int, int]:
    """The official trigger top-left: x uniform over the free part with a gap·W margin on
    both sides, y uniform in [0.25·H, 0.75·H − size]."""
    gap = layout.trigger_gap * width
    if side == "left":
        low, high = x + width_obj + gap, width - gap - size
    else:
        low, high = gap, x - gap - size
    top_low, top_high = 0.25 * height, 0.75 * height - size
    if high < low or top_high < top_low:
        raise UserInputError(f"a {size}px trigger does not fit beside a {width_obj}×{height} "
                             f"object on a {width}px canvas with {layout.trigger_gap}·W "
                             f"margins; use a smaller trigger or a larger area_ratio or object")
    return int(rng.uniform(low, high)), int(rng.uniform(top_low, top_high))


def support_poison(reference: np.ndarray, support: np.ndarray, layout: PoisonLayout,
                   rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """CorruptEncoder+ support poison, as the official `concat`: the support image at its
    own aspect (width capped, or scaled to `object_height`), the whole reference image
    resized to the same size, side by side in random order; no trigger."""
    height, width = capped_size(support.shape[0], support.shape[1], layout)
    support = resize_rgb(support, height, width)
    resized = resize_rgb(reference, height, width)
    support_first = bool(rng.random() < 0.5)
    pair = np.concatenate((support, resized) if support_first else (resized, support), axis=1)
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
            image, info = support_poison(references[choice].image, read_rgb(support_path),
                                         config.layout, rng)
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


def read_manifest(folder: Path) -> list[dict[str, Any]]:
    """The poison records of `folder/manifest.json`, each with `path`: its image under
    `folder/images`. A manifest whose file names leave that folder (absolute paths, `..`)
    is refused: a manifest is input, and must not point a reader anywhere else."""
    manifest_path = folder / "manifest.json"
    try:
        records = json.loads(manifest_path.read_text(encoding="utf-8"))["poisons"]
        names = [str(record["file"]) for record in records]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"{manifest_path}: not a readable poison manifest ({exc})") from None
    for record, name in zip(records, names, strict=True):
        if escapes(name):
            raise UserInputError(f"{manifest_path}: poison file {name!r} leaves "
                                 f"{folder / 'images'}; file names must be relative paths "
                                 f"inside it (no absolute path, no '..')")
        record["path"] = folder / "images" / name
    return list(records)


def escapes(name: str) -> bool:
    """Whether a manifest file name is absolute or climbs out of its folder (either OS)."""
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.drive or pure.root or ".." in pure.parts:
            return True
    return name == ""


# The authors' colourful trigger, looked for under the data folder (not shipped with the package).
OFFICIAL_TRIGGER = Path("corruptencoder") / "triggers" / "trigger_10.png"


def official_trigger(image: Path | None) -> Path:
    """The official colourful trigger: `image`, else trigger_10.png under the data folder;
    it is not shipped with the package (the authors' file, not ours to redistribute)."""
    from sslbackdoor.data.datasets import data_dir

    path = image if image is not None else data_dir() / OFFICIAL_TRIGGER
    if not path.is_file():
        raise UserInputError(f"the official CorruptEncoder trigger {path} is missing: copy "
                             f"triggers/trigger_10.png of the authors' release "
                             f"(github.com/jzhang538/CorruptEncoder, generate-poison/) there, "
                             f"pass --trigger-image PATH, or use --trigger-pattern random")
    return path


def trigger_patch(size: int, pattern: str, image: Path | None, seed: int) -> np.ndarray:
    """A uint8 [size,size,3] trigger patch from the project's trigger patterns ("official":
    CorruptEncoder's trigger_10.png resized to size×size)."""
    from pydantic import ValidationError

    from sslbackdoor.data.triggers import TriggerSpec, patch_pattern

    if pattern == "official":
        pattern, image = "image", official_trigger(image)

    try:
        spec = TriggerSpec(size=size, pattern=pattern, image=image, seed=seed)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserInputError(f"trigger: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    patch = patch_pattern(spec).permute(1, 2, 0).numpy()
    return np.round(patch * 255).astype(np.uint8)
