"""One run per output folder: an exclusive, non-blocking lock on `--out/.lock`.

The lock is an `fcntl.flock` on an open file, so the kernel releases it whenever the
holding process ends, SIGKILL included: a killed run never leaves a stale lock, and
`--resume` can start at once. A second run on the same folder is refused with one line
naming the holder's pid. Within one process the lock is re-entrant (a run's stages lock the
folder their caller already holds), because two `flock`s from one process on two open files
would refuse each other. Under torchrun only rank 0 (the process that writes) locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sslbackdoor.errors import UserInputError

LOCK_NAME = ".lock"


@dataclass
class _Held:
    fd: int
    depth: int
    created: list[Path]  # folders this lock made, deepest first


_HELD: dict[Path, _Held] = {}


def _key(folder: Path) -> Path:
    return Path(os.path.abspath(folder))


@contextlib.contextmanager
def output_lock(folder: Path | str) -> Iterator[Path]:
    """Hold the folder's lock for the block; creates the folder (and removes it again on
    the way out if the block left it empty). Raises UserInputError if another process
    holds it or the path is not a folder."""
    key = _key(Path(folder))
    if os.environ.get("RANK", "0") != "0":
        # Under torchrun every process runs the same command on the same --out; rank 0
        # writes and holds the lock, the others only help it train.
        yield key
        return
    held = _HELD.get(key)
    if held is not None:
        held.depth += 1
        try:
            yield key
        finally:
            held.depth -= 1
        return
    _HELD[key] = _acquire(key)
    try:
        yield key
    finally:
        _release(key, _HELD.pop(key))


def _acquire(folder: Path) -> _Held:
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"--out {folder} exists and is not a folder; choose a folder")
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise UserInputError(f"{folder} is in use by another sslbackdoor run"
                                 f"{f' (pid {holder})' if holder else ''}; wait for it or "
                                 f"choose another --out") from None
        # The previous holder may have unlinked the file between our open and flock; a lock
        # on an unlinked file would exclude nobody, so retry on the file now at the path.
        if _same_file(fd, path):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return _Held(fd, 0, created)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _release(folder: Path, held: _Held) -> None:
    # Unlink while still holding the lock: a waiting opener then finds the inode gone
    # (`_same_file`) and retries on a fresh file instead of locking a dead one.
    with contextlib.suppress(OSError):
        (folder / LOCK_NAME).unlink()
    os.close(held.fd)
    # A run refused before writing anything leaves no trace: the folders this lock made
    # are removed again while empty.
    for made in held.created:
        try:
            made.rmdir()
        except OSError:
            break


def is_locked_here(folder: Path | str) -> bool:
    """Whether this process holds the folder's lock."""
    return _key(Path(folder)) in _HELD


def locking(callback: Callable[..., Any]) -> Callable[..., Any]:
    """`callback` holding the lock of its `out` folder while it runs; a dry run (`dry` set,
    or no folder) takes none. The library functions lock too; this covers the commands
    that write their folder directly."""
    @functools.wraps(callback)
    def locked(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if out is None or kwargs.get("dry"):
            return callback(*args, **kwargs)
        with output_lock(out):
            return callback(*args, **kwargs)
    return locked
