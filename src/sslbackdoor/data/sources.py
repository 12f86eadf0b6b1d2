"""Load the images of a list of configured data sources (shadow sets, pre-training sets)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.data import DataLoader

from sslbackdoor.config_io import Strict
from sslbackdoor.data.datasets import ImageDataset, TensorImageDataset, load_dataset
from sslbackdoor.errors import UserInputError


class DataSource(Strict):
    dataset: str
    split: Literal["train", "test", "unlabeled"] = "train"
    limit: int | None = Field(None, ge=1)
    classes: list[int] | None = Field(None, description="keep only these labels")
    root: str | None = None


def dataset_tensors(dataset: ImageDataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 [N,3,S,S]) and labels [N] of a dataset, loaded once."""
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.labels
    images, labels = [], []
    for batch_images, batch_labels in DataLoader(dataset, batch_size=batch_size):  # type: ignore[arg-type]
        images.append(batch_images)
        labels.append(torch.as_tensor(batch_labels))
    return torch.cat(images), torch.cat(labels)


def load_sources(sources: list[DataSource], image_size: int, *, data_root: str | None = None,
                 seed: int = 0, download: bool = False
                 ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """All images (uint8 [N,3,S,S]) of the sources, and one provenance entry per source.

    `classes` filters by label before `limit` takes a seeded stratified subset.
    """
    images, provenance = [], []
    for source in sources:
        dataset = load_dataset(source.dataset, source.split, image_size=image_size,
                               root=source.root or data_root, seed=seed, download=download,
                               limit=None if source.classes else source.limit)
        source_images, labels = dataset_tensors(dataset)
        note = ""
        if source.classes:
            keep = torch.isin(labels, torch.tensor(source.classes))
            if not bool(keep.any()):
                raise UserInputError(f"{source.dataset}/{source.split} has no image of classes "
                                     f"{source.classes}")
            source_images = _limit(source_images[keep], source.limit, seed)
            note = f"; classes {source.classes}"
        images.append(source_images)
        provenance.append({"dataset": source.dataset, "split": source.split,
                           "images": int(source_images.shape[0]),
                           "source": dataset.provenance + note})
    return torch.cat(images), provenance


def _limit(images: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    if limit is None or limit >= images.shape[0]:
        return images
    generator = torch.Generator().manual_seed(seed)
    return images[torch.randperm(images.shape[0], generator=generator)[:limit].sort().values]

