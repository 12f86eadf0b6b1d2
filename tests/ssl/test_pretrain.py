"""A tiny SimCLR run on sklearn digits: it trains, checkpoints every epoch, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sslbackdoor.errors import UserInputError
from sslbackdoor.ssl import pretrain
from sslbackdoor.ssl.pretrain import load_pretrain_config, pretrain_hash, run_pretrain
from sslbackdoor.training_state import TrainingState

TINY: dict[str, Any] = {
    "name": "tiny", "seed": 3, "device": "cpu", "image_size": 16,
    "data": [{"dataset": "sklearn-digits", "limit": 256}],
    "simclr": {"arch": "convnet:4", "epochs": 2, "batch_size": 64, "hidden_dim": 16,
               "projection_dim": 8},
    "monitor": {"bank_limit": 200, "test_limit": 100, "knn_k": 20,
                "probe": {"kind": "linear", "epochs": 2, "lr": 0.01, "batch_size": 64}},
}


def _interrupt_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pretrain.SimCLRTrainer.train_epoch

    def train_epoch(self: pretrain.SimCLRTrainer, images: torch.Tensor,
                    epoch: int) -> dict[str, float]:
        if epoch == 1:
            raise KeyboardInterrupt  # as if the job were killed during epoch 2
        return original(self, images, epoch)

    monkeypatch.setattr(pretrain.SimCLRTrainer, "train_epoch", train_epoch)


def test_tiny_run_checkpoints_and_resumes_exactly(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_pretrain_config(TINY)
    whole = run_pretrain(config, tmp_path / "whole")

    with monkeypatch.context() as patch:
        _interrupt_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            run_pretrain(config, tmp_path / "split")
    state = load_file(str(tmp_path / "split" / "training_state.safetensors"))
    assert not (tmp_path / "split" / "encoder.safetensors").exists()
    assert "model.head.0.weight" in state and any(k.startswith("optim.") for k in state)
    resumed = run_pretrain(config, tmp_path / "split", resume=True)

    expected = load_file(str(tmp_path / "whole" / "encoder.safetensors"))
    actual = load_file(str(tmp_path / "split" / "encoder.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["final"] == whole["final"]

    written = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert [h["epoch"] for h in written["history"]] == [1, 2]
    assert 0 <= written["final"]["knn_accuracy"] <= 1
    assert 0 <= written["final"]["linear_probe_accuracy"] <= 1
    assert written["config_hash"] == pretrain_hash(config)
    assert (tmp_path / "whole" / "config.yaml").is_file()


def test_resume_refuses_a_state_from_another_config(tmp_path: Path) -> None:
    config = load_pretrain_config(TINY)
    trainer = pretrain.SimCLRTrainer(config, torch.device("cpu"))
    pretrain.save_training_state(tmp_path / "training_state.safetensors", trainer.model,
                                 trainer.optimizer, TrainingState(1, {"trajectory": "other"}))
    with pytest.raises(UserInputError, match="different pre-training config"):
        run_pretrain(config, tmp_path, resume=True)


def test_cache_key_ignores_device_and_monitor_but_not_data() -> None:
    base = load_pretrain_config(TINY)
    assert pretrain_hash(base) == pretrain_hash(base.model_copy(update={"device": "auto"}))
    other = load_pretrain_config({**TINY, "data": [{"dataset": "sklearn-digits", "limit": 128}]})
    assert pretrain_hash(base) != pretrain_hash(other)
    longer = load_pretrain_config({**TINY, "simclr": {**TINY["simclr"], "epochs": 3}})
    assert pretrain_hash(base) != pretrain_hash(longer)
    assert pretrain_hash(base, False) == pretrain_hash(longer, False)


def test_batch_larger_than_the_data_is_a_user_error(tmp_path: Path) -> None:
    config = load_pretrain_config({**TINY, "data": [{"dataset": "sklearn-digits", "limit": 32}]})
    with pytest.raises(UserInputError, match="fewer than one batch"):
        run_pretrain(config, tmp_path)
