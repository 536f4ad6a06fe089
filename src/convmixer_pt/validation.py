"""ImageNet-style evaluation of a ConvMixer checkpoint in PyTorch or MindSpore under either protocol.

One data pipeline serves both frameworks: a PyTorch dataset over an ImageFolder tree whose transform is
the chosen protocol (`protocols`), so a score difference between frameworks is the model's, not the
pipeline's. Under torchrun each rank evaluates a disjoint stride of the images (no padding), and the
counts and prediction rows are gathered, so every image is counted exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import atomic_path, file_format, load_state_dict_strict
from .convert import Weights, read_weights
from .data import ShardSampler, error_line
from .distributed import all_gather_objects, barrier, init_distributed, shutdown
from .keymap import match_variant
from .model import ACTIVATIONS, create_model, variant_arch
from .protocols import DEFAULT_CROP_PCT, DEFAULT_IMG_SIZE, Transform, build_transform

FRAMEWORKS = ("torch", "mindspore")
TOPK = 5

# Given a batch of images (N, 3, H, W), the indices of the `k` highest logits per image, best first.
Predictor = Callable[[torch.Tensor, int], torch.Tensor]


class ValidationError(ValueError):
    """A data directory or an option that cannot be evaluated, with a message meant for the user."""


class ImageFolderFiles(Dataset):
    """ImageFolder layout with torchvision's rules (class folders sorted by name, sorted files);
    items are (image, label, index) so that predictions gathered from many ranks map back to files."""

    def __init__(self, root: str | Path, transform: Transform) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise ValidationError(f"{root}: no such directory")
        try:
            self.classes, class_to_idx = find_classes(str(root))
        except FileNotFoundError:
            raise ValidationError(f"{root}: holds no class folders; expected the ImageFolder layout "
                                  "DIR/<class>/<image> (see scripts/prepare_imagenet_val.py)") from None
        self.samples = make_dataset(str(root), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise ValidationError(f"{root}: its {len(self.classes)} class folders hold no images "
                                  f"({', '.join(IMG_EXTENSIONS)})")
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        path, label = self.samples[index]
        return self.transform(path), label, index


@dataclass
class EvalResult:
    """Counts and per-image rows (index, label, top-k predictions) of one rank, or of all after `merge`."""

    count: int = 0
    top1_hits: int = 0
    top5_hits: int = 0
    seconds: float = 0.0
    rows: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_hits / self.count if self.count else 0.0

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_hits / self.count if self.count else 0.0

    @property
    def img_per_s(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


def count_hits(topk: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of a batch; with fewer than 5 classes top-5 covers all of them."""
    hits = topk == labels[:, None]
    return int(hits[:, 0].sum()), int(hits[:, :TOPK].any(dim=1).sum())


def evaluate(predict: Predictor, loader: Iterable, num_classes: int, progress: bool = False) -> EvalResult:
    """Run `predict` over (images, labels, indices) batches and count top-1 / top-5 hits."""
    from tqdm import tqdm

    k = min(TOPK, num_classes)
    result = EvalResult()
    start = time.perf_counter()
    for images, labels, indices in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        topk = predict(images, k).cpu()
        top1, top5 = count_hits(topk, labels)
        result.count += len(labels)
        result.top1_hits += top1
        result.top5_hits += top5
        result.rows.extend(zip(indices.tolist(), labels.tolist(), topk.tolist(), strict=True))
    result.seconds = time.perf_counter() - start
    return result


def merge(results: Sequence[EvalResult]) -> EvalResult:
    """All ranks' results as one; the wall time is the slowest rank's (they run at the same time)."""
    rows = sorted((row for r in results for row in r.rows), key=lambda row: row[0])
    return EvalResult(count=sum(r.count for r in results), top1_hits=sum(r.top1_hits for r in results),
                      top5_hits=sum(r.top5_hits for r in results), seconds=max(r.seconds for r in results),
                      rows=rows)


def framework_of(checkpoint: str | Path) -> str:
    """MindSpore for a MindSpore checkpoint (recognised from the bytes, as `.ckpt` files are), else torch."""
    return "mindspore" if file_format(checkpoint) == "mindspore" else "torch"


def check_fit(name: str, checkpoint: str | Path, arch: dict[str, int], dataset: ImageFolderFiles) -> None:
    """The checkpoint must be the `--model` variant and its head must match the dataset's classes."""
    want = variant_arch(name)
    diff = [k for k in ("dim", "depth", "kernel_size", "patch_size") if arch[k] != want[k]]
    if diff:
        found = match_variant(arch)
        raise ValidationError(
            f"{checkpoint} holds a ConvMixer with {', '.join(f'{k}={arch[k]}' for k in diff)}, but --model "
            f"{name} has {', '.join(f'{k}={want[k]}' for k in diff)}"
            + (f"; use --model {found}" if found else ""))
    if arch["num_classes"] != len(dataset.classes):
        raise ValidationError(f"{checkpoint} has a {arch['num_classes']}-class head but {dataset.root} holds "
                              f"{len(dataset.classes)} class folders")


def check_act(act: str | None, known: Collection[str], framework: str) -> dict[str, str]:
    """Constructor overrides for `--act`, which swaps the variant's activation (e.g. MindCV's tanh GELU)."""
    if act is not None and act not in known:
        raise ValidationError(f"--act {act}: the {framework} model has no such activation; choose one of "
                              f"{', '.join(sorted(known))}")
    return {} if act is None else {"act": act}


def torch_model(name: str, weights: Weights, act: str | None = None) -> nn.Module:
    model = create_model(name, num_classes=weights.arch["num_classes"], **check_act(act, ACTIVATIONS, "torch"))
    load_state_dict_strict(model, weights.state, str(weights.path))
    return model


def torch_predictor(model: nn.Module, device: torch.device, amp: bool = False) -> Predictor:
    model = model.to(device).eval()

    @torch.inference_mode()
    def predict(images: torch.Tensor, k: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images.to(device, non_blocking=True))
        return logits.float().topk(k, dim=1).indices

    return predict


def mindspore_model(name: str, weights: Weights, device: torch.device, act: str | None = None) -> Any:
    """The MindSpore model with `weights` (from either framework's file, moved across bit for bit)."""
    import mindspore as ms

    from .ms_model import ACTIVATIONS as MS_ACTIVATIONS
    from .parity import ms_model

    check_act(act, MS_ACTIVATIONS, "mindspore")
    target = "GPU" if device.type == "cuda" else "CPU"
    try:
        ms.set_device(target, device.index or 0)
    except RuntimeError as e:  # MindSpore fixes its device once it has run anything; the same device is fine
        if ms.get_current_device().device_target != target:
            raise ValidationError(f"MindSpore cannot run on {target} here ({error_line(e)}); "
                                  "use --device cpu") from None
    return ms_model(weights, act, arch=dict(variant_arch(name), num_classes=weights.arch["num_classes"]))


def mindspore_predictor(net: Any) -> Predictor:
    import mindspore as ms

    def predict(images: torch.Tensor, k: int) -> torch.Tensor:
        logits = net(ms.Tensor(images.numpy())).asnumpy()
        return torch.from_numpy(logits).topk(k, dim=1).indices

    return predict


def validate(
    model: str,
    checkpoint: str | Path,
    data_dir: str | Path,
    protocol: str = "timm",
    framework: str | None = None,
    batch_size: int = 64,
    workers: int = 4,
    device: str | None = None,
    amp: bool = False,
    img_size: int = DEFAULT_IMG_SIZE,
    crop_pct: float = DEFAULT_CROP_PCT,
    act: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate `checkpoint` on `data_dir`; returns the report and one prediction row per image
    (the whole dataset's, on every rank under torchrun). `act` replaces the variant's activation."""
    framework = framework or framework_of(checkpoint)
    if framework not in FRAMEWORKS:
        raise ValidationError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    if framework == "mindspore" and amp:
        raise ValidationError("--amp applies to the torch framework only")
    if device and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValidationError(f"--device {device}: PyTorch sees no CUDA GPU here")
    # MindSpore's wheel from the package index runs on the CPU; it uses a GPU only when asked to.
    default = "cuda" if torch.cuda.is_available() and framework == "torch" else "cpu"
    device_type = torch.device(device).type if device else default
    env = init_distributed(device_type)
    try:
        if framework == "mindspore" and env.distributed:
            raise ValidationError("distributed evaluation runs the torch framework only; run MindSpore in one "
                                  "process")
        torch_device = env.device if env.distributed or not device else torch.device(device)
        dataset = ImageFolderFiles(data_dir, build_transform(protocol, img_size, crop_pct))
        weights = read_weights(checkpoint)
        check_fit(model, checkpoint, weights.arch, dataset)
        if framework == "torch":
            net = torch_model(model, weights, act)
            predict = torch_predictor(net, torch_device, amp)
        else:
            net = mindspore_model(model, weights, torch_device, act)
            predict = mindspore_predictor(net)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), env),
                            num_workers=workers, pin_memory=torch_device.type == "cuda")
        result = evaluate(predict, loader, len(dataset.classes), progress=progress and env.is_main)
        result = merge(all_gather_objects(result, env))
        barrier(env)  # gloo aborts a process that leaves while a peer's gather is still sending to it
    finally:
        shutdown(env)
    report = dict(model=model, checkpoint=str(checkpoint), framework=framework, protocol=protocol, act=net.act,
                  img_size=img_size, crop_pct=crop_pct, top1=round(result.top1, 4), top5=round(result.top5, 4),
                  count=result.count, img_per_s=round(result.img_per_s, 2), world_size=env.world_size)
    rows = [dict(path=os.path.relpath(dataset.samples[i][0], dataset.root), label=label, pred=topk[0],
                 top5=" ".join(map(str, topk))) for i, label, topk in result.rows]
    return report, rows


def write_json(report: dict[str, Any], path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def write_predictions(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """CSV `path,label,pred,top5`: pred is the top-1 class index, top5 the best five, space-separated."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "pred", "top5"])
        writer.writeheader()
        writer.writerows(rows)
