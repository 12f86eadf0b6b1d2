"""`sslbackdoor poison ...`: write poisoned pre-training images and their manifest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer

from sslbackdoor.attacks.corruptencoder import trigger_patch
from sslbackdoor.errors import UserInputError

poison_app = typer.Typer(no_args_is_help=True,
                         help="Write poisoned images for an unlabeled pre-training set.")

Out = Annotated[Path, typer.Option("--out", help="output folder (images/ + manifest.json)")]
Count = Annotated[int | None, typer.Option("--count", help="number of poisons")]
Ratio = Annotated[float | None, typer.Option("--ratio", help="poisons / pre-training set size")]
PretrainSize = Annotated[int | None, typer.Option("--pretrain-size", help="clean pre-training images (with --ratio)")]
TriggerSize = Annotated[int, typer.Option("--trigger-size", help="trigger patch side in pixels")]
TriggerPattern = Annotated[str, typer.Option(
    "--trigger-pattern", help="official (CorruptEncoder's colourful trigger_10.png, read from "
                              "--trigger-image or $SSLBACKDOOR_DATA/corruptencoder/triggers/"
                              "trigger_10.png) | image | random | white | checkerboard")]
TriggerImage = Annotated[Path | None, typer.Option(
    "--trigger-image", help="pattern image for --trigger-pattern image or official")]
Seed = Annotated[int, typer.Option("--seed")]


def poison_count(count: int | None, ratio: float | None, pretrain_size: int | None) -> int:
    """--count N, or --ratio R with --pretrain-size N (count = ceil(R·N))."""
    if count is not None:
        if count < 1:
            raise UserInputError(f"--count must be at least 1, got {count}")
        return count
    if ratio is None or pretrain_size is None:
        raise UserInputError("give --count N, or --ratio R together with --pretrain-size N")
    if not 0 < ratio < 1:
        raise UserInputError(f"--ratio must be in (0, 1), got {ratio}")
    return max(1, math.ceil(ratio * pretrain_size))


def images_in(folder: Path | None, what: str) -> list[Path]:
    from sslbackdoor.attacks.corruptencoder import image_files

    if folder is None:
        return []
    return image_files(folder, what)


@poison_app.command("corruptencoder")
def corruptencoder(
    references: Annotated[Path, typer.Option(
        help="reference objects: N/img.png + N/label.png (official release) or NAME.png + "
             "NAME_mask.png")],
    backgrounds: Annotated[Path, typer.Option(help="folder of natural background images")],
    out: Out, count: Count = None, ratio: Ratio = None, pretrain_size: PretrainSize = None,
    support_ratio: Annotated[float, typer.Option(help="CorruptEncoder+: fraction of support poisons")] = 0.0,
    supports: Annotated[Path | None, typer.Option(
        help="target-class support images (CorruptEncoder+); default: REFERENCES/support-images")] = None,
    trigger_size: TriggerSize = 40, trigger_pattern: TriggerPattern = "official",
    trigger_image: TriggerImage = None,
    area_ratio: Annotated[float, typer.Option(help="canvas width / object width")] = 2.0,
    object_height: Annotated[int | None, typer.Option(help="resize objects to this height")] = None,
    seed: Seed = 0,
) -> None:
    """CorruptEncoder (and CorruptEncoder+ with --support-ratio) poisons, at native size."""
    from sslbackdoor.attacks.corruptencoder import (
        PoisonConfig,
        PoisonLayout,
        generate_corruptencoder,
        load_reference_objects,
        support_folder,
    )

    layout = PoisonLayout(area_ratio=area_ratio, object_height=object_height)
    config = PoisonConfig(count=poison_count(count, ratio, pretrain_size),
                          support_ratio=support_ratio, seed=seed, layout=layout)
    objects = load_reference_objects(references)
    supports = supports or (support_folder(references) if support_ratio > 0 else None)
    records = generate_corruptencoder(objects, images_in(backgrounds, "backgrounds"),
                                      trigger_patch(trigger_size, trigger_pattern, trigger_image, seed),
                                      config, out, images_in(supports, "supports"))
    typer.echo(f"wrote {len(records)} poisons and {out / 'manifest.json'}")


def _baseline(method: Literal["ssl-backdoor", "poisonedencoder", "ctrl"], out: Path, count: int,
              seed: int, targets: Path | None = None, references: Path | None = None,
              backgrounds: Path | None = None, trigger: np.ndarray | None = None,
              magnitude: float = 100.0) -> None:
    from sslbackdoor.attacks.poisoning_baselines import BaselineConfig, generate_baseline

    config = BaselineConfig(method=method, count=count, seed=seed, ctrl_magnitude=magnitude)
    records = generate_baseline(config, out, target_images=images_in(targets, "targets"),
                                trigger=trigger, references=images_in(references, "references"),
                                backgrounds=images_in(backgrounds, "backgrounds"))
    typer.echo(f"wrote {len(records)} {method} poisons and {out / 'manifest.json'}")


@poison_app.command("ssl-backdoor")
def ssl_backdoor(targets: Annotated[Path, typer.Option(help="target-class images")], out: Out,
                 count: Count = None, ratio: Ratio = None, pretrain_size: PretrainSize = None,
                 trigger_size: TriggerSize = 40, trigger_pattern: TriggerPattern = "official",
                 trigger_image: TriggerImage = None, seed: Seed = 0) -> None:
    """SSL-Backdoor: a trigger pasted into target-class images."""
    _baseline("ssl-backdoor", out, poison_count(count, ratio, pretrain_size), seed,
              targets=targets,
              trigger=trigger_patch(trigger_size, trigger_pattern, trigger_image, seed))


@poison_app.command("poisonedencoder")
def poisonedencoder(references: Annotated[Path, typer.Option(help="reference images")],
                    backgrounds: Annotated[Path, typer.Option(help="random images to trigger")],
                    out: Out, count: Count = None, ratio: Ratio = None,
                    pretrain_size: PretrainSize = None, trigger_size: TriggerSize = 40,
                    trigger_pattern: TriggerPattern = "official", trigger_image: TriggerImage = None,
                    seed: Seed = 0) -> None:
    """PoisonedEncoder: a triggered random image beside a reference image."""
    _baseline("poisonedencoder", out, poison_count(count, ratio, pretrain_size), seed,
              references=references, backgrounds=backgrounds,
              trigger=trigger_patch(trigger_size, trigger_pattern, trigger_image, seed))


@poison_app.command("ctrl")
def ctrl(targets: Annotated[Path, typer.Option(help="target-class images")], out: Out,
         count: Count = None, ratio: Ratio = None, pretrain_size: PretrainSize = None,
         magnitude: Annotated[float, typer.Option(help="added DCT magnitude (CTRL's default)")] = 100.0,
         seed: Seed = 0) -> None:
    """CTRL: a frequency-domain trigger on target-class images."""
    _baseline("ctrl", out, poison_count(count, ratio, pretrain_size), seed, targets=targets,
              magnitude=magnitude)
