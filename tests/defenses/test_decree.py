"""DECREE flags an encoder whose trigger collapses features and not its clean twin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sslbackdoor.data.datasets import load_dataset
from sslbackdoor.defenses.cli import parse_source
from sslbackdoor.defenses.decree import (
    DEFAULT_SCAN_SHADOW,
    DecreeConfig,
    DecreeResult,
    DecreeSchedule,
    decree_scan,
    mean_pairwise_cosine,
    reference_config,
    scan_inputs,
    write_decree_outputs,
)
from sslbackdoor.downstream.features import dataset_tensors, encode
from sslbackdoor.models.checkpoints import load_encoder, read_safetensors_metadata
from tests.conftest import INTEROP

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


def test_lambda_returns_to_its_start_after_succeeding_below_lambda_min() -> None:
    schedule = DecreeSchedule(DecreeConfig(lambda_min=1e-3))
    for _ in range(6):
        schedule.update(False)
    assert schedule.cost == pytest.approx(2e-4)  # one division below lambda_min, then no more
    for _ in range(5):  # successes while λ < lambda_min, not yet more than 5 in a row …
        schedule.update(True)
    schedule.update(False)  # … a failure clears the count
    assert schedule.cost == pytest.approx(2e-4)
    schedule.up_counter = -100  # keep ×5 out of the way to see the reset alone
    for _ in range(11):
        schedule.update(True)
    assert schedule.cost == pytest.approx(1e-3)


def test_learning_rate_follows_the_reference_epochs() -> None:
    schedule = DecreeSchedule(DecreeConfig())
    assert [schedule.learning_rate(e, 0.5) for e in (0, 29, 30, 49, 50, 999)] == [
        0.5, 0.5, 0.1, 0.1, 0.05, 0.05]


def test_scan_uses_the_size_recorded_in_the_checkpoint() -> None:
    chosen = scan_inputs("torchvision:mobilenet_v2", 224, {"image_size": "96"})
    assert (chosen.image_size, chosen.shadow) == (96, DEFAULT_SCAN_SHADOW)


def test_scan_samples_held_out_images_of_the_pretraining_data_at_its_size() -> None:
    pretrain = json.dumps({"image_size": 28, "data": [{"dataset": "fashion-mnist", "split": "train"}]})
    chosen = scan_inputs("convnet-small", 32, {"pretrain": pretrain})
    assert (chosen.image_size, chosen.shadow) == (28, "fashion-mnist/test@300")
    pretrain = json.dumps({"data": [{"dataset": "natural-crops", "split": "unlabeled"}]})
    assert scan_inputs("convnet-small", 32, {"pretrain": pretrain}).shadow == "natural-crops/unlabeled@300"


def test_scan_without_metadata_runs_imagenet_cnns_at_64_px_and_others_natively() -> None:
    assert scan_inputs("torchvision:mobilenet_v2", 224, {}).image_size == 64
    assert scan_inputs("resnet18-cifar", 32, {"pretrain": "not json"}).image_size == 32


def test_scan_runs_imagenet_encoders_with_the_reference_imagenet_settings() -> None:
    assert scan_inputs("torchvision:mobilenet_v2", 224, {}).loop == "imagenet"
    assert scan_inputs("convnet-small", 32, {}).loop == "cifar"
    config = reference_config("imagenet", epochs=7, pl1_threshold=0.05)
    assert (config.inversion.steps, config.inversion.early_stop_patience, config.inversion.lr,
            config.inversion.batch_size) == (7, 35, 0.5, 128)
    assert (config.lambda_min, config.pl1_threshold) == (1e-7, 0.05)
    schedule = DecreeSchedule(config)
    assert [schedule.learning_rate(e, 0.5) for e in (199, 200, 500)] == [0.5, 0.1, 0.05]


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


MISSED_ENCODER = INTEROP / "encoders" / "mobilenet_v2-badencoder-mnist1-bf16.safetensors"


@pytest.fixture(scope="module")
def mobilenet_scans() -> dict[str, DecreeResult]:
    """The default scan of the BadEncoder MobileNetV2 an earlier `scan` missed (PL1 0.155–0.178)
    and of the clean ImageNet MobileNetV2 it was made from, as `sslbackdoor scan` runs them."""
    if not MISSED_ENCODER.parent.is_dir():
        pytest.skip(f"{MISSED_ENCODER.parent} is absent: the shared folder beside the checkout "
                    f"holds {MISSED_ENCODER.name}")
    suspects = {"backdoored": load_encoder(MISSED_ENCODER),
                "clean": load_encoder("imagenet", "torchvision:mobilenet_v2")}
    inputs = scan_inputs("torchvision:mobilenet_v2", 224, read_safetensors_metadata(MISSED_ENCODER))
    source, split, limit = parse_source(inputs.shadow)
    shadow, _ = dataset_tensors(load_dataset(source, split, image_size=inputs.image_size,  # type: ignore[arg-type]
                                             limit=limit, seed=0))
    config = reference_config(inputs.loop, max_images=shadow.shape[0])
    # One thread: on a shared 2-core machine two threads cost 2.5 CPU-s a batch against 0.4–0.55.
    with one_thread():
        return {name: decree_scan(model, shadow, config, CPU, seed=0) for name, model in suspects.items()}


@pytest.mark.slow
def test_scan_flags_the_backdoored_mobilenet_it_once_missed(mobilenet_scans: dict[str, DecreeResult]) -> None:
    backdoored = mobilenet_scans["backdoored"]
    assert backdoored.success and backdoored.flagged, backdoored.summary()


@pytest.mark.slow
def test_scan_passes_the_clean_imagenet_mobilenet(mobilenet_scans: dict[str, DecreeResult]) -> None:
    clean = mobilenet_scans["clean"]
    assert not clean.flagged, clean.summary()
    assert clean.pl1 > 3 * mobilenet_scans["backdoored"].pl1
