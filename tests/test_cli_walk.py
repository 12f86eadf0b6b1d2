"""Every command of the CLI, walked from the Typer app itself, given bad input.

For each command (groups included): no arguments, an unknown option and `--help`; for each
option of a non-string type, a value of the wrong type; for each path (a `Path` parameter,
or one of the `str` parameters in PATH_LIKE_STRINGS): a missing file, an empty file, a
file of random bytes and a folder; for each output path, the unusable kinds (a file where a
folder is expected, a folder where a file is expected, a path under a regular file).

Every case must end in exit 0 or 2, never a traceback; exit 2 comes with one `error: `
line; nothing is written under the `--out` passed in, nor anywhere in the working folder.
A new command is walked as soon as it is registered: a required parameter the walk has no
valid value for fails `test_the_walk_knows_every_required_parameter` instead of being
skipped.
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import typer.main
import yaml
from PIL import Image

from sslbackdoor.cli import app, main

# Outputs by parameter name: a folder (refused when it is a file or under one) or a file
# (refused when it is a folder or under a file). Other path parameters are inputs.
OUTPUT_FOLDERS = {"out", "root"}
OUTPUT_FILES = {"across_seeds"}
# `str` parameters that name an input file: they also take a keyword ("imagenet", a
# shipped experiment name), so their type cannot say so.
PATH_LIKE_STRINGS = {"experiment", "weights", "clean", "base"}
# The suffix a bad file gets, so that it reaches the loader that suffix selects.
SUFFIXES = {"encoder": ".safetensors", "experiment": ".yaml", "weights": ".pth",
            "clean": ".safetensors", "base": ".pth", "trigger_image": ".png"}
# Valid values for required parameters (and the options a case needs to reach the
# parameter under test), by parameter name; <NAME> is a file made by the `inputs` fixture.
REQUIRED = {
    "encoder": "<encoder>", "task": "sklearn-digits", "dataset": "sklearn-digits",
    "references": "<references>", "backgrounds": "<images>", "targets": "<images>",
    "folders": "<results>", "experiment": "<experiment>", "out": "<out>",
}
# Options that keep a command cheap should a case ever get through, and that every case
# of the command needs to reach its paths (a poison count, a shadow set and target); an
# option a case sets itself is left out.
CHEAP: dict[str, dict[str, str | None]] = {
    "run": {"--dry-run": None},
    "evaluate": {"--probe-epochs": "1", "--train-limit": "20", "--test-limit": "20",
                 "--device": "cpu"},
    "attack badencoder": {"--arch": "convnet-small", "--weights": "none",
                          "--shadow": "sklearn-digits@16", "--target": "sklearn-digits:1",
                          "--epochs": "1", "--image-size": "16", "--trigger-size": "3",
                          "--device": "cpu", "--quiet": None},
    "poison corruptencoder": {"--count": "1", "--trigger-size": "4", "--trigger-pattern": "random"},
    "poison ssl-backdoor": {"--count": "1", "--trigger-size": "4", "--trigger-pattern": "random"},
    "poison poisonedencoder": {"--count": "1", "--trigger-size": "4", "--trigger-pattern": "random"},
    "poison ctrl": {"--count": "1"},
    "pretrain simclr": {"--epochs": "1", "--limit": "16", "--probe-epochs": "0",
                        "--device": "cpu", "--quiet": None},
    "pretrain moco": {"--epochs": "1", "--limit": "16", "--probe-epochs": "0",
                      "--device": "cpu", "--quiet": None},
    "defend neural-cleanse": {"--steps": "1", "--probe-epochs": "1", "--train-limit": "20",
                              "--test-limit": "20", "--device": "cpu"},
    "defend mntd": {"--train-models": "2", "--heldout-models": "2", "--shadow-steps": "1",
                    "--meta-epochs": "1", "--shadow": "sklearn-digits@16", "--device": "cpu"},
    "defend patchguard": {"--train-limit": "20", "--test-limit": "20", "--device": "cpu"},
    "scan": {"--epochs": "1", "--shadow": "sklearn-digits@16", "--device": "cpu"},
}
# Options whose file is only read together with another option's value.
COMPANIONS = {"trigger_image": ["--trigger-pattern", "image"]}
# Commands that, given nothing, do their (valid, long) job: their no-argument case is
# the one case not run, and it is counted as skipped with this reason.
RUNS_WITHOUT_ARGUMENTS = {
    "demo": "runs the full demo: backdoors an ImageNet MobileNetV2 for two tasks",
    "data prepare": "unpacks the offline datasets into ./data",
}
# Bad-looking inputs that are valid: the case runs and may end in exit 0.
VALID_AS_GIVEN = {
    "run:input-folder:data_root": "an empty folder is a valid data root (the walk's "
                                  "experiment reads sklearn-digits, which needs no files)",
}
WRONG_VALUES = {int: "many", float: "lots", "choice": "no-such-choice"}
INPUT_KINDS = ("missing", "empty", "random", "folder")


@dataclass(frozen=True)
class Param:
    name: str
    flag: str | None  # None: positional
    kind: Any  # int, float, bool, str, Path or "choice"
    required: bool
    hidden: bool


@dataclass
class Command:
    path: tuple[str, ...]
    params: list[Param] = field(default_factory=list)
    group: bool = False

    @property
    def name(self) -> str:
        return " ".join(self.path)


@dataclass(frozen=True)
class Case:
    command: str
    kind: str  # no-args, unknown-option, help, wrong-type, input-<kind>, output-<kind>
    param: str = ""

    @property
    def id(self) -> str:
        return f"{self.command or 'sslbackdoor'}:{self.kind}{':' + self.param if self.param else ''}"


def _base_kind(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType, list):
        return _base_kind(args[0])
    if origin is Literal or (inspect.isclass(annotation) and issubclass(annotation, enum.Enum)):
        return "choice"
    return annotation


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[Command]:
    """Every command under `command` (depth first), its parameters typed from the Python
    annotations of its function (the same in every typer version)."""
    subcommands = getattr(command, "commands", None)
    if isinstance(subcommands, dict):
        yield Command(path, group=True)
        for name in sorted(subcommands):
            yield from walk(subcommands[name], (*path, name))
        return
    hints = typing.get_type_hints(inspect.unwrap(command.callback))
    params = [Param(p.name, next((o for o in p.opts if o.startswith("--")), None),
                    _base_kind(hints[p.name]), bool(p.required), bool(getattr(p, "hidden", False)))
              for p in command.params]
    yield Command(path, params)


COMMANDS = list(walk(typer.main.get_command(app)))
BY_NAME = {c.name: c for c in COMMANDS}


def cases_of(command: Command) -> Iterator[Case | tuple[Case, str]]:
    """The cases of one command; a (case, reason) pair is a case counted but not run."""
    no_args = Case(command.name, "no-args")
    yield (no_args, RUNS_WITHOUT_ARGUMENTS[command.name]) if command.name in RUNS_WITHOUT_ARGUMENTS else no_args
    yield Case(command.name, "unknown-option")
    yield Case(command.name, "help")
    for param in command.params:
        if param.kind in WRONG_VALUES and param.flag and not param.hidden:
            yield Case(command.name, "wrong-type", param.name)
        if param.name in OUTPUT_FOLDERS and param.kind is Path:
            yield from (Case(command.name, f"output-{k}", param.name) for k in ("file", "random", "under-file"))
            yield (Case(command.name, "output-absent", param.name), "a valid output folder: the command would run")
        elif param.name in OUTPUT_FILES and param.kind is Path:
            yield from (Case(command.name, f"output-{k}", param.name) for k in ("folder", "under-file"))
            yield (Case(command.name, "output-absent", param.name), "a valid output file: the command would run")
        elif param.kind is Path or param.name in PATH_LIKE_STRINGS:
            yield from (Case(command.name, f"input-{kind}", param.name) for kind in INPUT_KINDS)


PLANNED = [case for command in COMMANDS for case in cases_of(command)]
RUN_CASES = [case for case in PLANNED if isinstance(case, Case)]
SKIPPED = [case for case in PLANNED if not isinstance(case, Case)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small valid files for every required parameter."""
    from sslbackdoor.models.checkpoints import save_encoder
    from sslbackdoor.models.encoders import build_encoder

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{index}.png")
    (root / "references").mkdir()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "references" / "object.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(root / "references" / "object_mask.png")
    save_encoder(build_encoder("convnet-small"), root / "encoder.safetensors")
    (root / "results").mkdir()
    (root / "results" / "results.json").write_text(json.dumps({"name": "walk"}))
    (root / "experiment.yaml").write_text(yaml.safe_dump({
        "name": "walk", "image_size": 16, "device": "cpu",
        "encoder": {"arch": "convnet-small", "weights": None},
        "shadow": [{"dataset": "sklearn-digits", "limit": 16}],
        "targets": [{"task": "sklearn-digits", "target_class": 1, "trigger": {"size": 3},
                     "references": {"dataset": "sklearn-digits"}}],
        "attack": {"epochs": 1, "batch_size": 8}}))
    return {"encoder": root / "encoder.safetensors", "images": root / "images",
            "references": root / "references", "results": root / "results",
            "experiment": root / "experiment.yaml"}


def bad_path(kind: str, folder: Path, name: str) -> Path:
    """A path of the given bad kind in `folder`, named after the parameter."""
    path = folder / f"{kind}-{name}{SUFFIXES.get(name, '')}"
    if kind in ("empty", "file"):
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif kind == "folder":
        path.mkdir()
    elif kind == "under-file":
        blocker = folder / f"blocker-{name}"
        blocker.write_bytes(b"a regular file")
        path = blocker / "sub" / path.name
    return path


def argv_for(case: Case, command: Command, inputs: dict[str, Path], work: Path) -> tuple[list[str], Path | None]:
    """The command line of a case, and the path under test (if any)."""
    if case.kind == "no-args":
        return list(command.path), None
    if case.kind == "help":
        return [*command.path, "--help"], None
    args = [*command.path]
    tested: Path | None = None
    values: dict[str, str] = {}
    if case.kind == "wrong-type":
        param = next(p for p in command.params if p.name == case.param)
        values[param.name] = WRONG_VALUES[param.kind]
    elif case.kind.startswith(("input-", "output-")):
        tested = bad_path(case.kind.split("-", 1)[1], work, case.param)
        values[case.param] = str(tested)
    for param in command.params:
        value = values.get(param.name)
        # Required values, an --out to watch, and positional inputs (`run EXPERIMENT`).
        if value is None and (param.required or param.name == "out" or
                              (param.flag is None and param.name in REQUIRED)):
            value = _valid_value(param, inputs, work)
        if value is not None:
            args += [param.flag, value] if param.flag else [value]
    if case.kind == "unknown-option":
        args.append("--no-such-option")
    args += COMPANIONS.get(case.param, [])
    given = {p.flag for p in command.params if p.name in values} | set(COMPANIONS.get(case.param, []))
    for flag, value in CHEAP.get(command.name, {}).items():
        if flag not in given:
            args += [flag] if value is None else [flag, value]
    return args, tested


def _valid_value(param: Param, inputs: dict[str, Path], work: Path) -> str:
    template = REQUIRED[param.name]
    if template == "<out>":
        return str(work / "out")
    if template.startswith("<"):
        return str(inputs[template.strip("<>")])
    return template


def test_the_walk_knows_every_required_parameter() -> None:
    missing = sorted({f"{c.name}: {p.name}" for c in COMMANDS for p in c.params
                      if p.required and p.name not in REQUIRED})
    assert not missing, f"give the walk a valid value for {missing} (REQUIRED)"
    assert set(CHEAP) | set(RUNS_WITHOUT_ARGUMENTS) <= set(BY_NAME), "a listed command is gone"


def test_the_walk_covers_every_command() -> None:
    leaves = [c for c in COMMANDS if not c.group]
    kinds = Counter(case.kind.split("-")[0] if case.kind.startswith(("input-", "output-"))
                    else case.kind for case in RUN_CASES)
    print(f"\n{len(COMMANDS)} commands walked ({len(leaves)} commands, {len(COMMANDS) - len(leaves)} "
          f"groups); {len(RUN_CASES)} bad inputs run: {dict(sorted(kinds.items()))}; "
          f"{len(SKIPPED)} counted but not run: "
          + "; ".join(f"{case.id} ({reason})" for case, reason in SKIPPED))
    assert len(leaves) >= 18 and len(RUN_CASES) >= 250
    for command in leaves:  # every path parameter got its cases
        for param in command.params:
            if param.kind is Path or param.name in PATH_LIKE_STRINGS:
                assert any(c.command == command.name and c.param == param.name for c in RUN_CASES), param


@pytest.mark.parametrize("case", RUN_CASES, ids=lambda case: case.id)
def test_bad_input_is_refused_in_one_line(case: Case, inputs: dict[str, Path], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    command = BY_NAME[case.command]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # anything written relative to the working folder lands here
    argv, tested = argv_for(case, command, inputs, work)
    before = _snapshot(work)
    code = _run(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    takes_nothing = not any(p.required for p in command.params)
    expected = {0} if case.kind == "help" or (case.kind == "no-args" and takes_nothing) else {2}
    expected |= {0} if case.id in VALID_AS_GIVEN else set()
    assert code in expected, f"{argv} exited {code}: {captured.err[-500:]}"
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert lines and lines[-1].startswith("error: "), captured.err[-500:]
        if case.kind == "wrong-type":
            flag = next(p.flag for p in command.params if p.name == case.param)
            assert str(flag) in lines[-1]
        if tested is not None:  # the refusal is about the path under test
            assert tested.name in lines[-1] or tested.parent.name in lines[-1], lines[-1]
    assert _snapshot(work) == before, f"{argv} wrote {_snapshot(work) - before}"
    assert not (work / "out").exists() or not any((work / "out").iterdir())


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _snapshot(folder: Path) -> set[tuple[str, bytes]]:
    """Every file and folder under `folder`, with a file's bytes (a rewrite shows too)."""
    return {(str(p.relative_to(folder)), p.read_bytes() if p.is_file() else b"/")
            for p in folder.rglob("*")}
