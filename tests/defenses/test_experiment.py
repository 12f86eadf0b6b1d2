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
