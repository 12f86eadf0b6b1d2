"""Shared fixtures: small real data and tiny encoders that run in seconds on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sslbackdoor.models.encoders import Encoder

SHARED = Path(__file__).resolve().parents[2] / "shared"
INTEROP = SHARED / "interop"


class TinyConvNet(torch.nn.Module):
    """Two conv layers with BatchNorm and a linear output (features of any sign): → [B,16]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16),
            torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture
def tiny_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(TinyConvNet(), name="tiny", feature_dim=16, mean=(0.5, 0.5, 0.5),
                   std=(0.25, 0.25, 0.25), default_image_size=16)
