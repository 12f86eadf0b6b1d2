"""Encoder registry: every encoder maps images in [0,1] to feature vectors.

An `Encoder` owns its input normalisation, so triggers are always stamped on raw pixels
and callers never normalise by hand. Names:

* ``resnet18-cifar``: torchvision ResNet18 with a 3×3 stride-1 stem and no max-pool,
  fc removed (512-d) — the BadEncoder/SimCLR CIFAR encoder.
* ``resnet18-stl10``: the same network normalised with STL10's statistics, as the
  BadEncoder reference code feeds its STL10 encoders (`encoder_usage_info=stl10`); the
  authors' STL10 checkpoints read CIFAR10-normalised inputs wrongly.
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
# The BadEncoder reference code's STL10 transforms (datasets/stl10_dataset.py).
STL10_MEAN = (0.44087798, 0.42790666, 0.38678814)
STL10_STD = (0.25507198, 0.24801506, 0.25641308)


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
    return sorted({*ENCODERS, "clip:"})


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


@register_encoder("resnet18-stl10", "resnet18-cifar with STL10's normalisation, 512-d: the "
                  "BadEncoder authors' STL10 encoders")
def _resnet18_stl10(_: str | None) -> Encoder:
    return Encoder(cifar_resnet18_backbone(), name="resnet18-stl10", feature_dim=512,
                   mean=STL10_MEAN, std=STL10_STD, default_image_size=32)


# --- small encoders for CPU-scale SimCLR (chosen by benchmarks/simclr_small.py) -------------

SMALL_CONVNET_WIDTH = 32  # `convnet-small`: the best CPU candidate (benchmarks/simclr_small.py)


def _int_arg(name: str, arg: str | None, default: int, lowest: int = 1) -> int:
    if arg is None:
        return default
    if not arg.isdigit() or int(arg) < lowest:
        raise UserInputError(f"encoder {name}:{arg}: the width must be an integer ≥ {lowest}, "
                             f"e.g. {name}:{default}")
    return int(arg)


def cifar_resnet_backbone(width: int, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> nn.Module:
    """ResNet with BasicBlocks, 3×3 stride-1 stem, no max-pool and stage widths
    width·(1, 2, 4, 8): [B,3,H,W] → [B, 8·width]. width=64 is `resnet18-cifar`."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    channels = width
    for stage, count in enumerate(blocks):
        planes, stride = width * 2 ** stage, 1 if stage == 0 else 2
        for index in range(count):
            step = stride if index == 0 else 1
            downsample = None
            if step != 1 or channels != planes:
                downsample = nn.Sequential(nn.Conv2d(channels, planes, 1, stride=step, bias=False),
                                           nn.BatchNorm2d(planes))
            layers.append(BasicBlock(channels, planes, step, downsample))
            channels = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register_encoder("resnet18-cifar:", "resnet18-cifar at stage widths W·(1,2,4,8): "
                  "resnet18-cifar:WIDTH, 8·WIDTH-d")
def _resnet18_cifar_width(arg: str | None) -> Encoder:
    width = _int_arg("resnet18-cifar", arg, 64)
    return Encoder(cifar_resnet_backbone(width), name=f"resnet18-cifar:{width}",
                   feature_dim=8 * width, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                   default_image_size=32)


def convnet_backbone(width: int) -> nn.Module:
    """Four conv3×3-BN-ReLU-maxpool stages of width·(1,2,4,8) channels, global average
    pooling: [B,3,H,W] → [B, 8·width]."""
    layers: list[nn.Module] = []
    channels = 3
    for stage in range(4):
        out = width * 2 ** stage
        layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


@register_encoder("convnet:", "4-stage ConvNet, widths W·(1,2,4,8): convnet:WIDTH, 8·WIDTH-d")
def _convnet(arg: str | None) -> Encoder:
    width = _int_arg("convnet", arg, 32)
    return Encoder(convnet_backbone(width), name=f"convnet:{width}", feature_dim=8 * width,
                   mean=CIFAR10_MEAN, std=CIFAR10_STD, default_image_size=32)


@register_encoder("convnet-small", f"convnet:{SMALL_CONVNET_WIDTH}, {8 * SMALL_CONVNET_WIDTH}-d: "
                  f"the CPU-scale SimCLR encoder (fastest to learn in 30 min on 2 cores)")
def _convnet_small(_: str | None) -> Encoder:
    return Encoder(convnet_backbone(SMALL_CONVNET_WIDTH), name="convnet-small",
                   feature_dim=8 * SMALL_CONVNET_WIDTH, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                   default_image_size=32)


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
