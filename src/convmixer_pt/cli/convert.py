"""Convert ConvMixer checkpoints between PyTorch and MindSpore, exactly.

  convmixer-convert convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.ckpt
  convmixer-convert convmixer_1536_20.ckpt convmixer_1536_20.safetensors --verify

The output format follows OUT's name: .ckpt (MindSpore, MindCV's names), .safetensors, or
.pth/.pt/.pth.tar/.tar/.bin (PyTorch). Inputs are recognised from their bytes and tensor names: official
locuslab files, timm state dicts, training checkpoints (also wrapped, with module./_orig_mod. prefixes),
safetensors and MindSpore .ckpt. Pickles are loaded with weights_only=True and never run code.
"""

from __future__ import annotations

import argparse
import sys

from ..variants import ACTIVATIONS
from ..weights.convert import VerificationError, convert
from ..weights.formats import DTYPES, TORCH_LAYOUTS, output_format
from .common import Parser, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(prog="convert_ckpt.py", description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read")
    p.add_argument("output", help="file to write; its name picks the format")
    p.add_argument("--layout", choices=TORCH_LAYOUTS, default="timm",
                   help="tensor names of a PyTorch output (default: timm)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument("--dtype", choices=("keep", *DTYPES), default="keep",
                   help="cast the floating tensors (default: keep them as stored)")
    p.add_argument("--act", choices=sorted(ACTIVATIONS),
                   help="activation the weights were trained with; default: the file's record, else the "
                        "registered variant with these shapes (768/32 is ReLU, the others GELU)")
    p.add_argument("--clamp", action="store_true",
                   help="with --dtype: saturate values beyond the target type's range (default: refuse them)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--verify", action="store_true",
                   help="run the models of IN and OUT on one random batch; fail above 1e-5 relative logit "
                        "difference (OUT is then not written)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        try:
            weights, summary = convert(args.input, args.output, layout=args.layout, use_ema=args.ema,
                                       dtype=args.dtype, clamp=args.clamp, act=args.act, overwrite=args.force,
                                       verify=args.verify, progress=sys.stderr.isatty())
        except VerificationError as e:
            print("\n".join(e.report.lines()))
            raise
        if weights.act is None and (args.verify or output_format(args.output) == "safetensors"):
            arch = ", ".join(f"{k}={v}" for k, v in weights.arch.items())
            print(f"note: no registered variant has these shapes ({arch}) and the input records no activation: "
                  "none was recorded" + (" and --verify ran both models with GELU" if args.verify else "")
                  + "; pass --act to state it", file=sys.stderr)
        if summary.verify is not None:
            print("\n".join(summary.verify.lines()))
        print(f"{summary.line()}; activation {weights.act or 'unknown'} ({weights.act_source})")
        return 0

    return run(body, hint="; no output written")


if __name__ == "__main__":
    sys.exit(main())
