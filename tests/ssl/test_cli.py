"""`sslbackdoor pretrain simclr|moco`: per-method defaults, moco-only options, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from sslbackdoor.cli import main
from sslbackdoor.ssl.cli import _source

TINY = ["--dataset", "sklearn-digits", "--limit", "64", "--arch", "convnet:4",
        "--image-size", "16", "--epochs", "1", "--batch-size", "32", "--knn-every", "0",
        "--probe-epochs", "0", "--monitor-limit", "40", "--device", "cpu", "--quiet"]


def test_pretrain_moco_runs_one_tiny_epoch(tmp_path: Path) -> None:
    out = tmp_path / "moco"
    main(["pretrain", "moco", *TINY, "--queue-size", "64", "--bn-splits", "4",
          "--augment", "localized-crop", "--out", str(out)])
    assert load_file(str(out / "encoder.safetensors"))
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "pretrain-moco-v2" and len(results["history"]) == 1
    simclr = results["config"]["simclr"]
    assert {k: simclr[k] for k in ("method", "optimizer", "schedule", "lr", "temperature",
                                   "weight_decay")} == {
        "method": "moco-v2", "optimizer": "sgd", "schedule": "cosine", "lr": 0.06,
        "temperature": 0.2, "weight_decay": 1e-4}
    assert simclr["moco"] == {"queue_size": 64, "momentum": 0.999, "bn_splits": 4}
    assert simclr["augment"]["localized_crop"] is True
    state = load_file(str(out / "training_state.safetensors"))
    assert int(state["model.queue.position"]) == 0  # two batches of 32 filled 64 keys
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["simclr"]["method"] == "moco-v2"


def test_pretrain_simclr_keeps_its_defaults(tmp_path: Path) -> None:
    out = tmp_path / "simclr"
    main(["pretrain", "simclr", *TINY, "--out", str(out)])
    simclr = json.loads((out / "results.json").read_text())["config"]["simclr"]
    assert {k: simclr[k] for k in ("method", "optimizer", "schedule", "lr", "temperature",
                                   "weight_decay", "moco")} == {
        "method": "simclr", "optimizer": "adam", "schedule": "constant", "lr": 1e-3,
        "temperature": 0.5, "weight_decay": 1e-6, "moco": None}
    assert simclr["augment"]["localized_crop"] is False


@pytest.mark.parametrize(("args", "message"), [
    (["pretrain", "simclr", "--queue-size", "64"], "--queue-size: only for"),
    (["pretrain", "simclr", "--momentum", "0.9"], "--momentum: only for"),
    (["pretrain", "moco", "--optimizer", "foo"], "simclr.optimizer"),
    (["pretrain", "moco", "--schedule", "step"], "simclr.schedule"),
    (["pretrain", "simclr", "--augment", "foo"], "--augment 'foo'"),
    (["pretrain", "moco", "--momentum", "1.5"], "moco.momentum"),
])
def test_bad_options_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exited:
        main([*args, *TINY, "--out", str(out)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and message in error
    assert not out.exists()


def test_source_keeps_the_slashes_of_kind_arg_names() -> None:
    assert _source("stl10/unlabeled", None) == {"dataset": "stl10", "split": "unlabeled",
                                                "limit": None}
    assert _source("images:/data/poisons", 5) == {"dataset": "images:/data/poisons",
                                                  "split": "train", "limit": 5}
