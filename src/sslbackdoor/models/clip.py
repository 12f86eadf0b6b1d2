"""CLIP image and text towers from open_clip, loaded without unpickling anything.

Importing this module registers the encoder kind ``clip:ARCH`` (`build_encoder("clip:RN50")`):
an `Encoder` whose backbone is the open_clip model's ``.visual`` tower, with CLIP's
normalisation inside, so triggers are stamped on raw [0,1] pixels as for every encoder.
`load_clip` returns the whole model (`ClipBundle`) for zero-shot classification.

Weights, for `load_clip` (and, through `checkpoints.load_encoder`, for the image tower):

* a local ``.safetensors`` file (e.g. ``open_clip_model.safetensors`` from the Hugging Face
  Hub repo ``timm/resnet50_clip.openai``): read by safetensors, tensors only;
* any other local file: `load_torch_file`, i.e. ``torch.load(weights_only=True)``. OpenAI's
  original ``RN50.pt`` is a TorchScript archive; loading one runs its code, so it is refused;
* an open_clip pretrained tag (``openai``, ``yfcc15m``, ``cc12m`` for RN50), online only:
  ``open_clip.download_pretrained`` fetches the file (with huggingface_hub installed it asks
  the Hub for ``open_clip_model.safetensors`` before any pickle-based file) and the file is
  then read by the two rules above. The tag is never handed to
  ``open_clip.create_model(pretrained=...)``, whose loader falls back to an unrestricted
  ``torch.load`` on old torch versions.

QuickGELU: OpenAI-trained towers use QuickGELU, which has no parameters, so a weights file
cannot tell. A tag brings its own setting; otherwise it defaults to True when every
published open_clip tag of the architecture uses it (all RN50/RN101 weights do). The
ResNet image towers contain no GELU at all; only their text towers depend on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sslbackdoor.engine import eval_mode
from sslbackdoor.errors import UserInputError, first_line
from sslbackdoor.models.checkpoints import check_state_fits, load_torch_file, sha256_file
from sslbackdoor.models.encoders import Encoder, register_encoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = "tiny-clip-test"
COMMON_ARCHS = "RN50, RN101, RN50-quickgelu, ViT-B-32, ViT-B-16, ViT-L-14"

# A CLIP small enough to build and run in milliseconds: a one-block-per-stage ModifiedResNet
# (the RN50 tower's design, BatchNorm and attention pooling included) on 32 px images and a
# two-layer text transformer over the default tokenizer's vocabulary.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64,
                   "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}


def _open_clip() -> ModuleType:
    try:
        import open_clip
    except ImportError:
        raise UserInputError("clip: encoders need open_clip: pip install 'sslbackdoor[clip]' "
                             "(open_clip_torch)") from None
    return open_clip


def register_tiny_clip_config(name: str = TINY_CLIP) -> str:
    """Register `TINY_CLIP_CONFIG` with open_clip under `name` (idempotent); returns `name`.

    open_clip 3.x registers configs only from JSON files (`add_model_config(path)`); it
    keeps the parsed config after the file is gone, so a temporary file suffices.
    """
    open_clip = _open_clip()
    if name not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.json"
            path.write_text(json.dumps(TINY_CLIP_CONFIG), encoding="utf-8")
            open_clip.add_model_config(path)
    return name


def model_config(arch: str) -> dict[str, Any]:
    """open_clip's config of a built-in architecture (`tiny-clip-test` is registered on demand)."""
    open_clip = _open_clip()
    if arch == TINY_CLIP:
        register_tiny_clip_config()
    # Checked against the list first: get_model_config would download hf-hub: names.
    if arch not in open_clip.list_models():
        raise UserInputError(f"unknown CLIP architecture {arch!r}; valid: {COMMON_ARCHS}, "
                             f"{TINY_CLIP} (all: open_clip.list_models())")
    config: dict[str, Any] = open_clip.get_model_config(arch)
    return config


def default_quick_gelu(arch: str) -> bool:
    """True when every published open_clip tag of `arch` was trained with QuickGELU."""
    open_clip = _open_clip()
    tags = open_clip.list_pretrained_tags_by_model(arch)
    return bool(tags) and all(bool(open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu"))
                              for tag in tags)


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    # open_clip logs "initialized randomly" warnings on the root logger; weights come later.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def create_clip_model(arch: str, quick_gelu: bool | None = None) -> nn.Module:
    """A randomly initialised open_clip model (image and text towers), fp32 on CPU."""
    model_config(arch)
    quick = default_quick_gelu(arch) if quick_gelu is None else quick_gelu
    with _quiet_logging():
        model: nn.Module = _open_clip().create_model(arch, pretrained=None,
                                                     force_quick_gelu=quick)
    return model.eval()


def _image_size(config: Mapping[str, Any]) -> int:
    size = config["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, list | tuple) else size)


def _normalisation(config: Mapping[str, Any], tag: Mapping[str, Any] | None
                   ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    # Most CLIPs use OpenAI's statistics; a few configs and tags (SigLIP) bring their own.
    source = {**config.get("preprocess_cfg", {}), **(tag or {})}
    mean, std = source.get("mean", CLIP_MEAN), source.get("std", CLIP_STD)
    return (float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]),
                                                              float(std[2]))


def image_encoder(model: nn.Module, arch: str, tag: Mapping[str, Any] | None = None) -> Encoder:
    """The `Encoder` over `model.visual`: [B,3,S,S] in [0,1] → [B,D] (D = the tower's output)."""
    config = model_config(arch)
    visual: nn.Module = model.visual  # type: ignore[assignment]
    mean, std = _normalisation(config, tag)
    return Encoder(visual, name=f"clip:{arch}",
                   feature_dim=int(getattr(visual, "output_dim", config["embed_dim"])),
                   mean=mean, std=std, default_image_size=_image_size(config))


@register_encoder("clip:", "an open_clip image tower, e.g. clip:RN50 (1024-d, 224 px)")
def _clip(arch: str | None) -> Encoder:
    if not arch:
        raise UserInputError(f"name the CLIP architecture: clip:ARCH with ARCH one of "
                             f"{COMMON_ARCHS}, {TINY_CLIP}")
    return image_encoder(create_clip_model(arch), arch)


@dataclass
class ClipBundle:
    """A whole CLIP: its image tower as an `Encoder` and its text tower for prompts.

    `image_encoder.backbone` is `model.visual` itself (shared parameters).
    """

    arch: str
    model: nn.Module
    image_encoder: Encoder
    tokenizer: Callable[..., torch.Tensor]  # N strings → token ids [N, context_length]
    provenance: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text features [N,D] (float32) of N prompts, on the model's device."""
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(list(texts)).to(device)
        with eval_mode(self.model):
            features: torch.Tensor = self.model.encode_text(tokens)  # type: ignore[operator]
        return features.float()


def load_clip(arch: str, weights: str | Path | None, *,
              quick_gelu: bool | None = None) -> ClipBundle:
    """Build CLIP `arch` ("RN50" or "clip:RN50") with `weights` (see the module docstring).

    Args:
        weights: a full open_clip state dict file, an open_clip tag, or None (random).
        quick_gelu: override the activation of the towers (default: see module docstring).
    """
    arch = arch.removeprefix("clip:")
    model_config(arch)  # a bad architecture is reported before any file is read
    state, tag, provenance = _read_clip_weights(arch, weights)
    if quick_gelu is None and tag is not None:
        quick_gelu = bool(tag.get("quick_gelu", False))
    model = create_clip_model(arch, quick_gelu)
    if state is not None:
        load_clip_state(model, state, provenance.get("file", str(weights)))
    tokenizer = _open_clip().get_tokenizer(arch)
    return ClipBundle(arch, model, image_encoder(model, arch, tag), tokenizer,
                      {"arch": f"clip:{arch}", **provenance})


def _read_clip_weights(arch: str, weights: str | Path | None
                       ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None,
                                  dict[str, str]]:
    """(state dict or None, open_clip tag config or None, provenance)."""
    if weights is None or str(weights) in ("", "none", "random"):
        return None, None, {"weights": "random"}
    path = Path(weights)
    if path.is_file():
        return read_clip_state(path), None, {"weights": str(path), "file": str(path),
                                             "sha256": sha256_file(path)}
    open_clip = _open_clip()
    tag: dict[str, Any] = open_clip.get_pretrained_cfg(arch, str(weights))
    if not tag:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise UserInputError(f"CLIP weights {str(weights)!r} are neither a file nor an "
                             f"open_clip tag of {arch} (tags: {tags})")
    try:
        path = Path(open_clip.download_pretrained(tag))
    except Exception as exc:  # network and hub errors come in many types
        raise UserInputError(f"could not download open_clip weights {arch}/{weights} "
                             f"({type(exc).__name__}; offline?); pass a local weights file "
                             f"instead") from None
    return read_clip_state(path), tag, {"weights": str(weights), "file": str(path),
                                        "sha256": sha256_file(path)}


def is_torchscript_archive(path: Path) -> bool:
    """TorchScript zips carry compiled code (`code/`, `constants.pkl`); state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl")
                   for name in archive.namelist())


def read_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a CLIP weights file (`module.` prefixes removed); never unpickles objects."""
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserInputError(f"{path} is not a readable safetensors file "
                                 f"({first_line(exc)})") from None
    elif is_torchscript_archive(path):
        raise UserInputError(f"{path} is a TorchScript archive (like OpenAI's RN50.pt), which "
                             f"runs code when loaded; use open_clip_model.safetensors from "
                             f"huggingface.co/timm/resnet50_clip.openai instead")
    else:
        obj = load_torch_file(path)
        loaded = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                                   for v in loaded.values()):
            raise UserInputError(f"{path} holds no state dict of tensors (expected a dict, "
                                 f"optionally under 'state_dict')")
        state = loaded
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def load_clip_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a full open_clip state dict into `model`, strictly; mismatches → UserInputError."""
    state = dict(state)
    if state and all(key.startswith("backbone.") for key in state):
        raise UserInputError(f"{source} holds only an image encoder (sslbackdoor format); "
                             f"the text tower needs the full CLIP weights file")
    own = model.state_dict()
    # Older checkpoints store logit_scale as a 0-d tensor, newer models as [1] (or back).
    if "logit_scale" in state and "logit_scale" in own:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    check_state_fits(own, state, str(source), "this CLIP")
    model.load_state_dict(state)
