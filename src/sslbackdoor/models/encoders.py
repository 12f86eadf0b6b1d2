"""Encoder registry: every encoder maps images in [0,1] to feature vectors.

An `Encoder` owns its input normalisation, so triggers are always stamped on raw pixels
and callers never normalise by hand. Names:

* ``resnet18-cifar``: torchvision ResNet18 with a 3×3 stride-1 stem and no max-pool,
  fc removed (512-d) — the BadEncoder/SimCLR CIFAR encoder.
* ``torchvision:ARCH``: any torchvision classification model with its classifier removed
  (``torchvision:mobilenet_v2`` → 1280-d). ``weights="imagenet"`` loads ImageNet weights.
* ``clip:ARCH``: an open_clip image tower (registered by `sslbackdoor.models.clip`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from sslbackdoor.errors import UserInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class Encoder(nn.Module):
    """A backbone with its normalisation: forward([B,3,H,W] in [0,1]) → [B,D] features."""

    def __init__(self, backbone: nn.Module, *, name: str, feature_dim: int,
                 mean: tuple[float, float, float], std: tuple[float, float, float],
                 default_image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.feature_dim = feature_dim
        self.default_image_size = default_image_size
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone((images - self.mean) / self.std)
        return torch.flatten(features, 1)


@dataclass(frozen=True)
class EncoderFactory:
    build: Callable[[str | None], Encoder]  # argument: the `ARG` of `kind:ARG` names
    description: str


ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(name: str, description: str) -> Callable[[Callable[[str | None], Encoder]],
                                                               Callable[[str | None], Encoder]]:
    def decorator(build: Callable[[str | None], Encoder]) -> Callable[[str | None], Encoder]:
        ENCODERS[name] = EncoderFactory(build, description)
        return build
    return decorator


def build_encoder(name: str) -> Encoder:
    """A randomly initialised encoder of the registered architecture `name`."""
    if name.startswith("clip:"):
        import sslbackdoor.models.clip  # noqa: F401  (registers "clip:")
    kind, _, arg = name.partition(":")
    factory = ENCODERS.get(f"{kind}:" if arg else name)
    if factory is None:
        raise UserInputError(f"unknown encoder {name!r}; valid: {', '.join(encoder_names())}")
    return factory.build(arg or None)


def encoder_names() -> list[str]:
    return sorted([*ENCODERS, "clip:"])


def cifar_resnet18_backbone() -> nn.Module:
    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


@register_encoder("resnet18-cifar", "ResNet18, 3×3 stem, no max-pool, 512-d (BadEncoder/SimCLR)")
def _resnet18_cifar(_: str | None) -> Encoder:
    return Encoder(cifar_resnet18_backbone(), name="resnet18-cifar", feature_dim=512,
                   mean=CIFAR10_MEAN, std=CIFAR10_STD, default_image_size=32)


def strip_classifier(model: nn.Module) -> nn.Module:
    """Replace a torchvision classifier's last stage by Identity to expose its features."""
    for attribute in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(model, attribute, None), nn.Module):
            setattr(model, attribute, nn.Identity())
            return model
    raise UserInputError(f"cannot find the classifier of {type(model).__name__} "
                         f"(looked for fc, classifier, heads, head)")


@torch.no_grad()
def _feature_dim(backbone: nn.Module, image_size: int) -> int:
    backbone.eval()
    return int(torch.flatten(backbone(torch.zeros(1, 3, image_size, image_size)), 1).shape[1])


@register_encoder("torchvision:", "any torchvision classification model, classifier removed")
def _torchvision(arch: str | None) -> Encoder:
    available = torchvision.models.list_models(module=torchvision.models)
    if arch is None or arch not in available:
        raise UserInputError(f"unknown torchvision model {arch!r}; valid examples: "
                             f"mobilenet_v2, resnet18, resnet50, efficientnet_b0 "
                             f"(all: torchvision.models.list_models())")
    backbone = strip_classifier(torchvision.models.get_model(arch, weights=None))
    image_size = 224
    return Encoder(backbone, name=f"torchvision:{arch}",
                   feature_dim=_feature_dim(backbone, 224 if "vit" in arch else 64),
                   mean=IMAGENET_MEAN, std=IMAGENET_STD, default_image_size=image_size)
