"""Pre-training images at their own size and aspect, decoded once.

A contrastive view is a random crop of the *native* image resized to the training size
(torchvision's RandomResizedCrop). Resizing every image to a square first changes what a
view shows: a wide poison squashed to a square and cropped shows its trigger larger than
any test image does. `NativeImages` keeps every image as it was decoded, grouped by size
so that views of equal-sized images are still cut in one batched call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sslbackdoor.data.datasets import Split
from sslbackdoor.data.sources import DataSource, dataset_tensors, load_sources
from sslbackdoor.engine import to_device_images
from sslbackdoor.errors import UserInputError


class NativeImages:
    """N uint8 images of any sizes: `groups` are uint8 [n_g,3,h_g,w_g] tensors of equal-sized
    images; item i is row `rows[i]` of group `group_of[i]`. Indexing keeps item order."""

    def __init__(self, groups: Sequence[torch.Tensor], group_of: torch.Tensor,
                 rows: torch.Tensor) -> None:
        for group in groups:
            if group.dtype != torch.uint8 or group.dim() != 4 or group.shape[1] != 3:
                raise UserInputError(f"native images must be uint8 [N,3,H,W] groups, got "
                                     f"{group.dtype} {tuple(group.shape)}")
        self.groups = list(groups)
        self.group_of = group_of.long()
        self.rows = rows.long()

    @classmethod
    def of(cls, parts: Sequence[torch.Tensor | NativeImages | list[torch.Tensor]]) -> NativeImages:
        """Concatenate uint8 batches [N,3,H,W], NativeImages and lists of [3,h,w] images."""
        groups: list[torch.Tensor] = []
        group_of, rows = [], []
        for part in parts:
            if isinstance(part, list):
                part = cls.from_list(part)
            if isinstance(part, torch.Tensor):
                part = cls([part], torch.zeros(part.shape[0]), torch.arange(part.shape[0]))
            group_of.append(part.group_of + len(groups))
            rows.append(part.rows)
            groups.extend(part.groups)
        return cls(groups, torch.cat(group_of), torch.cat(rows))

    @classmethod
    def from_list(cls, images: Sequence[torch.Tensor]) -> NativeImages:
        """Images uint8 [3,h,w] of any sizes, stacked by size."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(index)
        group_of, rows = torch.zeros(len(images)), torch.zeros(len(images))
        groups = []
        for number, members in enumerate(by_size.values()):
            groups.append(torch.stack([images[i] for i in members]))
            group_of[members] = float(number)
            rows[members] = torch.arange(len(members), dtype=torch.float32)
        return cls(groups, group_of, rows)

    def __len__(self) -> int:
        return int(self.group_of.numel())

    @property
    def device(self) -> torch.device:
        return self.groups[0].device if self.groups else torch.device("cpu")

    def sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Heights and widths, float [N] each."""
        heights = torch.tensor([g.shape[2] for g in self.groups], dtype=torch.float32)
        widths = torch.tensor([g.shape[3] for g in self.groups], dtype=torch.float32)
        return heights[self.group_of], widths[self.group_of]

    def __getitem__(self, index: torch.Tensor | slice) -> NativeImages:
        picked = torch.arange(len(self))[index] if isinstance(index, slice) else index.long()
        groups_of, rows = self.group_of[picked], self.rows[picked]
        groups, new_group, new_rows = [], torch.zeros(picked.numel()), torch.zeros(picked.numel())
        for number, group in enumerate(groups_of.unique().tolist()):
            members = torch.nonzero(groups_of == group).flatten()
            groups.append(self.groups[group][rows[members].to(self.groups[group].device)])
            new_group[members] = float(number)
            new_rows[members] = torch.arange(members.numel(), dtype=torch.float32)
        return NativeImages(groups, new_group, new_rows)

    def to(self, device: torch.device) -> NativeImages:
        return NativeImages([g.to(device, non_blocking=True) for g in self.groups],
                            self.group_of, self.rows)

    def by_group(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(group tensor, item indices of that group) for every group with items."""
        for number, group in enumerate(self.groups):
            members = torch.nonzero(self.group_of == number).flatten()
            if members.numel():
                yield group, members

    def digest_bytes(self) -> Iterator[bytes]:
        """The images' bytes in item order, with their sizes (for content hashes)."""
        for index in range(len(self)):
            image = self.groups[int(self.group_of[index])][int(self.rows[index])]
            yield np.asarray(image.shape, dtype=np.int64).tobytes() + image.cpu().numpy().tobytes()


PretrainImages = torch.Tensor | NativeImages


def image_sizes(images: PretrainImages) -> tuple[int | torch.Tensor, int | torch.Tensor]:
    """The sizes views are drawn from: (H, W) of equal-sized images, else float [N] each."""
    if isinstance(images, NativeImages):
        return images.sizes()
    return int(images.shape[-2]), int(images.shape[-1])


def device_images(images: PretrainImages, device: torch.device) -> PretrainImages:
    """A batch on `device`: a tensor as float [0,1] channels-last, native images as they are
    (their views are cut before any conversion)."""
    if isinstance(images, NativeImages):
        return images.to(device)
    return to_device_images(images, device)


def read_native(path: Path) -> torch.Tensor:
    """uint8 [3,h,w] of an image file at its own size."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as exc:
        raise UserInputError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def read_native_folder(folder: Path, suffixes: Sequence[str] = (".png",)) -> list[torch.Tensor]:
    """Every image of a folder (sorted names) at its own size."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise UserInputError(f"{folder} holds no images ({', '.join(suffixes)})")
    return [read_native(p) for p in files]


def load_native_sources(sources: list[DataSource], *, data_root: str | None = None, seed: int = 0,
                        download: bool = False) -> tuple[NativeImages, list[dict[str, Any]]]:
    """The images of the sources at their own sizes (no square resize), one provenance
    entry per source. Sources of one native size load as one batch."""
    parts: list[torch.Tensor | list[torch.Tensor]] = []
    provenance: list[dict[str, Any]] = []
    for source in sources:
        images, entry = _native_source(source, data_root, seed, download)
        parts.append(images)
        provenance.append(entry)
    return NativeImages.of(parts), provenance


def _native_source(source: DataSource, data_root: str | None, seed: int, download: bool
                   ) -> tuple[torch.Tensor | list[torch.Tensor], dict[str, Any]]:
    from sslbackdoor.data.datasets import (
        dataset_labels,
        load_dataset,
        native_image,
        native_size_known,
    )

    if native_size_known(source.dataset):  # one size: load it unresized, as one batch
        images, entries = load_sources([source], None, data_root=data_root,  # type: ignore[arg-type]
                                       seed=seed, download=download)
        return images, entries[0]
    # Images of many sizes: the loader's size is a placeholder; items are read natively.
    dataset = load_dataset(source.dataset, source.split, image_size=32,
                           root=source.root or data_root, seed=seed, download=download,
                           limit=None if source.classes else source.limit)
    indices = torch.arange(len(dataset))
    if source.classes:
        indices = indices[torch.isin(dataset_labels(dataset), torch.tensor(source.classes))]
        if source.limit is not None and source.limit < indices.numel():
            generator = torch.Generator().manual_seed(seed)
            indices = indices[torch.randperm(indices.numel(), generator=generator)[:source.limit]
                              .sort().values]
    native = [native_image(dataset, int(i)) for i in indices]
    return native, {"dataset": source.dataset, "split": source.split, "images": len(native),
                    "source": f"{dataset.provenance}; native sizes"}


def load_native_labelled(name: str, split: Split, *, root: str | None = None, seed: int = 0,
                         download: bool = False) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    """Every image of a labelled dataset split at its own size (a uint8 batch where the
    dataset has one native size, else a list of [3,h,w]) and its labels [N]."""
    from sslbackdoor.data.datasets import (
        dataset_labels,
        load_dataset,
        native_image,
        native_size_known,
    )

    if native_size_known(name):
        return dataset_tensors(load_dataset(name, split, image_size=None, root=root, seed=seed,
                                            download=download))
    dataset = load_dataset(name, split, image_size=32, root=root, seed=seed, download=download)
    return [native_image(dataset, i) for i in range(len(dataset))], dataset_labels(dataset)


def pick(images: torch.Tensor | list[torch.Tensor], index: torch.Tensor
         ) -> torch.Tensor | list[torch.Tensor]:
    """images[index] for a batch or a list of images."""
    if isinstance(images, torch.Tensor):
        return images[index]
    return [images[int(i)] for i in index]


def resize_center_crop(images: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """The official test transform, Resize(size·256/224) of the shorter side (aspect kept,
    antialiased) then CenterCrop(size), of uint8 images [3,h,w] (a batch or a list) →
    uint8 [N,3,size,size]."""
    resize = round(size * 256 / 224)
    out = []
    for image in images:
        height, width = int(image.shape[-2]), int(image.shape[-1])
        short, long = (height, width) if height <= width else (width, height)
        long = int(resize * long / short)
        new_h, new_w = (resize, long) if height <= width else (long, resize)
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w),
                                                  mode="bilinear", align_corners=False,
                                                  antialias=True)[0]
        top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
        out.append(resized[:, top:top + size, left:left + size].round().clamp(0, 255)
                   .to(torch.uint8))
    if not out:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(out)
