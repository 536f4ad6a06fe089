"""Export a ConvMixer checkpoint to ONNX, optionally checked against onnxruntime first.

  convmixer-export-onnx convmixer_1536_20_ks9_p7.pth.tar convmixer_1536_20.onnx --verify
  convmixer-export-onnx runs/digits/best.pth digits.onnx --force   # 32 x 32: the size its training recorded

Any checkpoint the converter reads (official locuslab files, timm state dicts, training checkpoints,
safetensors, MindSpore .ckpt). The graph is standard ONNX in float32 with a dynamic batch axis; height and width
are --img-size, by default the size the checkpoint's training recorded (its config, or args.yaml beside it),
else 224. With --verify, onnxruntime and PyTorch run one random batch on the CPU; above 1e-5 relative
logit difference or with a different top-5, OUT is not written. Needs the onnx extra
(pip install ".[onnx]" from a checkout).
"""

from __future__ import annotations

import argparse
import sys

from ..export import OnnxVerificationError, export_checkpoint
from ..variants import ACTIVATIONS
from .common import Parser, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint to export")
    p.add_argument("output", help="the .onnx file to write")
    p.add_argument("--img-size", "--image-size", type=int,
                   help="input height and width (default: the size the checkpoint's training recorded, else 224)")
    p.add_argument("--act", choices=sorted(ACTIVATIONS),
                   help="activation the weights were trained with; default: the file's record, else the "
                        "registered variant with these shapes (768/32 is ReLU, the others GELU)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--verify", action="store_true",
                   help="compare onnxruntime's logits with PyTorch's on one random batch first; fail above 1e-5 "
                        "relative difference (OUT is then not written)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        try:
            weights, img_size, check = export_checkpoint(args.checkpoint, args.output, act=args.act, use_ema=args.ema,
                                               img_size=args.img_size, opset=args.opset, verify=args.verify,
                                               overwrite=args.force)
        except OnnxVerificationError as e:
            print(e.check.line())
            raise
        if check is not None:
            print(check.line())
        arch = ", ".join(f"{k}={v}" for k, v in weights.arch.items())
        act = f"activation {weights.act} ({weights.act_source})" if weights.act else \
            "activation unknown, exported with GELU (pass --act)"
        print(f"wrote {args.output}: {weights.variant or 'ConvMixer'} ({arch}), {act}, input "
              f"N x {weights.arch['in_chans']} x {img_size} x {img_size}")
        return 0

    return run(body, hint="; no output written")


if __name__ == "__main__":
    sys.exit(main())
