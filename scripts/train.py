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
from convmixer_pt.data import DataError
from convmixer_pt.distributed import init_distributed, shutdown

USER_ERRORS = (config.ConfigError, DataError, CheckpointError, engine.TrainingDiverged)


def one_line(error: Exception) -> str:
    """The user-facing sentence, also when a DataLoader worker re-raised it inside its traceback text."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(error):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{type(error).__module__}.") else last
    return lines[0] if lines else type(error).__name__


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
        print(f"error: {one_line(e)}", file=sys.stderr)
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
