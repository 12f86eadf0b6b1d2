"""MNTD (Xu et al., "Detecting AI Trojans Using Meta Neural Analysis", IEEE S&P 2021) for encoders.

The defender builds shadow encoders — half clean, half trojaned with triggers drawn from a
"jumbo" distribution (`shadow.sample_jumbo_trigger`) — and trains, jointly,

* a query set Q of 10 learnable images (pixels = sigmoid of free parameters), and
* a meta-classifier Linear(10·d → 20) → ReLU → Linear(20 → 1),

so that meta(normalize(f(Q))) predicts whether an encoder f is trojaned (BCE, label 1 =
trojaned, one encoder per step as in the reference code). A suspect encoder's score is
sigmoid(meta(...)). Over the held-out shadow encoders two metrics are reported, never one
for the other: ROC AUC (`roc_auc`), and detection accuracy at the official threshold — the
reference code's `threshold='half'`, the median of the evaluated scores, so that half are
called trojaned (`median_threshold`, `accuracy_at`). The BadEncoder paper's MNTD figure is
such a detection accuracy; a single suspect's score is not comparable with it.

Shadow encoders (documented choice): copies of a base encoder of the suspect's
architecture fine-tuned by `shadow.finetune_shadow` — trojaned ones with the simpler
"collapse" poisoning (triggered inputs → one target embedding, clean inputs kept), clean
ones with the same fine-tuning minus the backdoor term. The query outputs must have the
suspect's dimension d, so shadows share the suspect's architecture; `tiny` encoders make
the whole procedure run on a CPU in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslbackdoor.defenses.shadow import (
    JumboTriggerConfig,
    ShadowTrainingConfig,
    finetune_shadow,
    sample_jumbo_trigger,
)
from sslbackdoor.downstream.features import encode
from sslbackdoor.engine import to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.encoders import Encoder
from sslbackdoor.progress import log


class MNTDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_models: int = Field(16, ge=2, description="shadow encoders for meta-training")
    heldout_models: int = Field(8, ge=2, description="shadow encoders for the AUC")
    queries: int = Field(10, ge=1)
    hidden: int = Field(20, ge=1)
    meta_epochs: int = Field(60, ge=1)
    meta_lr: float = Field(1e-3, gt=0)
    score_threshold: float = Field(0.5, gt=0, lt=1, description="flag when score > this")
    jumbo: JumboTriggerConfig = JumboTriggerConfig()
    shadow: ShadowTrainingConfig = ShadowTrainingConfig()


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of scores [N] for binary labels [N] (1 = positive).

    Equals the probability that a random positive scores above a random negative, ties
    counting one half (the Mann–Whitney U statistic / (P·N)).
    """
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ")
    positives, negatives = scores[labels], scores[~labels]
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative")
    greater = (positives[:, None] > negatives[None, :]).double().sum()
    ties = (positives[:, None] == negatives[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (positives.numel() * negatives.numel()))


def median_threshold(scores: torch.Tensor) -> float:
    """The median of scores [N] (the mean of the two middle values for an even N), as
    numpy's median in the MNTD reference code."""
    ordered = scores.flatten().double().sort().values
    if ordered.numel() == 0:
        raise ValueError("the median of no scores is undefined")
    middle = ordered.numel() // 2
    return float(ordered[middle] if ordered.numel() % 2 else ordered[middle - 1:middle + 1].mean())


def accuracy_at(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> float:
    """Fraction of encoders whose verdict `score > threshold` matches its label (1 = trojaned)."""
    scores, labels = scores.flatten(), labels.flatten().bool()
    if scores.shape != labels.shape or scores.numel() == 0:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must "
                         f"be equally long and non-empty")
    return float(((scores > threshold) == labels).double().mean())


class MetaClassifier(nn.Module):
    """Learnable queries [Q,3,H,W] and the meta network; forward(encoder) → logit [1]."""

    def __init__(self, queries: int, image_size: int, feature_dim: int, hidden: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        # Free parameters behind a sigmoid keep the query pixels in [0,1] as images are.
        start = torch.rand(queries, 3, image_size, image_size, generator=generator)
        self.query_raw = nn.Parameter(torch.logit(start.clamp(0.01, 0.99)))
        self.net = nn.Sequential(nn.Linear(queries * feature_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def queries(self) -> torch.Tensor:
        return torch.sigmoid(self.query_raw)

    def forward(self, encoder: nn.Module) -> torch.Tensor:
        features = F.normalize(encoder(self.queries()).float(), dim=1)
        return self.net(features.flatten())


@dataclass
class ShadowEncoder:
    encoder: Encoder
    trojaned: bool
    backdoor_cosine: float | None = None  # mean cos(f'(x ⊕ e), f(x_ref)): did the trojan take?


def build_shadow_encoders(base: Encoder, images: torch.Tensor, count: int, config: MNTDConfig,
                          device: torch.device, seed: int) -> list[ShadowEncoder]:
    """`count` shadow encoders from `base`, alternating clean / jumbo-trojaned.

    Args:
        images: the defender's shadow images [N,3,S,S] (uint8 or float in [0,1]).
    """
    generator = torch.Generator().manual_seed(seed)
    data = to_device_images(images, torch.device("cpu"))
    shadows = []
    for index in range(count):
        trojaned = index % 2 == 1
        trigger = (sample_jumbo_trigger(data.shape[-1], config.jumbo, generator)
                   if trojaned else None)
        target = data[int(torch.randint(0, data.shape[0], (), generator=generator))]
        model_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
        encoder = finetune_shadow(base, data, trigger, target if trojaned else None,
                                  config.shadow, device, seed=model_seed)
        cosine = None
        if trigger is not None:
            goal = encode(base, target[None], device, precision="fp32")
            stamped = encode(encoder, trigger.apply(data[:128]), device, precision="fp32")
            cosine = float((stamped @ goal.T).mean())
        shadows.append(ShadowEncoder(encoder, trojaned, cosine))
        log(f"  MNTD shadow {index + 1}/{count}: {'trojaned' if trojaned else 'clean'}"
            + (f" (triggered→target cosine {cosine:.3f})" if cosine is not None else ""))
    return shadows


def train_meta_classifier(shadows: list[ShadowEncoder], image_size: int, config: MNTDConfig,
                          device: torch.device, seed: int = 0) -> MetaClassifier:
    """Jointly train the query set and the meta-classifier on shadow encoders (BCE)."""
    labels = {shadow.trojaned for shadow in shadows}
    if labels != {True, False}:
        raise UserInputError("MNTD needs both clean and trojaned shadow encoders")
    generator = torch.Generator().manual_seed(seed)
    feature_dim = _feature_dim(shadows[0].encoder, image_size, device)
    meta = MetaClassifier(config.queries, image_size, feature_dim, config.hidden,
                          generator).to(device)
    optimizer = torch.optim.Adam(meta.parameters(), lr=config.meta_lr)
    for _ in range(config.meta_epochs):
        for index in torch.randperm(len(shadows), generator=generator).tolist():
            shadow = shadows[index]
            target = torch.tensor([float(shadow.trojaned)], device=device)
            loss = F.binary_cross_entropy_with_logits(meta(shadow.encoder.to(device).eval()),
                                                      target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return meta.eval()


@torch.no_grad()
def _feature_dim(encoder: nn.Module, image_size: int, device: torch.device) -> int:
    return int(encoder.to(device).eval()(torch.zeros(1, 3, image_size, image_size,
                                                     device=device)).shape[1])


@torch.no_grad()
def meta_score(meta: MetaClassifier, encoder: nn.Module, device: torch.device) -> float:
    """Probability in (0,1) that `encoder` is trojaned."""
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return float(torch.sigmoid(meta(encoder.to(device).eval())))


@dataclass
class MNTDResult:
    meta: MetaClassifier
    heldout_scores: list[float]
    heldout_labels: list[int]
    auc: float
    accuracy: float  # at the configured score_threshold
    trojan_cosines: list[float]
    median_threshold: float = 0.5
    accuracy_at_median: float = 0.0  # the official detection accuracy

    def summary(self) -> dict[str, object]:
        return {"heldout_scores": self.heldout_scores, "heldout_labels": self.heldout_labels,
                "heldout_auc": self.auc, "heldout_accuracy": self.accuracy,
                "heldout_median_threshold": self.median_threshold,
                "heldout_accuracy_at_median": self.accuracy_at_median,
                "shadow_trojan_cosines": self.trojan_cosines}


def run_mntd(base: Encoder, images: torch.Tensor, config: MNTDConfig, device: torch.device,
             seed: int = 0) -> MNTDResult:
    """Build train and held-out shadow encoders, train the meta-classifier, measure AUC."""
    image_size = int(images.shape[-1])
    train = build_shadow_encoders(base, images, config.train_models, config, device, seed)
    heldout = build_shadow_encoders(base, images, config.heldout_models, config, device,
                                    seed + 1_000_003)
    meta = train_meta_classifier(train, image_size, config, device, seed)
    scores = [meta_score(meta, shadow.encoder, device) for shadow in heldout]
    labels = [int(shadow.trojaned) for shadow in heldout]
    score_tensor, label_tensor = torch.tensor(scores), torch.tensor(labels)
    auc = roc_auc(score_tensor, label_tensor)
    accuracy = accuracy_at(score_tensor, label_tensor, config.score_threshold)
    median = median_threshold(score_tensor)
    at_median = accuracy_at(score_tensor, label_tensor, median)
    log(f"  MNTD held-out AUC {auc:.3f}; detection accuracy {at_median:.3f} at the median "
        f"score {median:.3f}, {accuracy:.3f} at {config.score_threshold}")
    cosines = [s.backdoor_cosine for s in [*train, *heldout] if s.backdoor_cosine is not None]
    return MNTDResult(meta, scores, labels, auc, accuracy, cosines, median, at_median)
