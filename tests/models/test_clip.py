"""The `clip:` encoder kind and CLIP weights loading, on a tiny CLIP built offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sslbackdoor.attacks.badencoder import AttackTarget, BadEncoderAttack, BadEncoderConfig
from sslbackdoor.data.triggers import Trigger, TriggerSpec
from sslbackdoor.errors import UserInputError
from sslbackdoor.models.checkpoints import load_encoder, save_encoder
from sslbackdoor.models.clip import (
    CLIP_MEAN,
    CLIP_STD,
    TINY_CLIP,
    create_clip_model,
    default_quick_gelu,
    load_clip,
    model_config,
)
from sslbackdoor.models.encoders import build_encoder

ARCH = f"clip:{TINY_CLIP}"


def clip_normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


pytestmark = pytest.mark.usefixtures("single_thread_cpu")


@pytest.fixture(scope="module")
def tiny_clip() -> nn.Module:
    torch.manual_seed(0)
    return create_clip_model(TINY_CLIP)


def test_encoder_is_the_visual_tower_and_normalises_inside() -> None:
    torch.manual_seed(0)
    encoder = build_encoder(ARCH).eval()
    images = torch.rand(3, 3, 32, 32)
    features = encoder(images)
    assert encoder.name == ARCH
    assert features.shape == (3, encoder.feature_dim) == (3, 24)
    assert encoder.default_image_size == 32
    with torch.no_grad():
        torch.testing.assert_close(features, encoder.backbone(clip_normalise(images)))
        assert not torch.allclose(features, encoder.backbone(images))


def test_rn50_is_the_papers_tower() -> None:
    config = model_config("RN50")
    assert config["embed_dim"] == 1024 and config["vision_cfg"]["image_size"] == 224
    assert default_quick_gelu("RN50")  # every published RN50 weight uses QuickGELU


def test_unknown_architecture_is_one_line_error() -> None:
    with pytest.raises(UserInputError, match="unknown CLIP architecture") as error:
        build_encoder("clip:no-such-clip")
    assert "\n" not in str(error.value)


def test_safetensors_round_trip_gives_identical_features(tmp_path: Path) -> None:
    torch.manual_seed(1)
    encoder = build_encoder(ARCH).eval()
    path = tmp_path / "clip.safetensors"
    save_encoder(encoder, path)
    loaded = load_encoder(path).eval()  # architecture read from the file's metadata
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder(images), loaded(images))


def test_full_open_clip_state_dict_loads_with_weights_only(tmp_path: Path,
                                                           tiny_clip: nn.Module) -> None:
    path = tmp_path / "open_clip_model.pt"
    torch.save(tiny_clip.state_dict(), path)
    assert any(k.startswith("transformer.") for k in torch.load(path, weights_only=True))
    encoder = load_encoder(path, ARCH).eval()  # text tower dropped, visual.* → backbone.*
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), tiny_clip.visual(clip_normalise(images)))


def test_full_clip_safetensors_file_gives_both_towers(tmp_path: Path,
                                                      tiny_clip: nn.Module) -> None:
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.state_dict().items()}, str(path))
    bundle = load_clip(ARCH, path)
    encoder = load_encoder(path, ARCH).eval()
    images = torch.rand(2, 3, 32, 32)
    tokens = bundle.tokenizer(["A photo of a cat."])
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), bundle.image_encoder.eval()(images))
        torch.testing.assert_close(bundle.encode_text(["A photo of a cat."]),
                                   tiny_clip.encode_text(tokens))
    assert bundle.provenance["sha256"] and bundle.provenance["arch"] == ARCH


def _leave_mark(path: str) -> None:
    Path(path).write_text("unpickled", encoding="utf-8")


class Payload:
    """Unpickling this object calls `_leave_mark`: evidence that a loader ran pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _leave_mark, (str(self.marker),)


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path,
                                                   tiny_clip: nn.Module) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({**tiny_clip.state_dict(), "payload": Payload(marker)}, path)
    with pytest.raises(UserInputError, match="refused") as error:
        load_encoder(path, ARCH)
    assert "\n" not in str(error.value)
    with pytest.raises(UserInputError, match="refused"):
        load_clip(ARCH, path)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archives_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    with pytest.raises(UserInputError, match="TorchScript"):
        load_clip(ARCH, path)


def test_unknown_tag_is_one_line_error() -> None:
    with pytest.raises(UserInputError, match="neither a file nor an open_clip tag"):
        load_clip(ARCH, "no-such-tag")


def calibrate_batchnorm(encoder: nn.Module, images: torch.Tensor) -> nn.Module:
    """Give a random ResNet tower the BatchNorm statistics of `images`, as training would.

    With default statistics (mean 0, var 1) after ReLUs, every image maps to nearly the
    same feature (cosine ≈ 1), which leaves BadEncoder's L0 nothing to reduce.
    """
    for module in encoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batch
    encoder.train()
    with torch.no_grad():
        encoder(images)
    return encoder.eval()


def test_badencoder_moves_a_clip_tower() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    clean = calibrate_batchnorm(build_encoder(ARCH), torch.rand(64, 3, 32, 32,
                                                                generator=generator))
    shadow = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=generator)
    reference = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=generator)
    target = AttackTarget("tiny:1", Trigger.from_spec(TriggerSpec(size=8), 32), reference)
    config = BadEncoderConfig(epochs=3, batch_size=16, lr=0.003, precision="fp32")
    result = BadEncoderAttack(clean, [target], config, torch.device("cpu")).run(shadow)
    history = result.history
    assert all({"loss", "l0", "l1", "l2"} <= set(epoch) for epoch in history)
    assert history[-1]["l0"] < history[0]["l0"] - 0.01
    assert result.encoder.name == ARCH
