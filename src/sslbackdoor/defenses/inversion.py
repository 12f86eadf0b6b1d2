"""One trigger-inversion loop shared by Neural Cleanse and DECREE (TrojanZoo style).

Both defenses search for the smallest mask m ∈ [0,1]^{1×H×W} and pattern Δ ∈ [0,1]^{3×H×W}
that make stamped inputs x' = (1−m)⊙x + m⊙Δ (raw pixels; the model normalises) do
something: flip a classifier to a label (Neural Cleanse) or collapse an encoder's
embeddings (DECREE). The loop — parameterisation, optimiser, bookkeeping of the best
trigger, early stop — is here once; a defense supplies only

* an `InversionObjective`: the attack loss on a batch of stamped images and its success
  test, and
* a `CostSchedule`: how the weight c of the ‖m‖₁ penalty moves after successes/failures
  and when to stop (and, optionally, the learning rate of each epoch).

Two drivers share one Adam update (`_optimise_batch`) and one bookkeeping of the best
trigger (`_Best`): `invert_trigger` works in steps of `batches_per_step` mini-batches whose
mean score decides success (Neural Cleanse's reference); `invert_trigger_by_epoch` works as
DECREE's reference does: epochs that pass once over the shuffled images (the last, smaller
batch included), with success, the best mask and the cost updated after every mini-batch
and the stopping rule tested at the end of each epoch on the epoch's mean score.

Parameterisation: m = tanh(m')/(2−ε) + 0.5 (and Δ likewise), so both stay in (0,1)
without clipping and gradients never vanish at the bounds. Optimiser: Adam, lr 0.1,
betas (0.5, 0.9), as in Neural Cleanse's reference code.

Precision: the loop runs in fp32 by default. On CPU a bf16 forward/backward of a
MobileNetV2 at 32 px was slower (≈50 ms vs ≈30 ms per 32-image step, measured), and the
DECREE success test (mean cosine > 0.99) needs more precision than bf16's 8 mantissa bits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from sslbackdoor.engine import autocast, to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.progress import log

EPSILON = 1e-7  # keeps tanh(m')/(2−ε)+0.5 strictly inside (0,1), so atanh exists


class InversionConfig(BaseModel):
    """Optimiser and loop settings shared by every inversion."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(1000, ge=1, description="maximum schedule steps")
    batches_per_step: int = Field(
        1, ge=1, description="mini-batches per step; success is tested on their mean score "
                             "(Neural Cleanse's reference steps are epochs of mini-batches)")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(0.1, gt=0)
    betas: tuple[float, float] = (0.5, 0.9)
    patience: int = Field(5, ge=1, description="successes/failures before the cost moves")
    early_stop_patience: int = Field(25, ge=1,
                                     description="steps without a smaller successful mask")
    precision: Literal["fp32", "bf16"] = "fp32"
    penalty_channels: Literal[1, 3] = Field(
        1, description="colour channels the ‖m‖₁ penalty counts: 1 = the 2-D mask (Neural "
                       "Cleanse), 3 = the mask repeated over RGB (DECREE's reference code)")
    log_every: int = Field(0, ge=0, description="log a line every N steps (0: never)")


def squash(raw: torch.Tensor) -> torch.Tensor:
    """Unconstrained parameters → values in (0,1): tanh(raw)/(2−ε) + 0.5."""
    return torch.tanh(raw) / (2 - EPSILON) + 0.5


def unsquash(values: torch.Tensor) -> torch.Tensor:
    """Inverse of `squash` for values in [0,1] (clamped slightly inside)."""
    inside = values.clamp(1e-4, 1 - 1e-4)
    return torch.atanh((inside - 0.5) * (2 - EPSILON))


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x' = (1−m)⊙x + m⊙Δ for images [B,3,H,W], mask [1,H,W], pattern [3,H,W] in [0,1]."""
    return (1 - mask) * images + mask * pattern


class InversionObjective(Protocol):
    """What a defense inverts for: a loss to minimise on stamped images and a success test."""

    def attack_loss(self, stamped: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(scalar loss with grad, success score) for stamped images [B,3,H,W] in [0,1]."""
        ...

    def is_success(self, score: float) -> bool:
        """Whether the trigger achieved the defense's goal on this batch."""
        ...


class CostSchedule(ABC):
    """The weight of the ‖m‖₁ penalty and the stopping rule; updated once per step."""

    cost: float

    @abstractmethod
    def update(self, success: bool) -> None:
        """Move the cost after a step whose batch did (not) succeed."""

    @abstractmethod
    def should_stop(self, steps_since_improvement: int, success: bool) -> bool:
        """Stop early, given how long the best successful mask has not shrunk."""

    def learning_rate(self, epoch: int, base: float) -> float:
        """The optimiser's learning rate in `epoch` (0-based); `invert_trigger_by_epoch` only."""
        return base


@dataclass
class InversionResult:
    """The smallest successful trigger found (or the last one when none succeeded).

    mask: [1,H,W] in [0,1]; pattern: [3,H,W] in [0,1]; l1_norm: ‖mask‖₁ (sum over H·W);
    score: the objective's success score of the step that produced it.
    """

    mask: torch.Tensor
    pattern: torch.Tensor
    l1_norm: float
    success: bool
    steps: int
    score: float
    final_cost: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def area_fraction(self) -> float:
        """‖m‖₁ / (H·W): the mask's size as a fraction of the image (DECREE's PL1)."""
        return self.l1_norm / float(self.mask.shape[-2] * self.mask.shape[-1])


class _Batches:
    """An endless, seeded stream of shuffled mini-batches of images [N,3,H,W]."""

    def __init__(self, images: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.images = images
        self.batch_size = min(batch_size, images.shape[0])
        self.generator = generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if self.order.numel() < self.batch_size:
            self.order = torch.randperm(self.images.shape[0], generator=self.generator)
        index, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return self.images[index]


def invert_trigger(images: torch.Tensor, objective: InversionObjective, schedule: CostSchedule,
                   config: InversionConfig, device: torch.device, seed: int = 0,
                   label: str = "") -> InversionResult:
    """Search the smallest trigger that makes `objective` succeed on `images`.

    Args:
        images: clean images [N,3,H,W], uint8 or float in [0,1] (kept on `device`).
        objective: the defense's loss and success test.
        schedule: the defense's cost schedule (mutated: it is per-search state).
        seed: seeds the mask/pattern initialisation and the batch order.
    """
    data, mask_raw, pattern_raw, generator = _start(images, device, seed)
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=config.betas)
    batches = _Batches(data, config.batch_size, generator)
    best = _Best()
    step = 0
    for step in range(1, config.steps + 1):
        score, l1, mask, pattern = _optimise_step(mask_raw, pattern_raw, batches, objective,
                                                  schedule.cost, optimizer, config, device)
        success = objective.is_success(score)
        best.offer(success, l1, score, mask, pattern)
        schedule.update(success)
        if config.log_every and step % config.log_every == 0:
            best.history.append({"step": step, "cost": schedule.cost, "l1": l1,
                                 "score": score, "best_l1": best.l1})
            log(f"  inversion {label} step {step}: cost={schedule.cost:.2e} l1={l1:.1f} "
                f"score={score:.3f} best={best.l1:.1f}")
        if schedule.should_stop(best.steps_since_improvement, success):
            break
    return best.result(squash(mask_raw), squash(pattern_raw), step, schedule.cost)


def _optimise_step(mask_raw: torch.Tensor, pattern_raw: torch.Tensor, batches: _Batches,
                   objective: InversionObjective, cost: float,
                   optimizer: torch.optim.Optimizer, config: InversionConfig,
                   device: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """`batches_per_step` Adam updates; returns their mean score and ‖m‖₁ and the last
    mask [1,H,W] / pattern [3,H,W] those were measured with."""
    scores, norms = [], []
    for _ in range(config.batches_per_step):
        score, l1, mask, pattern = _optimise_batch(mask_raw, pattern_raw, batches.next(),
                                                   objective, cost, optimizer, config, device)
        scores.append(score)
        norms.append(l1)
    return sum(scores) / len(scores), sum(norms) / len(norms), mask, pattern


def _optimise_batch(mask_raw: torch.Tensor, pattern_raw: torch.Tensor, batch: torch.Tensor,
                    objective: InversionObjective, cost: float,
                    optimizer: torch.optim.Optimizer, config: InversionConfig,
                    device: torch.device) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """One Adam update on one mini-batch [B,3,H,W]; returns the score and ‖m‖₁ measured
    before the update and the mask [1,H,W] / pattern [3,H,W] they were measured with."""
    mask, pattern = squash(mask_raw), squash(pattern_raw)
    with autocast(device, config.precision == "bf16"):
        attack_loss, score = objective.attack_loss(stamp(batch, mask, pattern))
    l1 = mask.sum()
    loss = attack_loss.float() + cost * config.penalty_channels * l1
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return score, float(l1.detach()), mask.detach(), pattern.detach()


def epoch_batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Indices of one shuffled pass over `count` images in batches of `batch_size`, the last
    one smaller (as a DataLoader without drop_last); a last batch of one image, which has no
    pair to compare, joins the batch before it."""
    order = torch.randperm(count, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < 2:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def invert_trigger_by_epoch(images: torch.Tensor, objective: InversionObjective,
                            schedule: CostSchedule, config: InversionConfig,
                            device: torch.device, seed: int = 0,
                            label: str = "") -> InversionResult:
    """Like `invert_trigger`, but in DECREE's reference rhythm: `config.steps` is the
    maximum number of epochs over `images`; success, the best mask and the cost are
    updated after every mini-batch; `schedule.learning_rate` sets each epoch's learning
    rate; the stopping rule sees the epoch's mean score. `InversionResult.steps` counts
    mini-batches."""
    data, mask_raw, pattern_raw, generator = _start(images, device, seed)
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=config.lr, betas=config.betas)
    best = _Best()
    batches = 0
    for epoch in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate(epoch, config.lr)
        scores = []
        for index in epoch_batches(data.shape[0], config.batch_size, generator):
            score, l1, mask, pattern = _optimise_batch(mask_raw, pattern_raw,
                                                       data[index.to(data.device)], objective,
                                                       schedule.cost, optimizer, config, device)
            success = objective.is_success(score)
            best.offer(success, l1, score, mask, pattern)
            schedule.update(success)
            scores.append(score)
            batches += 1
        mean_score = sum(scores) / len(scores)
        if config.log_every and (epoch + 1) % config.log_every == 0:
            best.history.append({"epoch": epoch + 1, "cost": schedule.cost, "l1": l1,
                                 "score": mean_score, "best_l1": best.l1})
            log(f"  inversion {label} epoch {epoch + 1}: cost={schedule.cost:.2e} l1={l1:.1f} "
                f"score={mean_score:.3f} best={best.l1:.1f}")
        if schedule.should_stop(best.steps_since_improvement, objective.is_success(mean_score)):
            break
    return best.result(squash(mask_raw), squash(pattern_raw), batches, schedule.cost)


def _start(images: torch.Tensor, device: torch.device,
           seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """Checked images on `device` and a seeded random start: (images, mask', Δ', generator)."""
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 2:
        raise UserInputError(f"trigger inversion needs at least 2 images [N,3,H,W], got "
                             f"{tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    data = to_device_images(images, device)
    height, width = data.shape[-2:]
    # Random start in (0,1) as Neural Cleanse and DECREE do; a seeded generator keeps it
    # reproducible.
    mask_raw = unsquash(torch.rand(1, height, width, generator=generator)).to(device)
    pattern_raw = unsquash(torch.rand(3, height, width, generator=generator)).to(device)
    mask_raw.requires_grad_(True)
    pattern_raw.requires_grad_(True)
    return data, mask_raw, pattern_raw, generator


class _Best:
    """Keeps the smallest-‖m‖₁ successful trigger and how long ago it improved."""

    def __init__(self) -> None:
        self.l1 = math.inf
        self.score = 0.0
        self.mask: torch.Tensor | None = None
        self.pattern: torch.Tensor | None = None
        self.steps_since_improvement = 0
        self.history: list[dict[str, float]] = []

    def offer(self, success: bool, l1: float, score: float, mask: torch.Tensor,
              pattern: torch.Tensor) -> None:
        if success and l1 < self.l1:
            self.l1, self.score = l1, score
            self.mask, self.pattern = mask.detach().cpu().clone(), pattern.detach().cpu().clone()
            self.steps_since_improvement = 0
        else:
            self.steps_since_improvement += 1

    def result(self, last_mask: torch.Tensor, last_pattern: torch.Tensor, steps: int,
               cost: float) -> InversionResult:
        if self.mask is None or self.pattern is None:
            # No success within the budget: report the last trigger, flagged as failed.
            mask = last_mask.detach().cpu()
            return InversionResult(mask, last_pattern.detach().cpu(), float(mask.sum()), False,
                                   steps, self.score, cost, self.history)
        # The kept mask's own norm (selection used the step's mean norm, as Neural Cleanse's
        # reference does per epoch; with one batch per step the two are equal).
        return InversionResult(self.mask, self.pattern, float(self.mask.sum()), True, steps,
                               self.score, cost, self.history)
