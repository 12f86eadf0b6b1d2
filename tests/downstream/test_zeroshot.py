"""Zero-shot CLIP evaluation on a tiny CLIP built offline: weights, predictions, metrics, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslbackdoor.cli import main
from sslbackdoor.config import load_config
from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.downstream.features import encode
from sslbackdoor.downstream.zeroshot import (
    DIGIT_WORDS,
    evaluate_zero_shot,
    fill_template,
    templates_for,
    zero_shot_class_names,
    zero_shot_predict,
    zero_shot_weights,
)
from sslbackdoor.errors import UserInputError
from sslbackdoor.experiment import run_badencoder_experiment
from sslbackdoor.models.checkpoints import save_encoder
from sslbackdoor.models.clip import TINY_CLIP, ClipBundle, load_clip

ARCH = f"clip:{TINY_CLIP}"
CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "truck", "ship"]


def calibrate_batchnorm(encoder: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of `images`: without them a random tower maps every image to
    nearly the same feature and every zero-shot prediction is the same class."""
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    encoder.train()
    with torch.no_grad():
        encoder(images)
    return encoder.eval()


pytestmark = pytest.mark.usefixtures("single_thread_cpu")


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    torch.manual_seed(0)
    clip = load_clip(ARCH, None)
    calibrate_batchnorm(clip.image_encoder, torch.rand(64, 3, 32, 32))
    return clip


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return pixels, torch.arange(40) % len(CLASSES)


def test_weights_and_predictions_match_a_hand_computation(bundle: ClipBundle) -> None:
    templates = ["A photo of a {}.", "a blurry {} in the wild"]
    weights = zero_shot_weights(bundle, CLASSES, templates)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    rows = []
    for name in CLASSES:
        with torch.no_grad():
            text = bundle.model.encode_text(tokenizer([t.replace("{}", name) for t in templates]))
        mean = (text / text.norm(dim=1, keepdim=True)).mean(dim=0)
        rows.append(mean / mean.norm())
    expected = torch.stack(rows)
    torch.testing.assert_close(weights, expected)

    features = torch.randn(50, expected.shape[1], generator=torch.Generator().manual_seed(1))
    cosine = (features / features.norm(dim=1, keepdim=True)) @ expected.T
    predictions = zero_shot_predict(features, weights)
    assert torch.equal(predictions, cosine.argmax(dim=1))
    assert predictions.unique().numel() > 1


def test_feature_dimension_mismatch_is_one_line_error() -> None:
    with pytest.raises(UserInputError, match="same CLIP architecture"):
        zero_shot_predict(torch.randn(2, 8), torch.randn(3, 24))


def test_class_names_and_templates() -> None:
    digits = [str(d) for d in range(10)]
    assert zero_shot_class_names("svhn", digits) == list(DIGIT_WORDS)
    assert zero_shot_class_names("mnist-5k", digits)[0] == "zero"
    gtsrb = zero_shot_class_names("gtsrb", [str(i) for i in range(43)])
    assert len(gtsrb) == 43 and gtsrb[12] == "Priority road sign" and gtsrb[14] == "Stop sign"
    assert gtsrb[0] == "Speed limit 20km/h" and gtsrb[42].startswith("End of no passing by")
    assert zero_shot_class_names("stl10", CLASSES) == CLASSES
    # the reference code's prompts, verbatim: no final period
    assert templates_for("gtsrb") == ["A traffic sign photo of a {}"]
    assert templates_for("stl10") == ["A photo of a {}"]
    assert templates_for("svhn") == ["A photo of a {}"]
    assert templates_for("gtsrb", ["a {class} sign"]) == ["a {} sign"]
    assert fill_template("A photo of a {}.", "{odd} name") == "A photo of a {odd} name."
    with pytest.raises(UserInputError, match="has no"):
        templates_for("stl10", ["no placeholder"])


def test_evaluate_zero_shot_counts_asr_without_target_class_inputs(
        bundle: ClipBundle, images: tuple[torch.Tensor, torch.Tensor]) -> None:
    pixels, labels = images
    weights = zero_shot_weights(bundle, CLASSES, ["A photo of a {}."])
    clean = bundle.image_encoder
    backdoored = copy.deepcopy(clean)
    with torch.no_grad():
        for parameter in backdoored.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    trigger = Trigger.from_spec(TriggerSpec(size=8), 32)
    target = 2
    scores = evaluate_zero_shot(clean, backdoored, weights, pixels, labels, CPU,
                                trigger=trigger, target_class=target, precision="fp32")
    assert set(scores) == {"ca", "ba", "asr_b", "asr", "asr_b_all", "asr_all"}
    assert all(value is not None and 0.0 <= value <= 1.0 for value in scores.values())

    for encoder, asr, asr_all in ((clean, "asr_b", "asr_b_all"), (backdoored, "asr", "asr_all")):
        triggered = zero_shot_predict(encode(encoder, pixels, CPU, trigger=trigger,
                                             precision="fp32"), weights)
        hit = triggered == target
        others = labels != target
        assert scores[asr] == pytest.approx(float(hit[others].float().mean()))
        assert scores[asr_all] == pytest.approx(float(hit.float().mean()))
    predicted = zero_shot_predict(encode(clean, pixels, CPU, precision="fp32"), weights)
    assert scores["ca"] == pytest.approx(float((predicted == labels).float().mean()))

    alone = evaluate_zero_shot(None, backdoored, weights, pixels, labels, CPU, precision="fp32")
    assert alone["ca"] is None and alone["asr"] is None and alone["ba"] == scores["ba"]


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as stop:
        main(args)
    return int(stop.value.code or 0)


def test_cli_zero_shot_needs_a_clip_arch(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(["evaluate", "--zero-shot", "--encoder", str(tmp_path / "enc.safetensors"),
                    "--task", "svhn", "--out", str(tmp_path / "out"),
                    "--arch", "resnet18-cifar"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "clip:ARCH" in err
    code = run_cli(["evaluate", "--template", "a {}", "--encoder", "x", "--task", "svhn",
                    "--out", str(tmp_path / "out")])
    assert code == 2 and "only apply with --zero-shot" in capsys.readouterr().err


def tiny_files(tmp_path: Path, bundle: ClipBundle,
               images: tuple[torch.Tensor, torch.Tensor]) -> tuple[Path, Path, Path]:
    """A full CLIP weights file, a backdoored-looking image encoder file and an npz task
    folder in BadEncoder's layout (train.npz: 24 images, test.npz: the other 16)."""
    full = tmp_path / "clip.pt"
    torch.save(bundle.model.state_dict(), full)
    backdoored = copy.deepcopy(bundle.image_encoder)
    with torch.no_grad():
        for parameter in backdoored.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    encoder_file = tmp_path / "backdoored.safetensors"
    save_encoder(backdoored, encoder_file)
    pixels, labels = images
    npz = tmp_path / "task"
    npz.mkdir()
    for split, part in (("train", slice(0, 24)), ("test", slice(24, None))):
        np.savez(npz / f"{split}.npz", x=pixels[part].permute(0, 2, 3, 1).numpy(),
                 y=labels[part].numpy(), classes=np.array(CLASSES))
    return full, encoder_file, npz


def test_cli_zero_shot_writes_results(tmp_path: Path, bundle: ClipBundle,
                                      images: tuple[torch.Tensor, torch.Tensor]) -> None:
    full, encoder_file, npz = tiny_files(tmp_path, bundle, images)
    out = tmp_path / "out"
    main(["evaluate", "--zero-shot", "--encoder", str(encoder_file), "--clean", str(full),
          "--task", f"npz:{npz}", "--target-class", "1", "--trigger-size", "8",
          "--image-size", "32", "--template", "a photo of a {class}", "--device", "cpu",
          "--out", str(out), "--quiet"])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    [task] = results["tasks"]
    assert results["kind"] == "evaluate-zero-shot" and task["templates"] == ["a photo of a {}"]
    assert all(0.0 <= task[k] <= 1.0 for k in ("ca", "ba", "asr_b", "asr", "asr_all"))
    assert results["text_tower"]["sha256"] == results["clean_encoder"]["sha256"]


def test_experiment_reports_zero_shot_tables(tmp_path: Path, bundle: ClipBundle,
                                             images: tuple[torch.Tensor, torch.Tensor]) -> None:
    full, _, npz = tiny_files(tmp_path, bundle, images)
    task = f"npz:{npz}"
    raw: dict[str, Any] = {
        "name": "tiny-clip", "device": "cpu", "image_size": 32,
        "encoder": {"arch": ARCH, "weights": str(full)},
        "shadow": [{"dataset": task, "split": "train"}],
        "targets": [{"task": task, "target_class": 1, "trigger": {"size": 8},
                     "references": {"dataset": task, "split": "train", "count": 1}}],
        "attack": {"epochs": 1, "batch_size": 16, "lr": 0.001, "precision": "fp32"},
        "downstream": {"probe": {"epochs": 1}, "zero_shot": {}},
    }
    results = run_badencoder_experiment(load_config(raw), tmp_path / "run")
    [entry] = results["zero_shot"]
    assert entry["task"] == task and entry["target_class"] == 1
    assert all(0.0 <= entry[k] <= 1.0 for k in ("ca", "ba", "asr_b", "asr", "asr_all"))
    written = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert written["zero_shot"] == results["zero_shot"]
    with pytest.raises(UserInputError, match="needs a CLIP encoder"):
        load_config({**raw, "encoder": {"arch": "resnet18-cifar", "weights": None}})


def test_zero_shot_weights_are_normalised(bundle: ClipBundle) -> None:
    weights = zero_shot_weights(bundle, CLASSES, ["{}", "a {}"])
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(len(CLASSES)))
    assert F.cosine_similarity(weights[0], weights[1], dim=0) < 1
