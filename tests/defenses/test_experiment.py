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
