"""Shared fixtures: small real data and tiny encoders that run in seconds on CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sslbackdoor.models.encoders import Encoder

SHARED = Path(__file__).resolve().parents[2] / "shared"
INTEROP = SHARED / "interop"
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # reference-format files vendored in the repo


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


@pytest.fixture(scope="module")
def single_thread_cpu() -> Iterator[None]:
    """For modules of tiny models: flush denormals and use one thread, then restore.

    Random towers and collapsed features produce denormal floats (~10x slower on CPU), and
    two OpenMP threads spin-wait badly on tiny kernels when other processes share the cores;
    neither changes a result the tests check.
    """
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)
