"""What makes a run resumable: every process's RNG state, where the run stands, and the checkpoint schema.

Reproducibility: the sampler's order derives from (seed, epoch) and each sample's augmentation from (seed,
epoch, its place in the epoch) (`data.Seeded`), whatever worker decodes it; the training process's global RNGs
(Python, NumPy for Mixup, torch) are saved per process in `last.pth` and restored on resume. So a run stopped
at any step, at an epoch's end or within one, and resumed ends with the weights of an uninterrupted run, bit for
bit on CPU.
"""

from __future__ import annotations

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
from .config import TrainConfig, to_dict
from .parts import Parts

CHECKPOINT_VERSION = 1
RUN_FILES = ("last.pth", "best.pth", "summary.csv", "summary.png")  # what makes a folder hold a run


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


def recorded_epoch(path: Path) -> int | None:
    """The epoch a checkpoint of this trainer says it holds; None where there is no readable one."""
    if not path.is_file():
        return None
    try:
        obj, _ = read_torch_checkpoint(path)
    except CheckpointError:
        return None
    return obj.get("epoch") if isinstance(obj, dict) else None


def resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = Path(cfg.output) / "last.pth"
        return last if last.is_file() else None
    return Path(cfg.resume)


def load_training_checkpoint(path: Path, parts: Parts, env: DistEnv, cfg: TrainConfig) -> Progress:
    """Restore weights, optimizer, scaler, EMA and this process's RNGs; returns where the run stood."""
    obj, _ = read_torch_checkpoint(path)
    needed = ("model", "optimizer", "epoch", "step", "rng", "history")
    if not isinstance(obj, dict) or any(k not in obj for k in needed):
        raise CheckpointError(f"{path}: not a last.pth of this trainer (it lacks "
                              f"{', '.join(k for k in needed if not isinstance(obj, dict) or k not in obj)}); "
                              "use --finetune to start from its weights")
    with about(path):
        check_weights(obj["model"])
        load_state_dict_strict(parts.model, strip_prefixes(obj["model"]))
    try:
        parts.optimizer.load_state_dict(obj["optimizer"])
    except ValueError as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model ({e})") from None
    if obj.get("scaler") and parts.scaler.is_enabled():
        parts.scaler.load_state_dict(obj["scaler"])
    if parts.ema is not None:
        if "model_ema" not in obj:
            raise CheckpointError(f"{path}: has no EMA weights, but ema is on in this config")
        with about(f"{path} (model_ema)"):
            check_weights(obj["model_ema"])
            load_state_dict_strict(parts.ema.module, obj["model_ema"])
    if len(obj["rng"]) == env.world_size:
        restore_rng(obj["rng"][env.rank], env.device)
        mine = obj.get("processes", [{}] * env.world_size)[env.rank]
        if "buffers" in mine:
            _restore_buffers(parts.model, mine["buffers"])
        if parts.ema is not None and "ema_buffers" in mine:
            _restore_buffers(parts.ema.module, mine["ema_buffers"])
    else:
        seed_globals(derive_seed(cfg.seed, env.rank, obj["epoch"]))
        if env.is_main:
            print(f"note: {path} was written by {len(obj['rng'])} process(es), this run has {env.world_size}; "
                  "the weights continue exactly; Mixup's random stream and each process's BatchNorm statistics "
                  "between their epoch-end averages do not", file=sys.stderr)
    return Progress(epoch=obj["epoch"], step=obj["step"], batch=obj.get("batch", 0),
                    epoch_loss=obj.get("epoch_loss", 0.0), best_score=obj.get("best_score", -1.0),
                    best_epoch=obj.get("best_epoch", 0), history=list(obj["history"]))
