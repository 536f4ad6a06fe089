"""Do the PyTorch model of one checkpoint and the MindSpore model of another compute the same function?

    convmixer-parity model.pth model.ckpt    # exit 0 when they agree (needs MindSpore)
"""

from __future__ import annotations

import sys

from ..variants import ACTIVATIONS
from ..weights.parity import compare
from .common import Parser, run


def parser() -> Parser:
    p = Parser(description=compare.__doc__)
    p.add_argument("torch_checkpoint", help="any PyTorch-side file the loader accepts")
    p.add_argument("ms_checkpoint", help="a MindSpore .ckpt or MindSpore-layout safetensors in MindCV's names")
    p.add_argument("--act", choices=sorted(ACTIVATIONS),
                   help="activation where a file implies none (default: the registry's for these shapes)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        report = compare(args.torch_checkpoint, args.ms_checkpoint, act=args.act, batch_size=args.batch_size,
                         image_size=args.image_size, seed=args.seed)
        print("\n".join(report.lines()))
        return 0 if report.ok else 1

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
