"""What a run reports: `summary.csv`, `summary.png`, the one log line per epoch, and TensorBoard scalars."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..files import atomic_path, write_text, writing
from ..model import ConvMixer
from ..runtime import MissingDependencyError
from .config import TrainConfig

SUMMARY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "img_per_s", "epoch_time"]
EMA_COLUMNS = ["ema_val_loss", "ema_val_top1", "ema_val_top5"]


def write_summary(history: list[dict[str, float]], path: Path) -> None:
    columns = SUMMARY_COLUMNS + [c for c in EMA_COLUMNS if history and c in history[0]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(path, buf.getvalue(), overwrite=True)  # the run's own, rewritten every epoch


def plot_summary(history: list[dict[str, float]], path: Path) -> None:
    """Loss and accuracy per epoch as a PNG (Agg canvas, so no display and no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], marker=".", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [r["val_top1"] for r in history], marker=".", label="val top-1")
    ax_acc.plot(epochs, [r["val_top5"] for r in history], marker=".", label="val top-5")
    if "ema_val_top1" in history[0]:
        ax_acc.plot(epochs, [r["ema_val_top1"] for r in history], marker=".", label="EMA val top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp, writing(path):
        fig.savefig(tmp, format="png", dpi=100)


def epoch_line(row: dict[str, float], epochs: int) -> str:
    """One epoch's log line."""
    return (f"epoch {row['epoch']:>3}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"top1 {row['val_top1']:6.2f}%  top5 {row['val_top5']:6.2f}%"
            + (f"  ema_top1 {row['ema_val_top1']:6.2f}%" if "ema_val_top1" in row else "")
            + f"  lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s  {row['epoch_time']:.1f}s")


def run_line(cfg: TrainConfig, model: ConvMixer, train_images: int, val_images: int, classes: int, processes: int,
             global_batch: int, steps: int, device: str, amp: str) -> str:
    """The line that opens a run's log: model, data, batch layout and device."""
    params = sum(p.numel() for p in model.parameters())
    return (f"{cfg.model} {model.dim}/{model.depth} k{model.kernel_size} p{model.patch_size} "
            f"({params / 1e6:.2f}M params) on {cfg.dataset}: {train_images} train / {val_images} val images, "
            f"{classes} classes | {processes} process(es) x {cfg.batch_size} x {cfg.grad_accum} accum = "
            f"global batch {global_batch}, {steps} steps/epoch | {device}, amp {amp}")


class TensorBoard:
    """TensorBoard scalars of a run (the first process's): the training loss and learning rate every `log_every`
    steps, and each epoch's summary row (losses, accuracies, learning rate, img/s) at the step it ended on.
    `purge_step` drops what a run killed after its last checkpoint had logged beyond it."""

    def __init__(self, folder: Path, purge_step: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError("--tensorboard needs the tensorboard package: pip install tensorboard") \
                from None
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step or None)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def epoch(self, row: dict[str, float], step: int) -> None:
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
