"""fp32 vs bf16 autocast on this machine: the measurement behind `engine.uses_bf16`.

Times a training step (forward + backward, channels_last) of one encoder under fp32 and
under bf16 autocast in this one process, on the same inputs, and prints images/s for both,
their ratio and whether oneDNN reports native bf16 kernels. Usage:
    python benchmarks/precision.py [--arch convnet-small] [--image-size 32] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from sslbackdoor.engine import cpu_runs_bf16_natively, prepare_module
from sslbackdoor.models.encoders import build_encoder


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="convnet-small")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    return parser.parse_args()


def images_per_second(encoder: torch.nn.Module, images: torch.Tensor, bf16: bool,
                      steps: int) -> float:
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            encoder(images).float().square().mean().backward()

    step()  # warm-up: kernel selection and allocation
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images.shape[0] / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    encoder = prepare_module(build_encoder(args.arch).train(), torch.device("cpu"))
    images = torch.rand(args.batch_size, 3, args.image_size, args.image_size).contiguous(
        memory_format=torch.channels_last)
    fp32 = images_per_second(encoder, images, False, args.steps)
    bf16 = images_per_second(encoder, images, True, args.steps)
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, native bf16: {cpu_runs_bf16_natively()}")
    print(f"fp32:          {fp32:8.1f} img/s (forward + backward)")
    print(f"bf16 autocast: {bf16:8.1f} img/s")
    print(f"bf16 / fp32:   {bf16 / fp32:.2f}x -> the project uses "
          f"{'bf16' if cpu_runs_bf16_natively() else 'fp32'} on this CPU")


if __name__ == "__main__":
    main()
