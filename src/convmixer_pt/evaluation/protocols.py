"""The two ImageNet evaluation protocols the published ConvMixer numbers were measured with.

- ``timm`` (the paper's numbers): PIL decode, resize the shorter side to floor(size / crop_pct) with PIL's
  antialiased bicubic resampling, center crop, ImageNet mean/std; equal to
  ``timm.data.create_transform(size, crop_pct=crop_pct, interpolation="bicubic")`` (the filter and the
  normalisation can be set, for models trained otherwise).
- ``mindcv`` (MindCV's table): MindCV's ``transforms_imagenet_eval`` op list, run with MindSpore's own
  dataset ops: Decode, Resize(floor(size / crop_pct), bilinear, not antialiased), CenterCrop, Normalize
  with the mean/std scaled to 0-255, HWC2CHW.

Both map an image file to a float32 CHW numpy array, so either protocol can feed either framework.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import Decoded, Encoded
from ..errors import DataError, UserError, error_line
from ..runtime import require_mindspore
from ..variants import EVAL_CROP_PCT, EVAL_INPUT_SIZE, EVAL_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD

PROTOCOLS = ("timm", "mindcv")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # PIL's resize filters

Transform = Callable[[str | Path | Encoded], np.ndarray]  # an image file, or a shard sample's bytes


def resize_size(img_size: int, crop_pct: float) -> int:
    """The shorter side before the center crop: floor(224 / 0.96) = 233, as both timm and MindCV compute it."""
    return int(math.floor(img_size / crop_pct))


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def timm_transform(img_size: int = EVAL_INPUT_SIZE, crop_pct: float = EVAL_CROP_PCT,
                   interpolation: str = EVAL_INTERPOLATION, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Transform:
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return Decoded(transforms.Compose([
        transforms.Resize(resize_size(img_size, crop_pct), interpolation=InterpolationMode(interpolation)),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(tuple(mean), tuple(std)),
        transforms.Lambda(_to_numpy),
    ]))


def mindcv_ops(img_size: int = EVAL_INPUT_SIZE, crop_pct: float = EVAL_CROP_PCT,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list:
    """MindCV's eval op list for the convmixer configs (interpolation: bilinear, crop_pct: 0.96)."""
    require_mindspore("the mindcv protocol (MindSpore's image ops)")
    from mindspore.dataset import vision
    from mindspore.dataset.vision import Inter

    return [
        vision.Decode(),
        vision.Resize(resize_size(img_size, crop_pct), interpolation=Inter.BILINEAR),
        vision.CenterCrop(img_size),
        vision.Normalize(mean=[m * 255 for m in mean], std=[s * 255 for s in std]),
        vision.HWC2CHW(),
    ]


def mindspore_reason(error: BaseException) -> str:
    """The `[ERROR] ...` line of a MindSpore dataset error, whose first line only points elsewhere."""
    found = re.search(r"\[ERROR\] (.+)", str(error))
    return found.group(1).strip() if found else error_line(error)


def mindcv_transform(img_size: int = EVAL_INPUT_SIZE, crop_pct: float = EVAL_CROP_PCT,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Transform:
    ops = mindcv_ops(img_size, crop_pct, mean, std)

    def apply(source: str | Path | Encoded) -> np.ndarray:
        x = np.frombuffer(source.data, np.uint8) if isinstance(source, Encoded) else np.fromfile(source, np.uint8)
        try:
            for op in ops:  # MindSpore's dataset ops run eagerly on numpy arrays, one image at a time
                x = op(x)
        except (RuntimeError, ValueError, TypeError) as e:
            raise DataError(f"{source}: cannot read the image ({mindspore_reason(e)})") from None
        return np.ascontiguousarray(x, dtype=np.float32)

    return apply


def build_transform(protocol: str, img_size: int = EVAL_INPUT_SIZE, crop_pct: float = EVAL_CROP_PCT,
                    interpolation: str = EVAL_INTERPOLATION, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Transform:
    """Image file -> normalised float32 CHW array under `protocol`; `interpolation` is the timm protocol's
    resize filter (MindCV's protocol is bilinear by definition)."""
    if protocol == "timm":
        return timm_transform(img_size, crop_pct, interpolation, mean, std)
    if protocol == "mindcv":
        return mindcv_transform(img_size, crop_pct, mean, std)
    raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
