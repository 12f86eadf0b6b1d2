"""Each torchvision-backed source reads a tiny fake copy written in the real on-disk format."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.cifar
import torchvision.datasets.stl10
import torchvision.datasets.svhn
from PIL import Image

from sslbackdoor.data.datasets import ImageDataset, Split, dataset_labels, load_dataset
from sslbackdoor.data.torchvision_sources import GTSRB_CLASSES
from sslbackdoor.errors import UserInputError

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
STL_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _pixels(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _chw(image_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image_hwc).permute(2, 0, 1)


def _items(dataset: ImageDataset) -> tuple[list[torch.Tensor], list[int]]:
    pairs = [dataset[i] for i in range(len(dataset))]
    return [image for image, _ in pairs], [label for _, label in pairs]


def _assert_images(images: list[torch.Tensor], side: int) -> None:
    for image in images:
        assert image.dtype == torch.uint8
        assert tuple(image.shape) == (3, side, side)


def _exists_only(fpath: str | Path, md5: str | None = None) -> bool:
    return os.path.isfile(fpath)


@pytest.fixture
def skip_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    # CIFAR-10, STL-10 and SVHN compare every file with the official release's md5, which
    # fake files cannot match; only that comparison is replaced, by a plain existence check.
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10,
                   torchvision.datasets.svhn):
        monkeypatch.setattr(module, "check_integrity", _exists_only)


# --- CIFAR-10 -------------------------------------------------------------------------------


def _write_cifar(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Fake cifar-10-batches-py: 5 train batches of 2 images, a test batch of 3 (HWC kept)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    batches = [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]
    for name, count in batches:
        images = _pixels(rng, count, 32, 32, 3)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        # Rows are the R, G then B planes, row-major; keys are str, as the Python-2 pickles
        # of the real release load under encoding="latin1".
        rows = images.transpose(0, 3, 1, 2).reshape(count, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels, "batch_label": name}, f, protocol=2)
        written[name] = (images, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": 2}, f, protocol=2)
    return written


def test_cifar10_round_trips_pixels_and_labels(tmp_path: Path, skip_md5: None) -> None:
    written = _write_cifar(tmp_path, np.random.default_rng(0))
    train = load_dataset("cifar10", "train", root=tmp_path)
    test = load_dataset("cifar10", "test", root=tmp_path)

    assert len(train) == 10 and len(test) == 3
    assert list(train.classes) == CIFAR_NAMES
    images, labels = _items(test)
    _assert_images(images, 32)
    assert labels == written["test_batch"][1]
    for image, expected in zip(images, written["test_batch"][0], strict=True):
        assert torch.equal(image, _chw(expected))
    first_of_batch_3 = train[4]
    assert torch.equal(first_of_batch_3[0], _chw(written["data_batch_3"][0][0]))
    assert first_of_batch_3[1] == written["data_batch_3"][1][0]
    assert "cifar-10-batches-py" in train.provenance and "train" in train.provenance


def test_cifar10_resizes(tmp_path: Path, skip_md5: None) -> None:
    _write_cifar(tmp_path, np.random.default_rng(1))
    images, _ = _items(load_dataset("cifar10", "test", root=tmp_path, image_size=16))
    _assert_images(images, 16)


def test_cifar10_failing_md5_is_a_one_line_user_error(tmp_path: Path) -> None:
    _write_cifar(tmp_path, np.random.default_rng(2))
    with pytest.raises(UserInputError) as info:
        load_dataset("cifar10", "train", root=tmp_path)
    message = str(info.value)
    assert "'cifar10'" in message and str(tmp_path) in message and "corrupt" in message
    assert "\n" not in message


# --- STL-10 ----------------------------------------------------------------------------------


def _write_stl_images(path: Path, images: np.ndarray) -> None:
    # The binaries store each channel column-major: image, channel, column, row.
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())


def _write_stl10(root: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    written = {}
    for split, count in (("train", 3), ("test", 2)):
        images = _pixels(rng, count, 96, 96, 3)
        labels = [int(v) for v in rng.integers(0, 10, size=count)]
        _write_stl_images(folder / f"{split}_X.bin", images)
        (folder / f"{split}_y.bin").write_bytes(bytes(label + 1 for label in labels))  # 1-based
        written[split] = (images, labels)
    unlabeled = _pixels(rng, 2, 96, 96, 3)
    _write_stl_images(folder / "unlabeled_X.bin", unlabeled)
    written["unlabeled"] = (unlabeled, [-1, -1])
    (folder / "class_names.txt").write_text("\n".join(STL_NAMES) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join("0 1 2" for _ in range(10)) + "\n")
    return written


@pytest.mark.parametrize("split", ["train", "test", "unlabeled"])
def test_stl10_splits_round_trip(tmp_path: Path, skip_md5: None, split: Split) -> None:
    written = _write_stl10(tmp_path, np.random.default_rng(3))
    dataset = load_dataset("stl10", split, root=tmp_path)

    images, labels = _items(dataset)
    expected_images, expected_labels = written[split]
    assert len(dataset) == len(expected_labels)
    _assert_images(images, 96)
    assert labels == expected_labels
    for image, expected in zip(images, expected_images, strict=True):
        assert torch.equal(image, _chw(expected))
    assert list(dataset.classes) == STL_NAMES


def test_stl10_resizes_to_32(tmp_path: Path, skip_md5: None) -> None:
    _write_stl10(tmp_path, np.random.default_rng(4))
    images, _ = _items(load_dataset("stl10", "train", root=tmp_path, image_size=32))
    _assert_images(images, 32)


# --- SVHN -----------------------------------------------------------------------------------


def test_svhn_maps_label_10_to_digit_0(tmp_path: Path, skip_md5: None) -> None:
    rng = np.random.default_rng(5)
    images = _pixels(rng, 4, 32, 32, 3)
    raw_labels = np.array([[10], [1], [9], [10]], dtype=np.uint8)  # SVHN writes digit 0 as 10
    scipy.io.savemat(tmp_path / "test_32x32.mat",
                     {"X": images.transpose(1, 2, 3, 0), "y": raw_labels})

    dataset = load_dataset("svhn", "test", root=tmp_path)
    loaded, labels = _items(dataset)
    assert labels == [0, 1, 9, 0]
    assert list(dataset.classes) == [str(d) for d in range(10)]
    _assert_images(loaded, 32)
    for image, expected in zip(loaded, images, strict=True):
        assert torch.equal(image, _chw(expected))


# --- GTSRB ----------------------------------------------------------------------------------


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_gtsrb_train_labels_come_from_folder_numbers(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    training = tmp_path / "gtsrb" / "GTSRB" / "Training"
    square = _pixels(rng, 32, 32, 3)
    _save(training / "00012" / "00000_00000.ppm", square)
    _save(training / "00014" / "00000_00000.ppm", _pixels(rng, 41, 37, 3))
    (training / "00014" / "GT-00014.csv").write_text("not an image\n")

    dataset = load_dataset("gtsrb", "train", root=tmp_path)
    images, labels = _items(dataset)
    assert labels == [12, 14]
    assert dataset_labels(dataset).tolist() == [12, 14]
    assert [dataset.classes[label] for label in labels] == ["priority road", "stop"]
    assert len(dataset.classes) == 43 and dataset.classes[0] == "speed limit (20km/h)"
    _assert_images(images, 32)  # default side when no image size is asked for
    assert torch.equal(images[0], _chw(square))


def test_gtsrb_test_split_reads_csv(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    base = tmp_path / "gtsrb"
    rows = [("00000.ppm", 14), ("00001.ppm", 0), ("00002.ppm", 42)]
    for name, _ in rows:
        _save(base / "GTSRB" / "Final_Test" / "Images" / name, _pixels(rng, 30, 35, 3))
    with open(base / "GT-final_test.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2",
                         "ClassId"])
        for name, class_id in rows:
            writer.writerow([name, 35, 30, 5, 5, 25, 30, class_id])

    dataset = load_dataset("gtsrb", "test", root=tmp_path, image_size=48)
    images, labels = _items(dataset)
    assert labels == [14, 0, 42]
    _assert_images(images, 48)
    assert GTSRB_CLASSES[42] == "end of no passing by vehicles over 3.5 metric tons"


# --- MNIST and Fashion-MNIST ----------------------------------------------------------------


def _write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    count = len(images)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 2051, count, 28, 28) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
        struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("name", "folder", "label", "class_name"), [
    ("mnist", "MNIST", 3, "3 - three"),
    ("fashion-mnist", "FashionMNIST", 7, "Sneaker"),
])
def test_idx_sources_repeat_grey_over_channels(tmp_path: Path, name: str, folder: str,
                                               label: int, class_name: str) -> None:
    rng = np.random.default_rng(8)
    raw = tmp_path / folder / "raw"
    _write_idx(raw, "train", _pixels(rng, 2, 28, 28), np.array([label, 0]))
    test_images = _pixels(rng, 3, 28, 28)
    _write_idx(raw, "t10k", test_images, np.array([label, 9, 1]))

    dataset = load_dataset(name, "test", root=tmp_path)
    images, labels = _items(dataset)
    assert labels == [label, 9, 1]
    assert dataset.classes[label] == class_name and len(dataset.classes) == 10
    _assert_images(images, 28)
    for image, grey in zip(images, test_images, strict=True):
        assert all(torch.equal(image[c], torch.from_numpy(grey)) for c in range(3))
    assert len(load_dataset(name, "train", root=tmp_path)) == 2


# --- Food-101 -------------------------------------------------------------------------------


def test_food101_reads_meta_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    base = tmp_path / "food-101"
    split_files = {"train": {"apple_pie": ["apple_pie/101"], "sushi": ["sushi/202", "sushi/203"]},
                   "test": {"apple_pie": ["apple_pie/301"], "sushi": ["sushi/402"]}}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "classes.txt").write_text("apple_pie\nsushi\n")
    for split, metadata in split_files.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(metadata))
        for ids in metadata.values():
            for image_id in ids:
                _save(base / "images" / f"{image_id}.jpg", _pixels(rng, 40, 50, 3))

    train = load_dataset("food101", "train", root=tmp_path)
    images, labels = _items(train)
    assert list(train.classes) == ["apple_pie", "sushi"]
    assert labels == [0, 1, 1]
    _assert_images(images, 224)  # default side when no image size is asked for
    test_images, test_labels = _items(load_dataset("food101", "test", root=tmp_path,
                                                   image_size=24))
    assert test_labels == [0, 1]
    _assert_images(test_images, 24)


# --- ImageFolder ----------------------------------------------------------------------------


def test_imagefolder_with_split_folders_keeps_class_indices(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    cat, dog, frog = (_pixels(rng, 16, 16, 3) for _ in range(3))
    _save(tmp_path / "train" / "cat" / "a.png", cat)
    _save(tmp_path / "train" / "dog" / "b.png", dog)
    _save(tmp_path / "test" / "frog" / "c.png", frog)  # a class only the test split has

    train = load_dataset(f"imagefolder:{tmp_path}", "train", image_size=16)
    test = load_dataset(f"imagefolder:{tmp_path}", "test", image_size=16)
    assert list(train.classes) == list(test.classes) == ["cat", "dog", "frog"]
    train_images, train_labels = _items(train)
    test_images, test_labels = _items(test)
    assert train_labels == [0, 1] and test_labels == [2]
    assert torch.equal(train_images[1], _chw(dog))
    assert torch.equal(test_images[0], _chw(frog))
    assert str(tmp_path / "train") in train.provenance


def test_imagefolder_without_split_folders_reads_path_for_both(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    _save(tmp_path / "cat" / "a.png", _pixels(rng, 20, 12, 3))
    _save(tmp_path / "dog" / "b.png", _pixels(rng, 9, 9, 3))
    _save(tmp_path / "dog" / "c.png", _pixels(rng, 9, 9, 3))

    for split in ("train", "test"):
        dataset = load_dataset(f"imagefolder:{tmp_path}", split, image_size=8)
        images, labels = _items(dataset)
        assert labels == [0, 1, 1] and list(dataset.classes) == ["cat", "dog"]
        _assert_images(images, 8)


def test_imagefolder_needs_an_image_size_and_an_existing_path(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(UserInputError, match="image size"):
        load_dataset(f"imagefolder:{tmp_path}", "train")
    with pytest.raises(UserInputError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", "train", image_size=8)


# --- npz (BadEncoder reference format) ------------------------------------------------------


def test_npz_reference_format_with_column_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    x = _pixels(rng, 5, 16, 16, 3)
    y = np.array([[0], [3], [1], [3], [2]], dtype=np.int64)
    path = tmp_path / "train.npz"
    np.savez(path, x=x, y=y)

    for split in ("train", "test"):
        dataset = load_dataset(f"npz:{path}", split)
        images, labels = _items(dataset)
        assert labels == [0, 3, 1, 3, 2]
        assert list(dataset.classes) == ["0", "1", "2", "3"]
        assert all(torch.equal(image, _chw(expected)) for image, expected in zip(images, x,
                                                                                 strict=True))
        assert str(path) in dataset.provenance
    resized, _ = _items(load_dataset(f"npz:{path}", "train", image_size=32))
    _assert_images(resized, 32)


def test_npz_class_names_key(tmp_path: Path) -> None:
    path = tmp_path / "named.npz"
    np.savez(path, x=np.zeros((2, 8, 8, 3), dtype=np.uint8), y=np.array([1, 0]),
             classes=np.array(["cat", "dog"]))
    dataset = load_dataset(f"npz:{path}", "test")
    assert list(dataset.classes) == ["cat", "dog"] and dataset[0][1] == 1


@pytest.mark.parametrize(("arrays", "problem"), [
    ({"x": np.zeros((2, 8, 8, 3), dtype=np.uint8)}, "keys"),
    ({"x": np.zeros((2, 8, 8, 3), dtype=np.float32), "y": np.zeros(2, dtype=np.int64)}, "'x'"),
    ({"x": np.zeros((2, 3, 8, 8), dtype=np.uint8), "y": np.zeros(2, dtype=np.int64)}, "'x'"),
    ({"x": np.zeros((2, 8, 8, 3), dtype=np.uint8), "y": np.zeros(3, dtype=np.int64)}, "'y'"),
])
def test_bad_npz_is_a_user_error_naming_file_and_format(
        tmp_path: Path, arrays: dict[str, np.ndarray], problem: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(UserInputError) as info:
        load_dataset(f"npz:{path}", "train")
    message = str(info.value)
    assert str(path) in message and problem in message and "uint8 N×H×W×3" in message


def test_npz_that_is_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("hello")
    with pytest.raises(UserInputError, match=r"not a readable \.npz"):
        load_dataset(f"npz:{path}", "train")


# --- missing files --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "split", "missing"), [
    ("cifar10", "test", "cifar-10-batches-py"),
    ("stl10", "unlabeled", "stl10_binary"),
    ("svhn", "train", "train_32x32.mat"),
    ("gtsrb", "test", "Final_Test"),
    ("mnist", "train", "MNIST"),
    ("fashion-mnist", "test", "FashionMNIST"),
    ("food101", "train", "food-101"),
])
def test_missing_files_name_dataset_path_and_fix(tmp_path: Path, name: str, split: Split,
                                                 missing: str) -> None:
    with pytest.raises(UserInputError) as info:
        load_dataset(name, split, root=tmp_path)
    message = str(info.value)
    assert f"'{name}'" in message and str(tmp_path) in message and missing in message
    assert "--download" in message and "--data-root" in message
    assert "\n" not in message


def test_corrupt_idx_file_is_a_user_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw, "train", np.zeros((1, 28, 28), dtype=np.uint8), np.array([1]))
    _write_idx(raw, "t10k", np.zeros((1, 28, 28), dtype=np.uint8), np.array([1]))
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x00\x00garbage")
    with pytest.raises(UserInputError, match="could not be read"):
        load_dataset("mnist", "test", root=tmp_path)


# --- npz files that only pickle could read, or that claim more than they hold ----------------


def test_npz_object_array_is_refused_without_unpickling(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(UserInputError) as info:
        load_dataset(f"npz:{path}", "train")
    message = str(info.value)
    assert "'x' is an object array" in message and "never unpickles" in message
    assert "\n" not in message


def test_npz_header_claiming_more_than_the_file_holds_is_refused_before_allocating(
        tmp_path: Path) -> None:
    header = io.BytesIO()
    # 10^12 images of 32×32×3 bytes: numpy would try to allocate ~3 PB for it.
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False,
                                                  "shape": (10**12, 32, 32, 3)})
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + bytes(96))
        labels = io.BytesIO()
        np.save(labels, np.zeros(1, dtype=np.int64))
        archive.writestr("y.npy", labels.getvalue())
    with pytest.raises(UserInputError, match=r"'x' claims uint8 \(1000000000000, 32, 32, 3\)"):
        load_dataset(f"npz:{path}", "train")
