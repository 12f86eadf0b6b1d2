"""`sslbackdoor scan` and `sslbackdoor defend …` on bad input: exit 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_scan_says_which_image_size_and_shadow_set_it_used(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from sslbackdoor.models.checkpoints import save_encoder
    from sslbackdoor.models.encoders import build_encoder

    torch.manual_seed(0)
    checkpoint = tmp_path / "encoder.safetensors"
    save_encoder(build_encoder("convnet:2"), checkpoint, {"image_size": "16"})
    main(["scan", str(checkpoint), "--shadow", "natural-crops/train@6", "--epochs", "1",
          "--device", "cpu", "--out", str(tmp_path / "out")])
    said = capsys.readouterr().out
    assert "at 16 px (recorded in the checkpoint)" in said and "natural-crops/train@6 (--shadow)" in said
    summary = json.loads((tmp_path / "out" / "decree.json").read_text())
    assert summary["image_size"] == [16, 16] and summary["shadow"] == "natural-crops/train@6"


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
