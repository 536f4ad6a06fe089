"""ImageNet-style evaluation of a ConvMixer checkpoint in PyTorch or MindSpore under either protocol.

One data pipeline serves both frameworks: a PyTorch dataset over an ImageFolder tree whose transform is the
chosen protocol (`protocols`), so a score difference between frameworks is the model's, not the pipeline's.
Under torchrun each rank evaluates a disjoint stride of the images (no padding), and the counts and
prediction rows are gathered, so every image is counted exactly once.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..data import ImageFolder, RankSampler, ShardDataset, shelter_loader_worker
from ..errors import UserError, brief, error_line
from ..files import atomic_path, write_text, writing
from ..runtime import (
    autocast,
    barrier,
    init_distributed,
    peer_loss_as_error,
    require_mindspore,
    resolve_device,
    shutdown,
)
from ..variants import (
    EVAL_CROP_PCT,
    EVAL_INPUT_SIZE,
    EVAL_INTERPOLATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SHAPE_KEYS,
    check_sizes,
    match_variant,
    variant_arch,
)
from ..weights.formats import Weights, ms_model, read_weights, recorded_config, torch_model
from .loop import Predictor, evaluate
from .protocols import INTERPOLATIONS, build_transform

FRAMEWORKS = ("torch", "mindspore")


class ValidationError(UserError):
    """A data directory or an option that cannot be evaluated."""


def check_fit(name: str, checkpoint: str | Path, arch: dict[str, int]) -> None:
    """The checkpoint must be the `--model` variant."""
    want = variant_arch(name)
    diff = [k for k in SHAPE_KEYS if arch[k] != want[k]]
    if diff:
        found = match_variant(arch)
        raise ValidationError(
            f"{checkpoint} holds a ConvMixer with {', '.join(f'{k}={arch[k]}' for k in diff)}, but --model "
            f"{name} has {', '.join(f'{k}={want[k]}' for k in diff)}"
            + (f"; use --model {found}" if found else "; leave --model out to take the checkpoint's own"))


def torch_predictor(model: nn.Module, device: torch.device, amp: bool = False) -> Predictor:
    model = model.to(device).eval()

    @torch.inference_mode()
    def predict(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, "bf16" if amp else "none"):
            return model(images)

    return predict


def set_mindspore_device(device: torch.device) -> None:
    """Run MindSpore on `device`'s kind; MindSpore fixes its device once it has run anything."""
    ms = require_mindspore("MindSpore validation (--framework mindspore; --framework torch runs PyTorch)")

    target = "GPU" if device.type == "cuda" else "CPU"
    try:
        ms.set_device(target, device.index or 0)
    except RuntimeError as e:  # the same device again is fine
        if ms.get_current_device().device_target != target:
            raise ValidationError(f"MindSpore cannot run on {target} here ({error_line(e)}); "
                                  "use --device cpu") from None


def mindspore_predictor(net: Any) -> Predictor:
    import mindspore as ms

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(net(ms.Tensor(images.cpu().numpy())).asnumpy())

    return predict


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform's settings: what the checkpoint was trained with, unless given."""

    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where the settings came from

    def check(self) -> None:
        if self.img_size < 1:
            raise ValidationError(f"image size must be a positive number of pixels, got {self.img_size}")
        check_sizes({}, self.img_size)
        if not 0 < self.crop_pct <= 1:
            raise ValidationError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValidationError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                                  f"{self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(math.isfinite(v) for v in self.mean) \
                or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValidationError(f"mean and std must be three finite numbers each (std > 0), got {list(self.mean)} "
                                  f"and {list(self.std)}")


def preprocessing(weights: Weights, img_size: int | None = None, crop_pct: float | None = None,
                  interpolation: str | None = None, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Preprocessing:
    """Given settings, then what the checkpoint's training recorded, then the published weights' defaults."""
    recorded, source = recorded_config(weights)
    pick = {key: value if value is not None else recorded.get(name, default)
            for key, name, value, default in (
                ("img_size", "input_size", img_size, EVAL_INPUT_SIZE),
                ("crop_pct", "crop_pct", crop_pct, EVAL_CROP_PCT),
                ("interpolation", "eval_interpolation", interpolation, EVAL_INTERPOLATION),
                ("mean", "mean", mean, IMAGENET_MEAN),
                ("std", "std", std, IMAGENET_STD))}
    try:
        settings = Preprocessing(int(pick["img_size"]), float(pick["crop_pct"]), str(pick["interpolation"]),
                                 tuple(float(v) for v in pick["mean"]), tuple(float(v) for v in pick["std"]),
                                 source)
    except (TypeError, ValueError):
        raise ValidationError(f"{source}: its evaluation settings are not numbers ({brief(pick)})") from None
    settings.check()
    return settings


def open_dataset(data_dir: str | Path, transform: Any) -> ImageFolder | ShardDataset:
    """An ImageFolder tree, or tar shards by their index (`<split>.json`)."""
    if str(data_dir).endswith(".json"):
        return ShardDataset(data_dir, transform)
    return ImageFolder(data_dir, transform)


def model_name(weights: Weights) -> str:
    """The registered variant the weights are, or a name that says their shapes."""
    a = weights.arch
    return weights.variant or f"convmixer_{a['dim']}_{a['depth']} (kernel {a['kernel_size']}, patch {a['patch_size']})"


def validate(
    model: str | None,
    checkpoint: str | Path,
    data_dir: str | Path,
    protocol: str = "timm",
    framework: str | None = None,
    batch_size: int = 64,
    workers: int = 4,
    device: str | None = None,
    amp: bool = False,
    img_size: int | None = None,
    crop_pct: float | None = None,
    act: str | None = None,
    progress: bool = True,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate `checkpoint` on `data_dir`; returns the report and one prediction row per image (the whole
    dataset's, on every rank under torchrun).

    `model` (a registered variant) is checked against the checkpoint's shapes; None takes the architecture
    from the checkpoint. Preprocessing settings left None come from what the checkpoint's training recorded
    (this trainer's checkpoints and args.yaml), else the published weights' defaults. The framework follows the
    checkpoint (MindSpore for a .ckpt or MindSpore-layout safetensors) unless given; `act` states the activation,
    as the converter's --act.
    """
    weights = read_weights(checkpoint, act=act)
    framework = framework or weights.framework
    if framework not in FRAMEWORKS:
        raise ValidationError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    if framework == "mindspore" and amp:
        raise ValidationError("--amp applies to the torch framework only")
    if batch_size < 1 or workers < 0:
        raise ValidationError(f"batch size must be at least 1 and workers at least 0, got {batch_size} and "
                              f"{workers}")
    if model is not None:
        variant_arch(model)
    # MindSpore's wheel from the package index runs on the CPU; it uses a GPU only when asked to.
    if device is None and framework == "mindspore":
        device = "cpu"
    device = resolve_device(device)
    settings = preprocessing(weights, img_size, crop_pct, interpolation, mean, std)
    env = init_distributed(torch.device(device).type)
    try:
        if framework == "mindspore" and env.distributed:
            raise ValidationError("distributed evaluation runs the torch framework only; run MindSpore in one "
                                  "process")
        torch_device = env.device if env.distributed else torch.device(device)
        if framework == "mindspore":
            set_mindspore_device(torch_device)
        transform = build_transform(protocol, settings.img_size, settings.crop_pct, settings.interpolation,
                                    settings.mean, settings.std)
        dataset = open_dataset(data_dir, transform)
        if model is not None:
            check_fit(model, checkpoint, weights.arch)
        if weights.arch["num_classes"] != len(dataset.classes):
            raise ValidationError(f"{checkpoint} has a {weights.arch['num_classes']}-class head but {dataset.root} "
                                  f"holds {len(dataset.classes)} class folders")
        if framework == "torch":
            net = torch_model(weights)
            predict = torch_predictor(net, torch_device, amp)
        else:
            net = ms_model(weights)
            predict = mindspore_predictor(net)
        sampler = RankSampler(len(dataset), env)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                            pin_memory=torch_device.type == "cuda", worker_init_fn=shelter_loader_worker)
        eval_device = torch_device if framework == "torch" else torch.device("cpu")
        with peer_loss_as_error(env):
            (result,) = evaluate([predict], loader, env, eval_device, indices=sampler.indices,
                                 progress=progress and env.is_main)
            barrier(env)  # gloo aborts a process that leaves while a peer's gather is still sending to it
    finally:
        shutdown(env)
    report = dict(model=model or model_name(weights), checkpoint=str(checkpoint), framework=framework,
                  protocol=protocol, act=net.act, act_source=weights.act_source, img_size=settings.img_size,
                  crop_pct=settings.crop_pct,
                  interpolation=settings.interpolation if protocol == "timm" else "bilinear",
                  mean=list(settings.mean), std=list(settings.std), preprocessing_from=settings.source,
                  top1=round(result.top1, 4), top5=round(result.top5, 4), count=result.count,
                  img_per_s=round(result.img_per_s, 2), world_size=env.world_size)
    rows = [dict(path=dataset.sample_name(i), label=label, pred=topk[0], top5=" ".join(map(str, topk)))
            for i, label, topk in result.rows]
    return report, rows


def write_json(report: dict[str, Any], path: str | Path, overwrite: bool = False) -> None:
    write_text(path, json.dumps(report, indent=2) + "\n", overwrite=overwrite)


def write_predictions(rows: Sequence[dict[str, Any]], path: str | Path, overwrite: bool = False) -> None:
    """CSV `path,label,pred,top5`: pred is the top-1 class index, top5 the best five, space-separated."""
    with atomic_path(path, overwrite) as tmp, writing(path), open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "pred", "top5"])
        writer.writeheader()
        writer.writerows(rows)
