"""Registry of experiment kinds: `kind:` in a YAML file picks the config model and runner.

Each kind registers itself from its own module (`register_kind`); `run_experiment` loads
the module lazily, validates the file against the kind's pydantic model and runs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sslbackdoor.errors import UserInputError

Runner = Callable[[Any, Path, bool], dict[str, Any]]
DryRun = Callable[[Any], list[str]]


@dataclass(frozen=True)
class ExperimentKind:
    config_model: type[BaseModel]
    run: Runner  # (validated config, output folder, resume) → results dict
    dry_run: DryRun | None = None  # resolve every input without training; one line per stage


KINDS: dict[str, ExperimentKind] = {}

# Modules that register kinds; imported on first use so the CLI starts fast.
KIND_MODULES = {"badencoder": "sslbackdoor.experiment",
                "corruptencoder": "sslbackdoor.attacks.poisoning_experiment",
                "grid": "sslbackdoor.grid",
                "defenses": "sslbackdoor.defenses.experiment"}


def register_kind(name: str, config_model: type[BaseModel], run: Runner,
                  dry_run: DryRun | None = None) -> None:
    KINDS[name] = ExperimentKind(config_model, run, dry_run)


def experiment_kind(name: str) -> ExperimentKind:
    if name not in KINDS and name in KIND_MODULES:
        importlib.import_module(KIND_MODULES[name])
    if name not in KINDS:
        raise UserInputError(f"unknown experiment kind {name!r}; valid: "
                             f"{', '.join(sorted(KIND_MODULES))}")
    return KINDS[name]


def validate_experiment(raw: dict[str, Any], label: str) -> tuple[ExperimentKind, BaseModel]:
    from sslbackdoor.config_io import format_validation_error

    kind = experiment_kind(str(raw.get("kind", "badencoder")))
    try:
        return kind, kind.config_model.model_validate(raw)
    except ValidationError as exc:
        raise UserInputError(format_validation_error(exc, label)) from None


def dry_run_experiment(raw: dict[str, Any], label: str = "config") -> list[str]:
    """Validate a config and, where its kind can, resolve every input it would read;
    nothing is trained or written. Returns the lines to print."""
    kind, config = validate_experiment(raw, label)
    lines = kind.dry_run(config) if kind.dry_run is not None else []
    return [*lines, f"{label}: valid {raw.get('kind', 'badencoder')} experiment"]


def run_experiment(raw: dict[str, Any], out_dir: Path, resume: bool = False,
                   label: str = "config") -> dict[str, Any]:
    """Validate and run an experiment given as a (merged) config dict, holding the lock on
    `out_dir` (a second run on the same folder is refused) while it runs."""
    from sslbackdoor.run_lock import output_lock

    kind, config = validate_experiment(raw, label)
    with output_lock(out_dir):
        return kind.run(config, out_dir, resume)
