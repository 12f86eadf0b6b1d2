"""Datasets read by torchvision's own loaders, plus the ``imagefolder:`` and ``npz:`` kinds.

Every source reads torchvision's usual layout beneath the data root (``cifar-10-batches-py``,
``stl10_binary``, ``train_32x32.mat``, ``gtsrb/GTSRB/...``, ``MNIST/raw``, ``FashionMNIST/raw``,
``food-101``) and yields uint8 images ``[3, S, S]`` with int labels.

Missing files are reported before torchvision is called, so the user sees which path was
looked in; anything torchvision raises while reading (md5 mismatch, truncated or unparsable
files, a failed download) becomes a one-line `UserInputError`.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torchvision import datasets as tv_datasets

from sslbackdoor.data.datasets import (
    DatasetRequest,
    TensorImageDataset,
    TransformedDataset,
    register_dataset,
    resize_uint8,
)
from sslbackdoor.errors import UserInputError

DOWNLOAD_HINT = "pass --download to fetch it (needs internet) or --data-root DIR"

GTSRB_CLASSES = (
    "speed limit (20km/h)", "speed limit (30km/h)", "speed limit (50km/h)",
    "speed limit (60km/h)", "speed limit (70km/h)", "speed limit (80km/h)",
    "end of speed limit (80km/h)", "speed limit (100km/h)", "speed limit (120km/h)",
    "no passing", "no passing for vehicles over 3.5 metric tons",
    "right-of-way at the next intersection", "priority road", "yield", "stop",
    "no vehicles", "vehicles over 3.5 metric tons prohibited", "no entry",
    "general caution", "dangerous curve to the left", "dangerous curve to the right",
    "double curve", "bumpy road", "slippery road", "road narrows on the right", "road work",
    "traffic signals", "pedestrians", "children crossing", "bicycles crossing",
    "beware of ice/snow", "wild animals crossing", "end of all speed and passing limits",
    "turn right ahead", "turn left ahead", "ahead only", "go straight or right",
    "go straight or left", "keep right", "keep left", "roundabout mandatory",
    "end of no passing", "end of no passing by vehicles over 3.5 metric tons",
)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck")
SVHN_CLASSES = tuple(str(digit) for digit in range(10))
NPZ_FORMAT = ("an .npz with 'x' uint8 N×H×W×3, 'y' integer (N,) or (N,1) and optionally "
              "'classes' (str array)")
NPZ_KEYS = ("x", "y", "classes")
NPZ_LAYOUT = ("BadEncoder's layout: npz:DIR with DIR/train.npz and DIR/test.npz (npz:FILE.npz "
              "serves only where one split is read, e.g. shadow images)")

T = TypeVar("T")


def _one_line(exc: BaseException) -> str:
    """`TypeName: message` with all whitespace runs collapsed, for one-line errors."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _size(request: DatasetRequest, default: int) -> int:
    return request.image_size if request.image_size is not None else default


def _require_files(name: str, request: DatasetRequest, paths: Sequence[Path]) -> None:
    """Raise a one-line error naming the first of `paths` that is absent (unless downloading)."""
    if request.download:
        return
    for path in paths:
        if not path.exists():
            raise UserInputError(f"dataset {name!r} not found: {path} does not exist "
                                 f"(looked in data root {request.root}); {DOWNLOAD_HINT}")


def _construct(name: str, request: DatasetRequest, folder: Path, factory: Callable[[], T]) -> T:
    """Run a torchvision constructor; whatever it raises becomes a one-line UserInputError."""
    try:
        return factory()
    except UserInputError:
        raise
    except Exception as exc:
        # torchvision raises RuntimeError, OSError, AssertionError, pickle/zip errors... for
        # missing, corrupt or unofficial files; the user only needs what was read and why.
        if request.download:
            raise UserInputError(f"dataset {name!r} could not be downloaded into or read from "
                                 f"{folder} ({_one_line(exc)}); check the internet connection, "
                                 f"or put the files there yourself and drop --download") from exc
        raise UserInputError(f"dataset {name!r} in {folder} could not be read "
                             f"({_one_line(exc)}); the files may be corrupt, incomplete or not "
                             f"the official release: delete them and pass --download (needs "
                             f"internet), or pass --data-root DIR with a good copy") from exc


class TorchvisionDataset(TransformedDataset):
    """A TransformedDataset whose unreadable items raise a one-line UserInputError.

    Items are (uint8 [3, S, S], int label).
    """

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            return super().__getitem__(index)
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{self.provenance}: item {index} could not be read "
                                 f"({_one_line(exc)})") from exc


# --- torchvision's standard sets -------------------------------------------------------------


@register_dataset("cifar10", splits=("train", "test"), native_size=32,
                  description="CIFAR-10 (torchvision layout: cifar-10-batches-py)")
def _cifar10(request: DatasetRequest) -> TorchvisionDataset:
    folder = request.root / tv_datasets.CIFAR10.base_folder
    names = [name for name, _ in tv_datasets.CIFAR10.train_list + tv_datasets.CIFAR10.test_list]
    # torchvision checks every batch (and the meta file) whichever split is asked for.
    _require_files("cifar10", request,
                   [folder / name for name in [*names, tv_datasets.CIFAR10.meta["filename"]]])
    base = _construct("cifar10", request, folder, lambda: tv_datasets.CIFAR10(
        str(request.root), train=request.split == "train", download=request.download))
    return TorchvisionDataset(base, base.classes,
                              f"torchvision CIFAR10 {request.split} from {folder}",
                              _size(request, 32))


@register_dataset("stl10", splits=("train", "test", "unlabeled"), native_size=96,
                  description="STL-10 (torchvision layout: stl10_binary); unlabeled label -1")
def _stl10(request: DatasetRequest) -> TorchvisionDataset:
    folder = request.root / tv_datasets.STL10.base_folder
    # As for CIFAR-10, torchvision checks all five binaries for any split.
    files = [name for name, _ in tv_datasets.STL10.train_list + tv_datasets.STL10.test_list]
    _require_files("stl10", request, [folder / name for name in files])
    base = _construct("stl10", request, folder, lambda: tv_datasets.STL10(
        str(request.root), split=request.split, download=request.download))
    # torchvision sets `.classes` only when class_names.txt is present.
    classes = getattr(base, "classes", STL10_CLASSES)
    return TorchvisionDataset(base, classes, f"torchvision STL10 {request.split} from {folder}",
                              _size(request, 96))


@register_dataset("svhn", splits=("train", "test"), native_size=32,
                  description="SVHN cropped digits (torchvision layout: train_32x32.mat)")
def _svhn(request: DatasetRequest) -> TorchvisionDataset:
    path = request.root / tv_datasets.SVHN.split_list[request.split][1]
    _require_files("svhn", request, [path])
    base = _construct("svhn", request, path, lambda: tv_datasets.SVHN(
        str(request.root), split=request.split, download=request.download))
    return TorchvisionDataset(base, SVHN_CLASSES, f"torchvision SVHN {request.split} from {path}",
                              _size(request, 32))


def _gtsrb_folder_labels(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Relabel training samples by their class folder's number (00000..00042).

    torchvision numbers the folders by their rank among those present, which is only the
    class id when all 43 folders exist.
    """
    relabelled = []
    for path, _ in samples:
        folder = Path(path).parent.name
        if not folder.isdigit() or int(folder) >= len(GTSRB_CLASSES):
            raise UserInputError(f"GTSRB training folder {Path(path).parent} is not a class id "
                                 f"00000..{len(GTSRB_CLASSES) - 1:05d}")
        relabelled.append((path, int(folder)))
    return relabelled


@register_dataset("gtsrb", splits=("train", "test"), native_size=None,
                  description="German traffic signs, 43 classes (torchvision layout: gtsrb/)")
def _gtsrb(request: DatasetRequest) -> TorchvisionDataset:
    base_folder = request.root / "gtsrb"
    if request.split == "train":
        expected = [base_folder / "GTSRB" / "Training"]
    else:
        expected = [base_folder / "GTSRB" / "Final_Test" / "Images",
                    base_folder / "GT-final_test.csv"]
    _require_files("gtsrb", request, expected)
    base = _construct("gtsrb", request, base_folder, lambda: tv_datasets.GTSRB(
        str(request.root), split=request.split, download=request.download))
    if request.split == "train":
        base._samples = _gtsrb_folder_labels(base._samples)
    # Images vary in size; 32 is what the BadEncoder reference code trains on.
    return TorchvisionDataset(base, GTSRB_CLASSES,
                              f"torchvision GTSRB {request.split} from {expected[0]}",
                              _size(request, 32))


def _idx_dataset(name: str, cls: type[tv_datasets.MNIST],
                 request: DatasetRequest) -> TensorImageDataset:
    """MNIST-style idx files under root/<ClassName>/raw → uint8 [3, S, S] (grey repeated).

    torchvision holds the whole split as one uint8 tensor, so it is resized in one batched
    call (per-image resizing took ~2 minutes for the 60k Fashion-MNIST images at 32 px).
    """
    raw = request.root / cls.__name__ / "raw"
    # torchvision requires all four un-gzipped files whichever split is asked for.
    files = [raw / Path(archive).stem for archive, _ in cls.resources]
    _require_files(name, request, files)
    base = _construct(name, request, raw, lambda: cls(
        str(request.root), train=request.split == "train", download=request.download))
    images = resize_uint8(base.data.unsqueeze(1), _size(request, 28)).repeat(1, 3, 1, 1)
    return TensorImageDataset(images, torch.as_tensor(base.targets), base.classes,
                              f"torchvision {cls.__name__} {request.split} from {raw}")


@register_dataset("mnist", splits=("train", "test"), native_size=28,
                  description="MNIST digits (torchvision layout: MNIST/raw idx files)")
def _mnist(request: DatasetRequest) -> TensorImageDataset:
    return _idx_dataset("mnist", tv_datasets.MNIST, request)


@register_dataset("fashion-mnist", splits=("train", "test"), native_size=28,
                  description="Fashion-MNIST (torchvision layout: FashionMNIST/raw idx files)")
def _fashion_mnist(request: DatasetRequest) -> TensorImageDataset:
    return _idx_dataset("fashion-mnist", tv_datasets.FashionMNIST, request)


@register_dataset("food101", splits=("train", "test"), native_size=None,
                  description="Food-101, 101 dishes (torchvision layout: food-101/)")
def _food101(request: DatasetRequest) -> TorchvisionDataset:
    folder = request.root / "food-101"
    _require_files("food101", request,
                   [folder / "meta" / f"{request.split}.json", folder / "images"])
    base = _construct("food101", request, folder, lambda: tv_datasets.Food101(
        str(request.root), split=request.split, download=request.download))
    # Photos are up to 512 px on a side and vary; 224 is the usual ImageNet-style input.
    return TorchvisionDataset(base, base.classes,
                              f"torchvision Food101 {request.split} from {folder}",
                              _size(request, 224))


# --- user-supplied folders and files ------------------------------------------------------------


def _kind_path(kind: str, request: DatasetRequest) -> Path:
    if not request.arg:
        raise UserInputError(f"{kind}: needs a path, e.g. {kind}:data/my_{kind}")
    path = Path(request.arg).expanduser()
    if not path.exists():
        raise UserInputError(f"dataset '{kind}:{request.arg}' not found: {path} does not exist; "
                             f"check the path after '{kind}:'")
    return path


class SharedClassesImageFolder(tv_datasets.ImageFolder):
    """ImageFolder numbering classes by a given name list, so train and test labels agree."""

    def __init__(self, root: Path, class_names: Sequence[str]) -> None:
        self.shared_class_names = list(class_names)
        super().__init__(str(root), allow_empty=True)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        return self.shared_class_names, {n: i for i, n in enumerate(self.shared_class_names)}


def _class_folders(*roots: Path) -> list[str]:
    return sorted({entry.name for root in roots for entry in root.iterdir() if entry.is_dir()})


@register_dataset("imagefolder:", splits=("train", "test"), native_size=None,
                  description="imagefolder:PATH, PATH/<class>/*.png or PATH/{train,test}/<class>/")
def _imagefolder(request: DatasetRequest) -> TorchvisionDataset:
    path = _kind_path("imagefolder", request)
    name = f"imagefolder:{request.arg}"
    if request.image_size is None:
        raise UserInputError(f"{name}: images may differ in size, so an image size is needed "
                             f"(e.g. --image-size 32)")
    splits = [path / "train", path / "test"]
    folder = path / request.split if all(p.is_dir() for p in splits) else path
    # Classes come from both split folders: a class missing from one split keeps its index.
    classes = _class_folders(*splits) if folder != path else _class_folders(path)
    if not classes:
        raise UserInputError(f"{name}: no class folders in {folder}; expected "
                             f"{folder}/<class name>/<image files>")
    base = _construct(name, request, folder, lambda: SharedClassesImageFolder(folder, classes))
    if len(base) == 0:
        raise UserInputError(f"{name}: no image files in the class folders of {folder}")
    return TorchvisionDataset(base, classes, f"torchvision ImageFolder {folder}",
                              request.image_size)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays 'x', 'y' (and 'classes') of an .npz file, never unpickled; every header is
    checked before any data is read, so memory stays bounded by what the file really holds."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.removesuffix(".npy") in NPZ_KEYS:
                    _check_npy_header(path, archive, info)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in NPZ_KEYS if key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserInputError(f"{path} is not a readable .npz ({_one_line(exc)}); expected "
                             f"{NPZ_FORMAT}") from exc


def _check_npy_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse object arrays (only pickle could read them) and arrays whose header claims
    more bytes than the member holds or than this machine has (numpy would allocate the
    claimed size before reading)."""
    key = info.filename.removesuffix(".npy")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(member)
        held = info.file_size - member.tell()
    if dtype.hasobject:
        raise UserInputError(f"{path}: '{key}' is an object array, which only pickle could read; "
                             f"refused (sslbackdoor never unpickles); expected {NPZ_FORMAT}")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed > held:
        raise UserInputError(f"{path}: '{key}' claims {dtype} {shape} ({claimed} bytes) but holds "
                             f"{held} bytes; the file is truncated or not a plain .npz")
    if claimed > _physical_memory() // 2:
        raise UserInputError(f"{path}: '{key}' is {claimed / 2**30:.1f} GiB, more than half of "
                             f"this machine's memory; split it into smaller files")


def _physical_memory() -> int:
    return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def _npz_checked(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Validated (x uint8 [N,H,W,3], y int64 [N]) of a reference-format npz."""
    def bad(problem: str) -> UserInputError:
        return UserInputError(f"{path}: {problem}; expected {NPZ_FORMAT}")

    if "x" not in arrays or "y" not in arrays:
        raise bad(f"keys are {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise bad(f"'x' is {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape not in ((len(x),), (len(x), 1)):
        raise bad(f"'y' is {y.dtype} {y.shape} for {len(x)} images")
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and labels.min() < -1:
        raise bad(f"'y' has label {labels.min()} (labels are >= 0, or -1 for unlabeled)")
    return x, labels


def _npz_classes(path: Path, arrays: dict[str, np.ndarray], labels: np.ndarray) -> list[str]:
    count = int(labels.max()) + 1 if labels.size else 0
    if "classes" not in arrays:
        return [str(i) for i in range(count)]
    names = arrays["classes"]
    if names.dtype.kind != "U" or names.ndim != 1 or len(names) < count:
        raise UserInputError(f"{path}: 'classes' must be a str array of at least {count} names, "
                             f"got {names.dtype} {names.shape}; expected {NPZ_FORMAT}")
    return [str(name) for name in names]


@register_dataset("npz:", splits=("train", "test"), native_size=None,
                  description="npz:DIR (DIR/train.npz, DIR/test.npz: BadEncoder's layout) or "
                              "npz:FILE.npz (one split); x uint8 N×H×W×3, y")
def _npz(request: DatasetRequest) -> TensorImageDataset:
    path = npz_split_file(_kind_path("npz", request), request.split)
    arrays = _npz_arrays(path)
    x, labels = _npz_checked(path, arrays)
    classes = _npz_classes(path, arrays, labels)
    images = resize_uint8(torch.from_numpy(x).permute(0, 3, 1, 2), request.image_size)
    return TensorImageDataset(images, torch.from_numpy(labels), classes,
                              f"npz {path} ({len(x)} images {x.shape[1]}×{x.shape[2]})")


def npz_split_file(path: Path, split: str) -> Path:
    """The file an `npz:` path gives for a split: DIR/<split>.npz for a folder, the file itself
    otherwise."""
    if not path.is_dir():
        return path
    file = path / f"{split}.npz"
    if not file.is_file():
        raise UserInputError(f"npz:{path} has no {split}.npz; expected {NPZ_LAYOUT}")
    return file
