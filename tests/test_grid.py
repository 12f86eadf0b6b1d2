"""The `grid` experiment kind: a tiny grid end to end, the encoder cache, the report, and
every shipped paper-scale config validated and dry-run on tiny torchvision-format files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import yaml

from sslbackdoor import grid
from sslbackdoor.cli import main, shipped_experiments
from sslbackdoor.config import read_yaml, select_scale
from sslbackdoor.errors import UserInputError
from sslbackdoor.grid import GridConfig, dry_run, ensure_encoder, plan_cells, pretrain_folder
from sslbackdoor.grid_report import encoders_section, findings_section
from sslbackdoor.models.checkpoints import load_encoder, sha256_file
from sslbackdoor.runners import validate_experiment
from sslbackdoor.ssl import pretrain
from tests.data.test_torchvision_sources import (  # noqa: F401  (skip_md5 is a fixture)
    _save,
    _write_cifar,
    _write_stl10,
    skip_md5,
)

GRID_FILES = sorted(name for name in shipped_experiments() if name.startswith("badencoder-"))


def tiny_grid(cache: Path, study: str = "table", **extra: Any) -> dict[str, Any]:
    """One digits encoder (1 SimCLR epoch), one target, 1 attack epoch, linear probes."""
    return {
        "name": f"tiny-{study}", "kind": "grid", "study": study, "scale": "test", "seed": 0,
        "device": "cpu", "image_size": 16, "cache_dir": str(cache),
        "encoders": [{
            "name": "digits", "paper": "CIFAR10",
            "pretrain": {
                "data": [{"dataset": "sklearn-digits", "limit": 256}],
                "simclr": {"arch": "convnet:4", "epochs": 1, "batch_size": 64,
                           "hidden_dim": 16, "projection_dim": 8},
                "monitor": {"bank_limit": 200, "test_limit": 100, "knn_k": 20,
                            "probe": {"kind": "linear", "epochs": 2, "batch_size": 64}}}}],
        "targets": [{"task": "sklearn-digits", "target_class": 1, "paper": "SVHN",
                     "trigger": {"size": 4},
                     "references": {"dataset": "sklearn-digits", "count": 2}}],
        "shadow_limit": 128,
        "attack": {"epochs": 1, "batch_size": 32},
        "downstream": {"train_limit": 200, "test_limit": 100,
                       "probe": {"kind": "linear", "epochs": 2, "lr": 0.01, "batch_size": 64}},
        **extra,
    }


def _write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_tiny_table_grid_end_to_end_then_a_sweep_reuses_the_cached_encoder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    main(["run", str(_write(tmp_path / "table.yaml", tiny_grid(cache))), "--out",
          str(tmp_path / "table"), "--quiet"])

    results = json.loads((tmp_path / "table" / "results.json").read_text())
    assert results["kind"] == "grid" and results["scale"] == "test"
    [encoder] = results["encoders"]
    assert Path(encoder["weights"]).is_file()
    assert Path(encoder["cache"]).parent == cache / "encoders"
    assert 0 <= encoder["final"]["linear_probe_accuracy"] <= 1
    [cell] = results["cells"]
    assert cell["id"] == "digits__sklearn-digits" and cell["shadow_images"] == 128
    entry = cell["tasks"][0]
    assert all(0 <= entry[k] <= 1 for k in ("ca", "ba", "asr_b", "asr"))
    assert (tmp_path / "table" / "cells" / cell["id"] / "backdoored_encoder.safetensors").is_file()
    report = (tmp_path / "table" / "report.md").read_text()
    assert "Tables I/II" in report and "digits → sklearn-digits" in report
    assert "CIFAR10 → SVHN | 58.50 | 69.32 | 37.53 | 99.14" in report  # the paper's row
    assert "Scale: **test**" in report
    assert "## Findings (measured here" in report and "of 1 pairs" in report

    def no_pretraining(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached encoder should have been reused")

    monkeypatch.setattr(pretrain, "run_pretrain", no_pretraining)
    sweep = tiny_grid(cache, "trigger-size", sweep=[2, 4])
    main(["run", str(_write(tmp_path / "sweep.yaml", sweep)), "--out", str(tmp_path / "sweep"),
          "--quiet"])
    swept = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [c["variable"] for c in swept["cells"]] == [2, 4]
    assert swept["encoders"][0]["sha256"] == encoder["sha256"]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000

    (tmp_path / "sweep" / "report.md").unlink()
    main(["report", str(tmp_path / "sweep")])  # re-rendered from results.json
    rerendered = (tmp_path / "sweep" / "report.md").read_text()
    assert "ASR and BA vs trigger size" in rerendered and "![ASR and BA" in rerendered

    wider = tiny_grid(cache, "trigger-size", sweep=[2, 4, 6])  # resume reuses 2 and 4
    main(["run", str(_write(tmp_path / "wider.yaml", wider)), "--out", str(tmp_path / "sweep"),
          "--resume", "--quiet"])
    resumed = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert [c["reused"] for c in resumed["cells"]] == [True, True, False]
    assert [c["tasks"] for c in resumed["cells"][:2]] == [c["tasks"] for c in swept["cells"]]
    assert "(2 of 3 reused from earlier runs in this folder)" in (
        tmp_path / "sweep" / "report.md").read_text()


def test_plan_of_each_study(tmp_path: Path) -> None:
    targets = tiny_grid(tmp_path)["targets"]
    second = {**targets[0], "task": "mnist-5k", "paper": None}
    multi = GridConfig.model_validate(tiny_grid(tmp_path, "multi-target",
                                                targets=[*targets, second]))
    assert [c.id for c in plan_cells(multi)] == [
        "digits__sklearn-digits", "digits__mnist-5k", "digits__all-targets__all"]
    assert len(plan_cells(multi)[-1].config.targets) == 2
    sizes = GridConfig.model_validate(tiny_grid(tmp_path, "shadow-size", sweep=[64, 128]))
    assert [c.config.shadow[0].limit for c in plan_cells(sizes)] == [64, 128]
    shadows = [{"label": "crops", "paper": "different-distribution",
                "sources": [{"dataset": "natural-crops", "split": "unlabeled", "limit": 64}]}]
    distribution = GridConfig.model_validate(tiny_grid(tmp_path, "shadow-distribution",
                                                       shadows=shadows))
    [cell] = plan_cells(distribution)
    assert cell.config.shadow[0].dataset == "natural-crops"
    assert cell.config.encoder.weights == str(
        pretrain_folder(distribution, distribution.encoders[0]) / "encoder.safetensors")


def test_attack_seed_reseeds_the_cells_but_not_the_pre_training(tmp_path: Path) -> None:
    plain = GridConfig.model_validate(tiny_grid(tmp_path))
    reseeded = GridConfig.model_validate(tiny_grid(tmp_path, attack_seed=1))
    assert [c.config.seed for c in plan_cells(plain)] == [0]
    assert [c.config.seed for c in plan_cells(reseeded)] == [1]
    assert pretrain_folder(reseeded, reseeded.encoders[0]) == pretrain_folder(
        plain, plain.encoders[0])


def test_bad_grids_are_one_line_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="sweep"):
        validate_experiment(tiny_grid(tmp_path, "trigger-size"), "grid")
    bad_encoder = tiny_grid(tmp_path)
    bad_encoder["encoders"][0]["encoder"] = {"arch": "convnet:4", "weights": None}
    with pytest.raises(UserInputError, match="exactly one of"):
        validate_experiment(bad_encoder, "grid")
    with pytest.raises(UserInputError, match="--scale paper"):
        select_scale({"name": "x"}, "paper", "x.yaml")


def _write_svhn(root: Path, rng: np.random.Generator) -> None:
    for split in ("train", "test"):
        images = rng.integers(0, 256, size=(32, 32, 3, 3), dtype=np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images, "y": [[1], [10], [5]]})


def _write_gtsrb(root: Path, rng: np.random.Generator) -> None:
    base = root / "gtsrb"
    _save(base / "GTSRB" / "Training" / "00012" / "00000_00000.ppm",
          rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    _save(base / "GTSRB" / "Final_Test" / "Images" / "00000.ppm",
          rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8))
    (base / "GT-final_test.csv").write_text(
        "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n00000.ppm;30;30;1;1;29;29;12\n")


@pytest.fixture
def paper_data(tmp_path: Path, skip_md5: None) -> Path:  # noqa: F811
    """CIFAR-10, STL-10, SVHN and GTSRB in torchvision's on-disk formats, a few images each
    (seed 0 puts an airplane in CIFAR-10 train and a truck in STL-10 train)."""
    rng = np.random.default_rng(0)
    _write_cifar(tmp_path, rng)
    _write_stl10(tmp_path, rng)
    _write_svhn(tmp_path, rng)
    _write_gtsrb(tmp_path, rng)
    return tmp_path


@pytest.mark.parametrize("name", GRID_FILES)
def test_shipped_grid_validates_at_both_scales(name: str, tmp_path: Path) -> None:
    path = shipped_experiments()[name]
    assert path.read_text(encoding="utf-8").startswith("# ")
    for scale in ("small", "paper"):
        raw = select_scale(read_yaml(path), scale, name)
        _, config = validate_experiment({**raw, "cache_dir": str(tmp_path)}, name)
        assert isinstance(config, GridConfig) and config.scale == scale
        assert plan_cells(config)


@pytest.mark.parametrize("name", GRID_FILES)
def test_paper_scale_dry_runs_on_tiny_torchvision_files(name: str, paper_data: Path) -> None:
    raw = select_scale(read_yaml(shipped_experiments()[name]), "paper", name)
    raw.update(data_root=str(paper_data), cache_dir=str(paper_data / "cache"))
    _, config = validate_experiment(raw, name)
    assert isinstance(config, GridConfig)
    lines = dry_run(config)
    assert any(line.startswith("attack ") for line in lines)
    if any(e.pretrain for e in config.encoders):
        assert any("resnet18-cifar, 1000 epochs" in line for line in lines)


def test_small_grids_share_one_cached_encoder(tmp_path: Path) -> None:
    folders = set()
    for name in GRID_FILES:
        raw = select_scale(read_yaml(shipped_experiments()[name]), "small", name)
        _, config = validate_experiment({**raw, "cache_dir": str(tmp_path)}, name)
        assert isinstance(config, GridConfig)
        folders |= {pretrain_folder(config, e) for e in config.encoders if e.pretrain}
    assert len(folders) == 1  # 30 minutes of pre-training, done once for every study
    [folder] = folders
    shipped = grid.SHIPPED_ENCODERS / folder.name
    assert grid.is_cached(shipped), "the small grids' encoder ships with the package"
    record = json.loads((shipped / "results.json").read_text())
    assert record["config_hash"] == folder.name and record["config"]["simclr"]["epochs"] == 45
    assert sha256_file(shipped / "encoder.safetensors") == record["encoder"]["sha256"]
    assert load_encoder(shipped / "encoder.safetensors", "convnet-small").feature_dim == 256


def _ship(shipped: Path, folder: Path) -> None:
    """A shipped encoder under `folder`'s hash, as the package would hold it."""
    (shipped / folder.name).mkdir(parents=True)
    (shipped / folder.name / "encoder.safetensors").write_bytes(b"weights")
    (shipped / folder.name / "results.json").write_text(json.dumps({
        "final": {"knn_accuracy": 0.8, "linear_probe_accuracy": 0.9}, "train_seconds": 600.0,
        "environment": {"device": "cpu", "threads": 2, "bf16": False},
        "encoder": {"sha256": hashlib.sha256(b"weights").hexdigest()}}))


def test_a_shipped_encoder_seeds_the_cache_unless_switched_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = GridConfig.model_validate(tiny_grid(tmp_path / "cache"))
    [encoder] = config.encoders
    folder = pretrain_folder(config, encoder)
    _ship(tmp_path / "shipped", folder)
    monkeypatch.setattr(grid, "SHIPPED_ENCODERS", tmp_path / "shipped")

    def pretrained_here(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RuntimeError("pre-trained here")

    monkeypatch.setattr(pretrain, "run_pretrain", pretrained_here)
    off = config.model_copy(update={"shipped_encoders": False})
    with pytest.raises(RuntimeError, match="pre-trained here"):
        ensure_encoder(off, encoder)
    assert not folder.exists()

    assert dry_run(config)[0].endswith("(shipped with the package: copied, not pre-trained)")
    summary = ensure_encoder(config, encoder)
    assert summary["shipped"] and (folder / "encoder.safetensors").read_bytes() == b"weights"
    assert summary["final"]["linear_probe_accuracy"] == 0.9
    section = "\n".join(encoders_section({"encoders": [summary]}))
    assert "10.0 on cpu, 2 threads, fp32 (*shipped*)" in section
    assert "shipped_encoders=false" in section
    assert ensure_encoder(config, encoder)["shipped"]  # reused from the cache, still shipped
    (folder / "encoder.safetensors").write_bytes(b"re-trained")
    assert not ensure_encoder(config, encoder)["shipped"]


def test_dry_run_resolves_every_input_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    path = _write(tmp_path / "table.yaml", tiny_grid(cache))
    main(["run", str(path), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pretrain digits: convnet:4, 1 epochs")
    assert lines[1] == "attack digits__sklearn-digits: 1 target(s), 1 epochs"
    assert lines[-1] == f"{path}: valid grid experiment"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.yaml"]

    bad = tiny_grid(cache)
    bad["targets"][0]["target_class"] = 10  # sklearn digits has classes 0..9
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(_write(tmp_path / "bad.yaml", bad)), "--dry-run"])
    assert exit_info.value.code == 2
    assert "10" in capsys.readouterr().err


def _cell(variable: int | str | None, targets: list[int], *scores: tuple[float, float, float]
          ) -> dict[str, Any]:
    return {"encoder": "FM", "targets": targets, "variable": variable,
            "tasks": [{"task": f"task{i}", "ca": ca, "ba": ba, "asr": asr}
                      for i, (ca, ba, asr) in zip(targets, scores, strict=True)]}


def _results(study: str, cells: list[dict[str, Any]]) -> dict[str, Any]:
    return {"study": study, "cells": cells,
            "config": {"targets": [{"task": "task0"}, {"task": "task1"}]}}


def test_findings_check_every_pair_against_the_papers_bar() -> None:
    holds = _results("table", [_cell(None, [0], (0.90, 0.895, 0.99)),
                               _cell(None, [1], (0.80, 0.81, 0.95))])
    assert "**holds** (2 of 2 pairs)" in findings_section(holds)[1]
    fails = _results("multi-target", [_cell("one", [0], (0.90, 0.885, 0.99)),
                                       _cell("all", [0, 1], (0.90, 0.90, 0.99),
                                             (0.80, 0.80, 0.90))])
    text = findings_section(fails)[1]
    assert "**does not hold** (1 of 3 pairs)" in text
    assert "FM → task0: ASR 99.00, CA 90.00, BA 88.50" in text
    assert "FM → task1 (all at once): ASR 90.00" in text


def test_findings_of_a_sweep_say_whether_asr_rises_and_where_it_crosses() -> None:
    rising = _results("shadow-size", [_cell(1000, [0], (0.9, 0.9, 0.10)),
                                      _cell(256, [0], (0.9, 0.9, 0.01)),
                                      _cell(5000, [0], (0.9, 0.9, 0.96))])
    text = findings_section(rising)[1]
    assert "ASR rises with shadow-set size" in text
    assert "256 → 1.00, 1000 → 10.00, 5000 → 96.00; first ≥ 95% at 5000" in text
    falling = _results("trigger-size", [_cell(2, [0], (0.9, 0.9, 0.50)),
                                        _cell(4, [0], (0.9, 0.9, 0.40))])
    text = findings_section(falling)[1]
    assert "**does not rise** with trigger size" in text and "never ≥ 95%" in text
    saturated = _results("trigger-size", [_cell(4, [0], (0.9, 0.9, 1.0)),
                                          _cell(2, [0], (0.9, 0.9, 0.97))])
    text = findings_section(saturated)[1]
    assert "ASR rises with trigger size" in text
    assert "already ≥ 95% at the smallest value swept (2)" in text
    assert "**does not show here**" in text
    flat = _results("trigger-size", [_cell(4, [0], (0.9, 0.9, 1.0)),
                                     _cell(2, [0], (0.9, 0.9, 0.999))])
    assert "ASR **stays flat** with trigger size" in findings_section(flat)[1]
    single = _results("trigger-size", [_cell(10, [0], (0.9, 0.9, 0.9))])
    assert "ASR has one trigger size only, so no trend: 10 → 90.00" in findings_section(single)[1]


def test_findings_of_a_sweep_check_ba_against_ca_at_every_value() -> None:
    sweep = _results("trigger-size", [_cell(2, [0], (0.947, 0.930, 1.0)),
                                      _cell(4, [0], (0.947, 0.940, 1.0))])
    text = findings_section(sweep)[1]
    assert "BA ≥ CA − 1 point at every swept value: **does not hold** (1 of 2 values)" in text
    assert "FM → task0 [2]: CA 94.70, BA 93.00" in text
    sweep["cells"][0]["tasks"][0]["ba"] = 0.945
    assert "**holds** (2 of 2 values)" in findings_section(sweep)[1]


def test_targets_sharing_a_task_get_their_own_cell_folders(tmp_path: Path) -> None:
    raw = tiny_grid(tmp_path / "cache")
    second = {**raw["targets"][0], "target_class": 7}
    _, config = validate_experiment({**raw, "targets": [raw["targets"][0], second]}, "grid")
    assert [c.id for c in plan_cells(config)] == ["digits__sklearn-digits-class1",  # type: ignore[arg-type]
                                                  "digits__sklearn-digits-class7"]
    _, same = validate_experiment({**raw, "targets": [raw["targets"][0]] * 2}, "grid")
    with pytest.raises(UserInputError, match="would share a folder"):
        plan_cells(same)  # type: ignore[arg-type]
