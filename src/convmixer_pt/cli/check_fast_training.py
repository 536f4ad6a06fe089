"""Train a ConvMixer with the fast path and with plain PyTorch from one initialisation and compare the losses.

    convmixer-check-fast-training --model convmixer_1536_20 --steps 50 --json train_equiv.json

Exit status 1 when the fast curve is farther from the plain bf16 curve than twice the bf16-to-fp32 noise
(evaluation.fast_training says how that is measured). Meant for CUDA; `--device cpu` only exercises the
script (the kernels run there only under TRITON_INTERPRET=1, slowly, and at tiny sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch

from ..evaluation.fast_training import check_arguments, compare_training
from ..fast import FastOptions
from ..files import check_output, write_text
from ..runtime import resolve_device
from ..variants import list_models
from .common import Parser, run


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convmixer_1536_20", choices=list_models())
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-batches", type=int, default=4, help="distinct synthetic batches, cycled")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--channels-last", action="store_true",
                   help="models and inputs in channels_last; the fast run takes the channels_last kernels")
    p.add_argument("--fused-bn", action=argparse.BooleanOptionalAction,
                   help="the fast run fuses BatchNorm with its activation (default: CONVMIXER_FAST_BATCHNORM)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        check_arguments(args.model, args.steps, args.batch_size, args.img_size, args.num_batches, args.lr)
        device = resolve_device(args.device)
        if args.json:
            check_output(args.json, args.force)
        env = FastOptions.from_environment()
        fast = FastOptions(enabled=True, channels_last=args.channels_last,
                           fused_batchnorm=env.fused_batchnorm if args.fused_bn is None else args.fused_bn,
                           kernel_set=env.kernel_set)
        result = compare_training(args.model, fast, args.steps, args.batch_size, args.img_size, args.num_batches,
                                  args.lr, args.channels_last, device)
        for name, curve in result["curves"].items():
            print(name, " ".join(f"{v:.4f}" for v in curve), flush=True)
        print(f"mean |fast - plain| = {result['mean_gap']:.4g}; mean |bf16 - fp32| = {result['mean_noise']:.4g}; "
              f"first step |fast - plain| = {result['fast_gap'][0]:.3g}; {'PASS' if result['passed'] else 'FAIL'}")
        if args.json:
            name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
            report = dict(vars(args), fast=asdict(fast), **result, device_name=name, torch=torch.__version__)
            write_text(args.json, json.dumps(report, indent=1), overwrite=args.force)
        return 0 if result["passed"] else 1

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
