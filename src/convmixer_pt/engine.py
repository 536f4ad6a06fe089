"""The training engine: the official recipe, DDP/AMP, per-epoch evaluation and exactly resumable checkpoints.

Reproducibility: the sampler and the worker seeds derive from (seed, epoch, rank); the global RNGs (Python,
NumPy for Mixup, torch) are saved per process in `last.pth` and restored on resume, so a run stopped after
epoch k and resumed ends with the weights of an uninterrupted run, bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, save_yaml, to_dict
from .data import build_datasets, build_loaders, derive_seed
from .distributed import DistEnv, all_gather_objects, all_reduce_sum, average_bn_stats, barrier
from .model import ConvMixer, create_model
from .schedule import lr_at_step, set_lr

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SUMMARY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "epoch_time"]
EMA_COLUMNS = ["ema_val_loss", "ema_val_top1", "ema_val_top5"]
CHECKPOINT_VERSION = 1


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message says which checkpoint is the last good one."""


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but PyTorch sees no CUDA GPU")
    return requested


def resolve_amp(requested: str, device: str) -> str:
    """bf16 by default on CUDA, none on CPU; fp16 only on CUDA (it needs a GradScaler)."""
    if requested == "auto":
        return "bf16" if device == "cuda" else "none"
    if requested == "fp16" and device != "cuda":
        raise ConfigError("amp fp16 needs device cuda (use bf16 or none on CPU)")
    return requested


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.stop_epoch is not None and not 1 <= cfg.stop_epoch <= cfg.epochs:
        raise ConfigError(f"stop_epoch must be between 1 and epochs ({cfg.epochs}), got {cfg.stop_epoch}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError(f"batch_size and grad_accum must be positive, got {cfg.batch_size} and {cfg.grad_accum}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")


def build_model(cfg: TrainConfig, num_classes: int) -> ConvMixer:
    try:
        model = create_model(cfg.model, num_classes=num_classes, **cfg.model_args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.finetune:
        ckpt.load_model_weights(model, cfg.finetune)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: never on biases, BatchNorm or other 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


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
    best_score: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Parts:
    """The objects of one run. `forward` is what trains (DDP and/or compiled); `model` the bare module."""

    model: ConvMixer
    forward: nn.Module
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None
    mixup: Mixup | None
    loss_fn: nn.Module


def train_one_epoch(parts: Parts, loader: torch.utils.data.DataLoader, steps: int, epoch: int,
                    progress: Progress, cfg: TrainConfig, env: DistEnv, amp: str, last_path: Path
                    ) -> dict[str, float]:
    """One epoch of `steps` optimizer steps; the learning rate is set before every step."""
    parts.forward.train()
    global_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    batches = iter(loader)
    loss_total, lr = 0.0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=not (env.is_main and cfg.progress), file=sys.stderr)
    for step in range(steps):
        lr = lr_at_step(epoch, step, steps, cfg.epochs, cfg.lr)
        set_lr(parts.optimizer, lr)
        parts.optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=env.device)
        for micro in range(cfg.grad_accum):
            images, targets = next(batches)
            images = images.to(env.device, non_blocking=True)
            targets = targets.to(env.device, non_blocking=True)
            if parts.mixup is not None:
                images, targets = parts.mixup(images, targets)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            inner = parts.ddp is not None and micro < cfg.grad_accum - 1
            with parts.ddp.no_sync() if inner else contextlib.nullcontext():
                with autocast(env.device, amp):
                    loss = parts.loss_fn(parts.forward(images), targets)
                parts.scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.detach().float() / cfg.grad_accum
        # Every process sees the same mean loss, so all of them stop together before a bad update.
        mean_loss = all_reduce_sum(step_loss, env).item() / env.world_size
        if not math.isfinite(mean_loss):
            bar.close()
            kept = (f"{last_path} (after epoch {progress.epoch}) is the last good checkpoint"
                    if last_path.exists() else "no checkpoint had been written yet")
            raise TrainingDiverged(f"the training loss became {mean_loss} at epoch {epoch + 1}, step {step + 1}; "
                                   f"stopped before updating the weights, {kept}")
        if cfg.clip_grad is not None:
            parts.scaler.unscale_(parts.optimizer)
            nn.utils.clip_grad_norm_(parts.model.parameters(), cfg.clip_grad)
        scale = parts.scaler.get_scale() if parts.scaler.is_enabled() else None
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        progress.step += 1
        # fp16: the scaler skips a step with inf/NaN gradients (and lowers its scale); the EMA skips it too.
        stepped = scale is None or parts.scaler.get_scale() >= scale
        if parts.ema is not None and stepped:
            parts.ema.update(parts.model, step=progress.step)
        loss_total += mean_loss
        rate = (step + 1) * global_batch / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss_total / (step + 1):.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
        bar.update()
    bar.close()
    elapsed = time.perf_counter() - start
    return dict(train_loss=loss_total / steps, lr=lr, img_per_s=steps * global_batch / elapsed)


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, env: DistEnv, amp: str,
             channels_last: bool = False) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 (percent) over the whole validation set, each image counted once."""
    return evaluate_models([model], loader, env, amp, channels_last)[0]


@torch.no_grad()
def evaluate_models(models: list[nn.Module], loader: torch.utils.data.DataLoader, env: DistEnv, amp: str,
                    channels_last: bool = False) -> list[dict[str, float]]:
    """`evaluate` for several models (the model and its EMA) in one pass over the loader, so each validation
    image is decoded and augmented once, not once per model."""
    for model in models:
        model.eval()
    sums = torch.zeros(len(models), 4, dtype=torch.float64, device=env.device)  # loss, top-1, top-5, images
    for images, targets in loader:
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for k, model in enumerate(models):
            with autocast(env.device, amp):
                logits = model(images)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(targets[:, None])
            sums[k] += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                                    top[:, 0].sum().double(), top.any(dim=1).sum().double(),
                                    torch.tensor(float(len(targets)), dtype=torch.float64, device=env.device)])
    results = []
    for loss, top1, top5, count in all_reduce_sum(sums, env).tolist():
        results.append(dict(loss=loss / count, top1=100.0 * top1 / count, top5=100.0 * top5 / count,
                            count=int(count)))
    return results


def training_checkpoint(parts: Parts, progress: Progress, cfg: TrainConfig, rng: list[dict[str, Any]]
                        ) -> dict[str, Any]:
    state: dict[str, Any] = dict(
        model=parts.model.state_dict(), optimizer=parts.optimizer.state_dict(),
        scaler=parts.scaler.state_dict(), epoch=progress.epoch, step=progress.step,
        best_score=progress.best_score, best_epoch=progress.best_epoch, history=progress.history,
        rng=rng, config=to_dict(cfg), arch=parts.model.arch, version=CHECKPOINT_VERSION)
    if parts.ema is not None:
        state["model_ema"] = parts.ema.module.state_dict()
    return state


def best_checkpoint(parts: Parts, progress: Progress, cfg: TrainConfig) -> dict[str, Any]:
    """Weights only (plus how they scored): a best.pth is for evaluation and conversion, not resuming."""
    state: dict[str, Any] = dict(model=parts.model.state_dict(), epoch=progress.epoch,
                                 metric=progress.best_score, config=to_dict(cfg), arch=parts.model.arch,
                                 version=CHECKPOINT_VERSION)
    if parts.ema is not None:
        state["model_ema"] = parts.ema.module.state_dict()
    return state


def resume_path(cfg: TrainConfig) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        last = Path(cfg.output) / "last.pth"
        return last if last.is_file() else None
    return Path(cfg.resume)


def load_training_checkpoint(path: Path, parts: Parts, env: DistEnv, cfg: TrainConfig) -> Progress:
    """Restore weights, optimizer, scaler, EMA and this process's RNGs; returns where the run stood."""
    obj, _ = ckpt.read_torch_checkpoint(path)
    needed = ("model", "optimizer", "epoch", "step", "rng", "history")
    if not isinstance(obj, dict) or any(k not in obj for k in needed):
        raise ckpt.CheckpointError(f"{path}: not a last.pth of this trainer (it lacks "
                                   f"{', '.join(k for k in needed if not isinstance(obj, dict) or k not in obj)}); "
                                   "use --finetune to start from its weights")
    ckpt.load_state_dict_strict(parts.model, ckpt.strip_prefixes(obj["model"]), str(path))
    try:
        parts.optimizer.load_state_dict(obj["optimizer"])
    except ValueError as e:
        raise ckpt.CheckpointError(f"{path}: its optimizer state does not fit this model ({e})") from None
    if obj.get("scaler") and parts.scaler.is_enabled():
        parts.scaler.load_state_dict(obj["scaler"])
    if parts.ema is not None:
        if "model_ema" not in obj:
            raise ckpt.CheckpointError(f"{path}: has no EMA weights, but ema is on in this config")
        ckpt.load_state_dict_strict(parts.ema.module, obj["model_ema"], f"{path} (model_ema)")
    if len(obj["rng"]) == env.world_size:
        restore_rng(obj["rng"][env.rank], env.device)
    else:
        seed_globals(derive_seed(cfg.seed, env.rank, obj["epoch"]))
        if env.is_main:
            print(f"note: {path} was written by {len(obj['rng'])} process(es), this run has {env.world_size}; "
                  "the weights continue exactly, the augmentation random streams do not", file=sys.stderr)
    return Progress(epoch=obj["epoch"], step=obj["step"], best_score=obj.get("best_score", -1.0),
                    best_epoch=obj.get("best_epoch", 0), history=list(obj["history"]))


def write_summary(history: list[dict[str, float]], path: Path) -> None:
    columns = SUMMARY_COLUMNS + [c for c in EMA_COLUMNS if history and c in history[0]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    with ckpt.atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def plot_summary(history: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch as a PNG (Agg canvas, so no display and no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], marker=".", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], marker=".", label="val top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in history], marker=".", label="val top-5")
    if "ema_val_top1" in history[0]:
        ax_acc.plot(epochs, [r["ema_val_top1"] for r in history], marker=".", label="EMA val top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with ckpt.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def build_parts(cfg: TrainConfig, env: DistEnv, num_classes: int, amp: str) -> Parts:
    torch.manual_seed(cfg.seed)  # the same initial weights in every process (DDP also broadcasts rank 0's)
    model = build_model(cfg, num_classes)
    if cfg.sync_bn and env.distributed:
        if env.device.type != "cuda":
            raise ConfigError("sync_bn needs device cuda (PyTorch's SyncBatchNorm has no CPU kernel)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(env.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.opt_betas),
                                  eps=cfg.opt_eps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp == "fp16")
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    ddp = None
    if env.has_group:  # also with one process under torchrun, so a one-GPU torchrun exercises NCCL and DDP
        # Buffers are synced once at construction, then stay per process during the epoch and are averaged
        # at its end (average_bn_stats) instead of being overwritten by rank 0's before every forward.
        # (PyTorch renamed broadcast_buffers to forward_sync_buffers and warns about the old name.)
        new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
        ddp = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
                                      **no_sync)
    forward: nn.Module = ddp if ddp is not None else model
    if cfg.compile:
        forward = torch.compile(forward)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    return Parts(model=model, forward=forward, ddp=ddp, optimizer=optimizer, scaler=scaler, ema=ema,
                 mixup=mixup, loss_fn=loss_fn)


def run(cfg: TrainConfig, env: DistEnv) -> Progress:
    """Train (or continue) the configured run and write everything into `cfg.output`."""
    check_config(cfg)
    amp = resolve_amp(cfg.amp, env.device.type)
    out = Path(cfg.output)
    last_path, best_path = out / "last.pth", out / "best.pth"
    resume = resume_path(cfg)

    def log(message: str) -> None:
        if env.is_main:
            print(message, flush=True)

    train_set, val_set, num_classes = build_datasets(cfg, env)
    parts = build_parts(cfg, env, num_classes, amp)
    if resume is not None:
        progress = load_training_checkpoint(resume, parts, env, cfg)
    else:
        progress = Progress()
        seed_globals(derive_seed(cfg.seed, env.rank))
    train_loader, val_loader, sampler, workers_gen = build_loaders(cfg, train_set, val_set, env)
    steps = sampler.steps
    stop = cfg.stop_epoch or cfg.epochs
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "args.yaml")
    params = sum(p.numel() for p in parts.model.parameters())
    log(f"{cfg.model} {parts.model.dim}/{parts.model.depth} k{parts.model.kernel_size} p{parts.model.patch_size} "
        f"({params / 1e6:.2f}M params) on {cfg.dataset}: {len(train_set)} train / {len(val_set)} val images, "
        f"{num_classes} classes | {env.world_size} process(es) x {cfg.batch_size} x {cfg.grad_accum} accum = "
        f"global batch {sampler.global_batch}, {steps} steps/epoch | {env.device.type}, amp {amp}"
        + (f" | resumed from {resume} after epoch {progress.epoch}" if resume is not None else ""))

    for epoch in range(progress.epoch, stop):
        sampler.set_epoch(epoch)
        workers_gen.manual_seed(derive_seed(cfg.seed, epoch, env.rank))
        start = time.perf_counter()
        train = train_one_epoch(parts, train_loader, steps, epoch, progress, cfg, env, amp, last_path)
        if cfg.bn_average:
            average_bn_stats(parts.model, env)
            if parts.ema is not None:
                average_bn_stats(parts.ema.module, env)
        models = [parts.model] if parts.ema is None else [parts.model, parts.ema.module]
        val, *ema = evaluate_models(models, val_loader, env, amp, cfg.channels_last)
        row = dict(epoch=epoch + 1, train_loss=train["train_loss"], val_loss=val["loss"], val_top1=val["top1"],
                   val_top5=val["top5"], lr=train["lr"], img_per_s=train["img_per_s"])
        score = val["top1"]
        if ema:
            ema_val = ema[0]
            row.update(ema_val_loss=ema_val["loss"], ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
            score = ema_val["top1"]
        row["epoch_time"] = time.perf_counter() - start
        progress.epoch = epoch + 1
        progress.history.append(row)
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch = score, epoch + 1
        rng = all_gather_objects(capture_rng(env.device), env)
        if env.is_main:
            ckpt.save_atomic(training_checkpoint(parts, progress, cfg, rng), last_path)
            if improved:
                ckpt.save_atomic(best_checkpoint(parts, progress, cfg), best_path)
            write_summary(progress.history, out / "summary.csv")
            plot_summary(progress.history, out / "summary.png")
        log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"top1 {row['val_top1']:6.2f}%  top5 {row['val_top5']:6.2f}%"
            + (f"  ema_top1 {row['ema_val_top1']:6.2f}%" if parts.ema is not None else "")
            + f"  lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  {row['epoch_time']:.1f}s")
    barrier(env)
    if stop < cfg.epochs:
        log(f"stopped after epoch {stop} of {cfg.epochs}; continue with --resume auto --output {out}")
    log(f"done: best val top-1 {progress.best_score:.2f}% (epoch {progress.best_epoch}); outputs in {out}/ "
        "(last.pth, best.pth, summary.csv, summary.png, args.yaml)")
    return progress
