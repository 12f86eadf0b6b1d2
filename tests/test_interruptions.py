"""Interrupted runs lose nothing: every long command, SIGKILLed in the middle of an epoch
(and, where it has cells or stages, after a finished one), then `--resume`d, ends with the
numbers of an uninterrupted run.

Every run is a real `python -m sslbackdoor` process on one thread (the same code path and
the same float arithmetic for all of them), at a scale of seconds. Numbers are compared
exactly: same config and seed give the same numbers on one machine. Timings, paths, reuse
flags and file digests are left out of the comparison (safetensors writes its metadata in a
per-process hash order, so equal weights can differ in sha256); every encoder file's tensors
are compared instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from tests.attacks.test_poisoning_experiment import tiny

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
STARTUP_LIMIT_S = 600  # a safety net against a hung child, not a timing check
VOLATILE = {"seconds", "timings_s", "images_per_second", "shadow_images_per_second",
            "train_seconds", "attack_seconds", "reused", "environment", "pretrain_environment"}


def _command(args: list[str]) -> list[str]:
    # Not --quiet: the resumed processes' logs show that they continued, not restarted.
    return [sys.executable, "-m", "sslbackdoor", *args]


def run_to_end(args: list[str], log: Path) -> None:
    with log.open("w") as err:
        code = subprocess.run(_command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                              timeout=STARTUP_LIMIT_S).returncode
    assert code == 0, log.read_text()


def kill_when(args: list[str], ready: Callable[[], bool], log: Path,
              meanwhile: Callable[[int], None] | None = None) -> None:
    """Start the command and SIGKILL it as soon as `ready()` holds (first stopping it for
    `meanwhile(pid)`, if given); it must still be running then."""
    with log.open("w") as err:
        process = subprocess.Popen(_command(args), env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=err)
        deadline = time.monotonic() + STARTUP_LIMIT_S
        try:
            while not ready():
                assert process.poll() is None, f"ended before the kill point: {log.read_text()}"
                assert time.monotonic() < deadline, "the kill point never came"
                time.sleep(0.01)
            if meanwhile is not None:
                # Stopped, the run keeps its lock however long the other check takes.
                process.send_signal(signal.SIGSTOP)
                meanwhile(process.pid)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()


def second_run_is_refused(args: list[str]) -> Callable[[int], None]:
    """A second run on the busy --out exits 2 with one line naming the running one's pid."""
    def check(pid: int) -> None:
        second = subprocess.run(_command(args), env=ENV, capture_output=True, text=True,
                                timeout=STARTUP_LIMIT_S)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"is in use by another sslbackdoor run (pid {pid})" in second.stderr
    return check


def first(pattern: str, folder: Path) -> Callable[[], bool]:
    return lambda: any(folder.glob(pattern))


def checkpoint_epoch(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int((handle.metadata() or {})["epoch"])


def numbers(node: Any) -> Any:
    """The results' numbers, nested as in the file."""
    if isinstance(node, dict):
        kept = {k: numbers(v) for k, v in node.items() if k not in VOLATILE}
        return {k: v for k, v in kept.items() if v is not None}
    if isinstance(node, list):
        return [numbers(v) for v in node]
    return node if isinstance(node, bool | int | float) else None


def results(folder: Path) -> Any:
    return numbers(json.loads((folder / "results.json").read_text(encoding="utf-8")))


def assert_same_encoders(reference: Path, resumed: Path) -> int:
    """Every *encoder.safetensors under `reference` has the same tensors under `resumed`."""
    files = sorted(p.relative_to(reference) for p in reference.rglob("*encoder.safetensors"))
    assert files
    for relative in files:
        with safe_open(str(reference / relative), "pt") as a, \
                safe_open(str(resumed / relative), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():  # noqa: SIM118  (safe_open is not a dict)
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), f"{relative}: {key}"
    return len(files)


def write(path: Path, raw: dict[str, Any]) -> Path:
    # A JSON round trip unshares nested dicts, which YAML would write as (refused) aliases.
    path.write_text(yaml.safe_dump(json.loads(json.dumps(raw))), encoding="utf-8")
    return path


def resumed_logs(tmp_path: Path) -> str:
    """What the --resume processes said (every process after the first kill)."""
    logs = [*sorted(tmp_path.glob("kill*.log"))[1:], tmp_path / "resume.log"]
    return "".join(path.read_text() for path in logs)


def assert_resume_matches(tmp_path: Path, args: list[str],
                          kills: list[Callable[[Path], Callable[[], bool]]],
                          after_kill: Callable[[Path], None], continued: list[str],
                          concurrent: bool = False) -> Path:
    """Run `args --out A` to the end; run `args --out B`, killed at each kill point in turn
    (each later process with --resume), then resume B to the end; A and B must agree, and
    the resumed processes' logs must show each of `continued` (work picked up, not redone).
    With `concurrent`, a second run on B is started (and refused) while the first runs."""
    reference, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_to_end([*args, "--out", str(reference)], tmp_path / "reference.log")
    for index, kill in enumerate(kills):
        command = [*args, "--out", str(interrupted), *(["--resume"] if index else [])]
        kill_when(command, kill(interrupted), tmp_path / f"kill{index}.log",
                  second_run_is_refused(command) if concurrent and index == 0 else None)
        assert not (interrupted / "results.json").exists()
        if index == 0:
            after_kill(interrupted)
    run_to_end([*args, "--out", str(interrupted), "--resume"], tmp_path / "resume.log")
    assert results(interrupted) == results(reference)
    assert_same_encoders(reference, interrupted)
    said = resumed_logs(tmp_path)
    assert all(line in said for line in continued), said
    return interrupted


def test_pretrain_resumes_mid_epoch(tmp_path: Path) -> None:
    args = ["pretrain", "simclr", "--dataset", "sklearn-digits", "--limit", "512", "--arch",
            "convnet:4", "--epochs", "3", "--batch-size", "64", "--image-size", "16",
            "--precision", "fp32", "--monitor-limit", "100", "--probe-epochs", "2", "--device",
            "cpu"]

    def mid_epoch(folder: Path) -> None:
        assert checkpoint_epoch(folder / "training_state.safetensors") < 3

    assert_resume_matches(tmp_path, args, [lambda out: first("training_state.safetensors", out)],
                          mid_epoch, ["resuming SimCLR"])


DIGITS_TARGET = {"task": "sklearn-digits", "target_class": 1, "trigger": {"size": 4},
                 "references": {"dataset": "sklearn-digits", "count": 2}}


def test_badencoder_experiment_resumes_mid_epoch(tmp_path: Path) -> None:
    config = {"name": "tiny", "device": "cpu", "image_size": 16,
              "encoder": {"arch": "convnet:4", "weights": None},
              "shadow": [{"dataset": "sklearn-digits", "limit": 512}],
              "targets": [DIGITS_TARGET],
              "attack": {"epochs": 4, "batch_size": 32, "precision": "fp32"},
              "downstream": {"train_limit": 300, "test_limit": 100,
                             "probe": {"kind": "linear", "epochs": 3, "lr": 0.01}}}

    def mid_epoch(folder: Path) -> None:
        assert checkpoint_epoch(folder / "attack_state.safetensors") < 4

    assert_resume_matches(tmp_path, ["run", str(write(tmp_path / "tiny.yaml", config))],
                          [lambda out: first("attack_state.safetensors", out)], mid_epoch,
                          ["resuming BadEncoder"], concurrent=True)


def test_clip_experiment_with_zero_shot_resumes_mid_epoch(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from sslbackdoor.models.clip import TINY_CLIP, load_clip

    torch.manual_seed(0)
    clip = load_clip(f"clip:{TINY_CLIP}", None)
    weights = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(weights))
    task = tmp_path / "task"
    task.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 128), ("test", 40)):
        np.savez(task / f"{split}.npz", x=rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
                 y=np.arange(count) % 4, classes=np.array(["cat", "dog", "truck", "ship"]))
    config = {"name": "tiny-clip", "device": "cpu", "image_size": 32,
              "encoder": {"arch": f"clip:{TINY_CLIP}", "weights": str(weights)},
              "shadow": [{"dataset": f"npz:{task}", "split": "train"}],
              "targets": [{"task": f"npz:{task}", "target_class": 1, "trigger": {"size": 8},
                           "references": {"dataset": f"npz:{task}", "count": 1}}],
              "attack": {"epochs": 4, "batch_size": 16, "lr": 0.001, "precision": "fp32"},
              "downstream": {"probe": {"epochs": 2}, "zero_shot": {}}}

    def mid_epoch(folder: Path) -> None:
        assert checkpoint_epoch(folder / "attack_state.safetensors") < 4

    interrupted = assert_resume_matches(
        tmp_path, ["run", str(write(tmp_path / "clip.yaml", config))],
        [lambda out: first("attack_state.safetensors", out)], mid_epoch, ["resuming BadEncoder"])
    assert results(interrupted)["zero_shot"]


def test_grid_resumes_mid_pretraining_epoch_and_after_a_finished_cell(tmp_path: Path) -> None:
    def grid(cache: str) -> dict[str, Any]:
        return {
            "name": "tiny", "kind": "grid", "study": "table", "scale": "test", "seed": 0,
            "device": "cpu", "image_size": 16, "cache_dir": cache,
            "encoders": [{"name": "digits", "paper": "CIFAR10", "pretrain": {
                "data": [{"dataset": "sklearn-digits", "limit": 512}],
                "simclr": {"arch": "convnet:4", "epochs": 3, "batch_size": 64,
                           "hidden_dim": 16, "projection_dim": 8, "precision": "fp32"},
                "monitor": {"bank_limit": 200, "test_limit": 100, "knn_k": 20, "probe": None}}}],
            "targets": [{**DIGITS_TARGET, "paper": "SVHN"},
                        {**DIGITS_TARGET, "target_class": 7, "paper": "STL10"}],
            "shadow_limit": 128, "attack": {"epochs": 2, "batch_size": 32, "precision": "fp32"},
            "downstream": {"train_limit": 200, "test_limit": 100,
                           "probe": {"kind": "linear", "epochs": 2, "lr": 0.01}}}

    # Each folder pre-trains into its own cache, so the interrupted run really pre-trains.
    reference = tmp_path / "uninterrupted"
    run_to_end(["run", str(write(tmp_path / "a.yaml", grid(str(tmp_path / "cache-a")))),
                "--out", str(reference)], tmp_path / "reference.log")
    args = ["run", str(write(tmp_path / "b.yaml", grid(str(tmp_path / "cache-b"))))]
    out = tmp_path / "interrupted"
    kill_when([*args, "--out", str(out)],
              first("encoders/*/training_state.safetensors", tmp_path / "cache-b"),
              tmp_path / "kill0.log")
    [state] = (tmp_path / "cache-b").glob("encoders/*/training_state.safetensors")
    assert checkpoint_epoch(state) < 3
    kill_when([*args, "--out", str(out), "--resume"], first("cells/*/results.json", out),
              tmp_path / "kill1.log")
    assert len(list(out.glob("cells/*/results.json"))) == 1
    run_to_end([*args, "--out", str(out), "--resume"], tmp_path / "resume.log")
    said = resumed_logs(tmp_path)
    assert "resuming SimCLR" in said and "finished earlier, reused" in said, said
    assert [c["reused"] for c in json.loads((out / "results.json").read_text())["cells"]] == [True, False]
    assert numbers(_cells(out)) == numbers(_cells(reference))
    assert assert_same_encoders(reference, out) == 2


def _cells(folder: Path) -> Any:
    """A grid's cells and encoders (its config names its own cache folder)."""
    grid = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return {"cells": grid["cells"], "encoders": grid["encoders"]}


def test_corruptencoder_resumes_mid_epoch_and_after_a_finished_encoder(tmp_path: Path) -> None:
    # The poisoning tests' tiny experiment, with enough images and epochs to interrupt.
    config = tiny(methods=["clean", "corruptencoder"], localized_crop=[False],
                  simclr__epochs=3, layout__object_height=16)
    config["pretrain_data"][0]["limit"] = 400

    def mid_epoch(folder: Path) -> None:
        [state] = folder.glob("encoders/*/training_state.safetensors")
        assert checkpoint_epoch(state) < 3

    assert_resume_matches(tmp_path, ["run", str(write(tmp_path / "ce.yaml", config))],
                          [lambda out: first("encoders/*/training_state.safetensors", out),
                           lambda out: first("encoders/*/results.json", out)], mid_epoch,
                          ["resuming SimCLR", "reusing the finished pre-training run"])


def test_defenses_resume_mid_attack_epoch_and_after_a_finished_stage(tmp_path: Path) -> None:
    inversion = {"steps": 3, "batch_size": 16}
    config = {
        "name": "tiny-defenses", "kind": "defenses", "device": "cpu", "image_size": 16,
        "encoder": {"arch": "convnet:4", "weights": None},
        "attack": {"shadow": [{"dataset": "sklearn-digits", "limit": 384}],
                   "references": {"dataset": "sklearn-digits", "count": 2},
                   "config": {"epochs": 4, "batch_size": 32, "precision": "fp32"}},
        "task": "sklearn-digits", "target_class": 1, "trigger": {"size": 4},
        "train_limit": 200, "test_limit": 100,
        "probe": {"kind": "linear", "epochs": 2, "lr": 0.01},
        "defender_shadow": {"dataset": "natural-crops:60", "split": "unlabeled", "limit": 32},
        "neural_cleanse": {"inversion": inversion, "max_images": 64,
                           "unlearn": {"epochs": 1}},
        "decree": {"inversion": inversion},
        "mntd": {"train_models": 2, "heldout_models": 2, "meta_epochs": 2, "queries": 2,
                 "shadow": {"steps": 2, "batch_size": 16}},
        "patchguard": {"receptive_field": 8, "stride": 4,
                       "probe": {"kind": "linear", "epochs": 2, "lr": 0.01}},
    }

    def mid_epoch(folder: Path) -> None:
        assert checkpoint_epoch(folder / "attack" / "attack_state.safetensors") < 4
        assert yaml.safe_load((folder / "config.yaml").read_text())["kind"] == "defenses"

    assert_resume_matches(tmp_path, ["run", str(write(tmp_path / "defenses.yaml", config))],
                          [lambda out: first("attack/attack_state.safetensors", out),
                           lambda out: first("stages/clean-neural_cleanse.json", out)],
                          mid_epoch, ["resuming BadEncoder", "clean-neural_cleanse: finished earlier, reused"])
