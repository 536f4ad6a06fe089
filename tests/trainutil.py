"""Shared pieces of the trainer tests: a tiny, fast training config and the command lines that run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"

# A ConvMixer 16/1 on 16x16 inputs: a step costs about a millisecond on one CPU core.
TINY = dict(model="convmixer_128_4", model_args=dict(dim=16, depth=1, kernel_size=3, patch_size=4),
            input_size=16, crop_pct=1.0, batch_size=4, workers=0, epochs=3, progress=False)
# Everything random switched off, so different process layouts must compute the same thing.
NO_AUG = dict(auto_augment=None, scale=[1.0, 1.0], ratio=[1.0, 1.0], interpolation="bilinear", hflip=0.0,
              color_jitter=0.0, re_prob=0.0, mixup=0.0, cutmix=0.0)


def cli_args(values: dict) -> list[str]:
    """Command-line flags for config values (lists as several words, model_args as KEY=VALUE)."""
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            out += [flag, *(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, "none" if value is None else str(value)]
    return out


def child_env() -> dict[str, str]:
    """The environment of a trainer a test starts: one intra-op thread (runs compared with it sum in that order),
    no warnings in the stderr the test reads."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def torchrun(values: dict, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """scripts/train.py under `torchrun --standalone` with gloo on CPU."""
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TRAIN_SCRIPT), "--device", "cpu", *cli_args(values)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
