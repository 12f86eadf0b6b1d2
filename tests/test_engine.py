"""Precision choice (bf16 autocast only where the hardware runs it natively) and crash-safe writes."""

import errno
import os
from pathlib import Path

import pytest
import torch

from sslbackdoor import engine
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.encoders import Encoder


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocasts_to_bf16_only_with_native_bf16(native: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "cpu_runs_bf16_natively", lambda: native)
    cpu = torch.device("cpu")
    with engine.autocast(cpu):
        assert torch.is_autocast_enabled("cpu") is native
        out = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    assert engine.uses_bf16(cpu) is native
    assert engine.uses_bf16(cpu, requested=False) is False
    assert engine.uses_bf16(torch.device("cuda")) is True  # decided by config alone on GPUs


def test_native_bf16_check_matches_onednn() -> None:
    assert engine.cpu_runs_bf16_natively() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, after: int = 10) -> None:
    """Every file write stores `after` bytes, then fails as a full disk does."""
    def write(path: Path, data: bytes) -> None:
        path.write_bytes(data[:after])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine, "write_file_bytes", write)


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.bin"
    engine.atomic_write_bytes(target, b"old complete contents")
    fill_the_disk(monkeypatch)
    with pytest.raises(OSError) as info:
        engine.atomic_write_bytes(target, b"new contents, much longer than ten bytes")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old complete contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_atomic_write_names_the_target_when_its_folder_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError) as info:
        engine.atomic_write_text(tmp_path / "file" / "sub" / "out.txt", "text")
    assert info.value.filename == str(tmp_path / "file" / "sub" / "out.txt")


def test_unusable_output_paths_are_refused_before_any_work(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="exists and is not a folder"):
        engine.check_output_folder(tmp_path / "file")
    with pytest.raises(UserInputError, match="is a file, so nothing can be created under it"):
        engine.check_output_folder(tmp_path / "file" / "a" / "b")
    with pytest.raises(UserInputError, match="is a folder; give a file path"):
        engine.check_output_file(tmp_path, "--across-seeds")
    engine.check_output_folder(tmp_path / "new" / "deeper")  # creatable: fine, and not created
    assert not (tmp_path / "new").exists()
    # Tests run as root, for whom every folder is writable: the permission answer is faked.
    monkeypatch.setattr(engine.os, "access", lambda path, mode: False)
    with pytest.raises(UserInputError, match="is not writable"):
        engine.check_output_folder(tmp_path / "new")


SAFETENSORS_TWICE = """
import hashlib, sys, torch
from sslbackdoor.engine import safetensors_bytes
tensors = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(5, dtype=torch.bfloat16)}
metadata = {f"key{i}": f"value {i} é" for i in range(20)}
sys.stdout.write(hashlib.sha256(safetensors_bytes(tensors, metadata)).hexdigest())
"""


def test_safetensors_bytes_are_the_same_in_every_process() -> None:
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", SAFETENSORS_TWICE], check=True, capture_output=True,
                              text=True).stdout for _ in range(3)}
    assert len(digests) == 1


def test_safetensors_bytes_load_back_with_their_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    from sslbackdoor.engine import safetensors_bytes

    tensors = {"w": torch.randn(3, 4), "x": torch.arange(7, dtype=torch.int64)}
    metadata = {"zeta": "1", "alpha": "two", "mid": "ü"}
    path = tmp_path / "t.safetensors"
    path.write_bytes(safetensors_bytes(tensors, metadata))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    assert (path.stat().st_size - 8) % 8 == 0


def test_freeze_batchnorm_keeps_running_stats_and_affine_fixed(tiny_encoder: Encoder) -> None:
    engine.freeze_batchnorm(tiny_encoder)
    batchnorms = [m for m in tiny_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and all(not m.training for m in batchnorms)
    assert all(not p.requires_grad for m in batchnorms for p in m.parameters())
    assert any(p.requires_grad for p in tiny_encoder.parameters())  # only BatchNorm is frozen


def test_environment_names_the_device_and_versions() -> None:
    found = engine.environment(torch.device("cpu"))
    assert found["device"] == "cpu" and found["torch"] == torch.__version__
    assert found["bf16"] == engine.uses_bf16(torch.device("cpu"))
    assert set(found) == {"device", "torch", "threads", "machine", "bf16", "python"}
