"""One run per output folder: a second process is refused with one line; SIGKILL frees it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sslbackdoor.cli import main
from sslbackdoor.errors import UserInputError
from sslbackdoor.run_lock import LOCK_NAME, is_locked_here, output_lock

HOLD = ("import sys, time\n"
        "from sslbackdoor.run_lock import output_lock\n"
        "with output_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process holding the lock on tmp_path/out."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield process, out
    process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder(
        holder: tuple[subprocess.Popen[str], Path]) -> None:
    process, out = holder
    with pytest.raises(UserInputError) as info, output_lock(out):
        pass
    message = str(info.value)
    assert f"{out} is in use by another sslbackdoor run (pid {process.pid})" in message
    assert "choose another --out" in message and "\n" not in message


def test_sigkill_frees_the_lock_at_once(holder: tuple[subprocess.Popen[str], Path]) -> None:
    process, out = holder
    process.send_signal(signal.SIGKILL)
    process.wait()
    with output_lock(out):
        assert is_locked_here(out)
    assert not is_locked_here(out)


def test_reentrant_in_one_process_and_an_unused_new_folder_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with output_lock(out), output_lock(out):
        assert (out / LOCK_NAME).read_text().strip().isdigit()
    assert not (tmp_path / "a").exists()
    with output_lock(out):
        (out / "results.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_a_file_in_place_of_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserInputError, match="exists and is not a folder"), output_lock(tmp_path / "f"):
        pass


def test_cli_refuses_a_locked_out_with_exit_2_and_one_line(
        holder: tuple[subprocess.Popen[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    process, out = holder
    # `scan` writes its folder from the CLI itself, so the command-level lock must catch it.
    with pytest.raises(SystemExit) as info:
        main(["scan", "none.safetensors", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err
    assert err == (f"error: {out} is in use by another sslbackdoor run (pid {process.pid}); "
                   f"wait for it or choose another --out")


def test_a_dry_run_takes_no_lock(holder: tuple[subprocess.Popen[str], Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    _, out = holder
    config = {"name": "dry", "image_size": 16, "encoder": {"arch": "convnet:4", "weights": None},
              "shadow": [{"dataset": "sklearn-digits", "limit": 64}],
              "targets": [{"task": "sklearn-digits", "target_class": 1, "trigger": {"size": 4},
                           "references": {"dataset": "sklearn-digits", "count": 2}}]}
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["run", str(path), "--dry-run", "--out", str(out)])
    assert capsys.readouterr().out.strip().endswith("valid badencoder experiment")


def test_the_lock_is_released_when_the_holder_exits(tmp_path: Path) -> None:
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "pass"), str(out)],
                   check=True, capture_output=True)
    with output_lock(out):
        assert is_locked_here(out)
    assert not out.exists()


def test_under_torchrun_only_rank_0_locks(holder: tuple[subprocess.Popen[str], Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = holder
    monkeypatch.setenv("RANK", "1")
    with output_lock(out):
        assert not is_locked_here(out)
