"""Evaluate a ConvMixer checkpoint on an ImageFolder tree (ImageNet val) in PyTorch or MindSpore.

    convmixer-validate --model convmixer_1536_20 --checkpoint convmixer_1536_20_ks9_p7.pth.tar \\
        --data-dir /data/imagenet/val --protocol timm --json out.json --save-predictions preds.csv
    torchrun --nproc_per_node 8 scripts/validate.py ...   # PyTorch path, every image counted once

The framework follows the checkpoint: a MindSpore `.ckpt` or MindSpore-layout safetensors runs the MindSpore
model, anything else the PyTorch one (`--framework` forces either). Both protocols feed both frameworks; the
MindSpore framework and the mindcv protocol need MindSpore.
"""

from __future__ import annotations

import json
import os
import sys

from ..errors import UserError
from ..evaluation.protocols import INTERPOLATIONS, PROTOCOLS
from ..evaluation.validation import FRAMEWORKS, validate, write_json, write_predictions
from ..files import check_output
from ..runtime import loader_workers, process_ranks
from ..variants import ACTIVATIONS, EVAL_CROP_PCT, EVAL_INPUT_SIZE, EVAL_INTERPOLATION, list_models
from .common import Parser, run


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list_models(),
                   help="the registered variant the checkpoint must be (default: the checkpoint's own shapes)")
    p.add_argument("--checkpoint", required=True, help="any checkpoint the converter reads")
    p.add_argument("--data-dir", required=True, help="ImageFolder root: DIR/<synset>/<image>")
    p.add_argument("--protocol", default="timm", choices=PROTOCOLS,
                   help="timm: PIL bicubic, antialiased (the paper's numbers); mindcv: MindSpore bilinear ops")
    p.add_argument("--framework", choices=FRAMEWORKS, help="default: from the checkpoint's format")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=loader_workers(),
                   help="image-decoding processes (default: 4, at most one per CPU available: %(default)s here)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: for PyTorch the local rank's GPU if any, "
                                    "else cpu; for MindSpore cpu)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (torch framework)")
    p.add_argument("--img-size", type=int, help="center crop size (default: what the checkpoint's training "
                                               f"recorded, else {EVAL_INPUT_SIZE})")
    p.add_argument("--crop-pct", type=float, help="resize the shorter side to floor(img_size / crop_pct) first "
                                                  f"(default: recorded, else {EVAL_CROP_PCT})")
    p.add_argument("--interpolation", choices=INTERPOLATIONS,
                   help=f"the timm protocol's resize filter (default: recorded, else {EVAL_INTERPOLATION})")
    p.add_argument("--mean", type=float, nargs=3, help="normalisation mean, R G B (default: recorded, else ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, help="normalisation std, R G B (default: recorded, else ImageNet's)")
    p.add_argument("--act", choices=sorted(ACTIVATIONS),
                   help="the activation, as the converter's --act (default: the file's record, else the "
                        "registry's), e.g. gelu_tanh for MindCV's tanh-approximated GELU")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON")
    p.add_argument("--save-predictions", metavar="OUT.csv", help="CSV path,label,pred,top5, one row per image")
    p.add_argument("--force", action="store_true", help="replace --json and --save-predictions files that exist")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.json and args.save_predictions and \
                os.path.abspath(args.json) == os.path.abspath(args.save_predictions):
            raise UserError(f"{args.json}: given as both --json and --save-predictions; give two files")
        for out in (args.json, args.save_predictions):
            if out:
                check_output(out, args.force, inputs=[args.checkpoint])
        report, rows = validate(
            args.model, args.checkpoint, args.data_dir, protocol=args.protocol, framework=args.framework,
            batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp,
            img_size=args.img_size, crop_pct=args.crop_pct, act=args.act, progress=not args.no_progress,
            interpolation=args.interpolation, mean=args.mean, std=args.std)
        if process_ranks()[0] != 0:  # under torchrun, rank 0 reports for all
            return 0
        print(json.dumps(report, indent=2))
        if args.json:
            write_json(report, args.json, overwrite=args.force)
        if args.save_predictions:
            write_predictions(rows, args.save_predictions, overwrite=args.force)
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
