"""torch.distributed glue for `vse-train` under torchrun (one or many nodes): the process group, each
rank's share of a global batch, embeddings all-gathered *with gradients* so the hinge loss ranks every
pair of the global batch, and BatchNorm statistics over the global batch.

Gradient bookkeeping: every rank computes the same global loss from the gathered embeddings; the
gather's backward sums the gradient of each rank's embeddings over all ranks (world_size times the
gradient of that loss), and DistributedDataParallel averages parameter gradients over ranks, so the
update equals one process's update on the concatenated batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (the autograd-aware collectives: dist.nn.functional)
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Context:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on CUDA, gloo on CPU.
    Without torchrun (no WORLD_SIZE, or 1) it is a no-op single-process context on `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def gather(x, ctx: Context):
    """Concatenates a tensor (or each tensor of a tuple) over ranks along dim 0, in rank order.
    Floating tensors keep their gradient path back to the rank that produced them."""
    if not ctx.enabled:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(gather(part, ctx) for part in x)
    if x.is_floating_point() and x.requires_grad:
        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(dist.nn.functional.all_gather(x))
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch: per-channel sums are all-reduced with
    autograd, so gradients match one process on the concatenated batch. Unlike nn.SyncBatchNorm it
    also runs on CPU (gloo). Evaluation uses the running statistics, as BatchNorm1d does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels_last = x.movedim(1, -1).reshape(-1, x.size(1)).float()
        stats = torch.stack([channels_last.sum(0), (channels_last * channels_last).sum(0),
                             torch.full_like(channels_last[0], channels_last.size(0))])
        with warnings.catch_warnings():  # see gather()
            warnings.simplefilter("ignore", FutureWarning)
            total, square_total, count = dist.nn.functional.all_reduce(stats)
        mean = total / count
        var = square_total / count - mean * mean
        with torch.no_grad():
            n = count[0]
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var.detach() * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x - mean.view(shape).to(x.dtype)) * torch.rsqrt(var.view(shape) + self.eps).to(x.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every nn.BatchNorm1d in `module` (in place) by a GlobalBatchNorm1d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, GlobalBatchNorm1d):
            if child.momentum is None:
                raise ValueError(f"{name}: BatchNorm1d(momentum=None) (cumulative averages) is not supported")
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats).to(child.running_mean.device)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child)
    return module
