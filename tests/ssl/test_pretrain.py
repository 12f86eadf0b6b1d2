"""Tiny SimCLR and MoCo v2 runs on sklearn digits: they train, checkpoint every epoch and
resume exactly; the config's cache keys, schedule and method settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from sslbackdoor.errors import UserInputError
from sslbackdoor.ssl import pretrain
from sslbackdoor.ssl.moco import MoCoModel
from sslbackdoor.ssl.pretrain import (
    ContrastiveConfig,
    PretrainConfig,
    load_pretrain_config,
    pretrain_hash,
    run_pretrain,
)
from sslbackdoor.training_state import TrainingState

TINY: dict[str, Any] = {
    "name": "tiny", "seed": 3, "device": "cpu", "image_size": 16,
    "data": [{"dataset": "sklearn-digits", "limit": 256}],
    "simclr": {"arch": "convnet:4", "epochs": 2, "batch_size": 64, "hidden_dim": 16,
               "projection_dim": 8},
    "monitor": {"bank_limit": 200, "test_limit": 100, "knn_k": 20,
                "probe": {"kind": "linear", "epochs": 2, "lr": 0.01, "batch_size": 64}},
}
# MoCo v2 as CorruptEncoder trains it (SGD, cosine schedule), with a queue of 200 keys: 4
# steps of 64 per epoch wrap it once (pointer 56 after epoch 1, 112 after epoch 2).
TINY_MOCO: dict[str, Any] = {
    **TINY, "simclr": {**TINY["simclr"], "method": "moco-v2", "optimizer": "sgd",
                       "schedule": "cosine", "lr": 0.06, "temperature": 0.2,
                       "weight_decay": 1e-4,
                       "moco": {"queue_size": 200, "momentum": 0.99, "bn_splits": 4}}}
CONFIGS = {"simclr": TINY, "moco-v2": TINY_MOCO}


def _interrupt_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    original = pretrain.ContrastiveTrainer.train_epoch

    def train_epoch(self: pretrain.ContrastiveTrainer, images: torch.Tensor,
                    epoch: int) -> dict[str, float]:
        if epoch == 1:
            raise KeyboardInterrupt  # as if the job were killed during epoch 2
        return original(self, images, epoch)

    monkeypatch.setattr(pretrain.ContrastiveTrainer, "train_epoch", train_epoch)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_tiny_run_checkpoints_and_resumes_exactly(method: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_pretrain_config(CONFIGS[method])
    whole = run_pretrain(config, tmp_path / "whole")

    with monkeypatch.context() as patch:
        _interrupt_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            run_pretrain(config, tmp_path / "split")
    state = load_file(str(tmp_path / "split" / "training_state.safetensors"))
    assert not (tmp_path / "split" / "encoder.safetensors").exists()
    assert any(k.startswith("optim.") for k in state)
    if method == "simclr":
        assert "model.head.0.weight" in state
    else:  # online and key network, the queue's buffers, SGD's momentum buffers
        assert {"model.online.head.0.weight", "model.key_network.head.0.weight",
                "model.queue.keys"} <= state.keys()
        assert int(state["model.queue.position"]) == 256 % 200
        assert any(k.endswith(".momentum_buffer") for k in state)
    resumed = run_pretrain(config, tmp_path / "split", resume=True)

    expected = load_file(str(tmp_path / "whole" / "encoder.safetensors"))
    actual = load_file(str(tmp_path / "split" / "encoder.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["final"] == whole["final"]
    # The whole training state too: key network, queue (keys and position), optimizer.
    expected_state = load_file(str(tmp_path / "whole" / "training_state.safetensors"))
    actual_state = load_file(str(tmp_path / "split" / "training_state.safetensors"))
    assert expected_state.keys() == actual_state.keys()
    assert all(torch.equal(expected_state[k], actual_state[k]) for k in expected_state)

    written = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert written["kind"] == f"pretrain-{method}"
    assert [h["epoch"] for h in written["history"]] == [1, 2]
    assert 0 <= written["final"]["knn_accuracy"] <= 1
    assert 0 <= written["final"]["linear_probe_accuracy"] <= 1
    assert written["config_hash"] == pretrain_hash(config)
    assert (tmp_path / "whole" / "config.yaml").is_file()


def test_resume_refuses_a_state_from_another_config(tmp_path: Path) -> None:
    config = load_pretrain_config(TINY)
    trainer = pretrain.ContrastiveTrainer(config, torch.device("cpu"))
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


def test_moco_queue_advances_by_the_batch_and_is_restored_on_resume(tmp_path: Path) -> None:
    config = load_pretrain_config(TINY_MOCO)
    trainer = pretrain.ContrastiveTrainer(config, torch.device("cpu"))
    assert isinstance(trainer.model, MoCoModel)
    queue = trainer.model.queue
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    generator, keys = trainer.epoch_generator(0), trainer.epoch_generator(0, stream=1)
    pointers, before = [], queue.keys.clone()
    for _ in range(4):
        params = trainer.views.sample_pairs(64, 16, 16, generator)
        trainer.step(images, params, keys)
        pointers.append(queue.pointer)
    assert pointers == [64, 128, 192, 56]  # wraps around the 200 keys
    assert not torch.equal(queue.keys[:56], before[:56])
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(200))

    path = tmp_path / "training_state.safetensors"
    pretrain.save_training_state(path, trainer.model, trainer.optimizer, TrainingState(
        1, {"trajectory": pretrain_hash(config, include_epochs=False)}))
    fresh = pretrain.ContrastiveTrainer(config, torch.device("cpu"))
    assert isinstance(fresh.model, MoCoModel) and fresh.model.queue.pointer == 0
    assert pretrain._resume(fresh, path)[0] == 1
    assert fresh.model.queue.pointer == 56
    assert torch.equal(fresh.model.queue.keys, queue.keys)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.key_network.parameters(),
                                                 trainer.model.key_network.parameters(),
                                                 strict=True))


def test_key_shuffles_use_their_own_stream() -> None:
    trainer = pretrain.ContrastiveTrainer(load_pretrain_config(TINY), torch.device("cpu"))
    draw = [torch.randperm(50, generator=trainer.epoch_generator(e, s)) for e, s in
            ((0, 0), (0, 1), (1, 1))]
    # Stream 0 is the (seed, epoch) generator SimCLR always used.
    assert torch.equal(draw[0], torch.randperm(50, generator=torch.Generator().manual_seed(
        3 * 100_003)))
    assert not torch.equal(draw[0], draw[1]) and not torch.equal(draw[1], draw[2])


def test_cosine_learning_rate_is_set_every_epoch() -> None:
    cosine = ContrastiveConfig(lr=0.1, epochs=4, schedule="cosine")
    assert [cosine.learning_rate(e) for e in range(4)] == pytest.approx(
        [0.1, 0.1 * (1 + 2 ** -0.5) / 2, 0.05, 0.1 * (1 - 2 ** -0.5) / 2], rel=1e-12)
    assert ContrastiveConfig(lr=0.1, epochs=4).learning_rate(3) == 0.1
    config = load_pretrain_config(TINY_MOCO)
    trainer = pretrain.ContrastiveTrainer(config, torch.device("cpu"))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.9
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    trainer.train_epoch(images, 1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.03)  # 0.06·½(1+cos π/2)


# The small scale of experiments/badencoder-table.yaml (as pretrain_config builds it at
# commit 363f565): its encoder is cached under this key.
SMALL_TABLE: dict[str, Any] = {
    "name": "badencoder-table-Fashion-MNIST", "seed": 0, "image_size": 32,
    "data": [{"dataset": "fashion-mnist", "split": "train"}],
    "simclr": {"arch": "convnet-small", "epochs": 45, "batch_size": 256},
    "monitor": {"knn_every": 5, "bank_limit": 10000, "test_limit": 2000,
                "probe": {"kind": "linear", "epochs": 30, "lr": 0.001, "batch_size": 256}},
}


@pytest.mark.parametrize(("raw", "full", "trajectory"), [
    (SMALL_TABLE, "8bcb3562fdd34c8e", "7640268154ddea04"),
    (TINY, "bbd4b47149da4b65", "393c2de3c25097dc"),
])
def test_cache_keys_of_simclr_configs_are_unchanged(raw: dict[str, Any], full: str,
                                                    trajectory: str) -> None:
    """Computed before method, optimizer, schedule and moco existed: configs that leave them
    at their defaults must keep finding their cached encoders and resumable states."""
    config = load_pretrain_config(raw)
    assert pretrain_hash(config) == full
    assert pretrain_hash(config, include_epochs=False) == trajectory
    explicit = load_pretrain_config({**raw, "simclr": {
        **raw["simclr"], "method": "simclr", "optimizer": "adam", "schedule": "constant"}})
    assert pretrain_hash(explicit) == full


def test_new_fields_change_the_cache_key_and_cosine_keeps_epochs_in_the_trajectory() -> None:
    base = load_pretrain_config(TINY)
    variants = [load_pretrain_config({**TINY, "simclr": {**TINY["simclr"], **change}})
                for change in ({"optimizer": "sgd"}, {"schedule": "cosine"},
                               {"method": "moco-v2"})]
    keys = {pretrain_hash(c) for c in [base, *variants]}
    assert len(keys) == 4
    cosine = variants[1]
    longer = cosine.model_copy(update={"simclr": cosine.simclr.model_copy(update={"epochs": 3})})
    assert pretrain_hash(cosine, False) != pretrain_hash(longer, False)
    moco = load_pretrain_config(TINY_MOCO)
    other_queue = load_pretrain_config({**TINY_MOCO, "simclr": {
        **TINY_MOCO["simclr"], "moco": {"queue_size": 256, "momentum": 0.99, "bn_splits": 4}}})
    assert pretrain_hash(moco) != pretrain_hash(other_queue)


def test_moco_settings_follow_the_method() -> None:
    filled = load_pretrain_config({**TINY, "simclr": {**TINY["simclr"], "method": "moco-v2"}})
    assert filled.simclr.moco is not None
    assert filled.simclr.moco.model_dump() == {"queue_size": 65536, "momentum": 0.999,
                                               "bn_splits": 8}
    assert load_pretrain_config(TINY).simclr.moco is None
    with pytest.raises(UserInputError, match="apply only to method moco-v2"):
        load_pretrain_config({**TINY, "simclr": {**TINY["simclr"], "moco": {}}})
    for bad, message in (({"momentum": 1.0}, "less than 1"),
                         ({"queue_size": 0}, "greater than or equal to 1"),
                         ({"bn_splits": 3}, "multiple of moco.bn_splits"),
                         ({"queue_size": 32}, "smaller than one batch")):
        with pytest.raises(UserInputError, match=message):
            load_pretrain_config({**TINY, "simclr": {**TINY["simclr"], "method": "moco-v2",
                                                     "moco": bad}})
    assert isinstance(load_pretrain_config(TINY_MOCO), PretrainConfig)


def test_trainer_keys_are_the_models_shuffled_bn_keys() -> None:
    trainer = pretrain.ContrastiveTrainer(load_pretrain_config(TINY_MOCO), torch.device("cpu"))
    model = trainer.model
    assert isinstance(model, MoCoModel)
    model.train()
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    params = trainer.views.sample(64, 16, 16, torch.Generator().manual_seed(1))
    ours = trainer._moco_keys(model, images, params, torch.Generator().manual_seed(2))
    views = trainer.views.apply(images, params)
    theirs = model.keys(views, bn_splits=4, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ours, theirs, atol=1e-6)
