"""Convert ConvMixer checkpoints between PyTorch and MindSpore, exactly, without MindSpore installed.

  convmixer-convert convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.ckpt
  convmixer-convert convmixer_1536_20.ckpt convmixer_1536_20.safetensors --layout mindspore --verify
  convmixer-convert mindcv_train.ckpt convmixer.safetensors --act gelu_tanh --ema

The output format follows OUT's name: .ckpt (MindSpore, MindCV's names), .safetensors (timm names, or with
--layout mindspore MindCV's names and MindSpore's metadata), or .pth/.pt/.pth.tar/.tar/.bin (PyTorch). Inputs
are recognised from their bytes and tensor names: official locuslab files, timm state dicts, training
checkpoints of either framework (also wrapped, with module./_orig_mod. prefixes; a MindSpore training
checkpoint's optimizer, step and loss-scale entries are dropped and counted), safetensors in either naming, and
MindSpore .ckpt. Pickles are loaded with weights_only=True and never run code. Only --verify with a MindSpore
checkpoint on either side needs MindSpore.
"""

from __future__ import annotations

import argparse
import sys

from ..variants import ACTIVATIONS
from ..weights.convert import VerificationError, convert
from ..weights.formats import DTYPES, LAYOUTS, output_format, records_activation, resolve_act
from .common import Parser, exit_now, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read")
    p.add_argument("output", help="file to write; its name picks the format")
    p.add_argument("--layout", choices=LAYOUTS["safetensors"],
                   help="tensor names of the output: timm (default for PyTorch and .safetensors outputs), official, "
                        "or mindspore (MindCV's; .safetensors and, always, .ckpt)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument("--dtype", choices=("keep", *DTYPES), default="keep",
                   help="cast the floating tensors (default: keep them as stored)")
    p.add_argument("--act", choices=sorted(ACTIVATIONS),
                   help="activation the weights were trained with; default: the file's record, else the "
                        "registered variant with these shapes (768/32 is ReLU, the others GELU); required for a "
                        "MindSpore training checkpoint of a GELU-shaped model (MindCV's own cell trains with "
                        "gelu_tanh, convmixer-mindcv with gelu); both sides of --verify run it")
    p.add_argument("--clamp", action="store_true",
                   help="with --dtype: saturate values beyond the target type's range (default: refuse them)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--verify", action="store_true",
                   help="run the models of IN and OUT, each with its own file's activation, on one random batch; "
                        "fail above the relative logit difference that float32 rounding (and a --dtype cast) "
                        "explains (OUT is then not written)")
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
        if weights.dropped:
            print(f"note: {args.input}: {weights.dropped}", file=sys.stderr)
        if output_format(args.output) == "mindspore" and not args.output.endswith(".ckpt"):
            print(f"note: {args.output}: MindSpore's own load_checkpoint reads only names ending in .ckpt "
                  "(lowercase); rename it before loading it there", file=sys.stderr)
        recorded = records_activation(args.output)
        if weights.act is None and (args.verify or recorded):
            arch = ", ".join(f"{k}={v}" for k, v in weights.arch.items())
            print(f"note: no registered variant has these shapes ({arch}) and the input records no activation: "
                  "none was recorded" + (" and --verify ran both models with GELU" if args.verify else "")
                  + "; pass --act to state it", file=sys.stderr)
        elif weights.act is not None and not recorded:
            read_back, source = resolve_act(weights.arch, None, None)
            taken = f"{read_back} ({source})" if read_back else "GELU (no registered variant has these shapes)"
            if read_back != weights.act:
                print(f"note: {args.output}: this format cannot record the activation, and read back without "
                      f"--act it is taken for {taken}: state {weights.act} "
                      f"when loading or converting it (--act {weights.act}, act={weights.act!r}), or write "
                      ".safetensors, which records it", file=sys.stderr)
        if summary.verify is not None:
            print("\n".join(summary.verify.lines()))
        if recorded:
            where = "recorded in its metadata" if weights.act else "none recorded"
        else:
            where = "not recorded: this format cannot hold it"
        act = (f"{weights.act} ({weights.act_source})" if weights.act
               else "unknown (no record, no --act, no registered variant of these shapes)")
        print(f"{summary.line()}; activation {act}, {where}")
        return 0

    return run(body, hint="; no output written")


def command() -> None:
    """`main` as a process (the console command, tools/convert_ckpt.py): its exit skips the interpreter's
    teardown."""
    exit_now(main())


if __name__ == "__main__":
    command()
