"""``plain:COLOUR``: solid-colour images, the plain backgrounds of digit and clothing datasets.

CorruptEncoder pastes its reference object onto a background. The paper takes natural photos
because its downstream images are natural photos; where the downstream images are objects on a
plain background (MNIST, Fashion-MNIST), ``plain:black`` gives backgrounds that look like them.
COLOUR is a name (black, white, gray) or ``R,G,B`` with 0-255 components. The source has no
files: `limit` says how many images it holds, and it must be given.
"""

from __future__ import annotations

import torch

from sslbackdoor.data.datasets import DatasetRequest, TensorImageDataset, register_dataset
from sslbackdoor.errors import UserInputError

NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
}


def parse_colour(text: str) -> tuple[int, int, int]:
    """An RGB triple from a colour name or 'R,G,B' (0-255 each)."""
    if text in NAMED_COLOURS:
        return NAMED_COLOURS[text]
    parts = text.split(",")
    try:
        rgb = tuple(int(part) for part in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= value <= 255 for value in rgb):
        raise UserInputError(f"plain:{text}: colour must be {', '.join(NAMED_COLOURS)} or "
                             "R,G,B with components in 0-255")
    return rgb[0], rgb[1], rgb[2]


@register_dataset("plain:", splits=("train", "unlabeled"), native_size=None,
                  description="plain:COLOUR, solid-colour images (black, white, gray or R,G,B; "
                              "unlabeled; limit = how many)")
def _plain(request: DatasetRequest) -> TensorImageDataset:
    colour = parse_colour(request.arg or "")
    if request.image_size is None:
        raise UserInputError(f"plain:{request.arg}: give an image size")
    if request.limit is None:
        raise UserInputError(f"plain:{request.arg}: give a limit, the number of images wanted")
    pixel = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1)
    images = pixel.expand(request.limit, 3, request.image_size, request.image_size).clone()
    return TensorImageDataset(images, torch.zeros(request.limit, dtype=torch.long),
                              ["unlabeled"], f"{request.limit} solid {colour} images "
                              f"({request.image_size} px)")
