"""The `corruptencoder` experiment: the shipped config, a tiny end-to-end run, reuse and
refusal of earlier pre-training runs, bad targets and triggers."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sslbackdoor.attacks import poisoning_experiment as pe
from sslbackdoor.attacks.poisoning_experiment import ALL_METHODS, PoisoningExperimentConfig
from sslbackdoor.cli import shipped_experiments
from sslbackdoor.config import read_yaml, select_scale
from sslbackdoor.errors import UserInputError
from sslbackdoor.runners import run_experiment, validate_experiment

pytestmark = pytest.mark.usefixtures("single_thread_cpu")

# sklearn digits at 16 px: pre-training on digits 0, 2–6 plus natural crops, target "1"
# absent from it; 12 poisons; 1 epoch of a 4-wide ConvNet per method and crop policy.
TINY: dict[str, Any] = {
    "name": "tiny-corruptencoder", "kind": "corruptencoder", "seed": 0, "device": "cpu",
    "image_size": 16,
    "pretrain_data": [
        {"dataset": "sklearn-digits", "split": "train", "classes": [0, 2, 3, 4, 5, 6],
         "limit": 200},
        {"dataset": "natural-crops:60", "split": "unlabeled", "classes": [0, 2, 4, 6, 8],
         "limit": 20}],
    "simclr": {"arch": "convnet:4", "epochs": 1, "batch_size": 64, "hidden_dim": 16,
               "projection_dim": 8, "temperature": 0.2, "precision": "fp32"},
    "poison_ratio": 0.05,
    "references": {"dataset": "sklearn-digits", "label": 1, "count": 3},
    "supports": {"dataset": "sklearn-digits", "label": 1, "count": 10, "offset": 3},
    "backgrounds": {"dataset": "natural-crops:60", "split": "unlabeled",
                    "classes": [1, 3, 5, 7], "limit": 12},
    "background_size": 32,
    "trigger_size": 3,
    "layout": {"object_height": 24},
    "downstream": {"dataset": "sklearn-digits", "classes": [1, 7, 8, 9], "target_class": 1,
                   "probe": {"kind": "linear", "epochs": 3, "lr": 0.01, "batch_size": 64}},
}
RUNS = [f"{m}{'-localized' if loc else ''}" for m in ALL_METHODS for loc in (False, True)]


def tiny(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return raw


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("corruptencoder") / "run"
    return out, run_experiment(tiny(), out)


@pytest.mark.parametrize("scale", ["small", "paper"])
def test_shipped_config_validates_at_both_scales(scale: str) -> None:
    path = shipped_experiments()["corruptencoder"]
    kind, config = validate_experiment(select_scale(read_yaml(path), scale, str(path)),
                                       str(path))
    assert isinstance(config, PoisoningExperimentConfig)
    assert kind.config_model is PoisoningExperimentConfig
    assert config.methods == ALL_METHODS and config.localized_crop == [False, True]
    target = config.downstream.target_class
    probe = config.downstream.probe  # the official eval_linear
    assert (probe.kind, probe.epochs, probe.lr, probe.weight_decay) == ("eval-linear", 40, 0.01, 1e-4)
    assert config.support_images == 5
    assert target in config.downstream.classes
    if scale == "small":
        assert config.simclr.method == "simclr" and config.simclr.arch == "convnet-small"
        assert config.poison_ratio <= 0.01 and config.trigger_size == 8
        assert config.simclr.precision == "fp32"  # no native bf16 on the small scale's CPUs
        # Wide objects (bags) 42 px tall: the official canvas shape and trigger scale.
        assert config.layout.object_height == 42 and target == 8
        assert config.references is not None and config.references.label == target
        assert config.simclr.augment.crop_scale == (0.2, 1.0)
        fashion, crops = config.pretrain_data
        assert fashion.classes is not None and target not in fashion.classes
        assert crops.dataset == "natural-crops"
        # Poisons sit on black, as Fashion-MNIST's objects do; enough for every poison.
        assert config.backgrounds.dataset == "plain:black"
        assert config.backgrounds.limit and config.backgrounds.limit >= 50
        # PoisonedEncoder's random images are photos none of which is in pre-training.
        randoms = config.random_images
        assert randoms is not None and randoms.dataset == "natural-crops"
        assert crops.classes and randoms.classes
        assert not set(crops.classes) & set(randoms.classes)
    else:
        assert config.simclr.method == "moco-v2" and config.simclr.optimizer == "sgd"
        assert config.simclr.schedule == "cosine" and config.image_size == 224
        assert config.trigger_size == 40 and config.poison_ratio == 0.005
        assert len(config.downstream.classes) == 100
        # MoCo v2 aug-plus, the official trigger and reference layout.
        augment = config.simclr.augment
        assert augment.crop_scale == (0.2, 1.0) and augment.blur_p == 0.5
        assert augment.blur_sigma == (0.1, 2.0) and config.trigger_pattern == "official"


def test_tiny_run_trains_every_method_and_crop_and_reports(
        tiny_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = tiny_run
    rows = results["rows"]
    assert len(rows) == 12
    assert {(r["method"], r["localized_crop"]) for r in rows} == {
        (m, loc) for m in ALL_METHODS for loc in (False, True)}
    assert all(0 <= r["ca"] <= 1 and 0 <= r["asr"] <= 1 for r in rows)
    assert results["poison_count"] == round(0.05 * results["clean_images"])
    assert all(r["poisons"] == (0 if r["method"] == "clean" else results["poison_count"])
               for r in rows)
    assert not any(e["reused"] for e in results["encoders"])
    for run in RUNS:
        assert (out / "encoders" / run / "encoder.safetensors").is_file(), run
    for method in ALL_METHODS[1:]:
        assert len(list((out / "poisons" / method / "images").iterdir())) == \
            results["poison_count"]
    for row in rows:  # only CorruptEncoder(+) poisons have trigger and object boxes
        assert ("attack_pairs" in row) == row["method"].startswith("corruptencoder")
    pairs = {(r["method"], r["localized_crop"]): r["attack_pairs"] for r in rows
             if "attack_pairs" in r}
    assert pairs["corruptencoder", False]["triggered_poisons"] == results["poison_count"]
    assert pairs["corruptencoder+", False]["triggered_poisons"] < results["poison_count"]
    localized = pairs["corruptencoder", True]  # the defense removes split pairs, not nested
    assert localized["nested_probability"] > localized["probability"]
    assert {r["trigger"] for r in rows if r["method"] == "ctrl"} == {"ctrl"}
    assert {r["trigger"] for r in rows if r["method"] != "ctrl"} == {"patch"}
    for row in rows:  # the 3 px trigger enlarged 2× and 3×, for every patch-trigger row
        assert set(row.get("asr_enlarged", {})) == (set() if row["method"] == "ctrl"
                                                    else {"6", "9"})
    assert all(("asr_ctrl" in r) == (r["method"] == "clean") for r in rows)
    report = (out / "report.md").read_text()
    assert "## Trigger/object pairs" in report
    assert "## ASR with enlarged test triggers" in report
    assert "| method | crop | ASR (3 px) | ASR (6 px) | ASR (9 px) |" in report
    assert "CTRL's rows are attacked with CTRL's own frequency trigger" in report
    assert "| method | CA | ASR | CA (localized crop) | ASR (localized crop) |" in report
    assert "| corruptencoder+ |" in report
    assert "## Findings (measured here)" in report
    findings = report.split("## Findings (measured here)")[1]
    assert "20 points above the best baseline" in findings
    assert "within 1 point of the clean encoder" in findings
    assert "Scale: SimCLR `convnet:4` 1 epoch (batch 64)" in report
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_ctrl_rows_are_attacked_with_the_trigger_of_the_ctrl_poisons(
        tiny_run: tuple[Path, dict[str, Any]]) -> None:
    from sslbackdoor.attacks.corruptencoder import read_rgb
    from sslbackdoor.attacks.triggered_inputs import ctrl_test_images

    out, _ = tiny_run
    config = PoisoningExperimentConfig.model_validate(tiny())
    manifest = json.loads((out / "poisons" / "ctrl" / "manifest.json").read_text())
    for record in manifest["poisons"][:3]:
        source = torch.tensor(read_rgb(Path(record["reference"]))).permute(2, 0, 1)
        poison = read_rgb(out / "poisons" / "ctrl" / "images" / record["file"])
        tested = ctrl_test_images(source[None], pe.baseline_settings(config, "ctrl", 1))
        assert torch.equal(tested[0].permute(1, 2, 0), torch.tensor(poison))


def test_poisonedencoder_pairs_random_images_and_corruptencoder_uses_the_backgrounds(
        tmp_path: Path) -> None:
    from sslbackdoor.attacks.corruptencoder import read_rgb

    config = PoisoningExperimentConfig.model_validate(tiny(
        methods=["corruptencoder", "poisonedencoder"],
        backgrounds={"dataset": "plain:black", "split": "unlabeled", "limit": 4},
        random_images={"dataset": "plain:white", "split": "unlabeled", "limit": 5}))
    loaded = pe.load_inputs(config)
    assert loaded.random_images.shape[0] == 5 and int(loaded.random_images.min()) == 255
    pe.prepare_poisons(config, loaded, 6, tmp_path)
    for method, folder, value in (("poisonedencoder", "random-images", 255),
                                  ("corruptencoder", "backgrounds", 0)):
        manifest = json.loads((tmp_path / "poisons" / method / "manifest.json").read_text())
        used = {Path(record["background"]) for record in manifest["poisons"]}
        assert {path.parent.name for path in used} == {folder}
        assert all(int(read_rgb(path).min()) == value for path in used)


def test_rerun_reuses_finished_encoders_and_resume_continues_an_unfinished_one(
        tiny_run: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    out, first = tiny_run
    trained: list[str] = []
    original = pe.run_pretrain

    def counting(config: Any, folder: Path, resume: bool = False, **kwargs: Any) -> Any:
        trained.append(folder.name)
        return original(config, folder, resume=resume, **kwargs)

    monkeypatch.setattr(pe, "run_pretrain", counting)
    again = run_experiment(tiny(), out, resume=True)
    assert trained == []
    assert all(e["reused"] for e in again["encoders"])
    assert again["rows"] == first["rows"]  # the same encoders, evaluated the same way

    # An interrupted run (its state written, its encoder and results not yet) continues.
    unfinished = out / "encoders" / "ctrl-localized"
    (unfinished / "results.json").unlink()
    (unfinished / "encoder.safetensors").unlink()
    assert (unfinished / "training_state.safetensors").is_file()
    resumed = run_experiment(tiny(), out, resume=True)
    assert trained == ["ctrl-localized"]
    assert (unfinished / "encoder.safetensors").is_file()
    assert [e["run"] for e in resumed["encoders"] if not e["reused"]] == ["ctrl-localized"]
    assert resumed["rows"] == first["rows"]


@pytest.mark.parametrize(("change", "stale"), [
    ({"simclr__lr": 0.01}, "encoders/clean"),  # every run changes; the first one is named
    ({"trigger_size": 4}, "encoders/corruptencoder"),  # only the poisons change
])
def test_a_changed_config_refuses_the_finished_encoders_of_another(
        tiny_run: tuple[Path, dict[str, Any]], change: dict[str, Any], stale: str) -> None:
    out, _ = tiny_run
    config_before = (out / "config.yaml").read_text()
    poisons_before = sorted((out / "poisons" / "corruptencoder" / "images").iterdir())
    bytes_before = [p.read_bytes() for p in poisons_before]
    for resume in (False, True):
        with pytest.raises(UserInputError, match="use a new --out folder or delete") as info:
            run_experiment(tiny(**change), out, resume=resume)
        assert stale in str(info.value)
    # Refused before anything of the folder was replaced.
    assert (out / "config.yaml").read_text() == config_before
    assert [p.read_bytes() for p in poisons_before] == bytes_before


@pytest.mark.parametrize(("change", "message"), [
    ({"downstream__target_class": 2}, "is not among downstream.classes"),
    ({"pretrain_data": [{"dataset": "sklearn-digits", "classes": [0, 1, 2]}]},
     "is among the pre-training classes"),
    ({"pretrain_data": [{"dataset": "sklearn-digits", "limit": 200}]},
     "uses every class of sklearn-digits"),
    ({"backgrounds": {"dataset": "images:/nonexistent/backgrounds"}}, "folder not found"),
    ({"supports__offset": 500}, "has 146 images of class 1; 10 after the first 500"),
    ({"enlarged_trigger_scales": [2, 6]},
     r"enlarged_trigger_scales \[6\]: a 3 px trigger .* exceeds the 16 px image; the largest scale is 5"),
])
def test_a_bad_target_or_input_is_refused_before_anything_is_written(
        tmp_path: Path, change: dict[str, Any], message: str) -> None:
    out = tmp_path / "never"
    with pytest.raises(UserInputError, match=message):
        run_experiment(tiny(**change), out)
    assert not out.exists()


def test_cli_dry_run_loads_every_input_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from sslbackdoor.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(methods=["clean", "ctrl"], localized_crop=[True])))
    main(["run", str(path), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("inputs: 220 clean images, 11 poisons per method, 3 references")
    assert lines[1:] == ["pretrain clean-localized: SimCLR convnet:4, 1 epochs",
                         "pretrain ctrl-localized: SimCLR convnet:4, 1 epochs",
                         f"{path}: valid corruptencoder experiment"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.yaml"]


def test_cli_run_prints_ca_and_asr_per_method(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from sslbackdoor.cli import main

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny(methods=["clean"], localized_crop=[False])))
    main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    printed = capsys.readouterr().out
    row = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]
    assert f"{100 * row['ca']:.2f}" in printed and "standard" in printed


def test_cli_report_across_seeds_lines_up_the_seeds_rows(
        tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from sslbackdoor.cli import main

    _, results = tiny_run
    folders = [tmp_path / "seed0", tmp_path / "seed1"]
    for seed, folder in enumerate(folders):
        folder.mkdir()
        copy_ = copy.deepcopy(results) | {"seed": seed}
        copy_["config"]["seed"] = seed
        (folder / "results.json").write_text(json.dumps(copy_))
    main(["report", *map(str, folders), "--across-seeds", str(tmp_path / "seeds.md")])
    table = (tmp_path / "seeds.md").read_text()
    assert "| method | crop | seed 0 | seed 1 | mean |" in table
    assert table.count("(n=2)") == 12
    assert all((folder / "report.md").is_file() for folder in folders)


def test_cli_report_across_seeds_refuses_another_config_and_writes_nothing(
        tiny_run: tuple[Path, dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from sslbackdoor.cli import main

    _, results = tiny_run
    folders = [tmp_path / "a", tmp_path / "b"]
    for seed, folder in enumerate(folders):
        folder.mkdir()
        changed = copy.deepcopy(results) | {"seed": seed}
        changed["config"] |= {"seed": seed, "trigger_size": 3 + seed}
        (folder / "results.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *map(str, folders), "--across-seeds", str(tmp_path / "seeds.md")])
    assert exit_info.value.code == 2
    assert "differs from seed 0 in trigger_size" in capsys.readouterr().err
    assert not (tmp_path / "seeds.md").exists()
    assert not any((folder / "report.md").exists() for folder in folders)


def test_downstream_splits_that_share_images_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([1, 7, 8, 9] * 10)
    monkeypatch.setattr(pe, "load_native_labelled", lambda *args, **kwargs: (images, labels))
    config = PoisoningExperimentConfig.model_validate(tiny())
    with pytest.raises(UserInputError, match="test images also appear in its"):
        pe.downstream_data(config)
