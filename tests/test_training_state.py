"""Checkpoints survive a full disk: the previous one stays whole and loadable."""

import errno
import os
from pathlib import Path

import pytest
import torch

from sslbackdoor import engine
from sslbackdoor.training_state import TrainingState, load_training_state, save_training_state


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "training_state.safetensors"
    model, optimizer = model_and_optimizer(0)
    save_training_state(path, model, optimizer, TrainingState(1, {"history": [1.0]}))
    saved = path.read_bytes()

    def full_disk(target: Path, data: bytes) -> None:
        target.write_bytes(data[: len(data) // 2])  # part of the file, then no space
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine, "write_file_bytes", full_disk)
    later, later_optimizer = model_and_optimizer(1)
    with pytest.raises(OSError) as info:
        save_training_state(path, later, later_optimizer, TrainingState(2))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_bytes() == saved and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    restored, restored_optimizer = model_and_optimizer(2)
    state = load_training_state(path, restored, restored_optimizer)
    assert state.epoch == 1 and state.extras == {"history": [1.0]}
    assert torch.equal(restored.weight, model.weight)
