"""What makes a run resumable: every process's RNG state, where the run stands, and the checkpoint schema.

Reproducibility: the sampler's order derives from (seed, epoch) and each sample's augmentation from (seed,
epoch, its place in the epoch) (`data.Seeded`), whatever worker decodes it; the training process's global RNGs
(Python, NumPy for Mixup, torch) are saved per process in `last.pth` and restored on resume. So a run stopped
at any step, at an epoch's end or within one, and resumed ends with the weights of an uninterrupted run, bit for
bit on CPU.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import derive_seed
from ..errors import CheckpointError, about
from ..runtime import DistEnv
from ..weights.torch_io import check_weights, load_state_dict_strict, read_torch_checkpoint, strip_prefixes
from .config import RESUME_MAY_CHANGE, ConfigError, TrainConfig, to_dict
from .parts import Parts
from .report import SUMMARY_COLUMNS

CHECKPOINT_VERSION = 1


def seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's global RNG states as tensors and plain lists (loadable with weights_only=True)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=[version, list(words), gauss],
                 numpy=[kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
                 torch=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class Progress:
    """What a checkpoint carries besides weights and optimizer: where the run is and how it went."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch: int = 0  # optimizer steps completed in the epoch under way (0 at an epoch's end)
    epoch_loss: float = 0.0  # the sum of those steps' mean losses (the epoch's train_loss, once divided)
    best_score: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def place(epoch: int, batch: int, steps: int) -> str:
    """Where a run stands, in the words of every message about it: `epoch N, step S of T` within an epoch (N
    counted from 1, S steps of it done), `the end of epoch N` between epochs."""
    if batch:
        return f"epoch {epoch + 1}, step {batch} of {steps}"
    return f"the end of epoch {epoch}" if epoch else "the start"


def process_state(parts: Parts, device: torch.device) -> dict[str, Any]:
    """What differs between processes and must come back to each: its generators, and its BatchNorm running
    statistics (and the EMA's), which stay per process between the epoch-end averages (or for good without
    bn_average). On the CPU, as plain data."""
    state = dict(rng=capture_rng(device), buffers=_buffers(parts.model))
    if parts.ema is not None:
        state["ema_buffers"] = _buffers(parts.ema.module)
    return state


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().cpu().clone() for name, b in module.named_buffers()}


def _restore_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(saved[name])


def training_checkpoint(parts: Parts, progress: Progress, cfg: TrainConfig, processes: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    """`last.pth`: everything a resumed run needs, as plain data (loadable with weights_only=True);
    `processes` is every process's `process_state`, in rank order (their generators under `rng`, the rest
    under `processes`)."""
    state: dict[str, Any] = dict(
        model=parts.model.state_dict(), optimizer=parts.optimizer.state_dict(),
        scaler=parts.scaler.state_dict(), epoch=progress.epoch, step=progress.step, batch=progress.batch,
        epoch_loss=progress.epoch_loss, best_score=progress.best_score, best_epoch=progress.best_epoch,
        history=progress.history, rng=[p["rng"] for p in processes],
        processes=[{k: v for k, v in p.items() if k != "rng"} for p in processes], config=to_dict(cfg),
        arch=parts.model.arch, version=CHECKPOINT_VERSION)
    if parts.ema is not None:
        state["model_ema"] = parts.ema.module.state_dict()
    return state


def best_checkpoint(parts: Parts, progress: Progress, cfg: TrainConfig) -> dict[str, Any]:
    """`best.pth`: weights only (plus how they scored), for evaluation and conversion, not resuming."""
    state: dict[str, Any] = dict(model=parts.model.state_dict(), epoch=progress.epoch,
                                 metric=progress.best_score, config=to_dict(cfg), arch=parts.model.arch,
                                 version=CHECKPOINT_VERSION)
    if parts.ema is not None:
        state["model_ema"] = parts.ema.module.state_dict()
    return state


def recorded_place(path: Path) -> tuple[int, int] | None:
    """(epoch, batch): where a checkpoint of this trainer says it was written (best.pth: at an epoch's end); None
    where there is no readable one."""
    if not path.is_file():
        return None
    try:
        obj, _ = read_torch_checkpoint(path)
    except CheckpointError:
        return None
    if not isinstance(obj, dict) or not _whole(obj.get("epoch")) or not _whole(obj.get("batch", 0)):
        return None
    return obj["epoch"], obj.get("batch", 0)


def resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = Path(cfg.output) / "last.pth"
        return last if last.is_file() else None
    return Path(cfg.resume)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _bad(path: Path, field: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: its {field} {problem}; not a last.pth this trainer can continue")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_same_run(obj: dict[str, Any], path: Path, cfg: TrainConfig, env: DistEnv) -> None:
    """A resumed run computes what the run it continues computed: its config may differ only in
    `RESUME_MAY_CHANGE`, and its global batch not at all (a different one would place the remaining samples of
    the epoch elsewhere)."""
    saved = obj.get("config")
    if not isinstance(saved, dict):
        raise _bad(path, "config", f"is {_short(saved)}, not the run's settings")
    new = to_dict(cfg)
    for key, value in new.items():
        if key in RESUME_MAY_CHANGE or key not in saved or saved[key] == value:
            continue
        raise ConfigError(f"{path}: the run was started with {key} {_short(saved[key])}, and this command gives "
                          f"{_short(value)}; a resumed run keeps its settings ({Path(cfg.output) / 'args.yaml'}): "
                          "drop the change, or start a new run in another --output")
    batch, accum, processes = saved.get("batch_size"), saved.get("grad_accum"), len(obj["rng"])
    if not (_whole(batch) and _whole(accum) and batch > 0 and accum > 0):
        raise _bad(path, "config", f"has batch_size {_short(batch)} and grad_accum {_short(accum)}")
    old, now = batch * accum * processes, cfg.batch_size * cfg.grad_accum * env.world_size
    if old != now:
        raise ConfigError(f"{path}: the run's global batch is {old} ({batch} x {accum} accum x {processes} "
                          f"process(es)), this command's {now} ({cfg.batch_size} x {cfg.grad_accum} accum x "
                          f"{env.world_size}); resume with a global batch of {old}, so that no sample is skipped or "
                          "seen twice")


def _progress(obj: dict[str, Any], path: Path, cfg: TrainConfig) -> Progress:
    """Where the run stood, each field checked against what this trainer writes."""
    epoch, step, batch = obj["epoch"], obj["step"], obj.get("batch", 0)
    if not _whole(epoch) or not 0 <= epoch <= cfg.epochs:
        raise _bad(path, "epoch", f"is {_short(epoch)}, not a count of completed epochs of the run's {cfg.epochs}")
    if not _whole(batch) or batch < 0 or (batch and epoch == cfg.epochs):
        raise _bad(path, "batch", f"is {_short(batch)}, not a place within epoch {epoch + 1} of {cfg.epochs}")
    if not _whole(step) or step < batch:
        raise _bad(path, "step", f"is {_short(step)}, not a count of optimizer steps")
    epoch_loss, best_score = obj.get("epoch_loss", 0.0), obj.get("best_score", -1.0)
    best_epoch = obj.get("best_epoch", 0)
    if not _number(epoch_loss):
        raise _bad(path, "epoch_loss", f"is {_short(epoch_loss)}, not a finite number")
    if not _number(best_score):
        raise _bad(path, "best_score", f"is {_short(best_score)}, not a finite number")
    if not _whole(best_epoch) or not 0 <= best_epoch <= epoch:
        raise _bad(path, "best_epoch", f"is {_short(best_epoch)}, not one of the {epoch} completed epochs")
    history = obj["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise _bad(path, "history", f"is not a list of {epoch} epoch rows")
    for number, row in enumerate(history, 1):
        if not isinstance(row, dict) or row.get("epoch") != number or \
                not all(_number(row.get(column)) for column in SUMMARY_COLUMNS) or \
                not all(isinstance(k, str) and _number(v) for k, v in row.items()):
            raise _bad(path, "history", f"row {number} is not a summary row of epoch {number}")
    return Progress(epoch=epoch, step=step, batch=batch, epoch_loss=float(epoch_loss), best_score=float(best_score),
                    best_epoch=best_epoch, history=[dict(row) for row in history])


def check_place(progress: Progress, steps: int, path: Path) -> None:
    """A place within an epoch must be one of the epoch's steps (the global batch is checked to be the same, so
    the count of steps is too, unless the training set changed)."""
    if progress.batch >= steps:
        raise CheckpointError(f"{path}: was written at {place(progress.epoch, progress.batch, steps)}, but an epoch "
                              f"of this training set has {steps} steps; resume with the run's data")


def _rng_problem(state: Any) -> str | None:
    """Why `state` is not a `capture_rng` state: loaded into throwaway generators, not the process's."""
    if not isinstance(state, dict) or not {"python", "numpy", "torch"} <= state.keys():
        return "is not a dict of python, numpy and torch generator states"
    try:
        version, words, gauss = state["python"]
        random.Random().setstate((version, tuple(words), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        if not isinstance(keys, torch.Tensor) or keys.shape != (624,):
            return "numpy is not 624 words"
        np.random.RandomState().set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        for name in ("torch", "cuda"):
            if name in state:
                if not isinstance(state[name], torch.Tensor):
                    return f"{name} is not a tensor"
                if name == "torch":
                    torch.Generator().set_state(state[name])
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        return f"is not a generator state ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return None


def _buffers_problem(module: nn.Module, saved: Any) -> str | None:
    if not isinstance(saved, dict):
        return "is not a dict of tensors"
    own = dict(module.named_buffers())
    if saved.keys() != own.keys():
        missing = sorted(own.keys() - saved.keys()) + sorted(saved.keys() - own.keys())
        return f"does not have this model's buffers ({_short(missing[0])} differs)"
    for name, buffer in own.items():
        value = saved[name]
        if not isinstance(value, torch.Tensor) or value.shape != buffer.shape or value.dtype != buffer.dtype:
            return f"{name} is not a {tuple(buffer.shape)} {str(buffer.dtype).removeprefix('torch.')} tensor"
    return None


def _check_processes(obj: dict[str, Any], path: Path, parts: Parts) -> None:
    """Every process's generators and buffers, on every process: one that cannot continue stops them all."""
    rng = obj["rng"]
    for rank, state in enumerate(rng):
        problem = _rng_problem(state)
        if problem:
            raise _bad(path, f"rng of process {rank}", problem)
    if "processes" not in obj:
        return
    processes = obj["processes"]
    if not isinstance(processes, list) or len(processes) != len(rng):
        raise _bad(path, "processes", f"is not a list of {len(rng)} process states (one per rng)")
    for rank, mine in enumerate(processes):
        if not isinstance(mine, dict):
            raise _bad(path, f"processes[{rank}]", "is not a dict")
        for key, module in (("buffers", parts.model), ("ema_buffers", parts.ema.module if parts.ema else None)):
            if key in mine and module is not None:
                problem = _buffers_problem(module, mine[key])
                if problem:
                    raise _bad(path, f"processes[{rank}] {key}", problem)


def _load_optimizer(obj: dict[str, Any], path: Path, parts: Parts) -> None:
    state = obj["optimizer"]
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or \
            not isinstance(state.get("param_groups"), list):
        raise _bad(path, "optimizer", "is not an optimizer state (state and param_groups)")
    try:
        parts.optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model ({str(e)[:120]})") from None
    for group in parts.optimizer.param_groups:
        for param in group["params"]:
            for name, value in parts.optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor) or (value.dim() > 0 and value.shape != param.shape):
                    raise CheckpointError(f"{path}: its optimizer state does not fit this model ({name} of a "
                                          f"{tuple(param.shape)} parameter is {_short(value)[:40]})")


def load_training_checkpoint(path: Path, parts: Parts, env: DistEnv, cfg: TrainConfig) -> Progress:
    """Restore weights, optimizer, scaler, EMA and this process's RNGs; returns where the run stood. Every field
    is checked before it is used: a file that is not one of this trainer's last.pth is one line naming it."""
    obj, _ = read_torch_checkpoint(path)
    needed = ("model", "optimizer", "epoch", "step", "rng", "history")
    if not isinstance(obj, dict) or any(k not in obj for k in needed):
        raise CheckpointError(f"{path}: not a last.pth of this trainer (it lacks "
                              f"{', '.join(k for k in needed if not isinstance(obj, dict) or k not in obj)}); "
                              "use --finetune to start from its weights")
    if obj.get("version", CHECKPOINT_VERSION) != CHECKPOINT_VERSION:
        raise _bad(path, "version", f"is {_short(obj['version'])}, this trainer writes {CHECKPOINT_VERSION}")
    if not isinstance(obj["rng"], list) or not obj["rng"]:
        raise _bad(path, "rng", "is not a list of each process's generator states")
    check_same_run(obj, path, cfg, env)
    _check_processes(obj, path, parts)
    progress = _progress(obj, path, cfg)
    for key in ("model", "model_ema"):
        if key in obj and not (isinstance(obj[key], dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                                  for k, v in obj[key].items())):
            raise _bad(path, key, "is not a dict of named tensors")
    with about(path):
        check_weights(obj["model"])
        load_state_dict_strict(parts.model, strip_prefixes(obj["model"]))
    _load_optimizer(obj, path, parts)
    scaler = obj.get("scaler")
    if scaler and parts.scaler.is_enabled():
        if not isinstance(scaler, dict):
            raise _bad(path, "scaler", "is not a loss scaler state")
        try:
            parts.scaler.load_state_dict(scaler)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise _bad(path, "scaler", f"is not a loss scaler state ({str(e)[:80]})") from None
    if parts.ema is not None:
        if "model_ema" not in obj:
            raise CheckpointError(f"{path}: has no EMA weights, but ema is on in this config")
        with about(f"{path} (model_ema)"):
            check_weights(obj["model_ema"])
            load_state_dict_strict(parts.ema.module, obj["model_ema"])
    if len(obj["rng"]) == env.world_size:
        restore_rng(obj["rng"][env.rank], env.device)
        mine = obj["processes"][env.rank] if "processes" in obj else {}
        if "buffers" in mine:
            _restore_buffers(parts.model, mine["buffers"])
        if parts.ema is not None and "ema_buffers" in mine:
            _restore_buffers(parts.ema.module, mine["ema_buffers"])
    else:
        seed_globals(derive_seed(cfg.seed, env.rank, progress.epoch))
        if env.is_main:
            print(f"note: {path} was written by {len(obj['rng'])} process(es), this run has {env.world_size}; "
                  "the weights continue exactly; Mixup's random stream and each process's BatchNorm statistics "
                  "between their epoch-end averages do not", file=sys.stderr)
    return progress
