"""The command line end to end: real encoder, real data, tiny scale; bad input → exit 2."""

import json
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
