"""Depthwise 'same' convolution with a fused bias and activation, in Triton: forward, input and weight gradients.

Why: PyTorch sends 9x9 depthwise convolutions in NCHW to a generic kernel and channels_last to cuDNN; in
ConvMixer-1536/20 that one op takes ~8x the time of the 1x1 convolution that has 19x its FLOPs. Its floor
is one pass over each tensor, but with K*K taps per element the instructions issued per tap decide the time
on a GPU (docs/performance.md), so every tap here is a load, a bounds check, a convert and an FMA.

Layouts: contiguous NCHW here; channels_last tensors go to `depthwise_nhwc` (same function, same tests), and
this module's entry points (`conv`, `weight_grad`, `conv_backward`) dispatch on the input's layout. In NCHW
each channel plane (H*W elements) is flattened, so a 32x32 plane is one block of 1024 lanes with no padding
lanes; a tap (dh, dw) of the filter is the same block loaded at offset dh*W + dw, masked where the row or
column leaves the plane (zero padding). The K*K shifted loads of one plane hit L1, so device memory sees each
input element about once; the K*K weights of the channel are scalars.
'same' padding follows PyTorch exactly, also for even kernels: the top/left pad is (K-1)//2.

Two kernel sets compute the same function; `kernel_set` ('direct' or 'mma') picks one for fp16/bf16 (the
fast path's default is measured per shape in docs/performance.md):
- tensor cores (`_dw_conv_mma_kernel`, `_dw_wgrad_mma_kernel`), where a plane row's window (W + KW - 1
  columns) fits MMA_MAX_WINDOW. One filter row i turns a tile of input rows into output rows by a matrix
  product with a banded (Toeplitz) matrix: out[h, :] += x[h + i - PH, window] @ T_i, T_i[k, w] = w[i, k - w].
  The product does ~BK/KW times the multiply-adds of the direct sum, on units ~30x faster than FMA, and each
  input element is loaded once per filter row instead of once per tap. The weight gradient is the same
  product transposed, m = g^T @ x_window summed over the batch, whose diagonals are the filter taps.
  Operands are in the compute dtype (weights rounded as autocast does), products accumulate in fp32.
- direct (`_dw_conv_kernel`, `_dw_wgrad_kernel`): one multiply-add per tap on CUDA cores; any plane width.

Kernels (all accumulate in fp32; inputs and outputs are fp32, fp16 or bf16):
- `_dw_conv_kernel`, grid (N*C, plane tiles): y = conv(x) + b; stores act(y) and, for training, y itself
  (the pre-activation the activation's backward needs; for ReLU its output serves). With SIGN=-1 and no bias it is
  the input gradient: a correlation with the flipped filter. With AFFINE_RESIDUAL (inference) it computes
  x + act(conv(x) + b) * scale + shift, i.e. the whole residual branch of a ConvMixer block with its
  BatchNorm folded to a per-channel scale and shift, in one read and one write.
- `common.act_grad_kernel`, elementwise: the pre-activation gradient g = grad * act'(y), once (one pass).
- `_dw_wgrad_kernel`, grid (C, batch splits, filter rows) or (filter rows, C, batch splits), whichever a GPU
  times faster per shape: reduces g (bias gradient) and g times the KW
  shifted inputs of one filter row (weight gradient) over its share of the batch and the whole plane.
  A thread holds one plane position and the row's KW taps as register tiles of 8/4/2/1 columns, so each tap
  is a compile-time offset: a load, a bounds check and an FMA, one reduction per program at the end.
  Each split writes its own partial sums, summed afterwards in PyTorch: deterministic, no atomics.

These are launch functions without autograd: `convmixer_pt.fast.ops` makes them PyTorch custom operators
(with autograd, fake tensors for torch.compile), and `convmixer_pt.fast.dispatch` wires those into the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import depthwise_nhwc as nhwc
from .common import ACT_CODES, MEMORY, SUM, act, act_grad_kernel, batch_splits, interpreted, layout, on_device_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL = 15  # the weight gradient tiles a filter row by KW's binary digits (8+4+2+1)
MAX_WIDTH = 1024  # the weight gradient gives each position of a plane row a thread: 32 warps at most
MMA_MAX_WINDOW = 128  # widest window row (W + KW - 1, rounded up to a power of two) of the tensor-core kernels
KERNEL_SETS = ("direct", "mma")
MMA_TUNING = ((16, 4), (32, 4), (32, 8))  # (BH, num_warps) tried per shape by the tensor-core kernels on a GPU


@triton.jit
def _epilogue(acc, c, base, offs, inside, x_plane, b_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr, add_ptr,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr, AFFINE_RESIDUAL: tl.constexpr,
              ADD: tl.constexpr):
    """Both conv kernels' ending: bias, the pre-activation copy, the activation, the inference branch, and a
    tensor added to the result (the residual's gradient, in the input gradient)."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    if SAVE_PRE:
        tl.store(pre_ptr + base + offs, acc.to(pre_ptr.dtype.element_ty), mask=inside)
    y = act(acc, ACT)
    if AFFINE_RESIDUAL:
        skip = tl.load(x_plane + offs, mask=inside, other=0.0).to(tl.float32)
        y = skip + y * tl.load(scale_ptr + c).to(tl.float32) + tl.load(shift_ptr + c).to(tl.float32)
    if ADD:
        y += tl.load(add_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _dw_conv_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr, add_ptr,
                    C, H, W,
                    KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                    SIGN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                    AFFINE_RESIDUAL: tl.constexpr, ADD: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    hw = H * W
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < hw
    h = offs // W
    w = offs - h * W
    base = plane.to(tl.int64) * hw
    x_plane = x_ptr + base
    w_chan = w_ptr + c * (KH * KW)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    # One 64-bit row pointer per filter row, constant column offsets (folded into the loads' immediates), and
    # bounds as one unsigned compare each (negative indices wrap to large ones): ~7 SASS instructions per
    # tap and element, of which load, convert, zero-fill and FMA are the floor.
    for i in tl.static_range(KH):
        dh = (i - PH) * SIGN
        row_ok = inside & ((h + dh).to(tl.uint32) < H)
        row_ptr = x_plane + offs + dh * W
        for j in tl.static_range(KW):
            dw = (j - PW) * SIGN
            ok = row_ok & ((w + dw).to(tl.uint32) < W)
            v = tl.load(row_ptr + dw, mask=ok, other=0.0).to(tl.float32)
            acc += v * tl.load(w_chan + (i * KW + j)).to(tl.float32)
    _epilogue(acc, c, base, offs, inside, x_plane, b_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr, add_ptr,
              HAS_BIAS, ACT, SAVE_PRE, AFFINE_RESIDUAL, ADD)


@triton.jit
def _wgrad_taps(acc, row_ptr, w, W, row_ok, g, J0: tl.constexpr, COUNT: tl.constexpr, PW: tl.constexpr):
    """acc[j, p] += x[row, w_p + J0 + j - PW] * g[p] for COUNT consecutive filter columns (0 = none)."""
    if COUNT > 0:
        dw = J0 + tl.arange(0, COUNT) - PW
        ok = row_ok[None, :] & ((w[None, :] + dw[:, None]).to(tl.uint32) < W)
        xs = tl.load(row_ptr[None, :] + dw[:, None], mask=ok, other=0.0)
        acc += xs.to(tl.float32) * g[None, :]
    return acc


@triton.jit
def _store_taps(dw_ptr, acc, J0: tl.constexpr, COUNT: tl.constexpr):
    if COUNT > 0:
        tl.store(dw_ptr + J0 + tl.arange(0, COUNT), tl.reduce(acc, 1, SUM))


@triton.jit
def _dw_wgrad_kernel(x_ptr, gy_ptr, dw_ptr, db_ptr,
                     N, C, H, W, n_per_split,
                     KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, NEED_W: tl.constexpr,
                     C8: tl.constexpr, C4: tl.constexpr, C2: tl.constexpr, C1: tl.constexpr,
                     BLOCK_W: tl.constexpr, ROWS: tl.constexpr, ROW_FIRST: tl.constexpr):
    # i: the filter row this program reduces. ROW_FIRST: grid (rows, C, splits), so the KH programs that read
    # the same planes run together and can share L2; else (C, splits, rows). On a GPU the faster is timed.
    if ROW_FIRST:
        i = tl.program_id(0)
        c = tl.program_id(1)
        split = tl.program_id(2)
    else:
        c = tl.program_id(0)
        split = tl.program_id(1)
        i = tl.program_id(2)
    hw = H * W
    dh = i - PH
    # Positions as ROWS plane rows of BLOCK_W (a power of two >= W) columns: row and column are a shift
    # and a mask, not a division.
    lin = tl.arange(0, ROWS * BLOCK_W)
    r_in_tile = lin // BLOCK_W
    w = lin % BLOCK_W
    # The row's KW taps as register tiles of 8, 4, 2 and 1 columns (KW's binary digits), so every tap of a
    # thread is a compile-time column offset and no lane is padding. A zero count is a 1-row dummy.
    acc8 = tl.full([C8 + (C8 == 0), ROWS * BLOCK_W], 0.0, tl.float32)
    acc4 = tl.full([C4 + (C4 == 0), ROWS * BLOCK_W], 0.0, tl.float32)
    acc2 = tl.full([C2 + (C2 == 0), ROWS * BLOCK_W], 0.0, tl.float32)
    acc1 = tl.full([1, ROWS * BLOCK_W], 0.0, tl.float32)
    acc_b = tl.full([ROWS * BLOCK_W], 0.0, tl.float32)
    n_start = split.to(tl.int64) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n in range(n_start, n_end):
        base = (n * C + c) * hw
        for r0 in range(0, H, ROWS):
            h = r0 + r_in_tile
            inside = (h < H) & (w < W)
            offs = h * W + w
            g = tl.load(gy_ptr + base + offs, mask=inside, other=0.0).to(tl.float32)
            acc_b += g
            if NEED_W:
                row_ok = inside & ((h + dh).to(tl.uint32) < H)
                row_ptr = x_ptr + base + offs + dh * W
                acc8 = _wgrad_taps(acc8, row_ptr, w, W, row_ok, g, 0, C8, PW)
                acc4 = _wgrad_taps(acc4, row_ptr, w, W, row_ok, g, C8, C4, PW)
                acc2 = _wgrad_taps(acc2, row_ptr, w, W, row_ok, g, C8 + C4, C2, PW)
                acc1 = _wgrad_taps(acc1, row_ptr, w, W, row_ok, g, C8 + C4 + C2, C1, PW)
    slot = split * C + c
    if NEED_W:
        row_out = dw_ptr + slot * (KH * KW) + i * KW
        _store_taps(row_out, acc8, 0, C8)
        _store_taps(row_out, acc4, C8, C4)
        _store_taps(row_out, acc2, C8 + C4, C2)
        _store_taps(row_out, acc1, C8 + C4 + C2, C1)
    tl.store(db_ptr + slot, tl.reduce(acc_b, 0, SUM), mask=i == 0)


@triton.jit
def _window(x_plane, rows, u, H, W, DH: tl.constexpr):
    """The [rows, window columns] tile of input rows `rows + DH` at columns `u`, zero outside the plane."""
    src = rows + DH
    ok = ((src.to(tl.uint32) < H)[:, None]) & ((u.to(tl.uint32) < W)[None, :])
    return tl.load(x_plane + src[:, None] * W + u[None, :], mask=ok, other=0.0)


@triton.jit
def _dw_conv_mma_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr, add_ptr,
                        C, H, W,
                        KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                        AFFINE_RESIDUAL: tl.constexpr, ADD: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                        BK: tl.constexpr, UPCAST: tl.constexpr):
    plane = tl.program_id(0)
    c = plane % C
    base = plane.to(tl.int64) * H * W
    x_plane = x_ptr + base
    rows = tl.program_id(1) * BH + tl.arange(0, BH)
    cols = tl.arange(0, BW)
    win = tl.arange(0, BK)
    # Window column k is input column k - PW; output column w takes filter column k - w from it.
    tap = win[:, None] - cols[None, :]
    tap_ok = (tap >= 0) & (tap < KW)
    w_chan = w_ptr + c * (KH * KW)
    acc = tl.full([BH, BW], 0.0, tl.float32)
    for i in tl.static_range(KH):
        xt = _window(x_plane, rows, win - PW, H, W, i - PH)
        toeplitz = tl.load(w_chan + i * KW + tap, mask=tap_ok, other=0.0).to(xt.dtype)
        if UPCAST:
            xt, toeplitz = xt.to(tl.float32), toeplitz.to(tl.float32)
        acc = tl.dot(xt, toeplitz, acc, input_precision="ieee")
    offs = rows[:, None] * W + cols[None, :]
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    _epilogue(acc, c, base, offs, inside, x_plane, b_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr, add_ptr,
              HAS_BIAS, ACT, SAVE_PRE, AFFINE_RESIDUAL, ADD)


@triton.jit
def _dw_wgrad_mma_kernel(x_ptr, gy_ptr, dw_ptr, db_ptr,
                         N, C, H, W, n_per_split,
                         KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                         BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr):
    i = tl.program_id(0)  # the filter row; first grid axis, so the programs of one channel run together
    c = tl.program_id(1)
    split = tl.program_id(2)
    hw = H * W
    cols = tl.arange(0, BW)
    win = tl.arange(0, BK)
    # m[w, k] = sum over the batch share and rows of g[h, w] * x[h + i - PH, k - PW]; then
    # dw[i, j] = sum_w m[w, w + j] (a diagonal) and db = sum g.
    m = tl.full([BW, BK], 0.0, tl.float32)
    acc_b = tl.full([BH, BW], 0.0, tl.float32)
    n_start = split.to(tl.int64) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n in range(n_start, n_end):
        base = (n * C + c) * hw
        for r0 in range(0, H, BH):
            rows = r0 + tl.arange(0, BH)
            inside = (rows < H)[:, None] & (cols < W)[None, :]
            g = tl.load(gy_ptr + base + rows[:, None] * W + cols[None, :], mask=inside, other=0.0)
            acc_b += g.to(tl.float32)
            xt = _window(x_ptr + base, rows, win - PW, H, W, i - PH).to(g.dtype)
            if UPCAST:
                g, xt = g.to(tl.float32), xt.to(tl.float32)
            m = tl.dot(tl.trans(g), xt, m, input_precision="ieee")
    diag = win[None, :] - cols[:, None]
    slot = split * C + c
    for j in tl.static_range(KW):
        dw_ij = tl.reduce(tl.reduce(tl.where(diag == j, m, 0.0), 1, SUM), 0, SUM)
        tl.store(dw_ptr + slot * (KH * KW) + i * KW + j, dw_ij)
    tl.store(db_ptr + slot, tl.reduce(tl.reduce(acc_b, 1, SUM), 0, SUM), mask=i == 0)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype | None = None) -> str | None:
    """Why the kernels cannot take these operands, computing in `dtype` (default: the input's), or None if
    they can; callers fall back to PyTorch."""
    memory = layout(x)
    if memory is None:
        return "input is not a contiguous NCHW or channels_last tensor"
    dtype = dtype or x.dtype
    if dtype not in DTYPES:
        return f"dtype {dtype} is not one of fp32/fp16/bf16"
    c = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != c or weight.shape[1] != 1:
        return f"weight shape {tuple(weight.shape)} is not depthwise for {c} channels"
    if not (1 <= weight.shape[2] <= MAX_KERNEL and 1 <= weight.shape[3] <= MAX_KERNEL):
        return f"kernel {tuple(weight.shape[2:])} is larger than {MAX_KERNEL}"
    if x.shape[0] * c >= 2**31 - 1 or x[0].numel() >= 2**31:
        return "more planes or a larger image than one launch grid can index"
    if memory == "nchw" and x.shape[3] > MAX_WIDTH:
        return f"plane width {x.shape[3]} is above {MAX_WIDTH} (the weight-gradient kernel's row tile)"
    return None


def conv_launch_config(hw: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the plane kernel: up to a 32x32 plane per program, 2 elements per thread
    (4 per thread made ptxas spill at 9x9)."""
    block = min(1024, triton.next_power_of_2(hw))
    return block, max(1, min(16, block // 64))


def wgrad_launch_config(w: int) -> tuple[int, int, int]:
    """(BLOCK_W, ROWS, num_warps) of the weight-gradient kernel: 256 plane positions, one per thread."""
    block_w = triton.next_power_of_2(w)
    rows = max(1, 256 // block_w)
    return block_w, rows, max(1, block_w * rows // 32)


def mma_launch_config(h: int, w: int, kw: int) -> tuple[int, int, int, int] | None:
    """(BH, BW, BK, num_warps) of the tensor-core kernels, or None where a plane row's window (W + KW - 1
    columns) is wider than MMA_MAX_WINDOW: tiles of BH rows x BW output columns, windows of BK columns, each
    a power of two of at least 16 (the smallest tl.dot). On a GPU, BH and num_warps are then tuned per shape
    among MMA_TUNING; this is the interpreter's choice."""
    bk = max(16, triton.next_power_of_2(w + kw - 1))
    if bk > MMA_MAX_WINDOW:
        return None
    return min(32, max(16, triton.next_power_of_2(h))), max(16, triton.next_power_of_2(w)), bk, 4


def _autotuned(kernel: triton.JITFunction) -> triton.runtime.Autotuner:
    """`kernel` with BH and num_warps timed once per shape (first call) among MMA_TUNING. The kernels only
    write their outputs, so the timing runs leave them correct."""
    configs = [triton.Config({"BH": bh}, num_warps=warps) for bh, warps in MMA_TUNING]
    return triton.autotune(configs, key=["C", "H", "W", "KH", "KW", "HAS_BIAS", "SAVE_PRE", "AFFINE_RESIDUAL",
                                         "ADD"])(kernel)


def _launch_mma(kernel: triton.JITFunction, grid: Callable[[int], tuple[int, ...]], x: torch.Tensor,
                config: tuple[int, int, int, int], *args, **constexprs) -> None:
    """Run a tensor-core kernel: autotuned on a GPU, with `config` in the interpreter."""
    bh, bw, bk, num_warps = config
    constexprs.update(BW=bw, BK=bk, UPCAST=_upcast_dot(x))
    with on_device_of(x):
        if interpreted():
            kernel[grid(bh)](*args, BH=bh, num_warps=num_warps, **constexprs)
        else:
            _TUNED[kernel][lambda meta: grid(meta["BH"])](*args, **constexprs)


_TUNED = {kernel: _autotuned(kernel) for kernel in (_dw_conv_mma_kernel, _dw_wgrad_mma_kernel)}


def _mma_config(x: torch.Tensor, kw: int, kernel_set: str, force: bool) -> tuple[int, int, int, int] | None:
    """The tensor-core launch for `kernel_set` 'mma' in fp16/bf16 where the plane fits (`force`: also fp32, for
    the tests); None for the direct kernels. fp32 takes the direct kernels: exact fp32 products get no tensor
    cores, and as an FMA product the tile needs more registers than a thread has."""
    if kernel_set not in KERNEL_SETS:
        raise ValueError(f"unknown kernel set {kernel_set!r}; choose one of {', '.join(KERNEL_SETS)}")
    if not force and (kernel_set != "mma" or x.dtype == torch.float32):
        return None
    return mma_launch_config(x.shape[2], x.shape[3], kw)


def _upcast_dot(x: torch.Tensor) -> bool:
    """Triton's CPU interpreter multiplies bf16 tiles as raw integers: there the tensor-core kernels widen
    both operands to fp32 first (exact for bf16 values; products and fp32 sums are what the GPU computes)."""
    return x.dtype == torch.bfloat16 and interpreted()



def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, sign: int, act: str,
         save_pre: bool, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
         add: torch.Tensor | None = None, kernel_set: str = "direct", force_mma: bool = False,
         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(conv(x) + b) [inference BN + residual] [+ add], pre-activation or None), in x's layout."""
    memory = layout(x)
    if add is not None:
        add = add.contiguous(memory_format=MEMORY[memory])
    if memory == "nhwc":
        return nhwc.conv_nhwc(x, weight, bias, sign=sign, act_name=act, save_pre=save_pre, scale=scale,
                              shift=shift, add=add)
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    out = out_like(x)
    pre = out_like(x) if save_pre else None
    affine = scale is not None
    mma = _mma_config(x, kw, kernel_set, force_mma)
    if mma is not None:
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        if sign < 0:  # the input gradient: a correlation with the flipped filter, padded on the other side
            weight, ph, pw = weight.flip((2, 3)), kh - 1 - ph, kw - 1 - pw
        weight = weight.to(x.dtype)  # tensor-core operands in the compute dtype, rounded as autocast does
        _launch_mma(_dw_conv_mma_kernel, lambda bh: (n * c, triton.cdiv(h, bh)), x, mma,
                    x, weight.contiguous(), bias if bias is not None else weight, scale if affine else weight,
                    shift if affine else weight, out, pre if save_pre else out, add if add is not None else out,
                    c, h, w, KH=kh, KW=kw, PH=ph, PW=pw, HAS_BIAS=bias is not None, ACT=ACT_CODES[act],
                    SAVE_PRE=save_pre, AFFINE_RESIDUAL=affine, ADD=add is not None)
        return out, pre
    block, num_warps = conv_launch_config(h * w)
    grid = (n * c, triton.cdiv(h * w, block))
    with on_device_of(x):
        _dw_conv_kernel[grid](
            x, weight.contiguous(), bias if bias is not None else weight, scale if affine else weight,
            shift if affine else weight, out, pre if save_pre else out, add if add is not None else out,
            c, h, w,
            KH=kh, KW=kw, PH=(kh - 1) // 2, PW=(kw - 1) // 2, SIGN=sign, HAS_BIAS=bias is not None,
            ACT=ACT_CODES[act], SAVE_PRE=save_pre, AFFINE_RESIDUAL=affine, ADD=add is not None, BLOCK=block,
            num_warps=num_warps,
        )
    return out, pre


def weight_grad(x: torch.Tensor, grad: torch.Tensor, pre: torch.Tensor | None, kernel: tuple[int, int], act: str,
                need_w: bool, splits: int | None = None, kernel_set: str = "direct", force_mma: bool = False,
                row_first: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(pre-activation gradient, weight gradient [C, KH*KW] in fp32 or None, bias gradient [C] in fp32).
    `row_first` fixes the direct kernel's grid order (None: timed on a GPU, row first in the interpreter)."""
    n, c, h, w = x.shape
    kh, kw = kernel
    gy = grad
    if act != "none":
        gy = torch.empty_like(grad)
        with on_device_of(x):
            act_grad_kernel[(triton.cdiv(grad.numel(), 1024),)](grad, pre, gy, grad.numel(),
                                                                ACT=ACT_CODES[act], BLOCK=1024, num_warps=4)
    if layout(x) == "nhwc":
        dw_part, db_part = nhwc.wgrad_nhwc(x, gy, kernel, need_w, splits)
        return gy, dw_part.sum(0) if need_w else None, db_part.sum(0)
    rows = kh if need_w else 1
    splits = splits or batch_splits(n, c * rows)
    n_per_split = triton.cdiv(n, splits)
    splits = triton.cdiv(n, n_per_split)
    dw_part = torch.empty((splits, c, kh * kw), device=x.device, dtype=torch.float32)
    db_part = torch.empty((splits, c), device=x.device, dtype=torch.float32)
    mma = _mma_config(x, kw, kernel_set, force_mma)
    if mma is not None:
        _launch_mma(_dw_wgrad_mma_kernel, lambda bh: (rows, c, splits), x, mma,
                    x, gy, dw_part, db_part, n, c, h, w, n_per_split,
                    KH=kh, KW=kw, PH=(kh - 1) // 2, PW=(kw - 1) // 2)
        return gy, dw_part.sum(0) if need_w else None, db_part.sum(0)
    block_w, tile_rows, num_warps = wgrad_launch_config(w)

    def grid(meta: dict) -> tuple[int, int, int]:
        return (rows, c, splits) if meta["ROW_FIRST"] else (c, splits, rows)

    args = (x, gy, dw_part, db_part, n, c, h, w, n_per_split)
    constexprs = dict(KH=kh, KW=kw, PH=(kh - 1) // 2, PW=(kw - 1) // 2, NEED_W=need_w, C8=kw & 8, C4=kw & 4,
                      C2=kw & 2, C1=kw & 1, BLOCK_W=block_w, ROWS=tile_rows)
    with on_device_of(x):
        if row_first is not None or interpreted():
            meta = dict(ROW_FIRST=row_first is not False)
            _dw_wgrad_kernel[grid(meta)](*args, **constexprs, **meta, num_warps=num_warps)
        else:
            _wgrad_tuned(num_warps)[grid](*args, **constexprs)
    return gy, dw_part.sum(0) if need_w else None, db_part.sum(0)


_WGRAD_TUNED: dict[int, triton.runtime.Autotuner] = {}


def _wgrad_tuned(num_warps: int) -> triton.runtime.Autotuner:
    """The direct weight-gradient kernel with its grid order timed once per shape (both orders write every
    output, so the timing runs leave them correct); one tuner per warp count, which the plane width sets."""
    if num_warps not in _WGRAD_TUNED:
        configs = [triton.Config({"ROW_FIRST": order}, num_warps=num_warps) for order in (True, False)]
        _WGRAD_TUNED[num_warps] = triton.autotune(configs, key=["N", "C", "H", "W", "KH", "KW", "NEED_W"])(
            _dw_wgrad_kernel)
    return _WGRAD_TUNED[num_warps]


def out_like(x: torch.Tensor) -> torch.Tensor:
    """The (uninitialised) tensor the conv kernels write for input x: its shape and dtype, in its layout."""
    return torch.empty_like(x, memory_format=torch.channels_last) if layout(x) == "nhwc" else torch.empty_like(x)


def conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor | None, act: str,
                  need_x: bool, need_w: bool, kernel_set: str = "direct",
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of act(conv(x, weight) + b): of x (None unless `need_x`), of the weight (None unless `need_w`)
    and of the bias, the weight's dtype. `saved` is what the activation's derivative reads: the pre-activation
    (GELU, SiLU), the output (ReLU) or None ("none")."""
    gy, dw, db = weight_grad(x, grad.contiguous(memory_format=MEMORY[layout(x)]), saved, tuple(weight.shape[2:]),
                             act, need_w, kernel_set=kernel_set)
    gx = conv(gy, weight, None, sign=-1, act="none", save_pre=False, kernel_set=kernel_set)[0] if need_x else None
    return gx, dw.view(weight.shape).to(weight.dtype) if need_w else None, db.to(weight.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Conv2d would compute in: the autocast dtype where autocast is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def kernels_can_run(x: torch.Tensor) -> bool:
    """Compiled kernels need a CUDA tensor; the interpreter needs a CPU one."""
    return (x.device.type == "cpu") if interpreted() else x.is_cuda
