"""Write ImageFolder splits as WebDataset tar shards, with the index the trainer and validate.py read them by.

    convmixer-make-shards --src /data/imagenet --out /data/imagenet-shards              # train/ and val/
    convmixer-make-shards --src /data/imagenet --out /data/imagenet-shards --splits val --shard-size 500
    convmixer-train --config configs/convmixer_1536_20.yaml --dataset shards --data-dir /data/imagenet-shards

Each sample is `<key>.<image extension>` (the file's bytes, unchanged) and `<key>.cls` (the class index), in
the ImageFolder's order, so a run from the shards sees the same images in the same order as from the folders.
"""

from __future__ import annotations

import argparse
import sys

from ..data import write_shards
from ..errors import UserError
from .common import Parser, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the folder with one ImageFolder tree per split (SRC/train, SRC/val)")
    p.add_argument("--out", required=True, help="where the shards and their indexes go")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="the splits to write (default: train val)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")
        for split in args.splits:
            index = write_shards(f"{args.src}/{split}", args.out, split, args.shard_size)
            print(f"wrote {index} and its shards")
        return 0

    return run(body, hint="; the index of an unfinished split is not written")


if __name__ == "__main__":
    sys.exit(main())
