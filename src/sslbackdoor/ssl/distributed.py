"""Data-parallel pre-training under `torchrun`: process group, global BatchNorm, gathers.

Equivalence with one process on the global batch (what `tests/ssl` checks):
* each process takes a contiguous slice of every global batch and the same slice of the
  views' random parameters, so the processes together see exactly the single-process views;
* NT-Xent negatives are the projections of all processes (`gather_rows`, differentiable);
  each process averages the loss over its own anchor rows, so that DDP's gradient average
  over processes equals the gradient of the single-process loss;
* BatchNorm statistics are global: on CUDA torch's SyncBatchNorm, on CPU (where torch's
  SyncBatchNorm is unavailable) `GlobalBatchNorm`, which sums per-channel moments over
  processes with a differentiable all_reduce. Both give the single-process batch statistics
  and running averages.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from sslbackdoor.engine import resolve_device
from sslbackdoor.errors import UserInputError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run: rank r of world_size (1 and 0 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group set up by `torchrun` (gloo on CPU, nccl on CUDA), or not."""
    if not launched_by_torchrun():
        return DistContext(), resolve_device(device_name)
    context = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                          int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name)
    if device.type == "cuda":
        if context.local_rank >= torch.cuda.device_count():
            raise UserInputError(f"LOCAL_RANK {context.local_rank} but only "
                                 f"{torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return context, device


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_slice(global_size: int, context: DistContext) -> slice:
    """This process's contiguous share of a global batch of `global_size` items."""
    if global_size % context.world_size:
        raise UserInputError(f"batch size {global_size} is not divisible by the "
                             f"{context.world_size} processes; pick a multiple")
    share = global_size // context.world_size
    return slice(context.rank * share, (context.rank + 1) * share)


def gather_rows(tensor: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Concatenate [n,D] from every process in rank order → [n·W,D]; gradients flow back
    to each process's own rows (summed over the processes that used them)."""
    if not context.enabled:
        return tensor
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private functional-collectives API; still the public,
        # documented differentiable all_gather, whose backward sums over processes.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(tensor.contiguous()), dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over processes (the identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return cast(torch.Tensor, all_reduce(tensor, op=dist.ReduceOp.SUM))


def mean_over_processes(value: float, context: DistContext,
                        device: torch.device | None = None) -> float:
    """Average a number over processes (on `device`: NCCL reduces only CUDA tensors)."""
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / context.world_size


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span every process (CPU/gloo-capable).

    Inputs [B,C] or [B,C,H,W]. In eval mode, or outside a process group, it is plain
    BatchNorm. Statistics are float32, two-pass like torch's BatchNorm: one all_reduce of
    (count, Σx) gives the mean, a second of Σ(x−mean)² the biased variance.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"GlobalBatchNorm expects [B,C] or [B,C,H,W], got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0] if input.dim() == 2 else [0, 2, 3]
        x = input.float()
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / channels], device=x.device)
        sums = all_reduce_sum(torch.cat([count, x.sum(dims)]))
        total = sums[0]
        mean = sums[1:] / total
        centered = x - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims)) / total
        self._update_running_stats(mean.detach(), var.detach(), float(total))
        out = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, total: float) -> None:
        if not self.track_running_stats or self.running_mean is None or self.running_var is None:
            return
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                    else self.momentum)
        unbiased = var * total / max(total - 1.0, 1.0)
        self.running_mean.mul_(1 - momentum).add_(momentum * mean)
        self.running_var.mul_(1 - momentum).add_(momentum * unbiased)


def convert_global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Swap every BatchNorm for a cross-process one (SyncBatchNorm on CUDA), same state."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _swap_batchnorm(module)


def _swap_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        swapped = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                                  module.affine, module.track_running_stats)
        swapped.load_state_dict(module.state_dict())
        return swapped.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child))
    return module
