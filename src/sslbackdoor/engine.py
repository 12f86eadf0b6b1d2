"""Device, precision, seeding, eval-mode helpers and crash-safe file writes shared by every stage."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from sslbackdoor.errors import UserInputError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str = "auto") -> torch.device:
    """Map the one `--device auto|cpu|cuda` setting to a torch device."""
    # Denormal floats appear once BadEncoder collapses features (cosine ≈ 1) and slow
    # CPU kernels about 10×; flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserInputError("--device cuda was asked for but no CUDA GPU is visible; "
                                 "use --device cpu or auto")
        return torch.device(name)
    raise UserInputError(f"unknown device {name!r}; valid: auto, cpu, cuda")


@functools.cache
def cpu_runs_bf16_natively() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16/AMX class).

    Without them bf16 is emulated: measured on a 2-core AVX2-only EPYC, a convnet-small
    forward+backward at batch 64 took 4.7 s under bf16 autocast against 0.50 s in fp32.
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def uses_bf16(device: torch.device, requested: bool = True) -> bool:
    """bf16 autocast where it is the fast path: CUDA, and CPUs with native bf16."""
    return requested and (device.type != "cpu" or cpu_runs_bf16_natively())


def environment(device: torch.device) -> dict[str, Any]:
    """What a results.json records about the machine a run used."""
    return {"device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "bf16": uses_bf16(device), "python": platform.python_version()}


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA and on CPUs with native bf16 (the measured fast path for conv
    nets there); fp32 elsewhere, where emulated bf16 is several times slower."""
    if not uses_bf16(device, enabled):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)


def prepare_module(module: ModuleT, device: torch.device) -> ModuleT:
    """Move a conv net (in place) to `device` in channels_last format (faster with bf16)."""
    module.to(device).to(memory_format=torch.channels_last)
    return module


def to_device_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 or float images [B,3,H,W] → float32 in [0,1] on `device`, channels_last."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    return images.contiguous(memory_format=torch.channels_last)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same folder, then rename: never half-written.

    On any failure (a full disk included) the temp file is removed and an existing file at
    `path` is left as it was; an OSError is re-raised naming `path`, not the temp file.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write` of bytes held in memory. Serialisers that write files themselves
    (safetensors' `save_file`) report a full disk as their own error type; writing their
    bytes here makes it an OSError(ENOSPC) that names the file."""
    atomic_write(path, lambda tmp: write_file_bytes(tmp, data))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding of `tensors`, identical for identical inputs.

    safetensors writes its metadata in hash-map order, which differs between processes, so
    the same weights got another sha256 in every run; the header is re-emitted with the
    metadata keys sorted (tensor entries and data bytes unchanged)."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    header_length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_length])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors keeps the data 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + header_length:]


def write_file_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that could not be created or written:
    an existing file, a path under a file, or a folder without write permission."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"{option} {folder} exists and is not a folder; give a folder path")
    _check_parent_writable(folder, option)


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, an output file path that is a folder or cannot be created."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{option} {path} is a folder; give a file path")
    _check_parent_writable(path, option)


def _check_parent_writable(path: Path, option: str) -> None:
    absolute = Path(os.path.abspath(path))
    ancestor = absolute if absolute.is_dir() else next(p for p in absolute.parents if p.exists())
    if not ancestor.is_dir():
        raise UserInputError(f"{option} {path}: {ancestor} is a file, so nothing can be "
                             f"created under it; give a path in a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} {path}: {ancestor} is not writable (permission "
                             f"denied or a read-only file system); give a writable path")


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Temporarily put a module in eval mode, restoring its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def freeze_batchnorm(encoder: torch.nn.Module) -> None:
    """Eval mode everywhere (BatchNorm uses its running statistics) and BN affine frozen."""
    encoder.eval()
    for module in encoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            for parameter in module.parameters():
                parameter.requires_grad_(False)
