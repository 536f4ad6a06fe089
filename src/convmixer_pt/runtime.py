"""Where code runs: the device, the autocast dtype, torchrun's process group with the few collectives the
trainer and validation need, and MindSpore, the optional framework.

Everything is passed around as a `DistEnv`; nothing here keeps module-level state. Under torchrun (RANK,
WORLD_SIZE, LOCAL_RANK set) a process group is always joined, even with one process, so a one-GPU torchrun
exercises NCCL and DDP; a plain `python scripts/train.py` runs without one.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import SettingError, UserError, brief

AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
MINDSPORE_PYTHONS = ((3, 10), (3, 12))  # the Python versions MindSpore 2.10 publishes wheels for
MINDCV_MIN = (0, 3, 0)  # the release whose scripts and registry `convmixer_pt.mindcv` is written against


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a scheduler's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def loader_workers(wanted: int = 4) -> int:
    """`wanted` loader workers, at most one per CPU this process may run on: more only make PyTorch's DataLoader
    warn ("suggested max number of worker ...") and compete for the same cores."""
    return max(0, min(wanted, usable_cores()))


def install_hint(extra: str) -> str:
    """How to add an extra: the package installs from a checkout or a wheel built from one, not from an index."""
    return (f'pip install ".[{extra}]" in a checkout of convmixer_pt, or '
            f'pip install "dist/convmixer_pt-<version>-py3-none-any.whl[{extra}]" after python -m build')


MINDSPORE_INSTALL = install_hint("mindspore")


class MissingDependencyError(UserError):
    """An optional dependency that a command needs is not installed."""


def require_mindspore(purpose: str) -> ModuleType:
    """MindSpore, imported; where it is not installed, a one-line error saying what needs it and how to get it.

    MindSpore is an extra: conversions never need it, only running the MindSpore model does.
    """
    try:
        import mindspore
    except ImportError:
        unsupported = sys.version_info[:2] > MINDSPORE_PYTHONS[1]
        where = " (MindSpore publishes wheels for Python {}.{} to {}.{} only)".format(
            *MINDSPORE_PYTHONS[0], *MINDSPORE_PYTHONS[1]) if unsupported else ""
        raise MissingDependencyError(f"{purpose} needs MindSpore, which is not installed here: "
                                     f"{MINDSPORE_INSTALL}{where}") from None
    return mindspore


def require_mindcv(purpose: str) -> ModuleType:
    """MindCV (and MindSpore), imported; where either is missing or MindCV is older than the release this package
    supports, a one-line error saying what needs it and how to get it."""
    require_mindspore(purpose)
    try:
        import mindcv
    except ImportError:
        raise MissingDependencyError(f"{purpose} needs MindCV, which is not installed here: "
                                     f"{MINDSPORE_INSTALL} (it brings MindSpore and MindCV)") from None
    version = getattr(mindcv, "__version__", "0")
    parts = tuple(int(p) if p.isdigit() else 0 for p in version.split(".")[:3])
    if parts < MINDCV_MIN:
        raise MissingDependencyError(f"{purpose} needs MindCV {'.'.join(map(str, MINDCV_MIN))} or newer, found "
                                     f"{version}: {MINDSPORE_INSTALL} --upgrade")
    return mindcv


def resolve_device(requested: str | None) -> str:
    """'cuda' or 'cpu' (or an indexed 'cuda:N' as given): 'auto' or None picks CUDA where PyTorch sees a GPU."""
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(requested).type
    except RuntimeError:
        raise UserError(f"device {requested!r} is not a device PyTorch knows (cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested} was asked for, but PyTorch sees no CUDA GPU here")
    return requested


def resolve_amp(requested: str, device: str) -> str:
    """bf16 by default on CUDA, none on CPU; fp16 only on CUDA (it needs a GradScaler)."""
    if requested == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "none"
    if requested not in AMP_DTYPES:
        raise UserError(f"amp {requested!r} is not one of auto, {', '.join(AMP_DTYPES)}")
    if requested == "fp16" and torch.device(device).type != "cuda":
        raise UserError("amp fp16 needs device cuda (use bf16 or none on CPU)")
    return requested


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast to `amp`'s dtype on `device`, or nothing for 'none'."""
    if AMP_DTYPES[amp] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    has_group: bool = False  # a process group is joined (the trainer then wraps the model in DDP)
    local_world_size: int = 1  # processes on this machine (they share its cores)

    @property
    def distributed(self) -> bool:
        """More than one process: results must be combined across processes."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _environ_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise SettingError(f"{name}={brief(text)} is not a whole number (torchrun sets it; unset it to run one "
                           "process)") from None
    if value < minimum:
        raise SettingError(f"{name}={value} is below {minimum} (torchrun sets it; unset it to run one process)")
    return value


def process_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's RANK, WORLD_SIZE and LOCAL_RANK (0, 1, 0 without them);
    a value set by hand that no launcher would set is a SettingError naming the variable."""
    rank = _environ_int("RANK", 0, 0)
    world_size = _environ_int("WORLD_SIZE", 1, 1)
    local_rank = _environ_int("LOCAL_RANK", 0, 0)
    if rank >= world_size:
        raise SettingError(f"RANK={rank} is not below WORLD_SIZE={world_size} (torchrun sets both; unset them to "
                           "run one process)")
    return rank, world_size, local_rank


def init_distributed(device: str) -> DistEnv:
    """Join torchrun's process group: NCCL on CUDA, gloo on CPU. `device` is 'cpu' or 'cuda'."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size, local_rank = process_ranks()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if under_torchrun and not dist.is_initialized():
        # `device_id` binds NCCL's communicator to this GPU eagerly (and silences its warning).
        extra = dict(device_id=dev) if device == "cuda" else {}
        store, _, _ = next(dist.rendezvous("env://"))
        # torchrun keeps one store across restarts of its workers, so a restarted worker may read the
        # addresses a dead attempt published and fail to connect; each attempt gets its own key prefix.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size,
                                store=dist.PrefixStore(f"convmixer_pt/attempt_{attempt}", store), **extra)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev,
                   has_group=under_torchrun, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


class ProcessLost(UserError):
    """Another process of the run ended (its own message, or torchrun's, says why), so this one cannot go on."""


@contextlib.contextmanager
def peer_loss_as_error(env: DistEnv) -> Iterator[None]:
    """Around work with collectives: one that fails because a peer process is gone (gloo says "Connection
    closed by peer"; the peer said why, or torchrun did) becomes one line instead of the backend's traceback."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not env.distributed or not any(cause in text for cause in PEER_GONE):
            raise
        detail = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0]).split(". ")[0][:120]
        raise ProcessLost(f"process {env.rank}: another process of this run ended, so this one cannot go on "
                          f"({detail})") from None


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


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
