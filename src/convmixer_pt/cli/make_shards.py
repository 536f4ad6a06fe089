"""Write ImageFolder splits as WebDataset tar shards, with the index the trainer and validate.py read them by.

    convmixer-make-shards --src /data/imagenet --out /data/imagenet-shards              # train/ and val/
    convmixer-make-shards --src /data/imagenet --out /data/imagenet-shards --splits val --shard-size 500
    convmixer-train --config configs/convmixer_1536_20.yaml --dataset shards --data-dir /data/imagenet-shards

Each sample is `<key>.<image extension>` (the file's bytes, unchanged) and `<key>.cls` (the class index); the
key is the sample's place in the ImageFolder's order. The splits named by --shuffle (train by default) are
written in a random order drawn from --seed: training reads a few shards at a time, so each shard must hold a
random sample of the classes. The others keep the ImageFolder's order.

A split's shards are written under fresh names and its index last, so an interrupted run leaves the previous
index and its shards as they were. An existing index is replaced only with --force, which then removes the
shards that index listed; no other file in --out is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import write_shards
from ..errors import UserError
from ..files import check_output, plain_name
from .common import Parser, run


def parser() -> Parser:
    summary, details = __doc__.split("\n\n", 1)
    p = Parser(description=summary, epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the folder with one ImageFolder tree per split (SRC/train, SRC/val)")
    p.add_argument("--out", required=True, help="where the shards and their indexes go")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="the splits to write (default: train val)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--shuffle", nargs="*", default=["train"], metavar="SPLIT",
                   help="the splits written in a random order (default: train; none with a bare --shuffle)")
    p.add_argument("--seed", type=int, default=0, help="the seed of that order (default: 0)")
    p.add_argument("--force", action="store_true",
                   help="replace a split's existing index (and remove the shards it listed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")
        if args.seed < 0:
            raise UserError(f"--seed must be at least 0, got {args.seed}")
        for split in args.splits:  # every split's name, then its index, checked before any is written
            plain_name(split, "--splits")
        for split in args.splits:
            check_output(Path(args.out) / f"{split}.json", args.force)
        for split in args.splits:
            seed = args.seed if split in args.shuffle else None
            index = write_shards(f"{args.src}/{split}", args.out, split, args.shard_size, shuffle_seed=seed,
                                 overwrite=args.force)
            print(f"wrote {index} and its shards")
        return 0

    return run(body, hint="; the index of an unfinished split is not written")


if __name__ == "__main__":
    sys.exit(main())
