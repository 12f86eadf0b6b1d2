"""MoCo v2 (Chen et al. 2020), as CorruptEncoder pre-trains its encoders.

* `moco_loss`: InfoNCE of queries against their keys (positives) and a queue (negatives).
* `momentum_update` / `momentum_copy`: the key network as an EMA of the online network.
* `KeyQueue`: the fixed-size first-in first-out queue of earlier keys, a module whose
  buffers (keys, position) are saved and restored with the rest of the training state.
* `MoCoModel`: online network (encoder + MoCo v2's 2-layer MLP head Linear-ReLU-Linear,
  no BatchNorm), key network and queue in one module; `keys` emulates MoCo's shuffled
  BatchNorm on one process.

CorruptEncoder's setting: τ 0.2, queue 65,536, momentum 0.999, SGD lr 0.06 with a cosine
schedule, 2-layer MLP head. The training loop is `ssl.pretrain.ContrastiveTrainer`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sslbackdoor.models.encoders import Encoder
from sslbackdoor.ssl.simclr import SimCLRModel, projection_head


def moco_loss(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor,
              temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE: each query's positive is its key; the queue's rows are negatives.

    Args:
        queries: [N,D] projections of view 1 by the online encoder.
        keys: [N,D] projections of view 2 by the momentum encoder (no gradient).
        queue: [K,D] earlier keys.
    Returns:
        scalar: mean over i of −log(exp(q_i·k_i/τ) / (exp(q_i·k_i/τ) + Σ_j exp(q_i·n_j/τ))),
        with q, k, n L2-normalised.
    """
    q = F.normalize(queries.float(), dim=1)
    k = F.normalize(keys.float(), dim=1).detach()
    negatives = F.normalize(queue.float(), dim=1).detach()
    positive = (q * k).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, q @ negatives.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float = 0.999) -> None:
    """target ← m·target + (1−m)·online for parameters; buffers are copied."""
    for source, target_parameter in zip(online.parameters(), target.parameters(), strict=True):
        target_parameter.mul_(momentum).add_(source.detach(), alpha=1 - momentum)
    for buffer, target_buffer in zip(online.buffers(), target.buffers(), strict=True):
        target_buffer.copy_(buffer)


def momentum_copy(online: nn.Module) -> nn.Module:
    """The key encoder: a frozen copy of the online encoder."""
    target = copy.deepcopy(online)
    for parameter in target.parameters():
        parameter.requires_grad_(False)
    return target


class KeyQueue(nn.Module):
    """A first-in first-out queue of K keys, initialised with random unit vectors.

    Buffers (saved in the state dict): `keys` float32 [K,D] (L2-normalised rows) and
    `position` int64 [] — the row the next key goes to; `pointer` is it as an int.
    """

    keys: torch.Tensor
    position: torch.Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator),
                                                 dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    @property
    def pointer(self) -> int:
        return int(self.position)

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries by keys [N,D] (N ≤ K), wrapping around."""
        keys = F.normalize(keys.detach().float(), dim=1).to(self.keys.device)
        size = self.size
        if keys.shape[0] > size:
            raise ValueError(f"cannot enqueue {keys.shape[0]} keys into a queue of {size}")
        index = (self.position + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys[index] = keys
        self.position.copy_((self.position + keys.shape[0]) % size)


def unshuffle(shuffled: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Undo `x[order]`: rows [N,...] in shuffled order → rows in the original order."""
    out = torch.empty_like(shuffled)
    out[order.to(shuffled.device)] = shuffled
    return out


class MoCoModel(nn.Module):
    """MoCo v2: online network, momentum key network and key queue in one module.

    `online` is a `SimCLRModel` whose head is replaced by MoCo v2's (Linear-ReLU-Linear,
    same sizes, no BatchNorm; `head_batch_norm=True` keeps SimCLR's); `key_network` its
    frozen momentum copy; `queue` a `KeyQueue` [queue_size, out_dim].
    `forward(images [B,3,H,W] in [0,1])` → online projections [B,out_dim];
    `encoder` is the online encoder (what pre-training produces).
    """

    def __init__(self, online: SimCLRModel, queue_size: int = 65536,
                 generator: torch.Generator | None = None, head_batch_norm: bool = False) -> None:
        super().__init__()
        if not head_batch_norm and any(isinstance(m, nn.BatchNorm1d) for m in online.head.modules()):
            linears = [m for m in online.head.modules() if isinstance(m, nn.Linear)]
            online.head = projection_head(linears[0].in_features, linears[0].out_features,
                                          linears[-1].out_features, batch_norm=False)
        self.online = online
        self.key_network = momentum_copy(online)
        out_dim = [m for m in online.head.modules() if isinstance(m, nn.Linear)][-1].out_features
        self.queue = KeyQueue(queue_size, out_dim, generator)

    @property
    def encoder(self) -> Encoder:
        return self.online.encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.online(images)

    @torch.no_grad()
    def key_projections(self, images: torch.Tensor, splits: int) -> torch.Tensor:
        """Key network on images [B,3,H,W] cut into `splits` equal consecutive chunks, each
        run separately (its own BatchNorm batch statistics) → float [B,out_dim]."""
        if splits < 1 or images.shape[0] % splits:
            raise ValueError(f"cannot split a batch of {images.shape[0]} into {splits} "
                             f"equal BatchNorm chunks")
        return torch.cat([self.key_network(chunk).float()
                          for chunk in images.chunk(splits)])

    @torch.no_grad()
    def keys(self, images: torch.Tensor, bn_splits: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Key projections of images [B,3,H,W] → float [B,out_dim], without gradient.

        Shuffled BatchNorm on one process: the batch is permuted with `generator` (a CPU
        generator), cut into `bn_splits` chunks of B/bn_splits that each get their own
        BatchNorm statistics (as the per-GPU batches of MoCo's multi-GPU shuffle), and
        the keys are put back into the input order.
        """
        order = torch.randperm(images.shape[0], generator=generator)
        shuffled = self.key_projections(images[order.to(images.device)], bn_splits)
        return unshuffle(shuffled, order)

    @torch.no_grad()
    def update_key_network(self, momentum: float) -> None:
        """key ← m·key + (1−m)·online (parameters); BatchNorm buffers copied."""
        momentum_update(self.online, self.key_network, momentum)
