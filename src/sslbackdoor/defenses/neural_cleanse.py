"""Neural Cleanse (Wang et al., IEEE S&P 2019) against a classifier.

For every label t the shared inversion loop (`inversion.py`) searches the smallest trigger
that flips inputs to t, minimising CE(f(x'), t) + c·‖m‖₁. A label whose trigger is much
smaller than the others' is suspicious; the MAD anomaly index makes that precise:

    MAD   = 1.4826 · median(|n − median(n)|)
    index = |n_t − median(n)| / MAD        (only for norms below the median)

and the model is flagged when the smallest label's index exceeds 2. Medians of an even
count are the mean of the two middle values (unlike `torch.median`, which takes the lower).

Cost schedule (the reference code's): c starts at 0; once `patience` consecutive steps
reach attack success ≥ 0.99 it is set to 1e-3; afterwards c ×2 after `patience`
successes and ÷2^1.5 after `patience` failures. Stop early once c has moved both ways
and the best norm has not shrunk for 25 steps. A label whose search stopped so has
*converged*; one that ran out of steps first has not, and its norm is only an upper bound
(reported per label: `converged`).

Budget (the reference code's, `gtsrb_visualize_example.py`): at most 1000 steps of
1000 // 32 = 31 mini-batches of 32 images each, early stop after 25 steps without a smaller
mask. Smaller budgets (the shipped small configs) say per label whether they converged.

Inversion images: `max_images` drawn at random, seeded, class-balanced when the labels are
given (`inversion_images`): the reference code draws its batches shuffled from the whole
test set, and the first N of a class-sorted set would hold a few classes only.

Mitigation (unlearning): fine-tune the whole classifier one epoch on 10% of the clean
data, 20% of which is stamped with the reversed trigger of the flagged label while
keeping its true label; report accuracy and ASR (with the real trigger) afterwards.

A BadEncoder victim's classifier is encoder + downstream head; `EncoderClassifier` glues
them (features L2-normalised as in the downstream pipeline).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslbackdoor.data.triggers import Trigger
from sslbackdoor.defenses.inversion import CostSchedule, InversionConfig, invert_trigger, stamp
from sslbackdoor.engine import eval_mode, freeze_batchnorm, to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.metrics import accuracy, attack_success_rate
from sslbackdoor.progress import log

MAD_CONSISTENCY = 1.4826  # makes MAD a consistent estimator of σ for normal data


class UnlearnConfig(BaseModel):
    """Neural Cleanse's unlearning mitigation."""

    model_config = ConfigDict(extra="forbid")

    data_fraction: float = Field(0.1, gt=0, le=1, description="share of the clean train data")
    stamped_fraction: float = Field(0.2, ge=0, le=1,
                                    description="share of that data stamped with the trigger")
    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(32, ge=1)


class NeuralCleanseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inversion: InversionConfig = InversionConfig(steps=1000, batches_per_step=1000 // 32,
                                                 batch_size=32)
    init_cost: float = Field(1e-3, gt=0)
    cost_up: float = Field(2.0, gt=1)
    cost_down: float = Field(2.0 ** 1.5, gt=1)
    success_threshold: float = Field(0.99, gt=0, le=1)
    anomaly_threshold: float = Field(2.0, gt=0)
    max_images: int = Field(1000, ge=2, description="clean images used for inversion, drawn "
                                                    "seeded and class-balanced")
    unlearn: UnlearnConfig = UnlearnConfig()


class NeuralCleanseSchedule(CostSchedule):
    """The reference cost schedule (see the module docstring)."""

    def __init__(self, init_cost: float, patience: int, early_stop_patience: int,
                 up: float = 2.0, down: float = 2.0 ** 1.5) -> None:
        self.cost = 0.0
        self.init_cost, self.patience = init_cost, patience
        self.early_stop_patience = early_stop_patience
        self.up, self.down = up, down
        self.initialised = False
        self.set_counter = self.up_counter = self.down_counter = 0
        self.moved_up = self.moved_down = False
        self.stopped = False  # by the early-stop rule, i.e. converged

    def update(self, success: bool) -> None:
        if not self.initialised:
            # c stays 0 (pure attack) until the attack reliably works, then the search
            # for a small mask begins.
            self.set_counter = self.set_counter + 1 if success else 0
            if self.set_counter >= self.patience:
                self.cost, self.initialised = self.init_cost, True
            return
        self.up_counter = self.up_counter + 1 if success else 0
        self.down_counter = 0 if success else self.down_counter + 1
        if self.up_counter >= self.patience:
            self.cost, self.up_counter, self.moved_up = self.cost * self.up, 0, True
        elif self.down_counter >= self.patience:
            self.cost, self.down_counter, self.moved_down = self.cost / self.down, 0, True

    def should_stop(self, steps_since_improvement: int, success: bool) -> bool:
        # The loop stops at the first True, so remembering it tells whether the search
        # converged or ran out of steps.
        self.stopped = self.stopped or (self.moved_up and self.moved_down
                                        and steps_since_improvement >= self.early_stop_patience)
        return self.stopped


class TargetLabelObjective:
    """Flip a classifier to `target`: loss CE(f(x'), t); score = fraction predicted t."""

    def __init__(self, classifier: nn.Module, target: int, threshold: float) -> None:
        self.classifier, self.target, self.threshold = classifier, target, threshold

    def attack_loss(self, stamped: torch.Tensor) -> tuple[torch.Tensor, float]:
        logits = self.classifier(stamped).float()
        targets = torch.full((logits.shape[0],), self.target, device=logits.device)
        hits = (logits.argmax(1) == targets).float().mean()
        return F.cross_entropy(logits, targets), float(hits)

    def is_success(self, score: float) -> bool:
        return score >= self.threshold


class EncoderClassifier(nn.Module):
    """A downstream classifier: head(normalize(encoder(x))) for images [B,3,H,W] in [0,1]."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.encoder(images).float(), dim=1))


def median(values: torch.Tensor) -> torch.Tensor:
    """Median of a 1-D tensor; the mean of the two middle values for an even count."""
    ordered = values.flatten().double().sort().values
    count = ordered.numel()
    if count == 0:
        raise ValueError("median of an empty tensor")
    middle = count // 2
    return ordered[middle] if count % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """MAD anomaly index [K] of each label's trigger norm n [K]: |n − median|/MAD.

    Labels at or above the median get 0: only unusually *small* triggers are suspicious.
    A MAD of 0 (all norms but outliers equal) gives +inf for any deviating small norm.
    """
    center = median(norms)
    mad = MAD_CONSISTENCY * median((norms.double() - center).abs())
    deviation = (center - norms.double()).clamp(min=0)
    if float(mad) == 0.0:
        return torch.where(deviation > 0, torch.tensor(float("inf"), dtype=torch.float64),
                           torch.zeros_like(deviation))
    return deviation / mad


@dataclass
class LabelTrigger:
    """The reversed trigger of one label: mask [1,H,W], pattern [3,H,W]."""

    label: int
    l1_norm: float
    success: bool
    steps: int
    mask: torch.Tensor
    pattern: torch.Tensor
    converged: bool = False  # stopped by the early-stop rule, not by the step budget


@dataclass
class NeuralCleanseResult:
    triggers: list[LabelTrigger]
    anomaly_index: list[float]
    min_label: int
    min_label_index: float
    flagged: bool
    threshold: float
    mitigation: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, object]:
        return {"norms": [t.l1_norm for t in self.triggers],
                "inversion_succeeded": [t.success for t in self.triggers],
                "converged": [t.converged for t in self.triggers],
                "steps": [t.steps for t in self.triggers],
                "anomaly_index": self.anomaly_index, "min_label": self.min_label,
                "min_label_anomaly_index": self.min_label_index, "flagged": self.flagged,
                "threshold": self.threshold, "mitigation": self.mitigation}


def inversion_images(images: torch.Tensor, labels: torch.Tensor | None, count: int,
                     seed: int) -> torch.Tensor:
    """`count` of images [N,3,H,W] drawn at random (seeded); with labels [N], class-balanced:
    classes take turns, each giving its next random image, until `count` are drawn (a class
    that runs out drops out of the turns)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    if labels is None or count >= images.shape[0]:
        return images[order[:count]]
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    shuffled = labels[order]
    classes = torch.unique(labels)
    turns: list[tuple[int, int, int]] = []  # (rank within its class, class turn, image)
    for turn, label in enumerate(classes[torch.randperm(len(classes), generator=generator)]):
        members = order[shuffled == label]  # this class's images, in random order
        turns += [(rank, turn, int(index)) for rank, index in enumerate(members)]
    chosen = torch.tensor([index for _, _, index in sorted(turns)[:count]])
    return images[chosen[torch.randperm(chosen.numel(), generator=generator)]]


def neural_cleanse(classifier: nn.Module, images: torch.Tensor, num_classes: int,
                   config: NeuralCleanseConfig, device: torch.device,
                   seed: int = 0, labels: torch.Tensor | None = None) -> NeuralCleanseResult:
    """Reverse a trigger per label and compute the anomaly index.

    Args:
        classifier: maps images [B,3,H,W] in [0,1] to logits [B,C] (frozen here).
        images: the defender's clean images [N,3,H,W] (uint8 or float in [0,1]).
        labels: their labels [N], to draw the `max_images` inversion images class-balanced
            (without, they are drawn at random).

    A label whose inversion never reaches the success threshold gets the whole image's
    area H·W as its norm: no trigger smaller than the image was found.
    """
    if num_classes < 3:
        raise UserInputError(f"Neural Cleanse needs at least 3 labels for a MAD, got {num_classes}")
    model = classifier.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    images = inversion_images(images, labels, config.max_images, seed)
    triggers = [_invert_label(model, images, label, config, device, seed)
                for label in range(num_classes)]
    norms = torch.tensor([t.l1_norm for t in triggers])
    index = anomaly_indices(norms)
    min_label = int(norms.argmin())
    min_index = float(index[min_label])
    return NeuralCleanseResult(triggers, [float(v) for v in index], min_label, min_index,
                               min_index > config.anomaly_threshold, config.anomaly_threshold)


def _invert_label(model: nn.Module, images: torch.Tensor, label: int,
                  config: NeuralCleanseConfig, device: torch.device, seed: int) -> LabelTrigger:
    inversion = config.inversion
    schedule = NeuralCleanseSchedule(config.init_cost, inversion.patience,
                                     inversion.early_stop_patience, config.cost_up,
                                     config.cost_down)
    objective = TargetLabelObjective(model, label, config.success_threshold)
    result = invert_trigger(images, objective, schedule, inversion, device, seed=seed + label,
                            label=f"label {label}")
    norm = result.l1_norm if result.success else float(result.mask[0].numel())
    log(f"  Neural Cleanse label {label}: ‖m‖₁={norm:.1f} "
        f"({'found' if result.success else 'not found'}, {result.steps} steps, "
        f"{'converged' if schedule.stopped else 'step budget spent, not converged'})")
    return LabelTrigger(label, norm, result.success, result.steps, result.mask, result.pattern,
                        schedule.stopped)


def unlearn(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            trigger: LabelTrigger, config: UnlearnConfig, device: torch.device,
            seed: int = 0) -> nn.Module:
    """A fine-tuned copy of `classifier` that ignores the reversed trigger.

    Args:
        images: clean train images [N,3,H,W]; labels: [N]. A seeded `data_fraction` of
            them is used, `stamped_fraction` of that stamped with the trigger (true labels).
    """
    generator = torch.Generator().manual_seed(seed)
    count = max(2, round(config.data_fraction * images.shape[0]))
    chosen = torch.randperm(images.shape[0], generator=generator)[:count]
    data, targets = to_device_images(images[chosen], device), labels[chosen].to(device)
    stamped = torch.rand(count, generator=generator) < config.stamped_fraction
    data[stamped.to(device)] = stamp(data[stamped.to(device)], trigger.mask.to(device),
                                     trigger.pattern.to(device))
    model = copy.deepcopy(classifier).to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    # Small batches would corrupt BatchNorm statistics; keep BN in eval mode with frozen
    # affine weights, as BadEncoder fine-tuning does.
    freeze_batchnorm(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    for _ in range(config.epochs):
        order = torch.randperm(count, generator=generator).to(device)
        for start in range(0, count, config.batch_size):
            index = order[start:start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data[index]).float(), targets[index]).backward()
            optimizer.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, device: torch.device,
             trigger: Trigger | None = None, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels [N] (on CPU) of images [N,3,H,W], optionally stamped with `trigger`."""
    predictions = []
    with eval_mode(model):
        for start in range(0, images.shape[0], batch_size):
            batch = to_device_images(images[start:start + batch_size], device)
            if trigger is not None:
                batch = trigger.apply(batch)
            predictions.append(model(batch).argmax(1).cpu())
    return torch.cat(predictions)


def accuracy_and_asr(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     device: torch.device, trigger: Trigger | None = None,
                     target: int | None = None) -> dict[str, float]:
    """{"accuracy": …, "asr": …} of a classifier on test images; ASR needs trigger and target."""
    scores = {"accuracy": accuracy(classify(model, images, device), labels)}
    if trigger is not None and target is not None:
        scores["asr"] = attack_success_rate(classify(model, images, device, trigger), labels,
                                            target)
    return scores
