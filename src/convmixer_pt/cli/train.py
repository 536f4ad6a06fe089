"""Train a ConvMixer with the paper's recipe: one process, several under torchrun, or on several nodes.

    convmixer-train --config configs/digits.yaml
    torchrun --nproc_per_node 8 scripts/train.py --config configs/convmixer_1536_20.yaml --data-dir /data/imagenet
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..runtime import init_distributed, resolve_device, shutdown
from ..train import config
from ..train.interrupts import Interrupts
from ..train.loop import run as train
from .common import Parser, run


def parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        cfg = config.resolve(args.config, config.overrides_from_args(args))
        # The signal handlers before anything that can take long (joining the process group, reading the data).
        with Interrupts(cfg) as interrupts:
            env = init_distributed(resolve_device(cfg.device))
            try:
                if env.device.type == "cuda":
                    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
                elif cfg.cpu_threads is not None:
                    torch.set_num_threads(cfg.cpu_threads)
                train(cfg, env, interrupts)
            finally:
                shutdown(env)
        return 0

    return run(body, hint="; resume with --resume auto")


if __name__ == "__main__":
    sys.exit(main())
