"""The command line end to end: real encoder, real data, tiny scale; bad input → exit 2."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sslbackdoor.cli import main

TINY_EXPERIMENT = {
    "name": "tiny",
    "image_size": 32,
    "encoder": {"arch": "torchvision:mobilenet_v2", "weights": "imagenet"},
    "shadow": [{"dataset": "natural-crops:200", "split": "unlabeled", "limit": 96},
               {"dataset": "sklearn-digits", "split": "train", "limit": 32}],
    "targets": [{"task": "sklearn-digits", "target_class": 1,
                 "trigger": {"size": 8, "position": "bottom-right"},
                 "references": {"dataset": "sklearn-digits", "split": "train", "count": 2}}],
    "attack": {"epochs": 2, "batch_size": 32, "lr": 0.003},
    "downstream": {"train_limit": 200, "test_limit": 100,
                   "probe": {"epochs": 5, "lr": 0.001, "batch_size": 64}},
}


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sslbackdoor", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    experiment = folder / "tiny.yaml"
    experiment.write_text(yaml.safe_dump(TINY_EXPERIMENT))
    result = run_cli(["run", str(experiment), "--out", str(folder / "out"), "--quiet"])
    assert result.returncode == 0, result.stderr
    return folder / "out"


def test_run_writes_every_promised_output(tiny_run: Path) -> None:
    for name in ("results.json", "config.yaml", "report.md", "similarity_cdf.png",
                 "backdoored_encoder.safetensors", "attack_state.safetensors"):
        assert (tiny_run / name).is_file(), name
    results = json.loads((tiny_run / "results.json").read_text())
    (task,) = results["tasks"]
    assert task["task"] == "sklearn-digits" and task["target_class"] == 1
    for key in ("ca", "ba", "asr_b", "asr", "asr_all"):
        assert 0.0 <= task[key] <= 1.0
    assert results["seed"] == 0 and results["config"]["attack"]["epochs"] == 2
    assert {"encoder", "shadow", "references", "tasks"} <= set(results["provenance"])
    assert results["provenance"]["encoder"]["sha256"].startswith("b03531047f")
    assert {"load_data", "attack", "evaluate"} <= set(results["timings_s"])
    assert "| sklearn-digits |" in (tiny_run / "report.md").read_text()


def test_resolved_config_reruns_and_resume_skips_finished_epochs(tiny_run: Path) -> None:
    result = run_cli(["run", str(tiny_run / "config.yaml"), "--out", str(tiny_run), "--resume",
                      "--set", "downstream.probe.epochs=1"])
    assert result.returncode == 0, result.stderr
    assert "resuming BadEncoder" in result.stderr and "after epoch 2" in result.stderr
    assert "epoch 1/2" not in result.stderr


def test_evaluate_stage_on_the_saved_encoder(tiny_run: Path, tmp_path: Path) -> None:
    result = run_cli(["evaluate", "--encoder", str(tiny_run / "backdoored_encoder.safetensors"),
                      "--clean", "imagenet", "--task", "sklearn-digits", "--target-class", "1",
                      "--trigger-size", "8", "--image-size", "32", "--probe-epochs", "2",
                      "--train-limit", "100", "--test-limit", "50", "--out", str(tmp_path),
                      "--quiet"])
    assert result.returncode == 0, result.stderr
    (task,) = json.loads((tmp_path / "results.json").read_text())["tasks"]
    assert task["ca"] is not None and task["asr"] is not None


@pytest.mark.parametrize(("args", "message"), [
    (["run", "no-such-experiment", "--out", "x"], "unknown experiment 'no-such-experiment'"),
    (["run", "missing.yaml", "--out", "x"], "experiment file not found: missing.yaml"),
    (["evaluate", "--encoder", "nope.safetensors", "--task", "mnist-5k", "--out", "x"],
     "checkpoint not found: nope.safetensors"),
    (["attack", "badencoder", "--out", "x", "--shadow", "sklearn-digits", "--target",
      "sklearn-digits:12", "--image-size", "16", "--epochs", "1"],
     "target class 12 is out of range for sklearn-digits: valid 0..9"),
    (["attack", "badencoder", "--out", "x", "--shadow", "no-such-data", "--target",
      "sklearn-digits:1"], "unknown dataset 'no-such-data'"),
    (["attack", "badencoder", "--out", "x", "--arch", "vgg999", "--shadow", "sklearn-digits",
      "--target", "sklearn-digits:1"], "unknown encoder 'vgg999'"),
    (["attack", "badencoder", "--out", "x", "--shadow", "sklearn-digits", "--target",
      "sklearn-digits:1", "--trigger-size", "40", "--image-size", "32"],
     "trigger size 40 is larger than the 32×32 image"),
    (["demo", "--set", "attack.lr=-1"], "attack.lr: Input should be greater than 0"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "runs").exists()


def test_demo_config_validates_and_run_lists_shipped_experiments(
        capsys: pytest.CaptureFixture[str]) -> None:
    main(["run", "--list"])
    assert "demo" in capsys.readouterr().out


def test_dry_run_of_a_badencoder_experiment_checks_the_data_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text(yaml.safe_dump(TINY_EXPERIMENT))
    main(["run", "tiny.yaml", "--dry-run"])
    assert capsys.readouterr().out.splitlines() == [
        "attack tiny: torchvision:mobilenet_v2, 1 target(s), 2 epochs",
        "tiny.yaml: valid badencoder experiment"]
    too_many = {**TINY_EXPERIMENT, "targets": [{**TINY_EXPERIMENT["targets"][0],  # type: ignore[dict-item]
                                                "references": {"dataset": "sklearn-digits",
                                                               "count": 10_000}}]}
    Path("bad.yaml").write_text(yaml.safe_dump(too_many))
    with pytest.raises(SystemExit) as info:
        main(["run", "bad.yaml", "--dry-run"])
    assert info.value.code == 2 and "fewer than 10000 images" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "tiny.yaml"]


@pytest.mark.parametrize(("args", "code", "stream", "expected"), [
    (["--no-such-flag"], 2, "err", "error: No such option: --no-such-flag; valid: --help, or a command: "),
    (["evaluate", "--encoder", "x.safetensors", "--task", "mnist"], 2, "err",
     "error: Missing option '--out' (see 'sslbackdoor evaluate --help')"),
    (["attack", "badencoder", "--out", "o", "--epochs", "many"], 2, "err",
     "error: Invalid value for '--epochs'"),
    (["no-such-command"], 2, "err", "error: No such command 'no-such-command'; valid: scan, "),
    ([], 0, "out", "Usage: sslbackdoor [OPTIONS] COMMAND [ARGS]..."),
    (["defend"], 0, "out", "Usage: sslbackdoor defend [OPTIONS] COMMAND [ARGS]..."),
    (["scan", "--help"], 0, "out", "DATASET[/SPLIT][@LIMIT]"),  # brackets are text, not markup
    (["defend", "mntd", "--help"], 0, "out", "DATASET[/SPLIT][@LIMIT]"),
    (["attack", "badencoder", "--help"], 0, "out", "DATASET[/SPLIT][@COUNT] per --target"),
])
def test_usage_errors_are_one_line_and_help_always_works(
        args: list[str], code: int, stream: str, expected: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        main(args)
        exit_code: object = 0
    except SystemExit as exc:
        exit_code = exc.code
    captured = capsys.readouterr()
    assert exit_code == code
    if stream == "err":
        assert captured.err.startswith(expected) and captured.err.count("\n") == 1
    else:
        assert expected in " ".join(captured.out.split()) and not captured.err
    assert not list(tmp_path.iterdir())


def test_hostile_files_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.data.test_images import png_header
    from tests.models.test_checkpoints import HOSTILE_SAFETENSORS
    from tests.test_config import BILLION_LAUGHS

    monkeypatch.chdir(tmp_path)
    Path("huge.safetensors").write_bytes(HOSTILE_SAFETENSORS["shape beyond the file"])
    Path("laughs.yaml").write_text(BILLION_LAUGHS)
    Path("references").mkdir()
    for name in ("bomb.png", "bomb_mask.png"):
        Path("references", name).write_bytes(png_header(100_000, 100_000))
    Path("backgrounds").mkdir()
    for args, message in [
        (["evaluate", "--encoder", "huge.safetensors", "--task", "sklearn-digits", "--out", "x"],
         "huge.safetensors: tensor 'w' claims 40000000000 bytes"),
        (["run", "laughs.yaml", "--dry-run"], "aliases (*a) are not allowed in config files"),
        (["poison", "corruptencoder", "--references", "references", "--backgrounds", "backgrounds",
          "--out", "x", "--count", "1", "--trigger-pattern", "random"], "megapixels"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err
        assert not Path("x").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open

    from sslbackdoor import engine

    written: list[str] = []
    real_write = engine.write_file_bytes

    def disk_full_at_the_second_checkpoint(path: Path, data: bytes) -> None:
        written.append(path.name)
        if sum("training_state" in name for name in written) == 2:
            real_write(path, data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(engine, "write_file_bytes", disk_full_at_the_second_checkpoint)
    out = tmp_path / "pretrain"
    with pytest.raises(SystemExit) as info:
        main(["pretrain", "simclr", "--dataset", "sklearn-digits", "--out", str(out), "--epochs", "2",
              "--limit", "32", "--batch-size", "16", "--image-size", "16", "--probe-epochs", "0",
              "--monitor-limit", "16", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"error: no space left on the device while writing {out / 'training_state.safetensors'}")
    with safe_open(str(out / "training_state.safetensors"), "pt") as handle:
        assert (handle.metadata() or {})["epoch"] == "1"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_unwritable_file_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from sslbackdoor import engine

    def permission_denied(path: Path, data: bytes) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    (tmp_path / "results.json").write_text(json.dumps({"name": "x"}))
    monkeypatch.setattr("sslbackdoor.report.render_report", lambda results: "# x\n")
    monkeypatch.setattr(engine, "write_file_bytes", permission_denied)
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot use {tmp_path / 'report.md'}: Permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_an_incomplete_results_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"name": "x", "tasks": []}))
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "is incomplete or malformed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
