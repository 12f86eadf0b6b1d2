"""The lock file pins what `make setup` installs: the running environment must match it."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

LOCK = Path(__file__).resolve().parents[1] / "constraints.txt"


def locked_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (version,) = (spec.version for spec in requirement.specifier)
            pins[requirement.name] = version
    return pins


def test_every_line_of_the_lock_is_an_exact_pin() -> None:
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            assert "==" in line and ";" not in line, f"not an exact pin: {line!r}"


@pytest.mark.parametrize("package", ["torch", "torchvision", "typer", "click", "numpy", "pydantic"])
def test_core_dependencies_are_locked(package: str) -> None:
    assert package in {name.lower() for name in locked_pins()}


def test_installed_versions_are_the_locked_ones() -> None:
    mismatched = {}
    for name, version in locked_pins().items():
        installed = metadata.version(name)
        if installed.split("+")[0] != version:
            mismatched[name] = f"locked {version}, installed {installed}"
    assert not mismatched, f"environment differs from constraints.txt (run `make setup` or `make lock`): {mismatched}"


def test_every_declared_dependency_is_in_the_lock() -> None:
    declared = metadata.requires("sslbackdoor") or []
    locked = {name.lower().replace("_", "-") for name in locked_pins()}
    missing = [r for r in (Requirement(d) for d in declared) if r.name.lower().replace("_", "-") not in locked]
    assert not missing, f"declared but not locked: {[str(r) for r in missing]}"
