"""Downstream tasks read two real splits: BadEncoder's npz layout, and no train/test leakage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sslbackdoor.downstream.evaluate import (
    check_split_leakage,
    load_task,
    tolerated_overlap,
)
from sslbackdoor.errors import UserInputError


def _images(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)


def _layout(folder: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """BadEncoder's layout: folder/train.npz and folder/test.npz, labels cycling 0..3."""
    folder.mkdir()
    for split, x in (("train", train), ("test", test)):
        np.savez(folder / f"{split}.npz", x=x, y=np.arange(len(x)) % 4)
    return folder


def test_npz_folder_gives_the_train_and_the_test_file(tmp_path: Path) -> None:
    train, test = _images(0, 40), _images(1, 20)
    folder = _layout(tmp_path / "task", train, test)
    task = load_task(f"npz:{folder}", 8)
    assert task.train_images.shape[0] == 40 and task.test_images.shape[0] == 20
    assert np.array_equal(task.test_images.permute(0, 2, 3, 1).numpy(), test)
    assert str(folder / "train.npz") in task.provenance["train"]
    assert str(folder / "test.npz") in task.provenance["test"]


def test_one_npz_file_is_refused_where_two_splits_are_needed(tmp_path: Path) -> None:
    path = tmp_path / "all.npz"
    np.savez(path, x=_images(0, 10), y=np.arange(10) % 4)
    with pytest.raises(UserInputError) as info:
        load_task(f"npz:{path}", 8)
    message = str(info.value)
    assert "DIR/train.npz and DIR/test.npz" in message and str(path) in message
    assert "\n" not in message


def test_npz_folder_without_test_npz_names_the_layout(tmp_path: Path) -> None:
    folder = _layout(tmp_path / "task", _images(0, 10), _images(1, 10))
    (folder / "test.npz").unlink()
    with pytest.raises(UserInputError, match=r"has no test\.npz; expected BadEncoder's layout"):
        load_task(f"npz:{folder}", 8)


def test_a_stray_duplicate_warns_in_one_line(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    train, test = _images(0, 40), _images(1, 50)
    test[7] = train[3]
    task = load_task(f"npz:{_layout(tmp_path / 'task', train, test)}", 8)
    assert task.test_images.shape[0] == 50
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "1 of its 50 test images also appear in its 40 training images" in err


def test_more_overlap_than_stray_duplicates_is_refused(tmp_path: Path) -> None:
    train, test = _images(0, 40), _images(1, 50)
    test[:2] = train[:2]  # 2 of 50: above the 1 tolerated for a test set under 200
    with pytest.raises(UserInputError) as info:
        load_task(f"npz:{_layout(tmp_path / 'task', train, test)}", 8)
    message = str(info.value)
    assert "2 of its 50 test images also appear" in message and "the splits leak" in message
    assert "1% of the test set, at least 1)" in message


def test_a_copied_test_file_is_refused(tmp_path: Path) -> None:
    folder = _layout(tmp_path / "task", _images(0, 30), _images(1, 30))
    shutil.copyfile(folder / "train.npz", folder / "test.npz")
    with pytest.raises(UserInputError, match="30 of its 30 test images"):
        load_task(f"npz:{folder}", 8)


def test_the_tolerance_is_one_percent_and_at_least_one() -> None:
    assert [tolerated_overlap(n) for n in (20, 100, 250, 1000, 10_000)] == [1, 1, 2, 10, 100]


@pytest.mark.parametrize(("name", "size"), [("sklearn-digits", 8), ("mnist-5k", 28),
                                            ("opencv-digits", 20), ("fashion-mnist", 28)])
def test_the_shipped_datasets_share_no_image_between_splits(
        name: str, size: int, capsys: pytest.CaptureFixture[str]) -> None:
    task = load_task(name, size)
    assert check_split_leakage(name, task.train_images, task.test_images) == 0
    assert "warning" not in capsys.readouterr().err
