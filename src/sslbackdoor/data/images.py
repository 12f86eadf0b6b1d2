"""Reading user-supplied image files: bounded pixel counts, one line for any bad file.

A PNG or JPEG header can claim any size (100000×100000 is 30 GB of RGB once decoded), so
the claimed size is checked before a pixel is decoded. Importing this module (the CLI does)
also lowers Pillow's own decompression-bomb limit for the whole process, so that a direct
`Image.open` elsewhere refuses the same files with `DecompressionBombError`.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

from PIL import Image

from sslbackdoor.errors import UserInputError, first_line

# 40 megapixels: above any camera photo or 8K frame (33 MP), ~120 MB decoded as RGB.
PIXEL_LIMIT = 40_000_000
# Pillow raises past twice MAX_IMAGE_PIXELS (and only warns past it).
Image.MAX_IMAGE_PIXELS = PIXEL_LIMIT // 2

# What Pillow raises for files it cannot decode varies by format plugin.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


def read_rgb_image(path: Path, what: str = "image") -> Image.Image:
    """An RGB copy of the image at `path`; missing, unreadable or oversized → UserInputError."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"cannot read {what} {path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below
            with Image.open(path) as image:
                check_pixel_count(image.size, path, what)
                return image.convert("RGB")
    except UserInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise UserInputError(f"cannot read {what} {path}: {first_line(exc).rstrip('.')}; {_LIMIT_TEXT}") from None
    except _DECODE_ERRORS as exc:
        raise UserInputError(f"cannot read {what} {path}: not a readable image "
                             f"({first_line(exc)})") from None


_LIMIT_TEXT = f"images of at most {PIXEL_LIMIT // 1_000_000} megapixels are read"


def check_pixel_count(size: tuple[int, int], path: Path, what: str = "image") -> None:
    width, height = size
    if width * height > PIXEL_LIMIT:
        raise UserInputError(f"cannot read {what} {path}: it is {width}×{height} pixels; {_LIMIT_TEXT}")
