"""Eager vs `torch.compile` for one SimCLR pre-training step on this machine.

Times the full step (encoder + projection head, NT-Xent, backward, Adam) on the same
views in this one process, eager first, then compiled (its compile time printed apart),
and prints views/s for both and their ratio: the measurement behind pre-training staying
eager. Usage:
    python benchmarks/compile.py [--arch convnet-small] [--image-size 32] [--views 512]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sslbackdoor.engine import prepare_module
from sslbackdoor.models.encoders import build_encoder
from sslbackdoor.ssl.simclr import SimCLRModel, nt_xent_loss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="convnet-small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--views", type=int, default=512, help="2 × the SimCLR batch")
    parser.add_argument("--steps", type=int, default=8)
    return parser.parse_args()


def training_step(arch: str, compiled: bool) -> Callable[[torch.Tensor], float]:
    torch.manual_seed(0)
    model = prepare_module(SimCLRModel(build_encoder(arch)), torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    network = torch.compile(model) if compiled else model

    def step(views: torch.Tensor) -> float:
        loss = nt_xent_loss(network(views))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def measure(step: Callable[[torch.Tensor], float], views: torch.Tensor,
            steps: int) -> tuple[float, float]:
    """(seconds of the first step, views/s over `steps` steps after a second warm-up)."""
    started = time.perf_counter()
    step(views)
    first = time.perf_counter() - started
    step(views)
    started = time.perf_counter()
    for _ in range(steps):
        step(views)
    return first, steps * views.shape[0] / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    views = torch.rand(args.views, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last)
    eager_first, eager = measure(training_step(args.arch, False), views, args.steps)
    compile_first, compiled = measure(training_step(args.arch, True), views, args.steps)
    print(f"{args.arch}, {args.image_size} px, {args.views} views per step, "
          f"{torch.get_num_threads()} threads, fp32")
    print(f"eager:    {eager:8.1f} views/s (first step {eager_first:.1f} s)")
    print(f"compiled: {compiled:8.1f} views/s (first step, compiling, {compile_first:.1f} s)")
    print(f"compiled / eager: {compiled / eager:.2f}x")


if __name__ == "__main__":
    main()
