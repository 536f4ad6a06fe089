"""Export the MindSpore model of a ConvMixer checkpoint to MindIR, for MindSpore Lite and serving.

    convmixer-export-mindir convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.mindir --verify
    convmixer-export-mindir mindcv_train.ckpt convmixer.mindir --act gelu_tanh --ema --image-size 256

IN is any checkpoint the converter reads. The graph takes float32 [batch, 3, S, S] with any batch size and
S = --image-size. --verify loads the MindIR back (mindspore.load + nn.GraphCell) and compares its logits with
the PyTorch model's on one random batch; above 1e-5 relative difference OUT is not written. Needs MindSpore.
"""

from __future__ import annotations

import argparse
import sys

from ..variants import ACTIVATIONS
from ..weights.mindir import ExportError, export_mindir
from .common import Parser, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read (any format the converter reads)")
    p.add_argument("output", help="MindIR file to write (name ending in .mindir)")
    p.add_argument("--act", choices=sorted(ACTIVATIONS), help="activation, as the converter's --act")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument("--image-size", type=int, default=224, help="input height and width (default: 224)")
    p.add_argument("--verify", action="store_true", help="compare the MindIR's logits with PyTorch's")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        try:
            weights, exported = export_mindir(args.input, args.output, use_ema=args.ema, act=args.act,
                                              image_size=args.image_size, overwrite=args.force, verify=args.verify)
        except ExportError as e:
            print("\n".join(e.report.lines()))
            raise
        if weights.dropped:
            print(f"note: {args.input}: {weights.dropped}", file=sys.stderr)
        if exported.verify is not None:
            print("\n".join(exported.verify.lines()))
        print(f"{exported.line()}; activation {weights.act or 'unknown (GELU)'} ({weights.act_source})")
        return 0

    return run(body, hint="; no output written")


if __name__ == "__main__":
    sys.exit(main())
