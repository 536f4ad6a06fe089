"""Process-group setup from torchrun's environment and the few collectives the trainer needs.

Everything is passed around as a `DistEnv`; nothing here keeps module-level state. Under torchrun (RANK,
WORLD_SIZE, LOCAL_RANK set) a process group is always joined, even with one process, so a one-GPU torchrun
exercises NCCL and DDP; a plain `python scripts/train.py` runs without one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    has_group: bool = False  # a process group is joined (the trainer then wraps the model in DDP)

    @property
    def distributed(self) -> bool:
        """More than one process: results must be combined across processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistEnv:
    """Join torchrun's process group: NCCL on CUDA, gloo on CPU. `device` is 'cpu' or 'cuda'."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if under_torchrun and not dist.is_initialized():
        # `device_id` binds NCCL's communicator to this GPU eagerly (and silences its warning).
        extra = dict(device_id=dev) if device == "cuda" else {}
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", **extra)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev,
                   has_group=under_torchrun)


def shutdown(env: DistEnv) -> None:
    if env.has_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum over processes, in place; a no-op for one process."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's `obj`, in rank order (pickled through the process group)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def average_bn_stats(model: nn.Module, env: DistEnv) -> None:
    """Replace every BatchNorm's running mean/var by the mean over processes, as the official runs did."""
    if not env.distributed:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var):
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(env.world_size)
