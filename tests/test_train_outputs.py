"""What a run leaves in --output: safe checkpoints in timm layout, summary.csv, the plot and args.yaml."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from images import make_train_val
from PIL import Image
from trainutil import TINY

from convmixer_pt import CheckpointError, create_model, read_state_dict
from convmixer_pt.runtime import init_distributed
from convmixer_pt.train import config
from convmixer_pt.train.inputs import build_transforms
from convmixer_pt.train.loop import run
from convmixer_pt.train.parts import build_model
from convmixer_pt.train.schedule import onecycle_lr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, config.TrainConfig]:
    tmp = tmp_path_factory.mktemp("outputs")
    data = make_train_val(tmp / "data")
    cfg = config.apply(config.TrainConfig(), dict(TINY, data_dir=str(data), output=str(tmp / "run"), epochs=2,
                                                  ema=True, device="cpu"))
    run(cfg, init_distributed("cpu"))
    return tmp / "run", cfg


def test_output_files(run_dir: tuple[Path, config.TrainConfig]) -> None:
    out, cfg = run_dir
    assert sorted(p.name for p in out.iterdir()) == [".lock", "args.yaml", "best.pth", "last.pth", "summary.csv",
                                                     "summary.png"]
    assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")  # the trainer that held the folder
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out / "summary.png").size[0] > 0
    assert config.resolve(out / "args.yaml", {}) == cfg


def test_checkpoints_are_plain_data_in_timm_layout(run_dir: tuple[Path, config.TrainConfig]) -> None:
    out, cfg = run_dir
    last = torch.load(out / "last.pth", map_location="cpu", weights_only=True)  # no allow-list needed
    assert last["epoch"] == 2 and last["config"] == config.to_dict(cfg)
    model = create_model(cfg.model, num_classes=3, **cfg.model_args)
    assert set(last["model"]) == set(model.state_dict())
    for path in (out / "last.pth", out / "best.pth"):
        weights, _ = read_state_dict(path)
        ema, _ = read_state_dict(path, use_ema=True)
        assert set(weights) == set(ema) == set(model.state_dict())
    best = torch.load(out / "best.pth", weights_only=True)
    assert "optimizer" not in best and best["metric"] == max(r["val_top1"] for r in last["history"])


def test_summary_csv_matches_the_weights(run_dir: tuple[Path, config.TrainConfig]) -> None:
    out, cfg = run_dir
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s",
                             "epoch_time", "ema_val_loss", "ema_val_top1", "ema_val_top5"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:  # the lr of the epoch's last step: the schedule at the next whole epoch
        assert float(r["lr"]) == pytest.approx(onecycle_lr(int(r["epoch"]), cfg.epochs, cfg.lr), rel=1e-12)
    # Top-1 of the last epoch, recomputed independently from last.pth and the val images.
    model = create_model(cfg.model, num_classes=3, checkpoint_path=out / "last.pth", **cfg.model_args).eval()
    _, transform = build_transforms(cfg)
    images = sorted(Path(cfg.data_dir, "val").glob("*/*.png"))
    labels = torch.tensor([int(p.parent.name[1:]) for p in images])
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        top1 = 100.0 * (model(batch).argmax(1) == labels).float().mean().item()
    assert float(rows[-1]["val_top1"]) == pytest.approx(top1, abs=1e-6)
    assert 0.0 <= float(rows[-1]["val_top5"]) <= 100.0 and float(rows[-1]["val_top5"]) >= top1


def test_synthetic_data_with_bf16_autocast(tmp_path: Path) -> None:
    """The GPU smoke run's path (generated images, autocast) on CPU: it trains and evaluates every image."""
    cfg = config.apply(config.TrainConfig(), dict(TINY, dataset="synthetic", num_classes=4, synthetic_train_size=16,
                                                  synthetic_val_size=10, epochs=1, amp="bf16", device="cpu",
                                                  output=str(tmp_path / "syn")))
    progress = run(cfg, init_distributed("cpu"))
    assert progress.step == 4 and progress.history[0]["val_top1"] in {10.0 * k for k in range(11)}


def test_finetune_starts_from_the_given_weights(run_dir: tuple[Path, config.TrainConfig]) -> None:
    out, cfg = run_dir
    weights, _ = read_state_dict(out / "best.pth")
    model = build_model(config.apply(cfg, dict(finetune=str(out / "best.pth"))), 3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    with pytest.raises(CheckpointError, match="does not fit the model"):
        build_model(config.apply(cfg, dict(finetune=str(out / "best.pth"))), 5)
