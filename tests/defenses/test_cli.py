"""`sslbackdoor scan` and `sslbackdoor defend …` on bad input: exit 2 with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslbackdoor.cli import main
from sslbackdoor.defenses.cli import parse_source
from sslbackdoor.errors import UserInputError


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return int(exit_info.value.code or 0), capsys.readouterr().err


def test_scan_of_a_missing_file_exits_2_with_one_line(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.safetensors"
    code, err = run_cli(["scan", str(missing), "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "checkpoint not found" in err and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_scan_rejects_a_threshold_outside_zero_one(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["scan", str(tmp_path / "x.safetensors"), "--threshold", "1.5"], capsys)
    assert code == 2 and "--threshold" in err and err.strip().count("\n") == 0


def test_neural_cleanse_rejects_an_unknown_mitigation(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["defend", "neural-cleanse", "--encoder", str(tmp_path / "e"),
                         "--task", "sklearn-digits", "--out", str(tmp_path), "--mitigate",
                         "prune"], capsys)
    assert code == 2 and "unlearn" in err


def test_parse_source() -> None:
    assert parse_source("natural-crops/unlabeled@500") == ("natural-crops", "unlabeled", 500)
    assert parse_source("mnist-5k") == ("mnist-5k", "train", None)
    with pytest.raises(UserInputError):
        parse_source("mnist-5k/valid")
    with pytest.raises(UserInputError):
        parse_source("mnist-5k@many")
