"""Precision choice: bf16 autocast only where the hardware runs it natively."""

import pytest
import torch

from sslbackdoor import engine


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
