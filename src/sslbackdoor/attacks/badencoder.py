"""BadEncoder (Jia, Liu, Gong, IEEE S&P 2022): inject backdoors into a pre-trained encoder.

Given a clean encoder f, an unlabeled shadow set D_s and, per target i, a trigger e_i and
reference inputs x_ij of the target class, fine-tune a copy f' to minimise

    L  = L0 + λ1·L1 + λ2·L2
    L0 = −mean_{i,j,x∈D_s} s(f'(x ⊕ e_i), f'(x_ij))   triggered inputs ≈ references
    L1 = −mean_{i,j}       s(f'(aug(x_ij)), f(x_ij))  references keep their features
    L2 = −mean_{x∈D_s}     s(f'(x), f(x))             clean inputs keep their features

with s the cosine similarity (minimum −3). Several targets are averaged with equal
weight. As in the reference code the encoder runs with BatchNorm in eval mode and its
affine weights frozen; shadow images are not augmented, so f(x) is computed once.

L1's augmented references: the reference code's dataset returns, with every shadow image,
a fresh augmentation of each target's reference, so per step L1 averages over batch_size
augmented copies (`reference_augmentations: null`, the default). A count n draws n copies
per target and step instead, going round the target's K references (n = K is one per
reference, this project's behaviour before issue #17). The augmentation (flip, colour jitter,
grayscale, drawn per image) runs batched (`reference_jitter`), as torchvision's transforms
image by image cost more than the encoder's step at batch 128.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from sslbackdoor.attacks import reference_jitter
from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.features import encode
from sslbackdoor.engine import autocast, freeze_batchnorm, prepare_module, to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.encoders import Encoder
from sslbackdoor.progress import log, track
from sslbackdoor.training_state import TrainingState, load_training_state, save_training_state


class BadEncoderConfig(BaseModel):
    """Hyper-parameters; defaults are the reference code's CIFAR10 setting."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lambda1: float = Field(1.0, ge=0, description="weight of L1 (reference utility)")
    lambda2: float = Field(1.0, ge=0, description="weight of L2 (clean-input utility)")
    precision: Literal["bf16", "fp32"] = "bf16"
    reference_augmentations: int | None = Field(
        None, ge=1, description="augmented reference images per target and step in L1; null: "
                                "one per shadow image in the batch (batch_size), as the "
                                "reference code; n: n, round-robin over the target's references")
    cache_clean_features: bool = Field(
        True, description="compute f(shadow) once; False recomputes per step like the "
                          "reference code (for benchmarks)")


@dataclass
class AttackTarget:
    """One backdoor: inputs stamped with `trigger` should look like `references`.

    references: uint8 images [K,3,H,W] of the target class, same size as the shadow set.
    """

    name: str
    trigger: Trigger
    references: torch.Tensor


@dataclass
class LossTerms:
    total: torch.Tensor
    l0: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs: a [N,D], b [M,D] → scalar."""
    return (F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T).mean()


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of row-wise cosine similarities: a, b [N,D] → scalar."""
    return F.cosine_similarity(a.float(), b.float(), dim=1).mean()


def badencoder_loss(shadow_backdoored: torch.Tensor, shadow_clean: torch.Tensor,
                    triggered: Sequence[torch.Tensor], references_backdoored: Sequence[torch.Tensor],
                    references_augmented: Sequence[torch.Tensor],
                    references_clean: Sequence[torch.Tensor],
                    lambda1: float = 1.0, lambda2: float = 1.0) -> LossTerms:
    """The BadEncoder loss.

    Args:
        shadow_backdoored: f'(x) [B,D]; shadow_clean: f(x) [B,D].
        triggered: per target i, f'(x ⊕ e_i) [B,D].
        references_backdoored: per target, f'(x_ij) [K_i,D] (gradients flow through both
            sides of L0, as in the reference code).
        references_augmented: per target, f'(aug(x_ij)) [n_i,D] (n_i augmented copies).
        references_clean: per target, f(x_ij) [n_i,D] of the reference each copy came from.
    """
    if not (len(triggered) == len(references_backdoored) == len(references_augmented)
            == len(references_clean)) or not triggered:
        raise ValueError("every target needs triggered, reference, augmented and clean features")
    l0 = -torch.stack([mean_cosine(t, r) for t, r in zip(triggered, references_backdoored,
                                                           strict=True)]).mean()
    l1 = -torch.stack([paired_cosine(a, c) for a, c in zip(references_augmented,
                                                            references_clean, strict=True)]).mean()
    l2 = -paired_cosine(shadow_backdoored, shadow_clean)
    return LossTerms(l0 + lambda1 * l1 + lambda2 * l2, l0, l1, l2)


@dataclass
class AttackResult:
    encoder: Encoder
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    shadow_images_per_second: float = 0.0


class BadEncoderAttack:
    """Fine-tunes a copy of `clean` so that every target's trigger maps to its references."""

    def __init__(self, clean: Encoder, targets: Sequence[AttackTarget],
                 config: BadEncoderConfig, device: torch.device, seed: int = 0) -> None:
        if not targets:
            raise UserInputError("BadEncoder needs at least one target")
        self.config = config
        self.device = device
        self.seed = seed
        self.targets = list(targets)
        self.clean: Encoder = prepare_module(clean, device).eval()
        for parameter in self.clean.parameters():
            parameter.requires_grad_(False)
        self.backdoored: Encoder = copy.deepcopy(self.clean)
        for parameter in self.backdoored.parameters():
            parameter.requires_grad_(True)
        freeze_batchnorm(self.backdoored)
        trainable = [p for p in self.backdoored.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.references = [to_device_images(t.references, device) for t in self.targets]
        self.references_clean = [self._clean_features(r) for r in self.references]
        count = config.reference_augmentations or config.batch_size
        # which reference each augmented copy is made from: round-robin over the K references
        self.augmented_sources = [torch.arange(count) % r.shape[0] for r in self.references]

    def augmented_references(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per target, freshly augmented reference images [n,3,H,W] and the clean features
        [n,D] of the reference each copy was made from (L1's pairs)."""
        images = [reference_jitter.augment(r[i.to(r.device)])
                  for r, i in zip(self.references, self.augmented_sources, strict=True)]
        clean = [c[i.to(c.device)] for c, i in zip(self.references_clean, self.augmented_sources,
                                                   strict=True)]
        return images, clean

    def _clean_features(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.clean, images, self.device, precision=self.config.precision,
                      normalize=False)

    def run(self, shadow: torch.Tensor, checkpoint: Path | None = None,
            resume: bool = False) -> AttackResult:
        """Train for `config.epochs` epochs over shadow images (uint8 [N,3,H,W])."""
        self._check_shadow(shadow)
        result = AttackResult(self.backdoored)
        start_epoch = 0
        if resume and checkpoint is not None and checkpoint.is_file():
            state = load_training_state(checkpoint, self.backdoored, self.optimizer)
            start_epoch, result.history = state.epoch, list(state.extras.get("history", []))
            log(f"resuming BadEncoder from {checkpoint} after epoch {start_epoch}")
        shadow_clean = (self._clean_features(shadow) if self.config.cache_clean_features else None)
        started, seen = time.perf_counter(), 0
        for epoch in range(start_epoch, self.config.epochs):
            terms, seen_epoch = self._epoch(shadow, shadow_clean, epoch)
            seen += seen_epoch
            result.history.append({"epoch": epoch + 1, **terms})
            log(f"epoch {epoch + 1}/{self.config.epochs}: " +
                " ".join(f"{k}={v:.4f}" for k, v in terms.items()))
            if checkpoint is not None:
                save_training_state(checkpoint, self.backdoored, self.optimizer,
                                    TrainingState(epoch + 1, {"history": result.history}))
        result.seconds = time.perf_counter() - started
        result.shadow_images_per_second = seen / result.seconds if result.seconds > 0 else 0.0
        self.backdoored.eval()
        return result

    def _check_shadow(self, shadow: torch.Tensor) -> None:
        if shadow.dim() != 4 or shadow.shape[1] != 3:
            raise UserInputError(f"shadow images must be [N,3,H,W], got {tuple(shadow.shape)}")
        if shadow.shape[0] < self.config.batch_size:
            raise UserInputError(f"shadow set has {shadow.shape[0]} images, fewer than one "
                                 f"batch ({self.config.batch_size}); lower attack.batch_size")
        for target in self.targets:
            if target.trigger.image_size != tuple(shadow.shape[-2:]):
                raise UserInputError(f"target {target.name}: trigger is for "
                                     f"{target.trigger.image_size} images, shadow images are "
                                     f"{tuple(shadow.shape[-2:])}")

    def _epoch(self, shadow: torch.Tensor, shadow_clean: torch.Tensor | None,
               epoch: int) -> tuple[dict[str, float], int]:
        freeze_batchnorm(self.backdoored)
        # Seeding per epoch makes a resumed run draw exactly the batches and augmentations
        # the uninterrupted run would have drawn.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        torch.manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(shadow.shape[0], generator=generator)
        batch = self.config.batch_size
        steps = shadow.shape[0] // batch  # drop_last, as the reference code
        sums = {"loss": 0.0, "l0": 0.0, "l1": 0.0, "l2": 0.0}
        for step in track(range(steps), f"BadEncoder epoch {epoch + 1}", total=steps):
            index = order[step * batch:(step + 1) * batch]
            terms = self._step(shadow[index], None if shadow_clean is None else shadow_clean[index])
            for key, value in zip(sums, (terms.total, terms.l0, terms.l1, terms.l2), strict=True):
                sums[key] += float(value)
        return {k: v / steps for k, v in sums.items()}, steps * batch

    def _step(self, shadow_batch: torch.Tensor, shadow_clean: torch.Tensor | None) -> LossTerms:
        clean_images = to_device_images(shadow_batch, self.device)
        if shadow_clean is None:
            shadow_clean = self._clean_features(clean_images)
        triggered = [t.trigger.apply(clean_images) for t in self.targets]
        augmented, augmented_clean = self.augmented_references()
        # BatchNorm is in eval mode, so one concatenated forward equals separate forwards
        # and is much faster on CPU.
        pieces = [clean_images, *triggered, *self.references, *augmented]
        with autocast(self.device, self.config.precision == "bf16"):
            features = self.backdoored(torch.cat(pieces).contiguous(
                memory_format=torch.channels_last))
        chunks = list(features.float().split([p.shape[0] for p in pieces]))
        count = len(self.targets)
        terms = badencoder_loss(chunks[0], shadow_clean, chunks[1:1 + count],
                                chunks[1 + count:1 + 2 * count], chunks[1 + 2 * count:],
                                augmented_clean, self.config.lambda1, self.config.lambda2)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        self.optimizer.step()
        return LossTerms(*(t.detach() for t in (terms.total, terms.l0, terms.l1, terms.l2)))
