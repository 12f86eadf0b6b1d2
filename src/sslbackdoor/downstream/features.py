"""Frozen-encoder features, computed once per (encoder, images, trigger)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbackdoor.data.sources import dataset_tensors
from sslbackdoor.data.triggers import Trigger
from sslbackdoor.engine import autocast, eval_mode, to_device_images
from sslbackdoor.models.encoders import Encoder

__all__ = ["DEFAULT_BATCH", "dataset_tensors", "encode"]  # dataset_tensors: the data layer's, kept importable here

DEFAULT_BATCH = 256


@torch.no_grad()
def encode(encoder: Encoder | torch.nn.Module, images: torch.Tensor, device: torch.device,
           *, trigger: Trigger | None = None, precision: str = "bf16",
           batch_size: int = DEFAULT_BATCH, normalize: bool = True) -> torch.Tensor:
    """Features [N,D] (float32, on `device`) of images [N,3,H,W] (uint8, or float in [0,1]).

    The encoder runs in eval mode under no_grad; `trigger` is stamped on raw pixels first.
    """
    outputs = []
    with eval_mode(encoder):
        for start in range(0, images.shape[0], batch_size):
            batch = to_device_images(images[start:start + batch_size], device)
            if trigger is not None:
                batch = trigger.apply(batch)
            with autocast(device, precision == "bf16"):
                outputs.append(encoder(batch).float())
    features = torch.cat(outputs) if outputs else torch.empty(0)
    return F.normalize(features, dim=1) if normalize else features
