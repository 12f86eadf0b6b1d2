"""DECREE flags an encoder whose trigger collapses features and not its clean twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslbackdoor.defenses.decree import (
    DecreeConfig,
    DecreeResult,
    DecreeSchedule,
    decree_scan,
    mean_pairwise_cosine,
    write_decree_outputs,
)
from sslbackdoor.downstream.features import encode

from .conftest import CPU, CollapseEncoders, one_thread


def test_mean_pairwise_cosine_excludes_the_diagonal() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs (0,1)=0, (0,2)=1, (1,2)=0, each counted twice: 2/6.
    assert float(mean_pairwise_cosine(features)) == pytest.approx(1 / 3)


def test_lambda_schedule_moves_after_more_than_patience_steps() -> None:
    schedule = DecreeSchedule(DecreeConfig())
    for _ in range(5):
        schedule.update(True)
    assert schedule.cost == 1e-3
    schedule.update(True)
    assert schedule.cost == pytest.approx(5e-3)
    for _ in range(6):
        schedule.update(False)
    assert schedule.cost == pytest.approx(1e-3)


@pytest.fixture(scope="module")
def scans(collapse_encoders: CollapseEncoders) -> dict[str, DecreeResult]:
    config = DecreeConfig()
    with one_thread():
        return {name: decree_scan(encoder, collapse_encoders.images, config, CPU, seed=0)
                for name, encoder in (("clean", collapse_encoders.clean),
                                      ("poisoned", collapse_encoders.poisoned))}


def test_the_poisoned_encoder_collapses_on_its_trigger(collapse_encoders: CollapseEncoders) -> None:
    images, trigger = collapse_encoders.images[:300], collapse_encoders.trigger
    triggered = encode(collapse_encoders.poisoned, trigger.apply(images), CPU, precision="fp32")
    assert float(mean_pairwise_cosine(triggered)) > 0.99
    clean_view = encode(collapse_encoders.clean, trigger.apply(images), CPU, precision="fp32")
    assert float(mean_pairwise_cosine(clean_view)) < 0.8


def test_decree_flags_the_poisoned_encoder(scans: dict[str, DecreeResult]) -> None:
    poisoned = scans["poisoned"]
    assert poisoned.success and poisoned.flagged
    assert poisoned.pl1 < 0.05  # the real trigger covers 16/1024 = 1.6% of the image


def test_decree_gives_the_clean_twin_a_much_larger_trigger(scans: dict[str, DecreeResult]) -> None:
    clean, poisoned = scans["clean"], scans["poisoned"]
    assert not clean.flagged
    assert clean.pl1 > 5 * poisoned.pl1


def test_decree_writes_images_and_a_summary(scans: dict[str, DecreeResult],
                                            collapse_encoders: CollapseEncoders,
                                            tmp_path: Path) -> None:
    paths = write_decree_outputs(scans["poisoned"], collapse_encoders.images, tmp_path)
    assert {p.name for p in paths} == {"mask.png", "pattern.png", "trigger.png", "stamped.png",
                                       "decree.json"}
    summary = json.loads((tmp_path / "decree.json").read_text())
    assert summary["verdict"] == "backdoored" and summary["threshold"] == 0.1
