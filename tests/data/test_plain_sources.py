import pytest
import torch

from sslbackdoor.config import DataSource
from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.data.plain_sources import parse_colour
from sslbackdoor.data.sources import load_sources
from sslbackdoor.errors import UserInputError


def test_plain_black_is_limit_images_of_zeros_at_the_requested_size() -> None:
    images, provenance = load_sources(
        [DataSource(dataset="plain:black", split="unlabeled", limit=5)], 12)
    assert images.shape == (5, 3, 12, 12) and images.dtype == torch.uint8
    assert int(images.max()) == 0
    assert "5 solid (0, 0, 0) images" in provenance[0]["source"]


def test_plain_rgb_colour_fills_every_pixel() -> None:
    dataset = load_dataset("plain:10,200,255", "train", image_size=8, limit=2)
    image, label = dataset[1]
    assert label == 0
    assert image[:, 3, 5].tolist() == [10, 200, 255]
    assert torch.equal(image, image[:, :1, :1].expand(3, 8, 8))


@pytest.mark.parametrize("text", ["purple", "1,2", "0,0,256", "a,b,c", ""])
def test_bad_colour_names_what_is_valid(text: str) -> None:
    with pytest.raises(UserInputError, match="black, white, gray or R,G,B"):
        parse_colour(text)


def test_plain_without_limit_or_size_says_what_is_missing() -> None:
    with pytest.raises(UserInputError, match="give a limit"):
        load_dataset("plain:black", "unlabeled", image_size=8)
    with pytest.raises(UserInputError, match="give an image size"):
        load_dataset("plain:black", "unlabeled", limit=3)


def test_plain_has_no_test_split() -> None:
    with pytest.raises(UserInputError, match="no split 'test'"):
        load_dataset("plain:black", "test", image_size=8, limit=1)
