"""Downstream classifiers trained on frozen, L2-normalised encoder features.

The BadEncoder protocol: an MLP d→512→ReLU→Dropout(0.5)→256→ReLU→C trained with
cross-entropy and Adam (lr 1e-4, batch 64, 500 epochs); a linear probe is the other
option. Unlike the reference code, batches are shuffled (seeded).

`eval-linear` is CorruptEncoder's official linear evaluation (`eval_linear.py`): features
L2-normalised, then standardised with the training features' full-batch mean and variance,
one Linear layer; SGD (momentum 0.9, weight decay `weight_decay`, 1e-4 there) at `lr`
(0.01), divided by 10 at 15/40 and 30/40 of the epochs (40 there).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sslbackdoor.engine import eval_mode


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["mlp", "linear", "eval-linear"] = "mlp"
    epochs: int = Field(500, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0)


class FullBatchNorm(nn.Module):
    """(x / ‖x‖ − mean) / √(var + 1e-5) with the training features' mean and variance."""

    def __init__(self, features: torch.Tensor) -> None:
        super().__init__()
        unit = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
        var, mean = torch.var_mean(unit, dim=0)
        self.register_buffer("mean", mean)
        self.register_buffer("inv_std", 1.0 / torch.sqrt(var + 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unit = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return (unit - self.mean) * self.inv_std


def build_probe(kind: str, feature_dim: int, num_classes: int) -> nn.Module:
    if kind in ("linear", "eval-linear"):
        return nn.Linear(feature_dim, num_classes)
    return nn.Sequential(nn.Linear(feature_dim, 512), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, num_classes))


def train_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                config: ProbeConfig, seed: int = 0) -> nn.Module:
    """Train a classifier on features [N,D] and labels [N] (on the features' device)."""
    device = features.device
    torch.manual_seed(seed)
    model = build_probe(config.kind, features.shape[1], num_classes).to(device)
    if config.kind == "eval-linear":
        model = nn.Sequential(FullBatchNorm(features), model).to(device)
    optimizer, schedule = _optimizer(model, config)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    labels = labels.to(device)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(features.shape[0], generator=generator).to(device)
        for start in range(0, features.shape[0], config.batch_size):
            index = order[start:start + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(features[index]), labels[index]).backward()
            optimizer.step()
        if schedule is not None:
            schedule.step()
    model.eval()
    return model


def _optimizer(model: nn.Module, config: ProbeConfig
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.MultiStepLR | None]:
    if config.kind == "eval-linear":
        sgd = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                              weight_decay=config.weight_decay)
        milestones = [max(1, config.epochs * 15 // 40), max(1, config.epochs * 30 // 40)]
        return sgd, torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=milestones)
    # The fused kernel is ~10x faster than the default on CPU for these small layers.
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                            fused=True), None


@torch.no_grad()
def predict(model: nn.Module, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Predicted classes [N] for features [N,D]."""
    with eval_mode(model):
        return torch.cat([model(features[i:i + batch_size]).argmax(1)
                          for i in range(0, features.shape[0], batch_size)]).cpu()
