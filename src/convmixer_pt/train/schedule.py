"""The official ConvMixer "onecycle" learning-rate schedule.

As in locuslab/convmixer's timm fork (`timm/scheduler/onecycle_lr.py` and `train.py`): piecewise linear in
the fractional epoch t over (0, 0), (floor(2T/5), lr), (floor(4T/5), lr/20), (T, 0), evaluated before every
optimizer step at t = epoch + (step + 1) / steps_per_epoch. There is no separate warm-up.
"""

from __future__ import annotations

import numpy as np
import torch


def onecycle_knots(epochs: int, lr: float) -> tuple[list[float], list[float]]:
    """The (epoch, lr) corners of the schedule; integer division as in the fork."""
    return [0, epochs * 2 // 5, epochs * 4 // 5, epochs], [0.0, lr, lr / 20.0, 0.0]


def onecycle_lr(t: float, epochs: int, lr: float) -> float:
    xs, ys = onecycle_knots(epochs, lr)
    return float(np.interp(t, xs, ys))


def lr_at_step(epoch: int, step: int, steps_per_epoch: int, epochs: int, lr: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of epoch `epoch` (0-based)."""
    return onecycle_lr(epoch + (step + 1) / steps_per_epoch, epochs, lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
