"""Experiment kind `grid`: the paper's tables and sweeps as one command.

A grid names clean encoders (pre-trained here with SimCLR, or given, e.g. a public ImageNet
encoder) and targets, and a `study` that says how they combine into BadEncoder runs
("cells"), each a full `run_badencoder_experiment` in `OUT/cells/<id>/`:

* ``table``               every encoder × every target, one target at a time (Tables I/II;
                          with a given ImageNet encoder, the public-encoder case study);
* ``multi-target``        per encoder, each target alone and all targets at once;
* ``shadow-size``         encoder × target × shadow-set size in `sweep` (figure);
* ``trigger-size``        encoder × target × trigger side in `sweep` (figure);
* ``shadow-distribution`` encoder × target × shadow set in `shadows` (Table IV: a subset
                          of the pre-training data, the same distribution disjoint from it,
                          a different distribution).

Pre-trained encoders are cached by the hash of what determines their weights, in
`CACHE/encoders/<hash>/` (CACHE: `cache_dir`, else $SSLBACKDOOR_CACHE, else runs/cache),
and reused by every grid that asks for the same pre-training. An encoder shipped with the
package under the same hash (`sslbackdoor/pretrained/<hash>/`, the small grids' SimCLR
encoder) seeds the cache instead of pre-training, unless `shipped_encoders: false`. Every
stage's config is built and validated before anything runs; `dry_run` also resolves every
dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from sslbackdoor.attacks.badencoder import BadEncoderConfig
from sslbackdoor.config import (
    DataSource,
    DownstreamSpec,
    EncoderSpec,
    ExperimentConfig,
    Strict,
    TargetSpec,
    dump_config,
    format_validation_error,
)
from sslbackdoor.engine import atomic_write, atomic_write_text, resolve_device
from sslbackdoor.errors import UserInputError
from sslbackdoor.progress import log
from sslbackdoor.runners import register_kind
from sslbackdoor.ssl.pretrain import ContrastiveConfig, MonitorConfig, PretrainConfig, pretrain_hash

RESULTS_SCHEMA = "sslbackdoor.grid/1"
Study = Literal["table", "multi-target", "shadow-size", "trigger-size", "shadow-distribution"]
ShadowKind = Literal["subset", "same-distribution", "different-distribution"]


class PretrainSpec(Strict):
    """SimCLR pre-training of a grid encoder (seed, device and image size: the grid's)."""

    data: list[DataSource] = Field(..., min_length=1)
    simclr: ContrastiveConfig = ContrastiveConfig()
    monitor: MonitorConfig = MonitorConfig()


class GridEncoder(Strict):
    """A clean encoder: pre-trained here (`pretrain`) or given (`encoder`)."""

    name: str = Field(..., min_length=1, description="row label, e.g. Fashion-MNIST")
    paper: str | None = Field(None, description="the paper's analogous pre-training set or "
                                                "encoder, e.g. CIFAR10 or 'ImageNet encoder'")
    pretrain: PretrainSpec | None = None
    encoder: EncoderSpec | None = None
    shadow: list[DataSource] | None = Field(None, description="default shadow set "
                                                              "(default: the pre-training data)")
    targets: list[str] | None = Field(None, description="tasks attacked with this encoder "
                                                        "(default: every target)")

    @model_validator(mode="after")
    def _one_source(self) -> GridEncoder:
        if (self.pretrain is None) == (self.encoder is None):
            raise ValueError(f"encoder {self.name!r}: give exactly one of `pretrain` "
                             f"(SimCLR here) or `encoder` (arch + weights)")
        if self.encoder is not None and self.shadow is None:
            raise ValueError(f"encoder {self.name!r} is given, not pre-trained here: "
                             f"name its `shadow` set")
        return self


class GridTarget(TargetSpec):
    paper: str | None = Field(None, description="the paper's analogous task, e.g. GTSRB")


class ShadowVariant(Strict):
    """One shadow set of the shadow-distribution study."""

    label: str
    paper: ShadowKind | None = None
    sources: list[DataSource] = Field(..., min_length=1)


class GridConfig(Strict):
    """The paper's experiments: which encoders, targets and study, at which scale."""

    name: str = "grid"
    kind: Literal["grid"] = "grid"
    study: Study = "table"
    scale: str = Field("custom", description="label for the report (small, paper, ...)")
    seed: int = 0
    attack_seed: int | None = Field(None, description="seed of the attacks, shadow subsets and "
                                                      "downstream probes (default: seed); "
                                                      "another value re-runs the cells on the "
                                                      "same pre-trained encoder")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    image_size: int = Field(32, ge=8)
    data_root: str | None = None
    download: bool = False
    cache_dir: str | None = Field(None, description="encoder cache ($SSLBACKDOOR_CACHE, "
                                                    "else runs/cache)")
    shipped_encoders: bool = Field(True, description="seed the cache from an encoder shipped "
                                                     "with the package under the same hash; "
                                                     "false pre-trains here")
    encoders: list[GridEncoder] = Field(..., min_length=1)
    targets: list[GridTarget] = Field(..., min_length=1)
    shadow_limit: int | None = Field(None, ge=1, description="images of the default shadow set")
    sweep: list[int] = Field(default_factory=list, description="shadow sizes or trigger sides")
    shadows: list[ShadowVariant] = Field(default_factory=list)
    attack: BadEncoderConfig = BadEncoderConfig()
    downstream: DownstreamSpec = DownstreamSpec()

    @model_validator(mode="after")
    def _study_inputs(self) -> GridConfig:
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names):
            raise ValueError(f"encoder names must be unique, got {names}")
        if self.study in ("shadow-size", "trigger-size") and not self.sweep:
            raise ValueError(f"study {self.study} needs `sweep: [sizes...]`")
        if self.study == "shadow-distribution" and not self.shadows:
            raise ValueError("study shadow-distribution needs `shadows: [{label, sources}]`")
        if self.study == "multi-target" and len(self.targets) < 2:
            raise ValueError("study multi-target needs at least two targets")
        if any(size < 1 for size in self.sweep):
            raise ValueError(f"sweep values must be positive, got {self.sweep}")
        tasks = [t.task for t in self.targets]
        for encoder in self.encoders:
            unknown = sorted(set(encoder.targets or []) - set(tasks))
            if unknown:
                raise ValueError(f"encoder {encoder.name!r}: targets {unknown} are not among "
                                 f"the grid's target tasks {tasks}")
        return self

    def target_indices(self, encoder: GridEncoder) -> list[int]:
        """Indices of the targets attacked with `encoder`."""
        return [i for i, t in enumerate(self.targets)
                if encoder.targets is None or t.task in encoder.targets]


SHIPPED_ENCODERS = Path(__file__).parent / "pretrained"
CACHE_FILES = ("encoder.safetensors", "results.json")  # results.json last: it marks "done"


def cache_root(config: GridConfig) -> Path:
    return Path(config.cache_dir or os.environ.get("SSLBACKDOOR_CACHE", "runs/cache"))


def is_cached(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CACHE_FILES)


def shipped_copy(grid: GridConfig, folder: Path) -> Path | None:
    """The package's encoder for the cache folder's pre-training hash, if it ships one and
    the grid allows it."""
    shipped = SHIPPED_ENCODERS / folder.name
    return shipped if grid.shipped_encoders and is_cached(shipped) else None


def seed_from_shipped(shipped: Path, folder: Path) -> None:
    """Copy a shipped encoder into the cache folder; each file is renamed into place
    whole, `results.json` last."""
    for name in CACHE_FILES:
        atomic_copy(shipped / name, folder / name)


def shipped_sha256(pretrain_hash: str) -> str | None:
    """The sha256 of the encoder the package ships for this pre-training hash, if any."""
    record = SHIPPED_ENCODERS / pretrain_hash / "results.json"
    if not record.is_file():
        return None
    return str(json.loads(record.read_text(encoding="utf-8"))["encoder"]["sha256"])


def atomic_copy(source: Path, destination: Path) -> None:
    def write(tmp: Path) -> None:
        shutil.copyfile(source, tmp)

    atomic_write(destination, write)


def pretrain_config(grid: GridConfig, encoder: GridEncoder) -> PretrainConfig:
    """The full pre-training config of a grid encoder (which must have `pretrain`)."""
    assert encoder.pretrain is not None
    spec = encoder.pretrain
    return PretrainConfig(name=f"{grid.name}-{encoder.name}", seed=grid.seed, device=grid.device,
                          image_size=grid.image_size, data_root=grid.data_root,
                          download=grid.download, data=spec.data, simclr=spec.simclr,
                          monitor=spec.monitor)


def pretrain_folder(grid: GridConfig, encoder: GridEncoder) -> Path:
    return cache_root(grid) / "encoders" / pretrain_hash(pretrain_config(grid, encoder))


def encoder_spec(grid: GridConfig, encoder: GridEncoder) -> EncoderSpec:
    """Arch and weights the attack starts from (a cached file for pre-trained ones)."""
    if encoder.encoder is not None:
        return encoder.encoder
    assert encoder.pretrain is not None
    return EncoderSpec(arch=encoder.pretrain.simclr.arch,
                       weights=str(pretrain_folder(grid, encoder) / "encoder.safetensors"))


@dataclass
class Cell:
    """One BadEncoder run of the grid."""

    id: str
    encoder: str
    targets: list[int]  # indices into GridConfig.targets
    variable: str | int | None  # sweep value, shadow label, or "one"/"all" (multi-target)
    config: ExperimentConfig


def default_shadow(grid: GridConfig, encoder: GridEncoder,
                   total: int | None = None) -> list[DataSource]:
    """The encoder's shadow set; `total` (else shadow_limit) images spread over sources."""
    sources = encoder.shadow or (encoder.pretrain.data if encoder.pretrain else [])
    total = total or grid.shadow_limit
    if total is None:
        return list(sources)
    share = max(1, total // len(sources))
    return [s.model_copy(update={"limit": share}) for s in sources]


def plan_cells(grid: GridConfig) -> list[Cell]:
    """Every cell with its validated ExperimentConfig (one-line error on a bad one)."""
    cells = []
    for encoder in grid.encoders:
        indices = grid.target_indices(encoder)
        for index in indices:
            cells += _cells_for(grid, encoder, index)
        if grid.study == "multi-target" and len(indices) > 1:
            cells.append(_cell(grid, encoder, indices, "all", default_shadow(grid, encoder)))
    ids = [cell.id for cell in cells]
    if len(set(ids)) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise UserInputError(f"grid cells {', '.join(twice)} would share a folder: give each "
                             f"target its own task or target_class")
    return cells


def _cells_for(grid: GridConfig, encoder: GridEncoder, index: int) -> list[Cell]:
    if grid.study in ("table", "multi-target"):
        variable = "one" if grid.study == "multi-target" else None
        return [_cell(grid, encoder, [index], variable, default_shadow(grid, encoder))]
    if grid.study == "shadow-size":
        return [_cell(grid, encoder, [index], size, default_shadow(grid, encoder, size))
                for size in grid.sweep]
    if grid.study == "trigger-size":
        return [_cell(grid, encoder, [index], size, default_shadow(grid, encoder),
                      trigger_size=size) for size in grid.sweep]
    return [_cell(grid, encoder, [index], variant.label, variant.sources)
            for variant in grid.shadows]


def _target_label(grid: GridConfig, index: int) -> str:
    """The target's task, plus its class where another target shares the task (their cells
    would otherwise share a folder, and --resume would continue one from the other)."""
    target = grid.targets[index]
    shared = sum(t.task == target.task for t in grid.targets) > 1
    return f"{target.task}-class{target.target_class}" if shared else target.task


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in text.lower()).strip("-")


def _cell(grid: GridConfig, encoder: GridEncoder, indices: list[int],
          variable: str | int | None, shadow: list[DataSource],
          trigger_size: int | None = None) -> Cell:
    targets = []
    for i in indices:
        target = grid.targets[i].model_dump(mode="json", exclude={"paper"})
        if trigger_size is not None:
            target["trigger"]["size"] = trigger_size
        targets.append(target)
    task = "all-targets" if len(indices) > 1 else _target_label(grid, indices[0])
    parts = [encoder.name, task] + ([str(variable)] if variable not in (None, "one") else [])
    cell_id = "__".join(_slug(p) for p in parts)
    raw = {"name": f"{grid.name}-{cell_id}", "kind": "badencoder", "seed": cell_seed(grid),
           "device": grid.device, "image_size": grid.image_size, "data_root": grid.data_root,
           "download": grid.download,
           "encoder": encoder_spec(grid, encoder).model_dump(mode="json"),
           "shadow": [s.model_dump(mode="json") for s in shadow], "targets": targets,
           "attack": grid.attack.model_dump(mode="json"),
           "downstream": grid.downstream.model_dump(mode="json")}
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserInputError(format_validation_error(exc, f"grid cell {cell_id}")) from None
    return Cell(cell_id, encoder.name, indices, variable, config)


def cell_seed(grid: GridConfig) -> int:
    """The cells' seed: `attack_seed` when set, else the grid's (which also seeds
    pre-training, so changing it alone would pre-train a new encoder)."""
    return grid.seed if grid.attack_seed is None else grid.attack_seed


def dry_run(grid: GridConfig) -> list[str]:
    """Build every stage's config and resolve every dataset it reads, without training.

    Returns one line per stage. Raises UserInputError on the first problem (a missing
    dataset, a target class out of range, too few reference images, ...).
    """
    lines = []
    for encoder in grid.encoders:
        if encoder.pretrain is not None:
            config = pretrain_config(grid, encoder)
            for source in config.data:
                _resolve(grid, source.dataset, source.split, source.root, source.limit)
            for split in ("train", "test"):
                _resolve(grid, config.monitor_dataset(), split, config.monitor.root, None)
            folder = pretrain_folder(grid, encoder)
            lines.append(f"pretrain {encoder.name}: {config.simclr.arch}, "
                         f"{config.simclr.epochs} epochs → {folder}{_cache_state(grid, folder)}")
    from sslbackdoor.experiment import check_inputs

    for cell in plan_cells(grid):
        check_inputs(cell.config)
        lines.append(f"attack {cell.id}: {len(cell.config.targets)} target(s), "
                     f"{cell.config.attack.epochs} epochs")
    return lines


def _cache_state(grid: GridConfig, folder: Path) -> str:
    if is_cached(folder):
        return " (cached)"
    if shipped_copy(grid, folder):
        return " (shipped with the package: copied, not pre-trained)"
    return ""


def _resolve(grid: GridConfig, dataset: str, split: str, root: str | None,
             limit: int | None) -> Any:
    from sslbackdoor.data.datasets import load_dataset

    return load_dataset(dataset, split, image_size=grid.image_size,  # type: ignore[arg-type]
                        root=root or grid.data_root, limit=limit, seed=grid.seed)


def ensure_encoder(grid: GridConfig, encoder: GridEncoder) -> dict[str, Any]:
    """Pre-train (or resume, or reuse from the cache) one encoder; its summary."""
    from sslbackdoor.models.checkpoints import sha256_file
    from sslbackdoor.ssl.pretrain import run_pretrain

    spec = encoder_spec(grid, encoder)
    summary: dict[str, Any] = {"name": encoder.name, "paper": encoder.paper, "arch": spec.arch,
                               "weights": spec.weights}
    if encoder.pretrain is None:
        return {**summary, "source": "given"}
    config = pretrain_config(grid, encoder)
    folder = pretrain_folder(grid, encoder)
    if not is_cached(folder) and (shipped := shipped_copy(grid, folder)):
        seed_from_shipped(shipped, folder)
        log(f"encoder {encoder.name}: the package ships this pre-training (hash "
            f"{folder.name}); copied into {folder} (shipped_encoders: false pre-trains here)")
    if is_cached(folder):
        log(f"encoder {encoder.name}: cached in {folder}")
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    else:
        log(f"encoder {encoder.name}: pre-training {config.simclr.arch} into {folder}")
        results = run_pretrain(config, folder, resume=True)
        if not results:  # a torchrun process other than rank 0: it only helped to train
            return {**summary, "source": "simclr", "cache": str(folder)}
    sha256 = sha256_file(Path(str(spec.weights)))
    return {**summary, "source": "simclr", "cache": str(folder),
            "shipped": sha256 == shipped_sha256(folder.name),
            "hash": pretrain_hash(config), "sha256": sha256,
            "data": [f"{s.dataset}/{s.split}" + (f"@{s.limit}" if s.limit else "")
                     for s in config.data],
            "epochs": config.simclr.epochs, "final": results["final"],
            "train_seconds": results["train_seconds"],
            "pretrain_environment": results.get("environment")}


def run_cell(cell: Cell, out_dir: Path, resume: bool) -> tuple[dict[str, Any], bool]:
    """Run (or, with resume, reuse a finished) BadEncoder cell; its results dict, and
    whether it was reused."""
    from sslbackdoor.experiment import config_hash, run_badencoder_experiment

    folder = out_dir / "cells" / cell.id
    done = folder / "results.json"
    if resume and done.is_file():
        results: dict[str, Any] = json.loads(done.read_text(encoding="utf-8"))
        if results.get("config_hash") == config_hash(cell.config):
            log(f"cell {cell.id}: finished earlier, reused")
            return results, True
    log(f"cell {cell.id}")
    return run_badencoder_experiment(cell.config, folder, resume), False


def run_grid(grid: GridConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Pre-train (cached), attack every cell, write results.json, report.md and figures.

    Under `torchrun` every process joins the pre-training (data parallel); rank 0 alone
    then runs the cells, and the other processes return a summary without cells.
    """
    from sslbackdoor.experiment import environment
    from sslbackdoor.grid_report import render_grid_report, write_grid_figures
    from sslbackdoor.ssl.distributed import init_distributed

    cells = plan_cells(grid)  # every config is valid before anything runs
    context, _ = init_distributed(grid.device)
    out_dir = Path(out_dir)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_config(grid))
    started = time.perf_counter()
    encoders = [ensure_encoder(grid, e) for e in grid.encoders]
    pretrain_seconds = time.perf_counter() - started
    if not context.is_main:
        return {"name": grid.name, "kind": "grid", "cells": [], "encoders": encoders}
    entries = []
    for cell in cells:
        results, reused = run_cell(cell, out_dir, resume)
        entries.append({"id": cell.id, "encoder": cell.encoder, "targets": cell.targets,
                        "variable": cell.variable, "tasks": results["tasks"],
                        "shadow_images": sum(s["images"] for s in
                                             results["provenance"]["shadow"]),
                        "attack_seconds": results["attack"]["seconds"],
                        "seconds": round(sum(results["timings_s"].values()), 2),
                        "reused": reused, "folder": f"cells/{cell.id}"})
    results = {"schema": RESULTS_SCHEMA, "name": grid.name, "kind": "grid", "study": grid.study,
               "scale": grid.scale, "seed": grid.seed, "attack_seed": cell_seed(grid),
               "config": grid.model_dump(mode="json"),
               "encoders": encoders, "cells": entries,
               "environment": environment(resolve_device(grid.device)),
               "timings_s": {"pretrain": round(pretrain_seconds, 2),
                             "total": round(time.perf_counter() - started, 2)}}
    results["figures"] = write_grid_figures(results, out_dir)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "report.md", render_grid_report(results))
    return results


def _run_kind(config: GridConfig, out_dir: Path, resume: bool) -> dict[str, Any]:
    return run_grid(config, out_dir, resume)


register_kind("grid", GridConfig, _run_kind, dry_run)
