"""Shadow encoders: clean fine-tunes and trojaned ones, for MNTD and the defense tests.

The trojaned shadows use a *simpler poisoning than BadEncoder* (documented choice): fine-tune
a copy f' of an encoder f so that triggered inputs collapse onto one target embedding while
clean inputs keep their features,

    L = −mean_x cos(f'(x ⊕ e), z*) − mean_x cos(f'(x̃), f(x)),

with z* = f(x_ref) for one target image x_ref and x̃ = x with a random horizontal flip and
Gaussian pixel noise. A *clean* shadow gets exactly the same fine-tuning without the first
term, so the two populations differ only in the backdoor, not in "was fine-tuned at all".
It needs no reference set and no augmentation pipeline, so a shadow costs `steps` batches.

MNTD's "jumbo" trigger distribution (random size, location, pattern, opacity; sometimes
a faint full-image blend) is `sample_jumbo_trigger`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.features import encode
from sslbackdoor.engine import autocast, freeze_batchnorm, to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.encoders import Encoder


class JumboTriggerConfig(BaseModel):
    """MNTD's jumbo distribution of triggers (sizes in pixels of the image)."""

    model_config = ConfigDict(extra="forbid")

    min_size: int = Field(2, ge=1)
    max_size: int = Field(5, ge=1)
    blend_probability: float = Field(0.25, ge=0, le=1,
                                     description="chance of a full-image blend trigger")
    patch_alpha: tuple[float, float] = (0.8, 1.0)
    blend_alpha: tuple[float, float] = (0.05, 0.2)

    @model_validator(mode="after")
    def _check(self) -> JumboTriggerConfig:
        if self.max_size < self.min_size:
            raise ValueError("max_size must be ≥ min_size")
        return self


class ShadowTrainingConfig(BaseModel):
    """Fine-tuning of one shadow encoder."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    noise: float = Field(0.03, ge=0, description="σ of the pixel noise in the utility term")
    precision: str = Field("fp32", pattern="^(fp32|bf16)$")


def _uniform(bounds: tuple[float, float], generator: torch.Generator) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand((), generator=generator))


def sample_jumbo_trigger(image_size: int, config: JumboTriggerConfig,
                         generator: torch.Generator) -> Trigger:
    """A random trigger for image_size×image_size images: a patch or a full-image blend."""
    if float(torch.rand((), generator=generator)) < config.blend_probability:
        alpha = _uniform(config.blend_alpha, generator)
        mask = torch.full((1, image_size, image_size), alpha)
        return Trigger(mask, torch.rand(3, image_size, image_size, generator=generator))
    top = min(config.max_size, image_size)
    size = int(torch.randint(min(config.min_size, top), top + 1, (), generator=generator))
    row, col = (int(v) for v in torch.randint(0, image_size - size + 1, (2,), generator=generator))
    mask = torch.zeros(1, image_size, image_size)
    mask[:, row:row + size, col:col + size] = _uniform(config.patch_alpha, generator)
    pattern = torch.zeros(3, image_size, image_size)
    pattern[:, row:row + size, col:col + size] = (
        torch.rand(3, size, size, generator=generator) > 0.5).float()
    return Trigger(mask, pattern)


def finetune_shadow(base: Encoder, images: torch.Tensor, trigger: Trigger | None,
                    target: torch.Tensor | None, config: ShadowTrainingConfig,
                    device: torch.device, seed: int = 0) -> Encoder:
    """A fine-tuned copy of `base`: clean when `trigger` is None, else trojaned.

    Args:
        images: shadow images [N,3,H,W] (uint8 or float in [0,1]).
        target: the image [3,H,W] whose clean embedding triggered inputs collapse onto.
    """
    if (trigger is None) != (target is None):
        raise UserInputError("a trojaned shadow needs both a trigger and a target image")
    generator = torch.Generator().manual_seed(seed)
    data = to_device_images(images, device)
    clean_features = encode(base, data, device, precision="fp32", normalize=True)
    goal = (encode(base, target[None], device, precision="fp32")[0]
            if target is not None else None)
    model: Encoder = copy.deepcopy(base).to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    freeze_batchnorm(model)  # BN statistics of a pre-trained encoder stay as they are
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=config.lr)
    for _ in range(config.steps):
        index = torch.randint(0, data.shape[0], (min(config.batch_size, data.shape[0]),),
                              generator=generator).to(device)
        loss = _shadow_loss(model, data[index], clean_features[index], trigger, goal,
                            config, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _jitter(batch: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and Gaussian pixel noise: the randomness of a clean fine-tune."""
    flip = (torch.rand(batch.shape[0], generator=generator) < 0.5).to(batch.device)
    flipped = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    grain = torch.randn(batch.shape, generator=generator).to(batch.device) * noise
    return (flipped + grain).clamp(0, 1)


def _shadow_loss(model: Encoder, batch: torch.Tensor, clean_features: torch.Tensor,
                 trigger: Trigger | None, goal: torch.Tensor | None,
                 config: ShadowTrainingConfig, generator: torch.Generator) -> torch.Tensor:
    """−cos(f'(x̃), f(x)) [− cos(f'(x⊕e), z*)], averaged over the batch [B,3,H,W]."""
    pieces = [_jitter(batch, config.noise, generator)]
    if trigger is not None:
        pieces.append(trigger.apply(batch))
    with autocast(batch.device, config.precision == "bf16"):
        features = model(torch.cat(pieces)).float()
    utility = F.cosine_similarity(features[:batch.shape[0]], clean_features, dim=1).mean()
    if goal is None:
        return -utility
    collapse = F.cosine_similarity(features[batch.shape[0]:], goal[None], dim=1).mean()
    return -utility - collapse
