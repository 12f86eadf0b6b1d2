"""Hostile image files: refused in one line, before any pixel is decoded."""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sslbackdoor.data.images import PIXEL_LIMIT, read_rgb_image
from sslbackdoor.errors import UserInputError


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height RGB pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any pixel data is decoded (a 100000² image would need 30 GB)."""
    def refuse(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(("width", "height"), [(100_000, 100_000), (7_000, 7_000)])
def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(
        tmp_path: Path, width: int, height: int, no_decoding: None) -> None:
    # 100000² is past Pillow's own bomb check; 7000² (49 MP) only past this project's limit.
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    with pytest.raises(UserInputError, match="images of at most 40 megapixels") as info:
        read_rgb_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_pillow_refuses_the_same_images_wherever_it_is_called(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(8_000, 6_000))  # 48 MP
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert 2 * Image.MAX_IMAGE_PIXELS == PIXEL_LIMIT


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n", np.random.default_rng(0).bytes(2048),
                                     png_header(64, 64)[:40]])
def test_unreadable_images_are_one_line(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match="not a readable image") as info:
        read_rgb_image(path)
    assert "\n" not in str(info.value)


def test_missing_image_and_a_normal_one(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="file not found"):
        read_rgb_image(tmp_path / "none.png")
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "grey.png")
    image = read_rgb_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (7, 5)
