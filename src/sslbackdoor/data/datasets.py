"""Dataset registry: every image source yields uint8 tensors [3,S,S] and integer labels.

All sources go through one shape so that triggers, encoders and probes never care where
images came from:

* images are uint8 RGB tensors ``[3, S, S]`` (grey images are repeated over channels,
  every image is resized to the requested side ``S``), labels are ``int``;
* a dataset knows its ``classes`` (names, index = label) and its ``provenance`` (a line
  saying exactly which files or package the images came from), written into results.

Sources register a builder under a name with `register_dataset`; `load_dataset` looks the
name up and validates the request. A name of the form ``kind:ARG`` (``npz:PATH``,
``imagefolder:PATH``) passes ``ARG`` to the builder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sslbackdoor.errors import UserInputError

Split = Literal["train", "test", "unlabeled"]


def data_dir() -> Path:
    """Root of prepared offline data and downloads: $SSLBACKDOOR_DATA or ./data."""
    return Path(os.environ.get("SSLBACKDOOR_DATA", "data")).expanduser()


class ImageDataset(Protocol):
    """What every registered source returns."""

    @property
    def classes(self) -> Sequence[str]: ...

    @property
    def provenance(self) -> str: ...

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """An in-memory dataset: uint8 images [N,3,S,S] and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                 provenance: str) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise UserInputError(f"images must be uint8 [N,3,H,W], got {images.dtype} "
                                 f"{tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise UserInputError(f"labels must have shape ({images.shape[0]},), got "
                                 f"{tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.provenance = provenance

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: torch.Tensor | Sequence[int], note: str = "") -> TensorImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        provenance = f"{self.provenance}; {note}" if note else self.provenance
        return TensorImageDataset(self.images[idx], self.labels[idx], self.classes, provenance)


class TransformedDataset(Dataset[tuple[torch.Tensor, int]]):
    """Wrap a source that yields (PIL image or array, label) into the uniform shape."""

    def __init__(self, base: Any, classes: Sequence[str], provenance: str,
                 image_size: int) -> None:
        self.base = base
        self.classes = list(classes)
        self.provenance = provenance
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return to_uint8_chw(image, self.image_size), int(label)


def to_uint8_chw(image: Any, size: int | None) -> torch.Tensor:
    """PIL image, HxW / HxWxC array or CxHxW tensor → uint8 [3,size,size]."""
    if isinstance(image, torch.Tensor):
        tensor = image
        if tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
    else:
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)
    if tensor.dtype != torch.uint8:
        tensor = (tensor.float() * (255.0 if tensor.is_floating_point() and tensor.max() <= 1
                                    else 1.0)).round().clamp(0, 255).to(torch.uint8)
    return resize_uint8(tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor, size)


def resize_uint8(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 [3,H,W] or [N,3,H,W] images to size×size."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images.contiguous()
    batched = images if images.dim() == 4 else images.unsqueeze(0)
    resized = F.interpolate(batched.float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)
    out = resized.round().clamp(0, 255).to(torch.uint8)
    return out if images.dim() == 4 else out[0]


def materialize(dataset: ImageDataset, batch_size: int = 512,
                num_workers: int = 0) -> TensorImageDataset:
    """Load every item of a dataset into memory (for the small sets used on CPU)."""
    if isinstance(dataset, TensorImageDataset):
        return dataset
    loader: DataLoader[tuple[torch.Tensor, int]] = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers)  # type: ignore[arg-type]
    images, labels = [], []
    for batch_images, batch_labels in loader:
        images.append(batch_images)
        labels.append(torch.as_tensor(batch_labels))
    return TensorImageDataset(torch.cat(images), torch.cat(labels), dataset.classes,
                              dataset.provenance)


@dataclass(frozen=True)
class DatasetRequest:
    """Everything a builder needs; `arg` is the part after ':' in `kind:ARG` names, and
    `limit` the number of images asked for (builders may ignore it; it is applied after)."""

    split: Split
    image_size: int | None
    root: Path
    download: bool
    arg: str | None = None
    limit: int | None = None


Builder = Callable[[DatasetRequest], ImageDataset]


@dataclass(frozen=True)
class DatasetEntry:
    builder: Builder
    splits: tuple[Split, ...]
    native_size: int | None
    description: str


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, splits: tuple[Split, ...] = ("train", "test"),
                     native_size: int | None = None,
                     description: str = "") -> Callable[[Builder], Builder]:
    """Decorator registering `builder` under `name` (use `kind:` for parametrised kinds)."""
    def decorator(builder: Builder) -> Builder:
        DATASETS[name] = DatasetEntry(builder, splits, native_size, description)
        return builder
    return decorator


def _ensure_sources_registered() -> None:
    # The modules register on import; imported lazily so `datasets` has no heavy imports.
    from sslbackdoor.data import (  # noqa: F401
        folder_sources,
        offline,
        plain_sources,
        torchvision_sources,
    )


def dataset_names() -> list[str]:
    _ensure_sources_registered()
    return sorted(DATASETS)


def load_dataset(name: str, split: Split = "train", *, image_size: int | None = None,
                 root: Path | str | None = None, download: bool = False,
                 limit: int | None = None, seed: int = 0) -> ImageDataset:
    """Build a registered dataset.

    Args:
        name: registered name (see `dataset_names()`), or `kind:ARG`.
        split: "train", "test" or "unlabeled" (where the source has it).
        image_size: side S of the returned square images; None keeps the native size
            (sources with images of varying size require one).
        root: where the files are; defaults to `data_dir()`.
        limit: keep a seeded, class-stratified random subset of this many images.
    """
    _ensure_sources_registered()
    kind, _, arg = name.partition(":")
    # `kind:ARG` builders take ARG; a plain source may take an optional one (natural-crops:N).
    entry = DATASETS.get(f"{kind}:") if arg else None
    entry = entry or DATASETS.get(kind)
    if entry is None:
        raise UserInputError(f"unknown dataset {name!r}; valid: {', '.join(dataset_names())}")
    if split not in entry.splits:
        raise UserInputError(f"dataset {name!r} has no split {split!r}; valid: "
                             f"{', '.join(entry.splits)}")
    if image_size is not None and image_size < 8:
        raise UserInputError(f"image_size {image_size} is too small; use at least 8")
    size = image_size if image_size is not None else entry.native_size
    request = DatasetRequest(split, size, Path(root) if root else data_dir(), download,
                             arg or None, limit)
    dataset = entry.builder(request)
    if limit is not None and limit < len(dataset):
        dataset = stratified_subset(dataset, limit, seed)
    return dataset


def native_size_known(name: str) -> bool:
    """Whether every image of a registered dataset has one native size (then
    `load_dataset(..., image_size=None)` loads it unresized in one batch)."""
    _ensure_sources_registered()
    kind, _, arg = name.partition(":")
    entry = (DATASETS.get(f"{kind}:") if arg else None) or DATASETS.get(kind)
    return entry is not None and entry.native_size is not None


def native_image(dataset: ImageDataset, index: int) -> torch.Tensor:
    """Item `index` of a lazily decoded dataset at its own size and aspect, uint8 [3,h,w]:
    CorruptEncoder's pre-training cuts views from the native image, never from a square."""
    if isinstance(dataset, SubsetDataset):
        return native_image(dataset.base, int(dataset.indices[index]))
    if isinstance(dataset, TransformedDataset):
        image, _ = dataset.base[index]
        return to_uint8_chw(image, None)
    raise UserInputError(f"{dataset.provenance}: its images exist only resized to one size, "
                         f"so they cannot be read at their native size")


def dataset_labels(dataset: ImageDataset) -> torch.Tensor:
    """Labels of a dataset without decoding images where the source allows it."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.labels
    for attr in ("targets", "labels", "_labels"):
        base = getattr(dataset, "base", dataset)
        values = getattr(base, attr, None)
        if values is not None and len(values) == len(dataset):
            return torch.as_tensor(np.asarray(values)).long().flatten()
    base = getattr(dataset, "base", None)
    samples = getattr(base, "samples", None) or getattr(base, "_samples", None)
    if samples is not None and len(samples) == len(dataset):
        return torch.tensor([int(label) for _, label in samples])
    return torch.tensor([dataset[i][1] for i in range(len(dataset))])


class SubsetDataset(Dataset[tuple[torch.Tensor, int]]):
    """A view of some indices of a lazy dataset, keeping classes and provenance."""

    def __init__(self, base: ImageDataset, indices: torch.Tensor, note: str) -> None:
        self.base = base
        self.indices = indices
        self.classes = base.classes
        self.provenance = f"{base.provenance}; {note}"

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[index])]


def stratified_subset(dataset: ImageDataset, size: int, seed: int) -> ImageDataset:
    """A seeded subset of `size` items with classes in their original proportions."""
    labels = dataset_labels(dataset)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    # Round-robin over classes in a random order gives exact proportional counts.
    rank_in_class = torch.empty_like(order)
    for cls in labels.unique():
        members = order[labels[order] == cls]
        rank_in_class[members] = torch.arange(len(members)) * len(labels) // len(members)
    chosen = order[torch.argsort(rank_in_class[order], stable=True)[:size]]
    chosen, _ = chosen.sort()
    note = f"stratified subset of {size} (seed {seed})"
    if isinstance(dataset, TensorImageDataset):
        return dataset.subset(chosen, note)
    return SubsetDataset(dataset, chosen, note)
