"""Images at their native size: grouping and indexing, loading without a square resize,
and the official test transform (Resize + CenterCrop, no squash)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sslbackdoor.config import DataSource
from sslbackdoor.data.native import (
    NativeImages,
    image_sizes,
    load_native_sources,
    read_native_folder,
    resize_center_crop,
)


def _image(height: int, width: int, value: int) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


def test_native_images_keep_sizes_and_item_order_through_indexing() -> None:
    images = NativeImages.of([torch.stack([_image(4, 4, 0), _image(4, 4, 1)]),
                              [_image(6, 9, 2), _image(5, 5, 3), _image(6, 9, 4)]])
    assert len(images) == 5 and len(images.groups) == 3  # 4×4, 6×9 (two), 5×5
    heights, widths = images.sizes()
    assert heights.tolist() == [4, 4, 6, 5, 6] and widths.tolist() == [4, 4, 9, 5, 9]
    picked = images[torch.tensor([4, 0, 3, 2])]
    values = [int(picked.groups[int(g)][int(r)].flatten()[0])
              for g, r in zip(picked.group_of, picked.rows, strict=True)]
    assert values == [4, 0, 3, 2]
    assert image_sizes(picked)[0].tolist() == [6, 4, 5, 6]  # type: ignore[union-attr]
    assert image_sizes(torch.zeros(2, 3, 7, 8)) == (7, 8)
    assert len(images[1:3]) == 2


def test_the_pre_training_sources_load_at_their_native_size() -> None:
    images, provenance = load_native_sources(
        [DataSource(dataset="sklearn-digits", split="train", classes=[0, 2], limit=20)])
    assert len(images) == 20 and [tuple(g.shape[1:]) for g in images.groups] == [(3, 8, 8)]
    assert provenance[0]["images"] == 20


def test_poisons_are_read_as_written(tmp_path: pytest.TempPathFactory) -> None:
    folder = tmp_path / "images"  # type: ignore[operator]
    folder.mkdir()
    Image.fromarray(np.zeros((30, 70, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((12, 10, 3), dtype=np.uint8)).save(folder / "b.png")
    assert [tuple(i.shape) for i in read_native_folder(folder)] == [(3, 30, 70), (3, 12, 10)]


def test_test_images_are_resized_on_the_shorter_side_then_centre_cropped() -> None:
    wide = torch.zeros(3, 20, 60, dtype=torch.uint8)
    wide[:, :, 27:33] = 255  # a bar at the centre stays at the centre, not squashed
    out = resize_center_crop([wide], 28)  # shorter side to 32, then the central 28×28
    assert out.shape == (1, 3, 28, 28)
    bar = out[0, 0, 14] > 127
    columns = torch.nonzero(bar).flatten()
    assert 8 <= len(columns) <= 11 and abs(float(columns.float().mean()) - 13.5) <= 1
    square = torch.randint(0, 256, (2, 3, 28, 28), dtype=torch.uint8)
    assert resize_center_crop(square, 28).shape == (2, 3, 28, 28)
