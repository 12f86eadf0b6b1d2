"""The BadEncoder experiment's resume guard: a checkpoint resumes only the attack that wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sslbackdoor.config import load_config
from sslbackdoor.errors import UserInputError
from sslbackdoor.experiment import attack_trajectory, run_attack_stage

pytestmark = pytest.mark.usefixtures("single_thread_cpu")


def tiny(trigger: int = 4, epochs: int = 1, probe_epochs: int = 2) -> dict[str, Any]:
    return {"name": "tiny", "device": "cpu", "image_size": 16,
            "encoder": {"arch": "convnet:4", "weights": None},
            "shadow": [{"dataset": "sklearn-digits", "limit": 64}],
            "targets": [{"task": "sklearn-digits", "target_class": 1, "trigger": {"size": trigger},
                         "references": {"dataset": "sklearn-digits", "count": 2}}],
            "attack": {"epochs": epochs, "batch_size": 32, "precision": "fp32"},
            "downstream": {"probe": {"epochs": probe_epochs}}}


def test_trajectory_ignores_epochs_and_evaluation_but_not_the_trigger() -> None:
    base = attack_trajectory(load_config(tiny()))
    assert attack_trajectory(load_config(tiny(epochs=3, probe_epochs=9))) == base
    assert attack_trajectory(load_config(tiny(trigger=5))) != base


def test_resume_refuses_another_attacks_checkpoint(tmp_path: Path) -> None:
    run_attack_stage(load_config(tiny()), tmp_path)
    assert (tmp_path / "attack_state.trajectory").is_file()
    with pytest.raises(UserInputError, match="written by a different attack"):
        run_attack_stage(load_config(tiny(trigger=5)), tmp_path, resume=True)
    stage = run_attack_stage(load_config(tiny(epochs=2)), tmp_path, resume=True)
    assert [h["epoch"] for h in stage.result.history] == [1, 2]
