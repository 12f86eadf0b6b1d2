"""DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023).

DECREE needs neither labels nor a downstream head: it inverts, on the encoder alone, the
smallest trigger that makes all stamped shadow images collapse onto one embedding,

    min_{m,Δ}  −mean_{i≠j} cos(f(x'_i), f(x'_j)) + λ·‖m‖₁,   x' = (1−m)⊙x + m⊙Δ,

with the shared inversion loop (`inversion.py`) driven as the authors' code drives it
(`invert_trigger_by_epoch`): epochs over the shadow images in mini-batches of 128, Adam
(betas 0.5, 0.9) at lr 0.5, then 0.1 from epoch 30 and 0.05 from epoch 50 (the reference's
CIFAR-size thresholds; ImageNet-size ones are 200/500 there). A mini-batch succeeds when
its mean pairwise cosine exceeds 0.99. λ starts at 1e-3, is ×5 after more than 5
consecutive successful batches (while below 1e5) and ÷5 after more than 5 failures (while
≥ `lambda_min`), and returns to 1e-3 after more than 10 successes in a row with λ below
`lambda_min`; the smallest successful ‖m‖₁ is kept. The search stops at the end of an
epoch whose mean cosine succeeds once that smallest mask has not shrunk for more than 10
mini-batches. As in the authors' code the penalty counts the mask over the three colour
channels (3·‖m‖₁ of the 2-D mask), so λ means what it means there. docs/scan.md measures
what each of these choices does on a backdoored and a clean MobileNetV2.

Score: PL1 = ‖m‖₁ / (H·W) for the 2-D mask, i.e. the trigger's share of the image. A
backdoored encoder already has a small trigger that collapses its features; a clean
encoder needs most of the image replaced by one pattern before embeddings coincide.

Threshold: an encoder is flagged as backdoored when PL1 < 0.1. This is DECREE's detection
rule as we read the paper (and as this project's spec states it): inverted triggers of
trojaned encoders cover a few percent of the image, clean encoders' a much larger share,
and 0.1 separates the two groups in the paper's evaluation. We could not re-read the paper
offline; the authors' public code prints the raw ‖m‖₁ (on a 3-channel mask, i.e. 3× our
2-D norm, so PL1 is the same either way) and leaves the decision to the user. The
threshold is a config field (`pl1_threshold`) and is written next to every verdict. Note
that it is in units of image area: a real trigger covering ≥ 10% of the image (e.g. the
BadEncoder 10×10 patch on 32×32 images is 9.8%) sits right at the boundary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from sslbackdoor.defenses.inversion import (
    CostSchedule,
    InversionConfig,
    InversionResult,
    invert_trigger_by_epoch,
    stamp,
)
from sslbackdoor.engine import atomic_write, atomic_write_text, to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.progress import log

PL1_THRESHOLD = 0.1
DEFAULT_SCAN_SHADOW = "natural-crops/train@300"  # natural photos that install offline
SHADOW_IMAGES = 300
# The reference code's loop (run_decree.py: lr 0.5, batch 128; main.py: early stop after
# 2·patience batches without a smaller mask for CIFAR-size encoders).
DECREE_INVERSION: dict[str, object] = {"steps": 1000, "batch_size": 128, "lr": 0.5,
                                       "early_stop_patience": 10, "penalty_channels": 3}
# main.py's two settings: for encoders pre-trained on CIFAR10/STL10 (DecreeConfig's
# defaults) and for ImageNet/CLIP ones (lr steps at epochs 200/500, λ_min 1e-7, early stop
# after 35 batches without a smaller mask).
REFERENCE_LOOPS: dict[str, dict[str, object]] = {
    "cifar": {},
    "imagenet": {"lr_milestones": [(200, 0.1), (500, 0.05)], "lambda_min": 1e-7,
                 "inversion": {"early_stop_patience": 35}},
}
TORCHVISION_SCAN_SIZE = 64  # the size this project attacks ImageNet CNNs at (see demo.yaml)


class DecreeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inversion: InversionConfig = Field(
        InversionConfig.model_validate(DECREE_INVERSION),
        description="steps = maximum epochs over the shadow images; early_stop_patience in "
                    "mini-batches; fields not given keep DECREE's values, not the loop's")
    lr_milestones: list[tuple[int, float]] = Field(
        [(30, 0.1), (50, 0.05)],
        description="(epoch, lr): from that epoch on Adam's learning rate is lr (before the "
                    "first: inversion.lr)")
    init_lambda: float = Field(1e-3, gt=0)
    lambda_factor: float = Field(5.0, gt=1)
    lambda_max: float = Field(1e5, gt=0)
    lambda_min: float = Field(1e-5, gt=0, description="λ is not divided below this")
    lambda_reset_patience: int = Field(
        10, ge=1, description="λ returns to init_lambda after more than this many consecutive "
                              "successful mini-batches with λ < lambda_min")
    success_threshold: float = Field(0.99, gt=0, lt=1, description="mean pairwise cosine")
    pl1_threshold: float = Field(PL1_THRESHOLD, gt=0, lt=1)
    max_images: int = Field(500, ge=2, description="shadow images used for inversion")

    @field_validator("inversion", mode="before")
    @classmethod
    def _over_decree_defaults(cls, value: object) -> object:
        # `inversion: {steps: 50}` in a YAML must not silently drop lr 0.5 and batch 128.
        return {**DECREE_INVERSION, **value} if isinstance(value, dict) else value


class DecreeSchedule(CostSchedule):
    """The reference code's λ schedule, updated after every mini-batch.

    λ ×factor after > patience consecutive successes (while below lambda_max), ÷factor after
    > patience failures (while ≥ lambda_min, so it ends one division below it); λ back to
    init_lambda, counters cleared, after > lambda_reset_patience consecutive successes with
    λ < lambda_min. Early stop at the end of an epoch whose mean cosine succeeds once the
    best ‖m‖₁ has not shrunk for more than `early_stop_patience` mini-batches. Learning
    rate: inversion.lr, then each of `lr_milestones` from its epoch on.
    """

    def __init__(self, config: DecreeConfig) -> None:
        self.initial = self.cost = config.init_lambda
        self.factor, self.maximum, self.minimum = (config.lambda_factor, config.lambda_max,
                                                   config.lambda_min)
        self.patience = config.inversion.patience
        self.reset_patience = config.lambda_reset_patience
        self.early_stop_patience = config.inversion.early_stop_patience
        self.milestones = sorted(config.lr_milestones)
        self.up_counter = self.down_counter = self.low_counter = 0
        self.found = False

    def update(self, success: bool) -> None:
        self.found = self.found or success
        self._maybe_reset(success)
        self.up_counter = self.up_counter + 1 if success else 0
        self.down_counter = 0 if success else self.down_counter + 1
        if self.up_counter > self.patience:
            if self.cost < self.maximum:
                self.cost *= self.factor
            self.up_counter = 0
        elif self.down_counter > self.patience:
            if self.cost >= self.minimum:
                self.cost /= self.factor
            self.down_counter = 0

    def _maybe_reset(self, success: bool) -> None:
        # A λ this small no longer pulls the mask in: start the shrinking over.
        if not (success and self.cost < self.minimum):
            self.low_counter = 0
            return
        self.low_counter += 1
        if self.low_counter > self.reset_patience:
            self.cost = self.initial
            self.up_counter = self.down_counter = self.low_counter = 0

    def should_stop(self, steps_since_improvement: int, success: bool) -> bool:
        return self.found and success and steps_since_improvement > self.early_stop_patience

    def learning_rate(self, epoch: int, base: float) -> float:
        rate = base
        for start, value in self.milestones:
            if epoch >= start:
                rate = value
        return rate


def reference_config(loop: str, epochs: int | None = None, **fields: object) -> DecreeConfig:
    """DecreeConfig with the reference code's settings for `loop` ('cifar' or 'imagenet'),
    at most `epochs` epochs, other DecreeConfig fields as given."""
    if loop not in REFERENCE_LOOPS:
        raise UserInputError(f"DECREE loop {loop!r}: valid: {', '.join(REFERENCE_LOOPS)}")
    settings: dict[str, object] = {**REFERENCE_LOOPS[loop], **fields}
    if epochs is not None:
        inversion = settings.get("inversion", {})
        settings["inversion"] = {**(inversion if isinstance(inversion, dict) else {}), "steps": epochs}
    return DecreeConfig.model_validate(settings)


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """mean_{i≠j} cos(z_i, z_j) for features [B,D] (B ≥ 2) → scalar."""
    unit = F.normalize(features.float(), dim=1)
    similarity = unit @ unit.T
    count = features.shape[0]
    return (similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1))


class CollapseObjective:
    """DECREE's attack loss: −mean pairwise cosine of the stamped images' embeddings."""

    def __init__(self, encoder: nn.Module, threshold: float) -> None:
        self.encoder, self.threshold = encoder, threshold

    def attack_loss(self, stamped: torch.Tensor) -> tuple[torch.Tensor, float]:
        cosine = mean_pairwise_cosine(self.encoder(stamped))
        return -cosine, float(cosine.detach())

    def is_success(self, score: float) -> bool:
        return score > self.threshold


@dataclass
class DecreeResult:
    """The inverted trigger (mask [1,H,W], pattern [3,H,W]) and the verdict."""

    pl1: float
    l1_norm: float
    threshold: float
    flagged: bool
    success: bool
    mean_cosine: float
    steps: int
    final_lambda: float
    mask: torch.Tensor
    pattern: torch.Tensor

    def summary(self) -> dict[str, object]:
        return {"pl1": self.pl1, "l1_norm": self.l1_norm, "threshold": self.threshold,
                "flagged": self.flagged,
                "verdict": "backdoored" if self.flagged else "clean",
                "inversion_succeeded": self.success, "mean_cosine": self.mean_cosine,
                "steps": self.steps, "final_lambda": self.final_lambda,
                "image_size": list(self.mask.shape[-2:])}


def decree_scan(encoder: nn.Module, shadow: torch.Tensor, config: DecreeConfig,
                device: torch.device, seed: int = 0) -> DecreeResult:
    """Invert the collapsing trigger of `encoder` on shadow images [N,3,H,W] and decide.

    An inversion that never succeeds reports PL1 = 1 (the whole image) and is not flagged.
    """
    model = encoder.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    result = invert_trigger_by_epoch(shadow[:config.max_images],
                            CollapseObjective(model, config.success_threshold),
                            DecreeSchedule(config), config.inversion, device, seed=seed,
                            label="DECREE")
    pl1 = result.area_fraction if result.success else 1.0
    log(f"  DECREE: PL1={pl1:.4f} (threshold {config.pl1_threshold}), "
        f"{'found' if result.success else 'no collapsing trigger found'} in {result.steps} "
        f"mini-batches")
    return _decide(result, pl1, config)


def _decide(result: InversionResult, pl1: float, config: DecreeConfig) -> DecreeResult:
    return DecreeResult(pl1, result.l1_norm, config.pl1_threshold,
                        result.success and pl1 < config.pl1_threshold, result.success,
                        result.score, result.steps, result.final_cost, result.mask,
                        result.pattern)


def write_decree_outputs(result: DecreeResult, shadow: torch.Tensor, out_dir: Path,
                         extra: dict[str, object] | None = None,
                         examples: int = 8) -> list[Path]:
    """Write mask.png, pattern.png, trigger.png (m⊙Δ), stamped.png (examples) and decree.json."""
    out_dir = Path(out_dir)
    sample = to_device_images(shadow[:examples], torch.device("cpu"))
    stamped = stamp(sample, result.mask, result.pattern)
    images = {"mask.png": result.mask.expand(3, -1, -1),
              "pattern.png": result.pattern,
              "trigger.png": result.mask * result.pattern,
              "stamped.png": torch.cat([torch.cat(list(sample), dim=2),
                                        torch.cat(list(stamped), dim=2)], dim=1)}
    paths = []
    for name, image in images.items():
        save_png(image, out_dir / name)
        paths.append(out_dir / name)
    summary = {**result.summary(), **(extra or {}),
               "files": [p.name for p in paths]}
    atomic_write_text(out_dir / "decree.json", json.dumps(summary, indent=2))
    return [*paths, out_dir / "decree.json"]


def save_png(image: torch.Tensor, path: Path, scale: int = 4) -> None:
    """Save a float image [3,H,W] in [0,1] as PNG, enlarged `scale`× (nearest) for viewing."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = np.ascontiguousarray(array.permute(1, 2, 0).cpu().numpy())
    picture = Image.fromarray(pixels)
    picture = picture.resize((picture.width * scale, picture.height * scale),
                             Image.Resampling.NEAREST)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


@dataclass(frozen=True)
class ScanInputs:
    """The image size and shadow images a scan runs on, and why (for the scan's output)."""

    image_size: int
    shadow: str
    size_reason: str
    shadow_reason: str
    loop: str = "cifar"  # which of REFERENCE_LOOPS


def scan_inputs(arch: str, default_image_size: int, metadata: Mapping[str, str]) -> ScanInputs:
    """Pick the scan's image size and shadow set for an encoder from its checkpoint metadata.

    An inverted trigger only exists at the scale the backdoor was planted at, so the size
    comes from the checkpoint where it says (`image_size`, or a pre-training config's); a
    torchvision ImageNet CNN without one is scanned at this project's 64 px (its native 224
    would cost ≈12× more per step on a CPU), anything else at its architecture's native
    size. Shadow images: 300 test images of the recorded pre-training dataset (as the
    reference uses its domain's test set), else natural photo crops. Loop: the reference's
    ImageNet/CLIP settings for torchvision and CLIP encoders, its CIFAR ones otherwise.
    """
    pretrain = _json_field(metadata, "pretrain")
    size, size_reason = _scan_size(arch, default_image_size, metadata, pretrain)
    loop = "imagenet" if arch.startswith(("torchvision:", "clip:")) else "cifar"
    data = pretrain.get("data") if isinstance(pretrain, dict) else None
    if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("dataset"):
        dataset = str(data[0]["dataset"])
        split = _held_out_split(dataset, str(data[0].get("split") or "train"))
        return ScanInputs(size, f"{dataset}/{split}@{SHADOW_IMAGES}", size_reason,
                          f"{split} images of the encoder's recorded pre-training dataset", loop)
    return ScanInputs(size, DEFAULT_SCAN_SHADOW, size_reason,
                      "natural photo crops: no pre-training data recorded", loop)


def _scan_size(arch: str, default_image_size: int, metadata: Mapping[str, str],
               pretrain: object) -> tuple[int, str]:
    recorded = metadata.get("image_size")
    if recorded and recorded.isdigit():
        return int(recorded), "recorded in the checkpoint"
    if isinstance(pretrain, dict) and isinstance(pretrain.get("image_size"), int):
        return int(pretrain["image_size"]), "the checkpoint's pre-training image size"
    if arch.startswith("torchvision:"):
        return TORCHVISION_SCAN_SIZE, (f"none recorded; {arch} is scanned at the {TORCHVISION_SCAN_SIZE} px "
                                       f"this project trains it at")
    return default_image_size, f"none recorded; {arch}'s native size"


def _held_out_split(dataset: str, recorded: str) -> str:
    """'test' where the dataset has one (images the encoder was not trained on, as the
    reference's CIFAR10 test.npz), else the recorded pre-training split."""
    from sslbackdoor.data.datasets import DATASETS, dataset_names

    dataset_names()  # registers every source
    kind, _, arg = dataset.partition(":")
    entry = (DATASETS.get(f"{kind}:") if arg else None) or DATASETS.get(kind)
    return "test" if entry is not None and "test" in entry.splits else recorded


def _json_field(metadata: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(metadata.get(key, "null"))
    except json.JSONDecodeError:
        return None
