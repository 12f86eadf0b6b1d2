"""DECREE (Feng et al., "Detecting Backdoors in Pre-trained Encoders", CVPR 2023).

DECREE needs neither labels nor a downstream head: it inverts, on the encoder alone, the
smallest trigger that makes all stamped shadow images collapse onto one embedding,

    min_{m,Δ}  −mean_{i≠j} cos(f(x'_i), f(x'_j)) + λ·‖m‖₁,   x' = (1−m)⊙x + m⊙Δ,

with the shared inversion loop (`inversion.py`). A batch succeeds when its mean pairwise
cosine exceeds 0.99. λ starts at 1e-3, is ×5 after more than 5 consecutive successful
batches (capped at 1e5) and ÷5 after more than 5 failures (not below `lambda_min`); the
smallest successful ‖m‖₁ is kept. As in the authors' code the penalty counts the mask over
the three colour channels (3·‖m‖₁ of the 2-D mask), so λ means what it means there; the
scale matters: λ = 1e-3 on a 16×16 mask was too weak to pull the mask off a scattered
local optimum in our tests, while the same λ on a 3×32×32 mask works.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslbackdoor.defenses.inversion import (
    CostSchedule,
    InversionConfig,
    InversionResult,
    invert_trigger,
    stamp,
)
from sslbackdoor.engine import atomic_write, atomic_write_text, to_device_images
from sslbackdoor.progress import log

PL1_THRESHOLD = 0.1


class DecreeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inversion: InversionConfig = InversionConfig(steps=1000, batch_size=64,
                                                 early_stop_patience=50, penalty_channels=3)
    init_lambda: float = Field(1e-3, gt=0)
    lambda_factor: float = Field(5.0, gt=1)
    lambda_max: float = Field(1e5, gt=0)
    lambda_min: float = Field(1e-5, gt=0, description="λ is not divided below this")
    success_threshold: float = Field(0.99, gt=0, lt=1, description="mean pairwise cosine")
    pl1_threshold: float = Field(PL1_THRESHOLD, gt=0, lt=1)
    max_images: int = Field(500, ge=2, description="shadow images used for inversion")


class DecreeSchedule(CostSchedule):
    """λ ×factor after > patience consecutive successes, ÷factor after > patience failures.

    Early stop once the current batch succeeds and the best ‖m‖₁ has not shrunk for more
    than `early_stop_patience` steps (the reference code checks the same after each epoch).
    """

    def __init__(self, config: DecreeConfig) -> None:
        self.cost = config.init_lambda
        self.factor, self.maximum, self.minimum = (config.lambda_factor, config.lambda_max,
                                                   config.lambda_min)
        self.patience = config.inversion.patience
        self.early_stop_patience = config.inversion.early_stop_patience
        self.up_counter = self.down_counter = 0
        self.found = False

    def update(self, success: bool) -> None:
        self.found = self.found or success
        self.up_counter = self.up_counter + 1 if success else 0
        self.down_counter = 0 if success else self.down_counter + 1
        if self.up_counter > self.patience:
            self.cost = min(self.cost * self.factor, self.maximum)
            self.up_counter = 0
        elif self.down_counter > self.patience:
            if self.cost >= self.minimum:
                self.cost /= self.factor
            self.down_counter = 0

    def should_stop(self, steps_since_improvement: int, success: bool) -> bool:
        return self.found and success and steps_since_improvement > self.early_stop_patience


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
    result = invert_trigger(shadow[:config.max_images],
                            CollapseObjective(model, config.success_threshold),
                            DecreeSchedule(config), config.inversion, device, seed=seed,
                            label="DECREE")
    pl1 = result.area_fraction if result.success else 1.0
    log(f"  DECREE: PL1={pl1:.4f} (threshold {config.pl1_threshold}), "
        f"{'found' if result.success else 'no collapsing trigger found'} in {result.steps} steps")
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
