#!/usr/bin/env python
"""Train a ConvMixer with the paper's recipe: one process, several under torchrun, or on several nodes.

    python scripts/train.py --config configs/digits.yaml
    torchrun --nproc_per_node 8 scripts/train.py --config configs/convmixer_1536_20.yaml --data-dir /data/imagenet
"""

from __future__ import annotations

import argparse
import sys

import torch

from convmixer_pt import config, engine
from convmixer_pt.checkpoint import CheckpointError
from convmixer_pt.data import DataError, error_line
from convmixer_pt.distributed import init_distributed, shutdown
from convmixer_pt.fast import SettingError

USER_ERRORS = (config.ConfigError, DataError, CheckpointError, engine.TrainingDiverged, SettingError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    env = None
    try:
        cfg = config.resolve(args.config, config.overrides_from_args(args))
        env = init_distributed(engine.resolve_device(cfg.device))
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        elif cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        engine.run(cfg, env)
    except USER_ERRORS as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    finally:
        if env is not None:
            shutdown(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
