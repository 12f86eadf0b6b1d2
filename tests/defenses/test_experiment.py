"""The shipped `defenses` experiment validates and renders a report from its results."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from sslbackdoor.errors import UserInputError
from sslbackdoor.runners import validate_experiment


def shipped() -> Path:
    return Path(str(resources.files("sslbackdoor") / "experiments" / "defenses.yaml"))


def test_shipped_config_validates_and_describes_itself() -> None:
    text = shipped().read_text(encoding="utf-8")
    assert text.startswith("# ")
    _, config = validate_experiment(yaml.safe_load(text), "defenses.yaml")
    assert config.kind == "defenses"  # type: ignore[attr-defined]


def test_a_config_without_backdoor_or_attack_is_rejected() -> None:
    raw = yaml.safe_load(shipped().read_text(encoding="utf-8"))
    raw.pop("attack")
    with pytest.raises(UserInputError, match="backdoored_encoder"):
        validate_experiment(raw, "defenses.yaml")


def test_finished_stages_are_reused_only_on_resume_with_the_same_config_and_encoders(
        tmp_path: Path) -> None:
    from sslbackdoor.defenses.experiment import _Stages

    _, config = validate_experiment(yaml.safe_load(shipped().read_text(encoding="utf-8")),
                                    "defenses.yaml")
    calls: list[int] = []

    def compute() -> dict[str, float]:
        calls.append(1)
        return {"score": 0.25 * len(calls)}

    def stages(resume: bool, backdoored: str) -> _Stages:
        return _Stages(config, tmp_path, resume, {"clean": "c", "backdoored": backdoored})  # type: ignore[arg-type]

    assert stages(False, "b").run("mntd", compute) == {"score": 0.25}
    assert stages(True, "b").run("mntd", compute) == {"score": 0.25} and len(calls) == 1
    assert stages(True, "another file").run("mntd", compute) == {"score": 0.5}
    assert stages(False, "another file").run("mntd", compute) == {"score": 0.75}
    assert (tmp_path / "stages" / "mntd.json").is_file()


def _defenses_results(nc_extra: dict[str, object], mntd_extra: dict[str, object]) -> dict:
    nc = {"min_label_anomaly_index": 2.28, "min_label": 3, "flagged": True, **nc_extra}
    encoder = {"neural_cleanse": nc, "decree": {"pl1": 0.1, "flagged": False},
               "mntd": {"score": 0.548, "flagged": True},
               "patchguard": {"patch_size": 12, "clean_accuracy": 0.9,
                              "certified_accuracy": 0.0, "asr": 0.5}}
    return {"name": "d", "seed": 0, "encoders": {"clean": encoder, "backdoored": encoder},
            "config": {"encoder": {"arch": "a", "weights": "w"}, "image_size": 64,
                       "task": "mnist-5k", "train_limit": 1, "test_limit": 1,
                       "decree": {"pl1_threshold": 0.1, "inversion": {"steps": 1}},
                       "mntd": {"train_models": 2, "heldout_models": 4, "shadow": {"steps": 1}},
                       "neural_cleanse": {"inversion": {"steps": 1, "batches_per_step": 1}},
                       "patchguard": {"receptive_field": 16, "stride": 8}},
            "mntd": {"heldout_auc": 0.75, "heldout_accuracy": 0.5,
                     "heldout_labels": [0, 1, 0, 1], **mntd_extra},
            "tasks": [{"task": "mnist-5k", "target_class": 1, "target_name": "1", "ca": 0.9,
                       "ba": 0.9, "asr_b": 0.0, "asr": 1.0}],
            "provenance": {"defender_shadow": {"images": 1}},
            "environment": {"device": "cpu", "threads": 2, "torch": "2"}, "timings_s": {}}


def test_the_report_states_nc_convergence_and_mntd_auc_apart_from_its_accuracy() -> None:
    from sslbackdoor.defenses.experiment import render_defenses_report

    report = render_defenses_report(_defenses_results(
        {"converged": [True, False, True, False]},
        {"heldout_accuracy_at_median": 1.0, "heldout_median_threshold": 0.42}))
    assert "2 of 4 labels converged (not: 1, 3)" in report
    assert ("AUC 0.750; detection accuracy 1.000 at the official threshold (the median score, "
            "0.420)") in report
    mntd_row = next(line for line in report.splitlines() if line.startswith("| MNTD"))
    assert "detection accuracy 0.52" not in mntd_row  # a single score is not an accuracy
    old = render_defenses_report(_defenses_results({}, {}))  # results.json from before
    assert "labels converged" not in old and "AUC 0.750; accuracy 0.500" in old
