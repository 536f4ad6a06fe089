"""Turn the flat ILSVRC2012 validation folder into the ImageFolder layout OUT/<synset>/<image>.

    # Kaggle's ground truth
    convmixer-prepare-imagenet-val --images ILSVRC/Data/CLS-LOC/val \\
        --labels LOC_val_solution.csv --out imagenet/val
    # the devkit's ground truth (ILSVRC2012_IDs) with its meta.mat
    convmixer-prepare-imagenet-val --images ILSVRC2012_img_val \\
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \\
        --meta ILSVRC2012_devkit_t12/data/meta.mat --out imagenet/val

Images are symlinked (absolute targets) unless --copy is given. Sorted synset folders give the standard
class indices (n01440764 = 0).
"""

from __future__ import annotations

import argparse
import sys

from ..evaluation.imagenet_val import build_image_folder, read_labels
from .common import Parser, run


def parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--images", required=True, help="flat folder of ILSVRC2012_val_*.JPEG")
    p.add_argument("--labels", required=True,
                   help="LOC_val_solution.csv (Kaggle) or ILSVRC2012_validation_ground_truth.txt (devkit)")
    p.add_argument("--meta", help="the devkit's data/meta.mat: ILSVRC2012_ID -> synset (devkit labels)")
    p.add_argument("--synsets", help="instead of --meta: a text file with the 1000 synsets in ILSVRC2012_ID "
                                     "order, one per line (not the sorted LOC_synset_mapping.txt)")
    p.add_argument("--out", required=True, help="the ImageFolder root to create (must not exist or be empty)")
    p.add_argument("--copy", action="store_true", help="copy the images instead of symlinking them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        labels = read_labels(args.labels, meta=args.meta, synsets=args.synsets)
        count = build_image_folder(args.images, labels, args.out, copy=args.copy)
        classes = len(set(labels.values()))
        print(f"{'copied' if args.copy else 'linked'} {count} images into {classes} class folders under {args.out}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
