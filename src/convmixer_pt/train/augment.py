"""timm's training augmentation after the decode and crop, done on the training device, to the bit.

The loader's worker decodes the image and cuts out RandomResizedCrop's region; everything after that is drawn
in the worker but done on the device. The draws are timm's, made in timm's order from the sample's seed: the
crop's interpolation, the flip (torchvision's `torch.rand(1) < p`), and RandAugment, whose own object runs on a
stand-in for the image with its ops recording what they would do instead of doing it (`PlanRecorder`). The
device then computes what Pillow computes (`resize`, `flip`, `replay`): the same integer and float formulas in
the same precision and order (Pillow's C: `ImagingResample`'s fixed-point coefficients, `ImagingBlend` and
`ImagingFilter3x3` in float32, the affine transform's coordinates and filters in float64, truncation where it
truncates). The worker spends about half the CPU time per image, and the pixels stay timm's
(`tests/test_train_augment.py` compares every op and whole pipelines with Pillow's output on decoded photos).

A sample's plan (int64, see `TrainCrop`) holds, after the erasing plan: GEOMETRY = 4 integers (flipped, the
crop's Pillow interpolation, the region's height and width), then `slots` RandAugment records of SLOT integers.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image
from timm.data import auto_augment

from .config import ConfigError

# The ops that can be replayed, by the name of timm's function (our `posterize` guard stands for timm's).
KINDS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
         "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel",
         "translate_x_abs", "translate_y_abs")
GEOMETRIC = frozenset({"rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel", "translate_x_abs",
                       "translate_y_abs"})
BILINEAR, BICUBIC = int(Image.Resampling.BILINEAR), int(Image.Resampling.BICUBIC)
SLOT = 3  # integers per recorded op in a plan: kind + 1 (0: none), resample, the argument's float64 bits
GEOMETRY = 4  # integers of the crop and flip in a plan: flipped, interpolation, height, width
PRECISION_BITS = 22  # Resample.c's fixed point for 8-bit images: 32 - 8 - 2
RESIZE_CHUNK = 16
PILLOW = tuple(int(part) for part in PIL.__version__.split(".")[:2])
REPLAYS_PILLOW = (13,)  # the Pillow whose arithmetic this module reproduces (older ones differ: the resize order)


def fill_color(mean: Sequence[float]) -> tuple[int, ...]:
    """What timm's RandAugment fills uncovered pixels with: its `img_mean` hyper-parameter, as
    `create_transform` derives it from the normalization mean."""
    return tuple(min(255, round(255 * m)) for m in mean)


class _Ops(list):
    """The stand-in for the image that timm's augmentation object passes from op to op."""


def _recorder(kind: str) -> Callable[..., _Ops]:
    def record(ops: _Ops, *args: Any, **kwargs: Any) -> _Ops:
        resample = 0
        if kind in GEOMETRIC:  # timm draws the interpolation inside these ops only (its `_interpolation`)
            resample = kwargs.get("resample", BICUBIC)
            if isinstance(resample, list | tuple):
                resample = random.choice(resample)
        ops.append((kind, float(args[0]) if args else 0.0, int(resample)))
        return ops
    return record


class PlanRecorder:
    """timm's augmentation `transform` (RandAugment or AutoAugment) with its ops recording instead of acting:
    called per sample after the flip, it draws what timm draws and returns the plan's integers (`slots` ops)."""

    def __init__(self, transform: Any, guarded_posterize: Callable[..., Any]) -> None:
        if PILLOW < REPLAYS_PILLOW:
            raise ConfigError(f"augment_on_device reproduces Pillow {REPLAYS_PILLOW[0]}'s arithmetic and this "
                              f"environment has Pillow {PIL.__version__}: pip install 'pillow>={REPLAYS_PILLOW[0]}'")
        if isinstance(transform, auto_augment.RandAugment):
            ops, self.slots = transform.ops, transform.num_layers
        elif isinstance(transform, auto_augment.AutoAugment):
            ops = [op for sub in transform.policy for op in sub]
            self.slots = max(len(sub) for sub in transform.policy)
        else:
            raise ConfigError(f"augment_on_device: {type(transform).__name__} cannot run on the device (only "
                              "timm's RandAugment and AutoAugment can)")
        functions = {getattr(auto_augment, kind): kind for kind in KINDS}
        functions[guarded_posterize] = "posterize"
        for op in ops:
            kind = functions.get(op.aug_fn)
            if kind is None:
                raise ConfigError(f"augment_on_device: timm's op {op.name} cannot run on the device (it can run "
                                  f"{', '.join(KINDS)})")
            op.aug_fn = _recorder(kind)
        self.transform = transform

    def __call__(self) -> tuple[int, ...]:
        ops = self.transform(_Ops())
        plan: list[int] = []
        for kind, arg, resample in ops:
            plan += [KINDS.index(kind) + 1, resample, struct.unpack("<q", struct.pack("<d", arg))[0]]
        return tuple(plan + [0] * (SLOT * self.slots - len(plan)))


def decode_plan(values: Sequence[int]) -> list[tuple[str, float, int]]:
    """The ops recorded in a plan's integers, in order."""
    ops = []
    for k in range(0, len(values), SLOT):
        kind, resample, bits = values[k:k + SLOT]
        if kind:
            ops.append((KINDS[kind - 1], struct.unpack("<d", struct.pack("<q", bits))[0], resample))
    return ops


def replay(x: torch.Tensor, plans: Sequence[Sequence[tuple[str, float, int]]], fill: Sequence[int]) -> torch.Tensor:
    """The uint8 (N, 3, H, W) batch `x` with each sample's recorded ops applied in order, as Pillow applies
    them; ops of one kind and interpolation at one position run together for all the samples that have them."""
    x = x.contiguous()
    for position in range(max((len(p) for p in plans), default=0)):
        groups: dict[tuple[str, int], list[int]] = {}
        for k, plan in enumerate(plans):
            if position < len(plan):
                groups.setdefault((plan[position][0], plan[position][2]), []).append(k)
        for (kind, resample), members in groups.items():
            args = [plans[k][position][1] for k in members]
            index = torch.tensor(members, device=x.device)
            x[index] = _apply(kind, x[index], args, resample, fill)
    return x


def _apply(kind: str, x: torch.Tensor, args: list[float], resample: int, fill: Sequence[int]) -> torch.Tensor:
    n = x.shape[0]
    per_sample = torch.tensor(args, dtype=torch.float64, device=x.device).view(n, 1, 1, 1)
    if kind == "invert":
        return 255 - x
    if kind == "posterize":  # bits kept; 8 or more: unchanged; 0: black (see inputs.posterize)
        bits = per_sample.long().clamp(0, 8)
        return x & ((~(2 ** (8 - bits) - 1)) & 0xFF).to(torch.uint8)
    if kind == "solarize":
        return torch.where(x.long() < per_sample.long(), x, 255 - x)
    if kind == "solarize_add":  # timm's: add below 128, capped at 255
        return torch.where(x < 128, (x.long() + per_sample.long()).clamp(max=255).to(torch.uint8), x)
    if kind == "auto_contrast":
        return _auto_contrast(x)
    if kind == "equalize":
        return _equalize(x)
    if kind in ("color", "contrast", "brightness", "sharpness"):
        return _blend(_degenerate(kind, x), x, per_sample.float())
    return _affine(x, [_matrix(kind, a, x.shape[-1], x.shape[-2]) for a in args], resample, fill)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB to L: ITU-R 601-2 in 16-bit fixed point, rounded."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _degenerate(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The image ImageEnhance blends with, per enhancer, as integers."""
    if kind == "color":
        return _luma(x).expand_as(x)
    if kind == "contrast":  # the mean of the L image, rounded half up (ImageStat's, in float64)
        luma = _luma(x)
        total = luma.sum(dim=(1, 2, 3), dtype=torch.int64).double()
        mean = total / torch.full_like(total, luma[0].numel())  # not `/ number` (see _auto_contrast)
        return (mean + 0.5).long().view(-1, 1, 1, 1).expand_as(x)
    if kind == "brightness":
        return torch.zeros_like(x)
    return _smooth(x)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """ImageFilter.SMOOTH as `ImagingFilter3x3` computes it: float32 weights 1/13 and 5/13, each kernel row a
    left-to-right sum, the rows added to 0.5 from the bottom one up, truncated; the border pixels kept."""
    f = x.float()
    side, centre = torch.tensor(1.0, dtype=torch.float32) / 13, torch.tensor(5.0, dtype=torch.float32) / 13
    out = x.clone()

    def row(r: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
        return r[..., :-2] * side + r[..., 1:-1] * middle + r[..., 2:] * side

    total = 0.5 + row(f[:, :, 2:], side)
    total = total + row(f[:, :, 1:-1], centre)
    total = total + row(f[:, :, :-2], side)
    out[:, :, 1:-1, 1:-1] = total.clamp(0, 255).to(torch.uint8)
    return out


def _blend(degenerate: torch.Tensor, image: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """`Image.blend(degenerate, image, alpha)` as `ImagingBlend`: float32, clipped, truncated."""
    start = degenerate.float()
    return (start + alpha * (image.int() - degenerate.int()).float()).clamp(0, 255).to(torch.uint8)


def _auto_contrast(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast with no cutoff: each channel's range stretched to 0..255 (`int()` truncation, in
    float64); a channel of one value unchanged."""
    lo = x.amin(dim=(2, 3), keepdim=True).double()
    hi = x.amax(dim=(2, 3), keepdim=True).double()
    flat = hi <= lo
    # Tensor by tensor: PyTorch divides a number by a tensor, and a CUDA tensor by a number, through a
    # reciprocal, which is not Python's quotient.
    scale = torch.full_like(lo, 255.0) / torch.where(flat, 1.0, hi - lo)
    offset = -lo * scale
    stretched = (x.double() * scale + offset).trunc().clamp(0, 255).to(torch.uint8)
    return torch.where(flat, x, stretched)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize: per channel, lut[i] = (step // 2 + pixels below i) // step, where step is the
    pixels outside the last used level over 255; unchanged when step is 0 or one level is used."""
    n, c = x.shape[:2]
    flat = x.reshape(n * c, -1).long()
    hist = torch.zeros(n * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    top = 255 - torch.flip(hist > 0, dims=[1]).int().argmax(dim=1, keepdim=True)  # the last level used
    step = (flat.shape[1] - hist.gather(1, top)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    same = (step == 0) | ((hist > 0).sum(1, keepdim=True) <= 1)
    mapped = torch.where(same, flat, lut.gather(1, flat))
    return mapped.to(torch.uint8).view_as(x)


def _matrix(kind: str, arg: float, width: int, height: int) -> tuple[float, ...] | str:
    """The affine data Pillow's transform receives for the op, computed as timm and Pillow compute it; or
    the name of a transpose that `Image.rotate` takes instead."""
    if kind == "shear_x":
        return (1, arg, 0, 0, 1, 0)
    if kind == "shear_y":
        return (1, 0, 0, arg, 1, 0)
    if kind in ("translate_x_rel", "translate_x_abs"):
        return (1, 0, arg * width if kind == "translate_x_rel" else arg, 0, 1, 0)
    if kind in ("translate_y_rel", "translate_y_abs"):
        return (1, 0, 0, 0, 1, arg * height if kind == "translate_y_rel" else arg)
    angle = arg % 360.0  # Image.rotate(angle) with expand=False, about the centre
    if angle == 0:
        return "identity"
    if angle == 180 or (angle in (90, 270) and width == height):
        return f"rotate_{int(angle)}"
    centre = (width / 2, height / 2)
    angle = -math.radians(angle)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    m[2] = m[0] * -centre[0] + m[1] * -centre[1] + m[2] + centre[0]
    m[5] = m[3] * -centre[0] + m[4] * -centre[1] + m[5] + centre[1]
    return tuple(m)


def _affine(x: torch.Tensor, matrices: list[tuple[float, ...] | str], resample: int,
            fill: Sequence[int]) -> torch.Tensor:
    """Pillow's AFFINE transform (`ImagingGenericTransform`): each output pixel's centre mapped into the input
    in float64, the uncovered ones filled, the rest sampled with the clamped bilinear or bicubic filter of
    Geometry.c and truncated."""
    out = torch.empty_like(x)
    general = [k for k, m in enumerate(matrices) if not isinstance(m, str)]
    for k, m in enumerate(matrices):
        if m == "identity":
            out[k] = x[k]
        elif m == "rotate_180":
            out[k] = x[k].flip(-1, -2)
        elif m == "rotate_90":  # counter-clockwise
            out[k] = x[k].rot90(1, (-2, -1))
        elif m == "rotate_270":
            out[k] = x[k].rot90(-1, (-2, -1))
    if not general:
        return out
    n, (_, c, h, w) = len(general), x.shape
    src = x[general].reshape(n, c, h * w)
    a = torch.tensor([matrices[k] for k in general], dtype=torch.float64, device=x.device).view(n, 6, 1, 1)
    ys = (torch.arange(h, dtype=torch.float64, device=x.device) + 0.5).view(1, h, 1)
    xs = (torch.arange(w, dtype=torch.float64, device=x.device) + 0.5).view(1, 1, w)
    xin = a[:, 0] * xs + a[:, 1] * ys + a[:, 2]
    yin = a[:, 3] * xs + a[:, 4] * ys + a[:, 5]
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    xin, yin = xin - 0.5, yin - 0.5
    x0, y0 = xin.floor(), yin.floor()
    dx, dy = (xin - x0).unsqueeze(1), (yin - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()

    def tap(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
        return src.gather(2, index).view(n, c, h, w).double()

    if resample == BICUBIC:
        rows = [_cubic(*(tap(y0 + i, x0 + j) for j in (-1, 0, 1, 2)), dx) for i in (-1, 0, 1, 2)]
        values = _cubic(*rows, dy).clamp(0, 255).trunc()
    else:
        rows = [_linear(tap(y0 + i, x0), tap(y0 + i, x0 + 1), dx) for i in (0, 1)]
        values = _linear(rows[0], rows[1], dy).trunc()
    colour = torch.tensor(list(fill), dtype=torch.float64, device=x.device).view(1, c, 1, 1)
    out[general] = torch.where(inside.unsqueeze(1), values, colour).to(torch.uint8)
    return out


def _linear(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * d


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor
           ) -> torch.Tensor:
    """Geometry.c's BICUBIC macro (a = -1 cubic convolution), its operations in its order."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _bicubic(x: float) -> float:
    """Resample.c's bicubic_filter (a = -0.5), its operations in its order."""
    x = abs(x)
    if x < 1.0:
        return (1.5 * x - 2.5) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


def _triangle(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


@lru_cache(maxsize=4096)
def resample_weights(in_size: int, out_size: int, resample: int) -> np.ndarray:
    """The (out_size, in_size) fixed-point weights with which Pillow resizes one axis of an 8-bit image
    (`precompute_coeffs`, then `normalize_coeffs_8bpc`), computed in float64 as there and in its order."""
    if resample not in (BILINEAR, BICUBIC):
        raise ValueError(f"resample {resample}: only bilinear and bicubic are replayed")
    kernel, support = (_bicubic, 2.0) if resample == BICUBIC else (_triangle, 1.0)
    scale = filterscale = in_size / out_size
    filterscale = max(filterscale, 1.0)
    support *= filterscale
    inverse = 1.0 / filterscale
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        centre = 0.0 + (xx + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        count = min(int(centre + support + 0.5), in_size) - low
        taps = [kernel((x + low - centre + 0.5) * inverse) for x in range(count)]
        total = 0.0
        for w in taps:
            total += w
        if total != 0.0:
            taps = [w / total for w in taps]
        one = 1 << PRECISION_BITS
        weights[xx, low:low + count] = [int(-0.5 + w * one) if w < 0 else int(0.5 + w * one) for w in taps]
    return weights


def vertical_first(width: int, height: int, out_width: int, out_height: int) -> bool:
    """Whether Pillow 13 resizes rows before columns for this size change (`ImagingResampleInner`: when the
    height shrinks by more than twice what the width does). The order changes the pixels: the first pass is
    rounded to 8 bits."""
    return 0 < height - out_height and height - out_height > 2 * (width - out_width)


def resize(regions: Sequence[torch.Tensor], resamples: Sequence[int], size: tuple[int, int]) -> torch.Tensor:
    """The uint8 (3, h, w) `regions` resized to `size` (height, width) as Pillow's `Image.resize` resizes
    them: two passes in Pillow's order (`vertical_first`), each a sum of integer products (exact in float64)
    rounded and clipped to 8 bits. Returns (N, 3, height, width) uint8. At most RESIZE_CHUNK regions at a
    time, so that the float64 copies stay bounded (about 50 MB for ImageNet-sized regions)."""
    out = torch.empty(len(regions), 3, *size, dtype=torch.uint8, device=regions[0].device)
    orders: dict[bool, list[int]] = {}
    for k, region in enumerate(regions):
        orders.setdefault(vertical_first(region.shape[2], region.shape[1], size[1], size[0]), []).append(k)
    for rows_first, members in orders.items():
        for start in range(0, len(members), RESIZE_CHUNK):
            chunk = members[start:start + RESIZE_CHUNK]
            out[chunk] = _resize([regions[k] for k in chunk], [resamples[k] for k in chunk], size, rows_first)
    return out


def _resize(regions: Sequence[torch.Tensor], resamples: Sequence[int], size: tuple[int, int],
            rows_first: bool) -> torch.Tensor:
    device, (height, width) = regions[0].device, size
    n, rows, cols = len(regions), max(r.shape[1] for r in regions), max(r.shape[2] for r in regions)
    x = torch.zeros(n, 3, rows, cols, dtype=torch.float64, device=device)
    across = torch.zeros(n, width, cols, dtype=torch.float64)
    down = torch.zeros(n, height, rows, dtype=torch.float64)
    for k, (region, resample) in enumerate(zip(regions, resamples, strict=True)):
        _, h, w = region.shape
        x[k, :, :h, :w] = region
        across[k, :, :w] = torch.from_numpy(resample_weights(w, width, resample))
        down[k, :, :h] = torch.from_numpy(resample_weights(h, height, resample))
    across, down = across.to(device), down.to(device)
    for vertical in ((True, False) if rows_first else (False, True)):
        x = _rows(x, down) if vertical else _columns(x, across)
    return x.to(torch.uint8)


def _round(x: torch.Tensor) -> torch.Tensor:
    """Resample.c's 8-bit result of a fixed-point sum: plus one half, shifted, clipped."""
    return ((x + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS)).floor().clamp(0, 255)


def _columns(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, c, rows, cols = x.shape
    return _round(x.reshape(n, c * rows, cols) @ weights.transpose(1, 2)).view(n, c, rows, -1)


def _rows(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    n, c, rows, cols = x.shape
    y = _round(weights @ x.permute(0, 2, 1, 3).reshape(n, rows, c * cols))
    return y.view(n, -1, c, cols).permute(0, 2, 1, 3)
