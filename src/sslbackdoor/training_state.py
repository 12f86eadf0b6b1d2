"""Checkpoint-every-epoch and exact resume, stored as safetensors (never pickle).

One file holds the model's tensors (`model.<key>`), the optimizer's per-parameter state
tensors (`optim.<index>.<name>`), and in its metadata the epoch, the optimizer's
hyper-parameters and any JSON-able extras (history, config hash).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sslbackdoor.engine import atomic_write_bytes, safetensors_bytes
from sslbackdoor.errors import UserInputError, first_line


@dataclass
class TrainingState:
    epoch: int  # number of finished epochs
    extras: dict[str, Any] = field(default_factory=dict)


def save_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: TrainingState) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, per_param in optim_state["state"].items():
        for name, value in per_param.items():
            if value is None:
                continue
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"epoch": str(state.epoch), "param_groups": json.dumps(optim_state["param_groups"]),
                "extras": json.dumps(state.extras)}
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata))  # a full disk → OSError


def load_training_state(path: Path, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore model and optimizer in place; returns the epoch count and extras."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        epoch = int(metadata["epoch"])
        param_groups = json.loads(metadata["param_groups"])
        extras = json.loads(metadata.get("extras", "{}"))
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise UserInputError(f"cannot resume from {path}: not a training-state file ({exc})") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        raise UserInputError(f"cannot resume from {path}: the model does not match "
                             f"({first_line(exc)})") from None
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": optim_state, "param_groups": param_groups})
    _match_parameter_layouts(optimizer)
    return TrainingState(epoch, extras)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give per-parameter state the memory layout of its parameter (channels_last convs).

    Files hold contiguous tensors; Adam's foreach and fused kernels walk state and parameter
    memory in lockstep, so a contiguous exp_avg beside a channels_last weight would be
    updated at the wrong positions and a resumed run would silently diverge.
    """
    for parameter, state in optimizer.state.items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                state[name] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
