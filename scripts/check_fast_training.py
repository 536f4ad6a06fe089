#!/usr/bin/env python
"""Train the same ConvMixer with the fast path and with plain PyTorch from one initialisation and compare.

    python scripts/check_fast_training.py --model convmixer_1536_20 --steps 50 --json train_equiv.json

Both runs use bf16 autocast, AdamW and the same fixed synthetic batches (labels to memorise, so the loss
falls). What "within bf16 noise" means is measured, not assumed: a third run, plain PyTorch without
autocast (fp32), gives the distance bf16 rounding alone puts between two curves. Rounding differences grow
chaotically along a training run, so step-by-step distances are single noisy samples; the check compares
averages: it passes when the mean distance of the fast curve from the plain bf16 curve is at most twice the
mean bf16-to-fp32 distance, and the first step (same weights, one forward) agrees within 1e-2 of the loss.
Exit status 1 when the check fails. It is meant for CUDA; `--device cpu` only exercises the
script (the kernels run there only under TRITON_INTERPRET=1, slowly, and at tiny sizes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

from convmixer_pt import create_model
from convmixer_pt.fast import CHANNELS_LAST_ENV_VAR
from convmixer_pt.model import list_models


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convmixer_1536_20", choices=list_models())
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-batches", type=int, default=4, help="distinct synthetic batches, cycled")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels-last", action="store_true",
                   help="models and inputs in channels_last; the fast run takes the channels_last kernels")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"check_fast_training: device {args.device!r} requested but CUDA is not available", file=sys.stderr)
        return 2
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        os.environ[CHANNELS_LAST_ENV_VAR] = "1"
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(args.device,
                memory_format=memory),
                torch.randint(0, 1000, (args.batch_size,), generator=gen).to(args.device))
               for _ in range(args.num_batches)]
    torch.manual_seed(0)
    init = create_model(args.model, fast=False).state_dict()
    curves = {}
    for name, fast, amp in [("fast_bf16", True, True), ("plain_bf16", False, True), ("plain_fp32", False, False)]:
        model = create_model(args.model, fast=fast).to(args.device, memory_format=memory)
        model.load_state_dict(copy.deepcopy(init))
        curves[name] = loss_curve(model, batches, args.steps, amp, args.lr, args.device)
        del model
        print(name, " ".join(f"{v:.4f}" for v in curves[name]), flush=True)
    fast_gap = [abs(a - b) for a, b in zip(curves["fast_bf16"], curves["plain_bf16"], strict=True)]
    noise = [abs(a - b) for a, b in zip(curves["plain_bf16"], curves["plain_fp32"], strict=True)]
    mean_gap, mean_noise = sum(fast_gap) / len(fast_gap), sum(noise) / len(noise)
    first_ok = fast_gap[0] <= 1e-2 * abs(curves["plain_bf16"][0])
    passed = first_ok and mean_gap <= 2 * mean_noise
    report = dict(vars(args), curves=curves, fast_gap=fast_gap, bf16_noise=noise, mean_gap=mean_gap,
                  mean_noise=mean_noise, first_step_ok=first_ok, passed=passed,
                  device_name=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
                  torch=torch.__version__)
    print(f"mean |fast - plain| = {mean_gap:.4g}; mean |bf16 - fp32| = {mean_noise:.4g}; "
          f"first step |fast - plain| = {fast_gap[0]:.3g}; {'PASS' if passed else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
