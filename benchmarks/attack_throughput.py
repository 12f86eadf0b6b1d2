"""BadEncoder attack throughput: this project's loop vs the reference code's structure.

Both loops run in this one process on the same encoder, shadow images, targets and batch:

* fast: the project's `BadEncoderAttack` — f(shadow) and f(references) computed once,
  one concatenated forward per step, bf16 autocast where the CPU runs it natively,
  channels_last;
* reference structure: fp32, contiguous (NCHW) tensors, the clean encoder re-run on every
  shadow batch and reference each step, one forward per input group (as the BadEncoder
  reference code does).

Prints shadow images/s for both and their ratio. Usage:
    python benchmarks/attack_throughput.py [--image-size 64] [--batch-size 64] [--steps 6]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from sslbackdoor.attacks.badencoder import (
    AttackTarget,
    BadEncoderAttack,
    BadEncoderConfig,
    badencoder_loss,
    freeze_batchnorm,
)
from sslbackdoor.data.augment import augment_each, reference_augmentation
from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.downstream.features import dataset_tensors
from sslbackdoor.engine import uses_bf16
from sslbackdoor.models.checkpoints import load_encoder
from sslbackdoor.models.encoders import Encoder


def reference_structure_step(backdoored: Encoder, clean: Encoder, optimizer: torch.optim.Optimizer,
                             shadow: torch.Tensor, targets: list[AttackTarget]) -> None:
    """One step laid out like the reference code: fp32, separate forwards, nothing cached."""
    images = shadow.float() / 255
    references = [t.references.float() / 255 for t in targets]
    augmentation = reference_augmentation()
    with torch.no_grad():
        shadow_clean = clean(images)
        references_clean = [clean(r) for r in references]
    shadow_bd = backdoored(images)
    triggered = [backdoored(t.trigger.apply(images)) for t in targets]
    references_bd = [backdoored(r) for r in references]
    references_aug = [backdoored(augment_each(r, augmentation)) for r in references]
    loss = badencoder_loss(shadow_bd, shadow_clean, triggered, references_bd, references_aug,
                           references_clean).total
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def time_reference_structure(encoder: Encoder, shadow: torch.Tensor, targets: list[AttackTarget],
                             batch: int, steps: int) -> float:
    clean = copy.deepcopy(encoder).eval()
    backdoored = copy.deepcopy(encoder)
    freeze_batchnorm(backdoored)
    optimizer = torch.optim.SGD([p for p in backdoored.parameters() if p.requires_grad],
                                lr=1e-3, momentum=0.9, weight_decay=5e-4)
    reference_structure_step(backdoored, clean, optimizer, shadow[:batch], targets)  # warm-up
    started = time.perf_counter()
    for step in range(steps):
        reference_structure_step(backdoored, clean, optimizer,
                                 shadow[(step % 4) * batch:(step % 4 + 1) * batch], targets)
    return steps * batch / (time.perf_counter() - started)


def time_fast(encoder: Encoder, shadow: torch.Tensor, targets: list[AttackTarget], batch: int,
              steps: int) -> float:
    config = BadEncoderConfig(epochs=1, batch_size=batch)
    BadEncoderAttack(copy.deepcopy(encoder), targets, config, torch.device("cpu")).run(
        shadow[:batch])  # warm-up
    attack = BadEncoderAttack(copy.deepcopy(encoder), targets, config, torch.device("cpu"))
    # The one-off clean-feature pass is part of the attack's cost, so it is timed too.
    result = attack.run(shadow[:steps * batch])
    return result.shadow_images_per_second if result.seconds else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    from sslbackdoor.progress import set_quiet

    set_quiet(True)
    torch.manual_seed(0)
    encoder = load_encoder("imagenet", "torchvision:mobilenet_v2")
    shadow, _ = dataset_tensors(load_dataset("natural-crops", "unlabeled",
                                             image_size=args.image_size,
                                             limit=args.batch_size * max(args.steps, 4)))
    references, _ = dataset_tensors(load_dataset("natural-crops:12", "unlabeled",
                                                 image_size=args.image_size))
    targets = [AttackTarget(f"t{i}", Trigger.from_spec(TriggerSpec(size=args.image_size // 5,
                                                                   position=position),
                                                       args.image_size), references[3 * i:3 * i + 3])
               for i, position in enumerate(("bottom-right", "top-left"))]
    reference = time_reference_structure(encoder, shadow, targets, args.batch_size, args.steps)
    fast = time_fast(encoder, shadow, targets, args.batch_size, args.steps)
    print(f"MobileNetV2 (ImageNet), {args.image_size} px, 2 targets, batch {args.batch_size}, "
          f"{args.steps} steps, {torch.get_num_threads()} threads")
    print(f"reference structure (fp32, recompute clean features): {reference:7.1f} shadow img/s")
    precision = "bf16" if uses_bf16(torch.device("cpu")) else "fp32"
    print(f"sslbackdoor ({precision}, channels_last, cached features):   {fast:7.1f} shadow img/s")
    print(f"speed-up: {fast / reference:.2f}x")


if __name__ == "__main__":
    main()
