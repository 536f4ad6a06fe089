"""Training-mode BatchNorm fused with the activation before it and the residual add after it:
`out = BN(act(src)) [+ skip]`, forward and backward, for NCHW and channels_last tensors.

Why: in a ConvMixer block both BatchNorms follow an activation, and the first is followed by the residual
add. Run as PyTorch ops that is an activation pass, a statistics pass, a normalisation pass and an add pass,
each a full read and write of an activation tensor, and the same again backward; on an H200 BatchNorm alone
took 17% of a 1536/20 training step (docs/performance.md). Here the forward is one statistics pass over
`src` and one pass that writes `out` (the activation is recomputed, never stored), and the backward one
reduction pass and one pass that writes the gradient of `src`. Only `src` is saved for the backward, not
act(src) as well: one activation tensor less per BatchNorm.

Semantics are nn.BatchNorm2d's in training mode: batch statistics (biased variance) normalise, the running
mean and the unbiased running variance are updated with the module's momentum (or the cumulative average
when momentum is None), affine and track_running_stats may be off. The updated statistics are written to new
tensors, which `fast.ops` copies into the module's buffers (where it also counts num_batches_tracked): its
operators are functional, as PyTorch's autograd registration requires.

Numerics: every pass computes in fp32. The statistics pass centres each tile on its own mean before summing
squares, and tiles are merged with Chan's formula, so a channel whose mean is large against its spread keeps
an exact variance (sum of squares minus squared mean would cancel). Tiles are [BLOCK_O, BLOCK_C, BLOCK_I]
over the tensor viewed as [O, C, I] (NCHW: O = N, I = H*W; channels_last: O = N*H*W, I = 1), so one set of
kernels serves both layouts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

from .common import ACT_CODES, MEMORY, SUM, act, act_grad, layout, on_device_of


@triton.jit
def _tile(n_outer, C, n_inner, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Offsets, mask and channel indices of this program's [BLOCK_O, BLOCK_C, BLOCK_I] tile of the
    [outer, channel, inner] view."""
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    if BLOCK_I == 1:  # channels_last (n_inner is 1): 2-D, so the channels are provably contiguous
        ok = ((o < n_outer)[:, None] & (c < C)[None, :])[:, :, None]
        offs = (o.to(tl.int64)[:, None] * C + c[None, :])[:, :, None]
    else:
        ok = (o < n_outer)[:, None, None] & (c < C)[None, :, None] & (i < n_inner)[None, None, :]
        offs = o.to(tl.int64)[:, None, None] * (C * n_inner) + (c * n_inner)[None, :, None] + i[None, None, :]
    return offs, ok, c


@triton.jit
def _channel_sum(v):
    return tl.reduce(tl.reduce(v, 2, SUM), 0, SUM)


@triton.jit
def _stats_kernel(src_ptr, sum_ptr, m2_ptr, count_ptr, n_outer, C, n_inner, ACT: tl.constexpr,
                  BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Per tile and channel: the sum of act(src) and the sum of squares about the tile's own mean."""
    pid_o, pid_i = tl.program_id(0), tl.program_id(2)
    offs, ok, c = _tile(n_outer, C, n_inner, BLOCK_O, BLOCK_C, BLOCK_I)
    v = tl.where(ok, act(tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32), ACT), 0.0)
    count = tl.minimum(n_outer - pid_o * BLOCK_O, BLOCK_O) * tl.minimum(n_inner - pid_i * BLOCK_I, BLOCK_I)
    s = _channel_sum(v)
    d = tl.where(ok, v - (s / count)[None, :, None], 0.0)
    tile = pid_o * tl.num_programs(2) + pid_i
    c_ok = c < C
    tl.store(sum_ptr + tile * C + c, s, mask=c_ok)
    tl.store(m2_ptr + tile * C + c, _channel_sum(d * d), mask=c_ok)
    tl.store(count_ptr + tile, count.to(tl.float32), mask=tl.program_id(1) == 0)


@triton.jit
def _finalize_kernel(sum_ptr, m2_ptr, count_ptr, T, C, n, weight_ptr, bias_ptr, run_mean_ptr, run_var_ptr,
                     new_mean_ptr, new_var_ptr, mean_ptr, rstd_ptr, scale_ptr, shift_ptr, eps, factor, unbias,
                     AFFINE: tl.constexpr, UPDATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's merge of the tiles: batch mean and 1/std, the per-channel scale (gamma/std) and shift (beta)
    that apply BN, and the updated running statistics (written to new tensors: the operator is functional)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    total = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        total += tl.reduce(tl.load(sum_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0), 0, SUM)
    mean = total / n
    m2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        count = tl.load(count_ptr + t, mask=t < T, other=1.0)[:, None]
        d = tl.load(sum_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0) / count - mean[None, :]
        part = tl.load(m2_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0) + count * d * d
        m2 += tl.reduce(tl.where(ok, part, 0.0), 0, SUM)
    var = m2 / n
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(rstd_ptr + c, rstd, mask=c_ok)
    scale = rstd
    shift = mean * 0.0
    if AFFINE:
        scale = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32) * rstd
        shift = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(scale_ptr + c, scale, mask=c_ok)
    tl.store(shift_ptr + c, shift, mask=c_ok)
    if UPDATE:
        rm = tl.load(run_mean_ptr + c, mask=c_ok, other=0.0)
        rv = tl.load(run_var_ptr + c, mask=c_ok, other=0.0)
        tl.store(new_mean_ptr + c, (rm.to(tl.float32) * (1.0 - factor) + mean * factor).to(rm.dtype), mask=c_ok)
        tl.store(new_var_ptr + c, (rv.to(tl.float32) * (1.0 - factor) + var * unbias * factor).to(rv.dtype),
                 mask=c_ok)


@triton.jit
def _apply_kernel(src_ptr, skip_ptr, out_ptr, mean_ptr, scale_ptr, shift_ptr, n_outer, C, n_inner,
                  ACT: tl.constexpr, HAS_SKIP: tl.constexpr,
                  BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """out = (act(src) - mean) * scale + shift [+ skip]; centred first, as PyTorch does, so a large mean
    does not cancel against the shift."""
    offs, ok, c = _tile(n_outer, C, n_inner, BLOCK_O, BLOCK_C, BLOCK_I)
    mean = tl.load(mean_ptr + c, mask=c < C, other=0.0)[None, :, None]
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0)[None, :, None]
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0)[None, :, None]
    y = (act(tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32), ACT) - mean) * scale + shift
    if HAS_SKIP:
        y += tl.load(skip_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_sums_kernel(grad_ptr, src_ptr, mean_ptr, s1_ptr, s2_ptr, n_outer, C, n_inner, ACT: tl.constexpr,
                      BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """Per tile and channel: sum(grad) and sum(grad * (act(src) - mean))."""
    pid_o, pid_i = tl.program_id(0), tl.program_id(2)
    offs, ok, c = _tile(n_outer, C, n_inner, BLOCK_O, BLOCK_C, BLOCK_I)
    c_ok = c < C
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :, None]
    centred = tl.where(ok, act(tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32), ACT) - mean, 0.0)
    tile = pid_o * tl.num_programs(2) + pid_i
    tl.store(s1_ptr + tile * C + c, _channel_sum(g), mask=c_ok)
    tl.store(s2_ptr + tile * C + c, _channel_sum(g * centred), mask=c_ok)


@triton.jit
def _finalize_grad_kernel(s1_ptr, s2_ptr, T, C, n, weight_ptr, rstd_ptr, a_ptr, b_ptr, k_ptr, d_weight_ptr,
                          d_bias_ptr, AFFINE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums over the tiles, the coefficients of d src, and the weight and bias gradients, in one launch:
    d act(src) = gamma * rstd * (grad - s1 / n - (act(src) - mean) * rstd^2 * s2 / n)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s1 = tl.full([BLOCK_C], 0.0, tl.float32)
    s2 = tl.full([BLOCK_C], 0.0, tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        s1 += tl.reduce(tl.load(s1_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0), 0, SUM)
        s2 += tl.reduce(tl.load(s2_ptr + t[:, None] * C + c[None, :], mask=ok, other=0.0), 0, SUM)
    rstd = tl.load(rstd_ptr + c, mask=c_ok, other=0.0)
    a = rstd
    if AFFINE:
        a = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32) * rstd
        tl.store(d_weight_ptr + c, s2 * rstd, mask=c_ok)
        tl.store(d_bias_ptr + c, s1, mask=c_ok)
    tl.store(a_ptr + c, a, mask=c_ok)
    tl.store(b_ptr + c, -a * rstd * rstd * s2 / n, mask=c_ok)
    tl.store(k_ptr + c, -a * s1 / n, mask=c_ok)


@triton.jit
def _grad_kernel(grad_ptr, src_ptr, out_ptr, mean_ptr, a_ptr, b_ptr, k_ptr, n_outer, C, n_inner, ACT: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr):
    """d src = (a * grad + b * (act(src) - mean) + k) * act'(src), per channel a, b, k."""
    offs, ok, c = _tile(n_outer, C, n_inner, BLOCK_O, BLOCK_C, BLOCK_I)
    c_ok = c < C
    a = tl.load(a_ptr + c, mask=c_ok, other=0.0)[None, :, None]
    b = tl.load(b_ptr + c, mask=c_ok, other=0.0)[None, :, None]
    k = tl.load(k_ptr + c, mask=c_ok, other=0.0)[None, :, None]
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :, None]
    g = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    d = (a * g + b * (act(s, ACT) - mean) + k) * act_grad(s, ACT)
    tl.store(out_ptr + offs, d.to(out_ptr.dtype.element_ty), mask=ok)


def _view(x: torch.Tensor) -> tuple[int, int, int]:
    """The [n_outer, C, n_inner] view of a contiguous NCHW or channels_last tensor."""
    n, c, h, w = x.shape
    return (n * h * w, c, 1) if layout(x) == "nhwc" else (n, c, h * w)


def _blocks(o: int, c: int, i: int) -> tuple[int, int, int, int]:
    """(BLOCK_O, BLOCK_C, BLOCK_I, num_warps): in NCHW one channel's planes, ~1024 elements per program (a
    32x32 plane, or four 16x16 ones); in channels_last [pixels, channels] tiles."""
    if i > 1:
        block_i = min(2048, triton.next_power_of_2(i))
        block_o = max(1, min(triton.next_power_of_2(o), 1024 // block_i))
        return block_o, 1, block_i, max(1, min(8, block_o * block_i // 256))
    return 64, min(64, triton.next_power_of_2(c)), 1, 4


def _grid(o: int, c: int, i: int, blocks: tuple[int, int, int, int]) -> tuple[int, int, int]:
    return triton.cdiv(o, blocks[0]), triton.cdiv(c, blocks[1]), triton.cdiv(i, blocks[2])


def _launch(kernel: triton.JITFunction, x: torch.Tensor, *args, **constexprs) -> None:
    o, c, i = _view(x)
    blocks = _blocks(o, c, i)
    with on_device_of(x):
        kernel[_grid(o, c, i, blocks)](*args, o, c, i, **constexprs, BLOCK_O=blocks[0], BLOCK_C=blocks[1],
                                       BLOCK_I=blocks[2], num_warps=blocks[3])


def _tiles(x: torch.Tensor) -> int:
    o, c, i = _view(x)
    grid = _grid(o, c, i, _blocks(o, c, i))
    return grid[0] * grid[2]


def supports(x: torch.Tensor, bn: nn.Module) -> bool:
    """Whether `bn` on `x` is what these kernels compute: a plain nn.BatchNorm2d in training mode (not
    SyncBatchNorm, not a subclass), and x a contiguous NCHW or channels_last tensor of more than one value
    per channel (PyTorch refuses one)."""
    return type(bn) is nn.BatchNorm2d and bn.training and layout(x) is not None \
        and x.shape[1] == bn.num_features and x.numel() // x.shape[1] > 1


def supports_eval(x: torch.Tensor, bn: nn.Module) -> bool:
    """Whether `eval_act_batch_norm` computes `bn` on `x`: a plain nn.BatchNorm2d in eval mode with running
    statistics, and x a contiguous NCHW or channels_last tensor."""
    return type(bn) is nn.BatchNorm2d and not bn.training and bn.running_mean is not None \
        and layout(x) is not None and x.shape[1] == bn.num_features


def out_like(src: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
    """The (uninitialised) output of `bn_forward`: src's shape and strides, in the dtype `bn(act(src)) + skip`
    has in PyTorch (the skip may be wider than src)."""
    return torch.empty_like(src, dtype=torch.result_type(src, skip) if skip is not None else src.dtype)


def bn_forward(src: torch.Tensor, skip: torch.Tensor | None, weight: torch.Tensor | None,
               bias: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               factor: float, eps: float, activation: str,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(bn(act(src)) [+ skip], batch mean, 1/std, updated running mean, updated running variance) in training
    mode; `factor` weighs the batch in the update (the momentum, or 1/batches for a cumulative average). The
    running statistics given are read, not written (None: not tracked, and None comes back); no autograd."""
    o, c, i = _view(src)
    n = o * i
    tiles = _tiles(src)
    f32 = dict(device=src.device, dtype=torch.float32)
    sums, m2s, counts = torch.empty(tiles, c, **f32), torch.empty(tiles, c, **f32), torch.empty(tiles, **f32)
    act_id = ACT_CODES[activation]
    _launch(_stats_kernel, src, src, sums, m2s, counts, ACT=act_id)
    mean, rstd, scale, shift = (torch.empty(c, **f32) for _ in range(4))
    update = running_mean is not None and running_var is not None
    new_mean = torch.empty_like(running_mean) if update else None
    new_var = torch.empty_like(running_var) if update else None
    affine = weight is not None
    dummy = mean
    with on_device_of(src):
        _finalize_kernel[(triton.cdiv(c, 128),)](
            sums, m2s, counts, tiles, c, float(n), weight if affine else dummy, bias if affine else dummy,
            running_mean if update else dummy, running_var if update else dummy,
            new_mean if update else dummy, new_var if update else dummy,
            mean, rstd, scale, shift, eps, factor if update else 0.0, n / (n - 1),
            AFFINE=affine, UPDATE=update, BLOCK_T=32, BLOCK_C=128, num_warps=4)
    out = out_like(src, skip)
    if skip is not None:
        skip = skip.contiguous(memory_format=MEMORY[layout(src)])
    _launch(_apply_kernel, src, src, skip if skip is not None else src, out, mean, scale, shift, ACT=act_id,
            HAS_SKIP=skip is not None)
    return out, mean, rstd, new_mean, new_var


def bn_backward(src: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                activation: str, grad: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(gradient of src, of the BN weight, of the BN bias; None without affine) from the output's gradient."""
    grad = grad.contiguous(memory_format=MEMORY[layout(src)])
    o, c, i = _view(src)
    n = o * i
    tiles = _tiles(src)
    f32 = dict(device=src.device, dtype=torch.float32)
    s1, s2 = torch.empty(tiles, c, **f32), torch.empty(tiles, c, **f32)
    act_id = ACT_CODES[activation]
    _launch(_grad_sums_kernel, src, grad, src, mean, s1, s2, ACT=act_id)
    a, b, k, d_weight, d_bias = (torch.empty(c, **f32) for _ in range(5))
    affine = weight is not None
    with on_device_of(src):
        _finalize_grad_kernel[(triton.cdiv(c, 128),)](
            s1, s2, tiles, c, float(n), weight if affine else rstd, rstd, a, b, k, d_weight, d_bias,
            AFFINE=affine, BLOCK_T=32, BLOCK_C=128, num_warps=4)
    d_src = torch.empty_like(src)
    _launch(_grad_kernel, src, grad, src, d_src, mean, a, b, k, ACT=act_id)
    if not affine:
        return d_src, None, None
    return d_src, d_weight.to(weight.dtype), d_bias.to(weight.dtype)


def eval_forward(src: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, activation: str) -> torch.Tensor:
    """bn(act(src)) with the running statistics (eval mode), in one pass; no autograd."""
    mean = running_mean.float().contiguous()
    scale = torch.rsqrt(running_var.float() + eps)
    shift = torch.zeros_like(scale)
    if weight is not None:
        scale = scale * weight.float()
        shift = bias.float().contiguous()
    out = torch.empty_like(src)
    _launch(_apply_kernel, src, src, src, out, mean, scale.contiguous(), shift, ACT=ACT_CODES[activation],
            HAS_SKIP=False)
    return out
