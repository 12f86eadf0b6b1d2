"""CorruptEncoder pre-training data path: views per second before and after native size.

Both paths make the two SimCLR views of the same batches in this one process:

* squashed (before): every image resized to S×S once, views cut from the squares
  (`SimCLRViews` on one uint8 tensor);
* native (after): images kept at their own sizes (`NativeImages`: Fashion-MNIST-sized
  28 px images, 64 px natural crops, 1% poisons of about 42 × 105 px as the small scale
  writes them), views cut from the native images, shrinking crops antialiased.

Pixels are random (the cost does not depend on them). Prints views/s of both paths and
their ratio. Usage:
    python benchmarks/corruptencoder_views.py [--image-size 32] [--batch-size 256] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from sslbackdoor.data.datasets import resize_uint8
from sslbackdoor.data.native import NativeImages, image_sizes
from sslbackdoor.ssl.simclr import SimCLRViews


def native_set(generator: torch.Generator) -> NativeImages:
    """The small scale's clean set and poisons at their native sizes."""
    def images(count: int, height: int, width: int) -> torch.Tensor:
        return torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8,
                             generator=generator)

    poisons = [image[0] for width in (100, 105, 110) for image in images(17, 42, width).split(1)]
    return NativeImages.of([images(4500, 28, 28), images(500, 64, 64), poisons[:50]])


def squashed(images: NativeImages, size: int) -> torch.Tensor:
    return torch.cat([resize_uint8(group, size) for group in images.groups])


def views_per_second(images: torch.Tensor | NativeImages, views: SimCLRViews, batch: int,
                     steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=generator)
    started = time.perf_counter()
    for step in range(steps):
        index = order[(step * batch) % (len(images) - batch):][:batch]
        chosen = images[index]
        params = views.sample_pairs(batch, *image_sizes(chosen), generator)
        views.apply(chosen, params[:batch])
        views.apply(chosen, params[batch:])
    return 2 * batch * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: the figure does not depend on the others' load
    native = native_set(torch.Generator().manual_seed(1))
    square = squashed(native, args.image_size)
    views = SimCLRViews(args.image_size)
    views_per_second(square, views, args.batch_size, 2)  # warm-up
    before = views_per_second(square, views, args.batch_size, args.steps)
    after = views_per_second(native, views, args.batch_size, args.steps)
    print(f"squashed (before): {before:.0f} views/s; native (after): {after:.0f} views/s; "
          f"native / squashed: {after / before:.2f} ({len(native)} images, batch "
          f"{args.batch_size}, {args.steps} steps, 1 thread)")


if __name__ == "__main__":
    main()
