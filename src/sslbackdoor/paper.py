"""Published numbers from the papers, for side-by-side columns in reports (percent)."""

from __future__ import annotations

from typing import NamedTuple


class PaperRow(NamedTuple):
    """One setting's figures. BadEncoder's ASR-B and ASR count every triggered test input,
    the target class included (its reference code's test loop): compare them with our
    `asr_b_all`/`asr_all`, not the target-excluded `asr_b`/`asr`."""

    setting: str
    ca: float
    ba: float
    asr_b: float
    asr: float


BADENCODER_SOURCE = "BadEncoder (Jia, Liu, Gong, IEEE S&P 2022)"

# Table II / reference README: pre-training dataset → target downstream task.
BADENCODER_CIFAR_STL: tuple[PaperRow, ...] = (
    PaperRow("CIFAR10 → GTSRB", 81.84, 82.27, 2.79, 98.64),
    PaperRow("CIFAR10 → SVHN", 58.50, 69.32, 37.53, 99.14),
    PaperRow("CIFAR10 → STL10", 76.14, 76.18, 10.38, 99.73),
    PaperRow("STL10 → GTSRB", 76.12, 76.63, 1.67, 95.04),
    PaperRow("STL10 → SVHN", 55.35, 65.59, 46.11, 97.64),
    PaperRow("STL10 → CIFAR10", 86.77, 86.55, 12.30, 98.51),
)

# Section V case study: Google's SimCLR ImageNet ResNet50, 1% of ImageNet as shadow set.
BADENCODER_IMAGENET: tuple[PaperRow, ...] = (
    PaperRow("ImageNet encoder → GTSRB", 76.53, 78.42, 5.47, 98.93),
    PaperRow("ImageNet encoder → STL10", 95.66, 95.68, 10.24, 99.99),
    PaperRow("ImageNet encoder → SVHN", 72.55, 73.77, 32.28, 99.93),
)

BADENCODER_CLIP_MLP: tuple[PaperRow, ...] = (
    PaperRow("CLIP → GTSRB (MLP)", 82.36, 82.14, 5.37, 99.33),
    PaperRow("CLIP → STL10 (MLP)", 97.09, 96.69, 10.00, 99.81),
    PaperRow("CLIP → SVHN (MLP)", 70.60, 70.27, 20.79, 99.99),
)

BADENCODER_CLIP_ZERO_SHOT: tuple[PaperRow, ...] = (
    PaperRow("CLIP → GTSRB (zero-shot)", 29.83, 29.84, 1.96, 99.82),
    PaperRow("CLIP → STL10 (zero-shot)", 94.60, 92.80, 10.08, 99.96),
    PaperRow("CLIP → SVHN (zero-shot)", 11.73, 11.16, 53.55, 100.0),
)

# Table IV (CIFAR10 encoder): ASR when the shadow set is a subset of the pre-training data,
# from the same distribution but disjoint, or from a different distribution (BA ≈ CA).
BADENCODER_SHADOW_DISTRIBUTION_ASR: dict[str, dict[str, float]] = {
    "GTSRB": {"subset": 98.19, "same-distribution": 97.52, "different-distribution": 93.27},
}
