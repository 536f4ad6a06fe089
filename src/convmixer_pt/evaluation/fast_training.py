"""Train the same ConvMixer with the fast path and with plain PyTorch from one initialisation and compare.

Both runs use bf16 autocast, AdamW and the same fixed synthetic batches (labels to memorise, so the loss
falls). What "within bf16 noise" means is measured, not assumed: a third run, plain PyTorch without autocast
(fp32), gives the distance bf16 rounding alone puts between two curves. Rounding differences grow chaotically
along a training run, so step-by-step distances are single noisy samples; the check compares averages: it
passes when the mean distance of the fast curve from the plain bf16 curve is at most twice the mean
bf16-to-fp32 distance, and the first step (same weights, one forward) agrees within 1e-2 of the loss.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..factory import create_model
from ..fast import FastOptions
from ..variants import variant_arch


def loss_curve(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int,
               amp: bool, lr: float, device: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def check_arguments(model: str, steps: int, batch_size: int, img_size: int, num_batches: int, lr: float) -> None:
    """A UserError for sizes and a learning rate that no training run can take."""
    patch = variant_arch(model)["patch_size"]
    if min(steps, batch_size, num_batches) < 1 or img_size < patch or not (math.isfinite(lr) and lr > 0):
        raise UserError(f"steps, batch size and batches must be at least 1, the image at least one {patch}-pixel "
                        f"patch, the learning rate finite and > 0; got {steps}, {batch_size}, {num_batches}, "
                        f"{img_size}, {lr}")


def compare_training(model: str, fast: FastOptions, steps: int = 50, batch_size: int = 32, img_size: int = 224,
                     num_batches: int = 4, lr: float = 1e-3, channels_last: bool = False,
                     device: str = "cuda") -> dict[str, Any]:
    """The three loss curves (fast bf16, plain bf16, plain fp32) and the verdict."""
    check_arguments(model, steps, batch_size, img_size, num_batches, lr)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(device, memory_format=memory),
                torch.randint(0, 1000, (batch_size,), generator=gen).to(device))
               for _ in range(num_batches)]
    torch.manual_seed(0)
    init = create_model(model, fast=False).state_dict()
    plain = replace(fast, enabled=False)
    curves = {}
    for name, options, amp in [("fast_bf16", fast, True), ("plain_bf16", plain, True), ("plain_fp32", plain, False)]:
        net = create_model(model, fast=options).to(device, memory_format=memory)
        net.load_state_dict(copy.deepcopy(init))
        curves[name] = loss_curve(net, batches, steps, amp, lr, device)
        del net
    fast_gap = [abs(a - b) for a, b in zip(curves["fast_bf16"], curves["plain_bf16"], strict=True)]
    noise = [abs(a - b) for a, b in zip(curves["plain_bf16"], curves["plain_fp32"], strict=True)]
    mean_gap, mean_noise = sum(fast_gap) / len(fast_gap), sum(noise) / len(noise)
    first_ok = fast_gap[0] <= 1e-2 * abs(curves["plain_bf16"][0])
    return dict(curves=curves, fast_gap=fast_gap, bf16_noise=noise, mean_gap=mean_gap, mean_noise=mean_noise,
                first_step_ok=first_ok, passed=first_ok and mean_gap <= 2 * mean_noise)
