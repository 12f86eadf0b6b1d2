"""PatchGuard (Xiang et al., USENIX Security 2021) with an encoder as the local feature extractor.

BagNet-style small receptive field: the image is cut into r×r patches with stride s (the
receptive field and stride of one "local feature"), each patch is encoded on its own —
resized to the encoder's input size when `resize_patches`, since pre-trained encoders
expect whole images at a fixed scale — and a linear classifier on each local feature gives
local logits u ∈ R^{X×Y×C}.

Robust masking: clip u at 0; for each class c find the w×w window of local features with
the largest sum, w = ceil((p + r − 1)/s) (every local feature a p×p patch can touch lies in
one such window); if its share of the class total exceeds T (default 0) remove it; predict
the argmax of what remains.

Certification for true class y (T = 0 shown; `certify` handles any T < 1): for every window
position P a patch could occupy, the adversary controls u inside P.
* Lower bound for y: zeroing y's evidence inside P is the worst case (extra evidence in P
  adds at least as much to the total as masking can remove), and masking then removes at
  most the largest window of what is left: L_y(P) = Σ_{∉P} u_y − max_V Σ_{V∖P} u_y.
* Upper bound for c ≠ y: any evidence E placed in P is removed by masking (the window at
  P already has sum ≥ E), unless the largest window share stays ≤ T, in which case the
  total is at most Σ_{∉P} u_c/(1−T): U_c(P) = Σ_{∉P} u_c / (1 − T).
Certified when the clean masked prediction is y and L_y(P) > max_c U_c(P) for every P.
If the window covers the whole feature map (w ≥ X and w ≥ Y) nothing can be certified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sslbackdoor.data.triggers import Trigger
from sslbackdoor.downstream.features import encode
from sslbackdoor.downstream.probe import ProbeConfig, train_probe
from sslbackdoor.engine import eval_mode, to_device_images
from sslbackdoor.errors import UserInputError
from sslbackdoor.metrics import accuracy, attack_success_rate
from sslbackdoor.models.encoders import Encoder


class PatchGuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    receptive_field: int = Field(16, ge=1, description="r: side of one local patch (px)")
    stride: int = Field(8, ge=1, description="s: stride between local patches (px)")
    patch_size: int | None = Field(None, ge=1, description="p: adversarial patch side (px); "
                                                           "default: the trigger's side")
    threshold: float = Field(0.0, ge=0, lt=1, description="T: detection threshold")
    resize_patches: bool = True
    probe: ProbeConfig = ProbeConfig(kind="linear", epochs=30, lr=1e-3, batch_size=256)

    @model_validator(mode="after")
    def _check(self) -> PatchGuardConfig:
        if self.stride > self.receptive_field:
            raise ValueError("stride larger than the receptive field would skip pixels")
        return self


def window_size(patch_size: int, receptive_field: int, stride: int) -> int:
    """w = ceil((p + r − 1)/s): local features a p×p patch can touch, per axis."""
    if min(patch_size, receptive_field, stride) < 1:
        raise ValueError("patch size, receptive field and stride must be ≥ 1")
    return math.ceil((patch_size + receptive_field - 1) / stride)


def window_masks(height: int, width: int, window: int) -> torch.Tensor:
    """Binary masks [P,X,Y] of every window position (window clipped to the map)."""
    wx, wy = min(window, height), min(window, width)
    masks = [torch.zeros(height, width).index_fill_(0, torch.arange(i, i + wx), 1)
             * torch.zeros(height, width).index_fill_(1, torch.arange(j, j + wy), 1)
             for i in range(height - wx + 1) for j in range(width - wy + 1)]
    return torch.stack(masks)


def robust_masking(local_logits: torch.Tensor, window: int,
                   threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked class evidence [N,C] and predictions [N] from local logits [N,X,Y,C]."""
    evidence = local_logits.clamp(min=0).double()
    masks = window_masks(evidence.shape[1], evidence.shape[2], window).double()
    window_sums = torch.einsum("nxyc,pxy->npc", evidence, masks)
    largest = window_sums.max(dim=1).values
    total = evidence.sum(dim=(1, 2))
    share = torch.where(total > 0, largest / total.clamp(min=1e-12), torch.zeros_like(total))
    masked = torch.where(share > threshold, total - largest, total)
    return masked, masked.argmax(dim=1)


def certify(local_logits: torch.Tensor, labels: torch.Tensor, window: int,
            threshold: float = 0.0) -> torch.Tensor:
    """Which images [N] are provably robust to any patch within one window position.

    Args:
        local_logits: [N,X,Y,C]; labels: true classes [N].
    """
    evidence = local_logits.clamp(min=0).double()
    count, height, width, _ = evidence.shape
    masks = window_masks(height, width, window).double()  # [P,X,Y]
    _, predictions = robust_masking(local_logits, window, threshold)
    total = evidence.sum(dim=(1, 2))  # [N,C]
    outside = total[:, None, :] - torch.einsum("nxyc,pxy->npc", evidence, masks)  # [N,P,C]
    true = evidence[torch.arange(count), :, :, labels]  # [N,X,Y]
    # Σ_{V∖P} u_y for every (patch window P, masking window V): [N,P,V]
    v_minus_p = torch.einsum("nxy,vxy->nv", true, masks)[:, None, :] - torch.einsum(
        "nxy,pxy,vxy->npv", true, masks, masks)
    lower = outside[torch.arange(count), :, labels] - v_minus_p.max(dim=2).values  # [N,P]
    upper = outside / (1 - threshold)
    upper[torch.arange(count), :, labels] = -math.inf
    wins = lower > upper.max(dim=2).values
    return (predictions == labels) & wins.all(dim=1)


@torch.no_grad()
def local_features(encoder: Encoder, images: torch.Tensor, config: PatchGuardConfig,
                   device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Normalised features [N,X,Y,D] of every r×r patch (stride s) of images [N,3,H,W]."""
    size = int(images.shape[-1])
    r, s = config.receptive_field, config.stride
    if r > size or images.shape[-2] != size:
        raise UserInputError(f"PatchGuard needs square images of at least the receptive "
                             f"field {r} px; got {tuple(images.shape[-2:])}")
    grid = (size - r) // s + 1
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_device_images(images[start:start + batch_size], device)
        patches = batch.unfold(2, r, s).unfold(3, r, s)  # [B,3,X,Y,r,r]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, r, r)
        if config.resize_patches and r != size:
            patches = F.interpolate(patches, size=(size, size), mode="bilinear",
                                    align_corners=False)
        features = encode(encoder, patches, device, precision="fp32", batch_size=256)
        chunks.append(features.view(batch.shape[0], grid, grid, -1))
    return torch.cat(chunks)


@dataclass
class PatchGuardResult:
    clean_accuracy_undefended: float
    clean_accuracy: float
    certified_accuracy: float
    asr: float | None
    asr_undefended: float | None
    window: int
    patch_size: int
    grid: int

    def summary(self) -> dict[str, object]:
        return dict(self.__dict__)


def local_logits(head: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The linear head at every location: features [N,X,Y,D] → logits [N,X,Y,C]."""
    with eval_mode(head), torch.no_grad():
        return head(features)


def evaluate_patchguard(encoder: Encoder, train_images: torch.Tensor,
                        train_labels: torch.Tensor, test_images: torch.Tensor,
                        test_labels: torch.Tensor, num_classes: int, config: PatchGuardConfig,
                        device: torch.device, *, trigger: Trigger | None = None,
                        target: int | None = None, seed: int = 0) -> PatchGuardResult:
    """Train the local classifier and report clean / certified accuracy and ASR.

    The local classifier is trained on every local feature with its image's label
    (BagNet's training objective, averaged logits ≈ per-location logits for a linear head).
    """
    patch = config.patch_size or (_trigger_side(trigger) if trigger is not None else None)
    if patch is None:
        raise UserInputError("PatchGuard needs a patch size (patch_size or a trigger)")
    train = local_features(encoder, train_images, config, device)
    grid = train.shape[1]
    head = train_probe(train.flatten(0, 2), train_labels.repeat_interleave(grid * grid),
                       num_classes, config.probe, seed)
    window = window_size(patch, config.receptive_field, config.stride)
    logits = local_logits(head, local_features(encoder, test_images, config, device)).cpu()
    _, defended = robust_masking(logits, window, config.threshold)
    undefended = logits.sum(dim=(1, 2)).argmax(dim=1)
    certified = certify(logits, test_labels, window, config.threshold)
    asr = asr_undefended = None
    if trigger is not None and target is not None:
        stamped = trigger.apply(to_device_images(test_images, torch.device("cpu")))
        triggered = local_logits(head, local_features(encoder, stamped, config, device)).cpu()
        _, attacked = robust_masking(triggered, window, config.threshold)
        asr = attack_success_rate(attacked, test_labels, target)
        asr_undefended = attack_success_rate(triggered.sum(dim=(1, 2)).argmax(dim=1),
                                             test_labels, target)
    return PatchGuardResult(accuracy(undefended, test_labels), accuracy(defended, test_labels),
                            float(certified.float().mean()), asr, asr_undefended, window, patch,
                            grid)


def _trigger_side(trigger: Trigger) -> int:
    """Side of the smallest square holding the trigger's mask."""
    rows = torch.nonzero(trigger.mask[0].sum(dim=1) > 0).flatten()
    cols = torch.nonzero(trigger.mask[0].sum(dim=0) > 0).flatten()
    if rows.numel() == 0:
        raise UserInputError("the trigger's mask is empty")
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0])) + 1
