"""The one evaluation loop: top-1, top-5 and cross-entropy of one or more models over a loader, each image
counted once across processes. The trainer's per-epoch evaluation and validation both run it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..runtime import DistEnv, all_gather_objects

TOPK = 5

# A batch of images (N, C, H, W) -> logits (N, classes), in any floating dtype, on any device.
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    """Counts of one model over one process's images, or over all of them after `merge`; `rows` holds
    (dataset index, label, top-5 classes) per image where they were asked for."""

    count: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    loss_sum: float = 0.0
    seconds: float = field(default=0.0, compare=False)  # wall time, not a result
    rows: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_hits / self.count if self.count else 0.0

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_hits / self.count if self.count else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else 0.0

    @property
    def img_per_s(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def merge(results: Sequence[EvalResult]) -> EvalResult:
    """Several processes' results as one; the wall time is the slowest process's (they run at the same time)."""
    rows = sorted((row for r in results for row in r.rows), key=lambda row: row[0])
    return EvalResult(count=sum(r.count for r in results), top1_hits=sum(r.top1_hits for r in results),
                      top5_hits=sum(r.top5_hits for r in results), loss_sum=sum(r.loss_sum for r in results),
                      seconds=max(r.seconds for r in results), rows=rows)


def count_hits(topk: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-5 hits) of a batch as 0-d tensors; with fewer than 5 classes top-5 covers all."""
    hits = topk == labels[:, None]
    return hits[:, 0].sum(), hits[:, :TOPK].any(dim=1).sum()


@torch.no_grad()
def evaluate(predictors: Sequence[Predictor], loader: Iterable, env: DistEnv, device: torch.device,
             channels_last: bool = False, indices: Sequence[int] | None = None,
             progress: bool = False) -> list[EvalResult]:
    """Every predictor on every (images, labels) batch of `loader`, in one pass (each image decoded once).

    Images go to `device` once. `indices` (the dataset index of each item, in loader order) asks for
    per-image rows. The results are merged over all processes, so each process gets the whole dataset's.
    """
    sums = torch.zeros(len(predictors), 3, dtype=torch.float64, device=device)  # loss, top-1, top-5
    rows: list[list[tuple[int, int, list[int]]]] = [[] for _ in predictors]
    count = 0
    start = time.perf_counter()
    for images, labels in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        for k, predict in enumerate(predictors):
            logits = predict(images).float().to(device)
            topk = logits.topk(min(TOPK, logits.shape[1]), dim=1).indices
            top1, top5 = count_hits(topk, labels)
            sums[k, 0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[k, 1] += top1
            sums[k, 2] += top5
            if indices is not None:
                rows[k].extend(zip(indices[count:count + len(labels)], labels.tolist(), topk.tolist(),
                                   strict=True))
        count += len(labels)
    seconds = time.perf_counter() - start
    mine = [EvalResult(count=count, top1_hits=int(top1), top5_hits=int(top5), loss_sum=loss, seconds=seconds,
                       rows=rows[k]) for k, (loss, top1, top5) in enumerate(sums.tolist())]
    gathered = all_gather_objects(mine, env)
    return [merge([per_process[k] for per_process in gathered]) for k in range(len(predictors))]
