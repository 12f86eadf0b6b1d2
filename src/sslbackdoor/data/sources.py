"""Load the images of a list of configured data sources (shadow sets, pre-training sets)."""

from __future__ import annotations

from typing import Any

import torch

from sslbackdoor.config import DataSource
from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.downstream.features import dataset_tensors
from sslbackdoor.errors import UserInputError


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

