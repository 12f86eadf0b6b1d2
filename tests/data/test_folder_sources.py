"""`images:DIR`: a folder of images, each read safely."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sslbackdoor.data.folder_sources  # noqa: F401 - registers images:
from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.errors import UserInputError
from tests.data.test_images import png_header


def write_images(folder: Path, count: int) -> None:
    folder.mkdir()
    for index in range(count):
        Image.fromarray(np.full((12, 10, 3), 40 * index, np.uint8)).save(folder / f"{index}.png")


def test_a_folder_of_images_loads_resized(tmp_path: Path) -> None:
    write_images(tmp_path / "images", 3)
    dataset = load_dataset(f"images:{tmp_path / 'images'}", "unlabeled", image_size=8)
    assert len(dataset) == 3


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bomb.png", png_header(100_000, 100_000), "megapixels"),
    ("noise.png", np.random.default_rng(0).bytes(1024), "not a readable image"),
    ("empty.jpg", b"", "not a readable image"),
])
def test_one_hostile_image_in_the_folder_is_one_line(tmp_path: Path, name: str, content: bytes,
                                                      message: str) -> None:
    write_images(tmp_path / "images", 2)
    (tmp_path / "images" / name).write_bytes(content)
    with pytest.raises(UserInputError, match=message) as info:
        load_dataset(f"images:{tmp_path / 'images'}", "unlabeled", image_size=8)
    assert name in str(info.value) and "\n" not in str(info.value)
