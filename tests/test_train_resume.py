"""A run stopped after epoch k and resumed ends bit for bit where an uninterrupted run ends.

The full recipe's randomness is on (RandAugment, random-resized crops, flips, erasing, mixup/cutmix) and
EMA is on, so the test fails if any generator (Python, NumPy, torch, the loader's worker seeds, the
sampler) or any optimizer/scaler/EMA state is not carried across the restart.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from images import make_train_val
from trainutil import TINY, torchrun

from convmixer_pt.runtime import init_distributed
from convmixer_pt.train import config
from convmixer_pt.train.loop import run

RECIPE = dict(TINY, ema=True, ema_decay=0.9, device="cpu")


def run_inprocess(values: dict) -> None:
    cfg = config.apply(config.TrainConfig(), values)
    run(cfg, init_distributed("cpu"))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for idx in sa:
        for name in sa[idx]:
            assert torch.equal(sa[idx][name], sb[idx][name]), f"optimizer state {idx}.{name} differs"
    cols = ("train_loss", "val_loss", "val_top1", "lr", "ema_val_top1")
    assert [[r[c] for c in cols] for r in a["history"]] == [[r[c] for c in cols] for r in b["history"]]


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bit_exact_one_process(tmp_path: Path, workers: int) -> None:
    data = make_train_val(tmp_path / "data")
    base = dict(RECIPE, data_dir=str(data), workers=workers)
    run_inprocess(dict(base, output=str(tmp_path / "full")))
    run_inprocess(dict(base, output=str(tmp_path / "split"), stop_epoch=1))
    first = load(tmp_path / "split" / "last.pth")
    assert first["epoch"] == 1
    run_inprocess(dict(base, output=str(tmp_path / "split"), resume="auto"))
    full, resumed = load(tmp_path / "full" / "last.pth"), load(tmp_path / "split" / "last.pth")
    assert full["epoch"] == resumed["epoch"] == 3
    # The weights moved after the restart, and landed exactly where the uninterrupted run's did.
    assert not torch.equal(first["model"]["head.weight"], resumed["model"]["head.weight"])
    assert_same_training_state(full, resumed)


@pytest.mark.slow
def test_resume_is_bit_exact_two_processes(tmp_path: Path) -> None:
    data = make_train_val(tmp_path / "data")
    base = dict(RECIPE, data_dir=str(data), batch_size=2)
    for values in (dict(base, output=str(tmp_path / "full")),
                   dict(base, output=str(tmp_path / "split"), stop_epoch=1),
                   dict(base, output=str(tmp_path / "split"), resume="auto")):
        proc = torchrun(values)
        assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = load(tmp_path / "full" / "last.pth"), load(tmp_path / "split" / "last.pth")
    assert full["epoch"] == resumed["epoch"] == 3 and len(resumed["rng"]) == 2
    assert_same_training_state(full, resumed)
