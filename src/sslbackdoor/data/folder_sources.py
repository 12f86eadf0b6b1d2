"""``images:DIR``: a flat folder of images (e.g. poisons written by `sslbackdoor poison`).

Unlabeled: every image gets label 0 of the single class "unlabeled". Every image is resized
to the requested square size, as every other source in this pipeline is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslbackdoor.data.datasets import (
    DatasetRequest,
    TensorImageDataset,
    register_dataset,
    to_uint8_chw,
)
from sslbackdoor.data.images import read_rgb_image
from sslbackdoor.errors import UserInputError

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


@register_dataset("images:", splits=("train", "unlabeled"), native_size=None,
                  description="images:DIR, a flat folder of images (unlabeled)")
def _images(request: DatasetRequest) -> TensorImageDataset:
    folder = Path(request.arg or "")
    if not folder.is_dir():
        raise UserInputError(f"images:{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserInputError(f"images:{folder}: no images ({', '.join(SUFFIXES)})")
    if request.image_size is None:
        raise UserInputError(f"images:{folder}: give an image size (images may differ in size)")
    size = request.image_size
    images = [to_uint8_chw(np.asarray(read_rgb_image(f)), size) for f in files]
    return TensorImageDataset(torch.stack(images), torch.zeros(len(files), dtype=torch.long),
                              ["unlabeled"], f"{len(files)} images from {folder}")
