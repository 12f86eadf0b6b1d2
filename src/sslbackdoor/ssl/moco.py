"""MoCo v2 (Chen et al. 2020), as CorruptEncoder pre-trains its encoders.

Pure pieces: the InfoNCE loss against a queue of negatives, the momentum (EMA) update of
the key encoder, and the fixed-size key queue. CorruptEncoder's setting: τ 0.2, queue
65,536, momentum 0.999, SGD lr 0.06 with a cosine schedule, 2-layer MLP head.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


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


class KeyQueue:
    """A first-in first-out queue of K keys [K,D], initialised with random unit vectors."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.pointer = 0

    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries by keys [N,D] (N ≤ K), wrapping around."""
        keys = F.normalize(keys.detach().float(), dim=1).to(self.keys.device)
        size = self.keys.shape[0]
        if keys.shape[0] > size:
            raise ValueError(f"cannot enqueue {keys.shape[0]} keys into a queue of {size}")
        index = (self.pointer + torch.arange(keys.shape[0])) % size
        self.keys[index] = keys
        self.pointer = int((self.pointer + keys.shape[0]) % size)
