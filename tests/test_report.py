"""`render_report` dispatches each experiment kind with a report of its own."""

from __future__ import annotations

import importlib

import pytest

from sslbackdoor.report import KIND_RENDERERS
from sslbackdoor.runners import KIND_MODULES


@pytest.mark.parametrize("kind", sorted(KIND_RENDERERS))
def test_every_kind_renderer_imports_and_names_a_registered_kind(kind: str) -> None:
    module, function = KIND_RENDERERS[kind]
    assert callable(getattr(importlib.import_module(module), function))
    assert kind in KIND_MODULES


def _badencoder_results(task: dict[str, object]) -> dict[str, object]:
    return {"name": "r", "seed": 0, "tasks": [task],
            "config": {"encoder": {"arch": "resnet18-cifar", "weights": "w"}, "image_size": 32,
                       "attack": {"epochs": 1, "batch_size": 8, "lr": 0.01},
                       "downstream": {"probe": {"kind": "mlp", "epochs": 1, "batch_size": 8,
                                                "lr": 0.1}}},
            "provenance": {"encoder": {"arch": "resnet18-cifar", "weights": "w"},
                           "shadow": [{"images": 8, "dataset": "d", "split": "train",
                                       "source": "s"}],
                           "references": [], "tasks": {}},
            "environment": {"device": "cpu", "threads": 2, "torch": "2"},
            "timings_s": {"attack": 1.0}, "attack": {"shadow_images_per_second": 1.0}}


def test_the_badencoder_report_shows_both_asr_conventions_beside_the_paper() -> None:
    from sslbackdoor.report import render_report

    task = {"task": "gtsrb", "target_class": 12, "target_name": "priority road",
            "test_size": 100, "ca": 0.8, "ba": 0.81, "asr_b": 0.02, "asr": 0.97,
            "asr_b_all": 0.05, "asr_all": 0.975}
    report = render_report(_badencoder_results(task))
    assert "| ASR-B | ASR | ASR-B (all) | ASR (all) |" in report
    assert "| 2.00 | 97.00 | 5.00 | 97.50 |" in report
    assert "| setting (paper) | CA | BA | ASR-B (all) | ASR (all) |" in report
    del task["asr_b_all"]  # a results.json from before the field still renders
    assert "| 2.00 | 97.00 | – | 97.50 |" in render_report(_badencoder_results(task))
