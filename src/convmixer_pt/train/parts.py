"""The objects of one training run, built from its config: model (with DDP and torch.compile as asked),
AdamW with the recipe's parameter groups, the loss scaler, EMA, Mixup/CutMix and the loss."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..factory import create_model
from ..model import ConvMixer
from ..runtime import DistEnv
from ..weights.formats import load_model_weights
from .config import ConfigError, TrainConfig


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


def build_model(cfg: TrainConfig, num_classes: int) -> ConvMixer:
    try:
        model = create_model(cfg.model, num_classes=num_classes, **cfg.model_args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.finetune:
        load_model_weights(model, cfg.finetune)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only: never on biases, BatchNorm or other 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


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

