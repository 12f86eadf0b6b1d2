"""Which small encoder learns Fashion-MNIST best with SimCLR in a fixed CPU time budget?

For each candidate architecture: SimCLR pre-training (the spec's settings: NT-Xent τ 0.5,
Adam lr 1e-3 wd 1e-6, batch 256, RandomResizedCrop/flip/jitter/grey views, 28→32 px) on
the 60k Fashion-MNIST training images for `--minutes` of wall-clock training time, then
a linear probe (frozen, L2-normalised features; Adam, 100 epochs) trained on the training
images and tested on the 10k test images. Evaluation time is not counted in the budget.
Accuracy is also measured at the given `--checkpoints` (fractions of the budget), so one
run shows the learning curve. Prints one line per measurement and a summary table.

Usage (the real measurement; about 30 min per architecture plus evaluation):
    python benchmarks/simclr_small.py --minutes 30 --archs convnet-small
A finished encoder (e.g. the grids' cached one), evaluated the same way:
    python benchmarks/simclr_small.py --encoder runs/cache/encoders/HASH/encoder.safetensors
Quick look (numbers are then a few minutes' worth, with subsets for the probe):
    python benchmarks/simclr_small.py --minutes 3 --archs convnet:32,resnet18-cifar:16 \
        --probe-train-limit 10000 --probe-test-limit 2000

The target is a linear-probe accuracy of at least 0.88 on the Fashion-MNIST test set after
30 minutes on 2 CPU cores. Run on an otherwise idle machine: shared cores slow training.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sslbackdoor.config import DataSource
from sslbackdoor.downstream.probe import ProbeConfig
from sslbackdoor.engine import atomic_write_text
from sslbackdoor.ssl.monitor import LabeledImages, knn_accuracy, linear_probe_accuracy
from sslbackdoor.ssl.pretrain import (
    ContrastiveConfig,
    ContrastiveTrainer,
    MonitorConfig,
    PretrainConfig,
    load_monitor_data,
    load_pretrain_images,
)

TARGET = 0.88


@dataclass
class Measurement:
    arch: str
    train_seconds: float
    images_seen: int
    knn: float
    linear: float

    def line(self) -> str:
        rate = self.images_seen / self.train_seconds if self.train_seconds else 0.0
        return (f"{self.arch:22s} {self.train_seconds / 60:6.1f} min  {self.images_seen:8d} img "
                f"({rate:6.1f} img/s)  kNN {self.knn:.4f}  linear {self.linear:.4f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="convnet-small", help="comma-separated encoders")
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per arch")
    parser.add_argument("--images", type=int, default=None,
                        help="budget in training images instead of minutes (load-independent "
                             "learning curves on a shared machine)")
    parser.add_argument("--checkpoints", default="0,0.5,1",
                        help="fractions of the budget at which to evaluate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--train-limit", type=int, default=None, help="pre-training subset")
    parser.add_argument("--probe-train-limit", type=int, default=None)
    parser.add_argument("--probe-test-limit", type=int, default=None)
    parser.add_argument("--probe-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the measurements here")
    parser.add_argument("--encoder", default=None,
                        help="evaluate this finished encoder (.safetensors, e.g. a grid's "
                             "cached one) with the same kNN and linear probe; no training")
    return parser.parse_args()


def build_config(arch: str, args: argparse.Namespace) -> PretrainConfig:
    return PretrainConfig(
        name=f"bench-{arch}", seed=args.seed, device="cpu", image_size=32,
        data=[DataSource(dataset="fashion-mnist", split="train", limit=args.train_limit)],
        simclr=ContrastiveConfig(arch=arch, epochs=10_000, batch_size=args.batch_size),
        monitor=MonitorConfig(bank_limit=args.probe_train_limit, test_limit=args.probe_test_limit,
                              probe=ProbeConfig(kind="linear", epochs=args.probe_epochs,
                                                lr=1e-3, batch_size=256)))


def evaluate(trainer: ContrastiveTrainer, train: LabeledImages, test: LabeledImages,
             args: argparse.Namespace) -> tuple[float, float]:
    encoder, device = trainer.model.encoder, trainer.device
    probe = trainer.config.monitor.probe
    assert probe is not None
    knn = knn_accuracy(encoder, train, test, device)
    linear = linear_probe_accuracy(encoder, train, test, device, probe, args.seed)
    trainer.model.train()
    return knn, linear


def measure(arch: str, images: torch.Tensor, args: argparse.Namespace) -> list[Measurement]:
    """Train `arch` for the budget, evaluating at each checkpoint fraction."""
    config = build_config(arch, args)
    train, test = load_monitor_data(config)
    trainer = ContrastiveTrainer(config, torch.device("cpu"))
    batch = config.simclr.batch_size
    budget = float(args.images) if args.images else args.minutes * 60
    marks = sorted(float(f) * budget for f in args.checkpoints.split(","))
    results, seconds, seen, step, epoch = [], 0.0, 0, 0, 0
    generator = trainer.epoch_generator(0)
    order = torch.randperm(images.shape[0], generator=generator)
    while marks:
        if (seen if args.images else seconds) >= marks[0]:
            marks.pop(0)
            results.append(Measurement(arch, seconds, seen, *evaluate(trainer, train, test, args)))
            print(results[-1].line(), flush=True)
            continue
        if (step + 1) * batch > images.shape[0]:
            epoch, step = epoch + 1, 0
            generator = trainer.epoch_generator(epoch)
            order = torch.randperm(images.shape[0], generator=generator)
        index = order[step * batch:(step + 1) * batch]
        started = time.perf_counter()
        params = trainer.views.sample_pairs(batch, images.shape[-2], images.shape[-1], generator)
        trainer.step(images[index], params)
        seconds += time.perf_counter() - started
        seen, step = seen + batch, step + 1
    return results


def evaluate_file(path: Path, args: argparse.Namespace) -> None:
    """kNN and linear probe of a finished encoder, as `measure` evaluates checkpoints."""
    from sslbackdoor.models.checkpoints import load_encoder

    config = build_config("convnet-small", args)
    train, test = load_monitor_data(config)
    encoder = load_encoder(path)
    probe = config.monitor.probe
    assert probe is not None
    device = torch.device("cpu")
    knn = knn_accuracy(encoder, train, test, device)
    linear = linear_probe_accuracy(encoder, train, test, device, probe, args.seed)
    verdict = "meets" if linear >= TARGET else "below"
    print(f"{path}: {encoder.name}, bank {train.labels.numel()}, test {test.labels.numel()}: "
          f"kNN {knn:.4f}  linear {linear:.4f}  → {verdict} the {TARGET} target")


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.encoder:
        evaluate_file(Path(args.encoder), args)
        return
    reference = build_config("convnet-small", args)
    images, _ = load_pretrain_images(reference)
    budget = f"{args.images} images" if args.images else f"{args.minutes} min"
    print(f"Fashion-MNIST: {images.shape[0]} training images at 32 px; "
          f"{torch.get_num_threads()} threads; budget {budget} per arch", flush=True)
    everything = []
    for arch in args.archs.split(","):
        everything += measure(arch, images, args)
    print("\nsummary (last measurement per arch):")
    for arch in args.archs.split(","):
        last = [m for m in everything if m.arch == arch][-1]
        verdict = "meets" if last.linear >= TARGET else "below"
        print(f"{last.line()}  → {verdict} the {TARGET} target")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps([m.__dict__ for m in everything], indent=2))


if __name__ == "__main__":
    main()
