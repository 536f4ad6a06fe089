"""The depthwise kernels for channels_last tensors: forward (bias, activation, inference BN + residual), input
gradient and weight gradient.

Why a second layout: in NCHW every tap of a thread is one 2-byte load, a convert and an FMA, and the issue
rate of those instructions sets the time (docs/performance.md). In channels_last the channels of one pixel
are adjacent, so a thread loads 8 bf16 channels of a pixel in one 16-byte load, the filter tap's 8 weights
are one vector for all the pixels the thread holds, and the bounds check is per pixel, not per element:
what remains per element and tap is close to the convert and the FMA.

Layout: a logical NCHW tensor with channels_last strides, i.e. memory [N, H, W, C]. The plane width W and
the channel count C are compile-time constants, so every tap's offset ((dh * W + dw) * C) is an immediate
of its load; a new image size or width compiles the kernels once more, like a new kernel size.
- `_dw_conv_nhwc_kernel`, grid (N * tiles of TH x TW pixels, channel blocks): one tile of pixels and
  BLOCK_C channels per program, the same arithmetic and epilogue as the NCHW direct kernel (SIGN=-1 and no
  bias: the input gradient; AFFINE_RESIDUAL: inference with BN folded, plus the skip connection).
- `_dw_wgrad_nhwc_kernel`, grid (filter rows, channel blocks, batch splits): the filter row first, so the
  KH programs that read the same input and gradient run together and share L2. Each thread holds the
  row's KW taps for its pixel and channels as register tiles of 8/4/2/1 (KW's binary digits), as the NCHW
  weight gradient does; each split writes its own partial sums (deterministic, no atomics).
Both read bf16 with an even channel count as 32-bit channel pairs (`_widen_pairs`): fewer instructions to
widen to fp32, the same bits.
On a GPU the forward's tile shape is autotuned per shape among NHWC_CONV_TUNING (the kernel only writes its
outputs, so timing runs leave them correct, and every tile shape sums the taps in the same order, so the
choice never changes a bit of the result); the interpreter takes the first entry. The weight gradient's
tile is fixed (WGRAD_PIXELS), since there the tile sets the order of the sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ACT_CODES, SUM, act, batch_splits, interpreted, on_device_of

# (TH, TW, BLOCK_C, num_warps): each thread holds 4 pixels x 8 channels (16-byte loads of bf16). Shapes that
# give a thread other pixel counts made Triton convert layouts inside the tap loop (through shared memory).
NHWC_CONV_TUNING = ((8, 8, 64, 4), (8, 8, 128, 8), (8, 8, 32, 2))
# The weight gradient's tile: WGRAD_PIXELS pixels x WGRAD_BLOCK_C channels per step, one pixel and 8 channels
# per thread. Fixed, not timed: the tile sets the order of the sums, and a timed choice could differ from run
# to run and with it the last bit of every weight gradient.
WGRAD_PIXELS, WGRAD_BLOCK_C, WGRAD_WARPS = 16, 64, 4


@triton.jit
def _channels_inside(cc, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """cc < C; a compile-time all-true mask where the blocks tile the channels exactly (the ImageNet widths),
    so the per-tap weight loads and the zero-fill of masked lanes go away there."""
    if C % BLOCK_C == 0:
        ok = tl.full([BLOCK_C], 1, tl.int1)
    else:
        ok = cc < C
    return ok


@triton.jit
def _widen_pairs(word, SHAPE: tl.constexpr):
    """bf16 channel pairs read as 32-bit words -> fp32 in channel order: the even channel is the word shifted
    up 16 bits, the odd one the word with its low half cleared, one instruction each (a bf16 lane on its own
    takes a permute and a shift). Exact, like any bf16 -> fp32 conversion."""
    even = (word << 16).to(tl.float32, bitcast=True)
    odd = (word & -65536).to(tl.float32, bitcast=True)
    return tl.reshape(tl.join(even, odd), SHAPE)


@triton.jit
def _dw_conv_nhwc_kernel(x_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr, add_ptr, H,
                         C: tl.constexpr, W: tl.constexpr,
                         KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                         SIGN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
                         AFFINE_RESIDUAL: tl.constexpr, ADD: tl.constexpr, PAIRS: tl.constexpr,
                         TH: tl.constexpr, TW: tl.constexpr, BLOCK_C: tl.constexpr):
    tiles_w: tl.constexpr = (W + TW - 1) // TW
    tiles = (H + TH - 1) // TH * tiles_w
    pid = tl.program_id(0)
    n = pid // tiles
    t = pid - n * tiles
    tile_h = t // tiles_w
    p = tl.arange(0, TH * TW)
    h = tile_h * TH + p // TW
    w = (t - tile_h * tiles_w) * TW + p % TW
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = _channels_inside(cc, C, BLOCK_C)
    pix_ok = (h < H) & (w < W)
    img = n.to(tl.int64) * H * (W * C)
    x_img = x_ptr + img
    offs = (h * W + w)[:, None] * C + cc[None, :]
    # bf16 with an even channel count is read as 32-bit channel pairs (`_widen_pairs`).
    HALF: tl.constexpr = BLOCK_C // 2
    kq = tl.program_id(1) * HALF + tl.arange(0, HALF)
    q_ok = _channels_inside(kq, C // 2, HALF)
    word_offs = (h * W + w)[:, None] * (C // 2) + kq[None, :]
    acc = tl.full([TH * TW, BLOCK_C], 0.0, tl.float32)
    # Filter rows as a loop, not unrolled: unrolled, the compiler issues all KH*KW loads of a thread first
    # and spills them. Within a row the KW column offsets are immediates.
    for i in range(KH):
        dh = (i - PH) * SIGN
        row_ok = pix_ok & ((h + dh).to(tl.uint32) < H)
        w_row = w_ptr + i * (KW * C) + cc
        for j in tl.static_range(KW):
            dw = (j - PW) * SIGN
            ok = row_ok & ((w + dw).to(tl.uint32) < W)
            if PAIRS:
                words = x_img.to(tl.pointer_type(tl.int32), bitcast=True) + word_offs + (dh * W + dw) * (C // 2)
                v = _widen_pairs(tl.load(words, mask=ok[:, None] & q_ok[None, :], other=0), [TH * TW, BLOCK_C])
            else:
                v = tl.load(x_img + offs + (dh * W + dw) * C, mask=ok[:, None] & c_ok[None, :], other=0.0)
            tap = tl.load(w_row + j * C, mask=c_ok, other=0.0)
            acc += v.to(tl.float32) * tap[None, :]
    inside = pix_ok[:, None] & c_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + img + offs, acc.to(pre_ptr.dtype.element_ty), mask=inside)
    y = act(acc, ACT)
    if AFFINE_RESIDUAL:
        skip = tl.load(x_img + offs, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + cc, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + cc, mask=c_ok, other=0.0)
        y = skip + y * scale[None, :] + shift[None, :]
    if ADD:
        y += tl.load(add_ptr + img + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + img + offs, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _wgrad_taps_nhwc(acc, row_ptr, row_words, w, row_ok, c_ok, q_ok, g, J0: tl.constexpr, COUNT: tl.constexpr,
                     PW: tl.constexpr, C: tl.constexpr, W: tl.constexpr, PAIRS: tl.constexpr):
    """acc[j, p, c] += x[row, w_p + J0 + j - PW, c] * g[p, c] for COUNT consecutive filter columns (0 = none);
    PAIRS: x read as bf16 channel pairs through `row_words`."""
    if COUNT > 0:
        dw = J0 + tl.arange(0, COUNT) - PW
        ok = row_ok[None, :] & ((w[None, :] + dw[:, None]).to(tl.uint32) < W)
        if PAIRS:
            words = tl.load(row_words[None, :, :] + (dw * (C // 2))[:, None, None],
                            mask=ok[:, :, None] & q_ok[None, None, :], other=0)
            xs = _widen_pairs(words, [COUNT, acc.shape[1], acc.shape[2]])
        else:
            xs = tl.load(row_ptr[None, :, :] + (dw * C)[:, None, None], mask=ok[:, :, None] & c_ok[None, None, :],
                         other=0.0).to(tl.float32)
        acc += xs * g[None, :, :]
    return acc


@triton.jit
def _store_taps_nhwc(row_out, acc, c_ok, J0: tl.constexpr, COUNT: tl.constexpr):
    if COUNT > 0:
        taps = J0 + tl.arange(0, COUNT)
        tl.store(row_out[None, :] + taps[:, None], tl.reduce(acc, 1, SUM), mask=c_ok[None, :])


@triton.jit
def _dw_wgrad_nhwc_kernel(x_ptr, gy_ptr, dw_ptr, db_ptr, N, H, n_per_split,
                          C: tl.constexpr, W: tl.constexpr,
                          KH: tl.constexpr, KW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                          NEED_W: tl.constexpr, C8: tl.constexpr, C4: tl.constexpr, C2: tl.constexpr,
                          C1: tl.constexpr, PAIRS: tl.constexpr, P: tl.constexpr, BLOCK_C: tl.constexpr):
    i = tl.program_id(0)  # the filter row this program reduces
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    c_ok = _channels_inside(cc, C, BLOCK_C)
    HALF: tl.constexpr = BLOCK_C // 2  # channel pairs, where PAIRS
    kq = tl.program_id(1) * HALF + tl.arange(0, HALF)
    q_ok = _channels_inside(kq, C // 2, HALF)
    x_words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    g_words = gy_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    dh = i - PH
    hw = H * W
    p = tl.arange(0, P)
    acc8 = tl.full([C8 + (C8 == 0), P, BLOCK_C], 0.0, tl.float32)
    acc4 = tl.full([C4 + (C4 == 0), P, BLOCK_C], 0.0, tl.float32)
    acc2 = tl.full([C2 + (C2 == 0), P, BLOCK_C], 0.0, tl.float32)
    acc1 = tl.full([1, P, BLOCK_C], 0.0, tl.float32)
    acc_b = tl.full([P, BLOCK_C], 0.0, tl.float32)
    n_start = split.to(tl.int64) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    for n in range(n_start, n_end):
        img = n * hw * C
        for p0 in range(0, hw, P):
            pix = p0 + p
            h = pix // W
            w = pix % W
            inside = pix < hw
            offs = img + pix[:, None] * C + cc[None, :]
            word_offs = img // 2 + pix[:, None] * (C // 2) + kq[None, :]
            if PAIRS:
                g = _widen_pairs(tl.load(g_words + word_offs, mask=inside[:, None] & q_ok[None, :], other=0),
                                 [P, BLOCK_C])
            else:
                g = tl.load(gy_ptr + offs, mask=inside[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc_b += g
            if NEED_W:
                row_ok = inside & ((h + dh).to(tl.uint32) < H)
                row_ptr = x_ptr + offs + dh * (W * C)
                row_words = x_words + word_offs + dh * (W * (C // 2))
                acc8 = _wgrad_taps_nhwc(acc8, row_ptr, row_words, w, row_ok, c_ok, q_ok, g, 0, C8, PW, C, W, PAIRS)
                acc4 = _wgrad_taps_nhwc(acc4, row_ptr, row_words, w, row_ok, c_ok, q_ok, g, C8, C4, PW, C, W, PAIRS)
                acc2 = _wgrad_taps_nhwc(acc2, row_ptr, row_words, w, row_ok, c_ok, q_ok, g, C8 + C4, C2, PW, C, W,
                                        PAIRS)
                acc1 = _wgrad_taps_nhwc(acc1, row_ptr, row_words, w, row_ok, c_ok, q_ok, g, C8 + C4 + C2, C1, PW, C,
                                        W, PAIRS)
    slot = split * C + cc
    if NEED_W:
        row_out = dw_ptr + slot * (KH * KW) + i * KW
        _store_taps_nhwc(row_out, acc8, c_ok, 0, C8)
        _store_taps_nhwc(row_out, acc4, c_ok, C8, C4)
        _store_taps_nhwc(row_out, acc2, c_ok, C8 + C4, C2)
        _store_taps_nhwc(row_out, acc1, c_ok, C8 + C4 + C2, C1)
    tl.store(db_ptr + slot, tl.reduce(acc_b, 0, SUM), mask=c_ok & (i == 0))


def _conv_configs() -> list[triton.Config]:
    return [triton.Config({"TH": th, "TW": tw, "BLOCK_C": bc}, num_warps=warps)
            for th, tw, bc, warps in NHWC_CONV_TUNING]


_CONV_TUNED = triton.autotune(_conv_configs(), key=["H", "C", "W", "KH", "KW", "SIGN", "HAS_BIAS", "SAVE_PRE",
                                                     "AFFINE_RESIDUAL", "ADD", "PAIRS"])(_dw_conv_nhwc_kernel)


def conv_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, sign: int, act_name: str,
              save_pre: bool, scale: torch.Tensor | None, shift: torch.Tensor | None,
              add: torch.Tensor | None = None, pairs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(act(conv(x) + b) [with the inference BN + residual] [+ add], pre-activation or None) for channels_last
    x (and add). `pairs`: read bf16 channels in pairs (default: wherever possible: bf16, an even count)."""
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    out = torch.empty_like(x, memory_format=torch.channels_last)
    pre = torch.empty_like(out) if save_pre else None
    # Each tap's weights as one contiguous vector over the channels: [KH*KW, C], in fp32.
    taps = weight.detach().float().reshape(c, kh * kw).t().contiguous()
    can_pair = _pairable(x)
    pairs = can_pair if pairs is None else pairs and can_pair
    affine = scale is not None
    args = (x, taps, bias if bias is not None else taps, scale if affine else taps, shift if affine else taps,
            out, pre if save_pre else out, add if add is not None else out, h)
    constexprs = dict(C=c, W=w, KH=kh, KW=kw, PH=(kh - 1) // 2, PW=(kw - 1) // 2, SIGN=sign,
                      HAS_BIAS=bias is not None, ACT=ACT_CODES[act_name], SAVE_PRE=save_pre,
                      AFFINE_RESIDUAL=affine, ADD=add is not None, PAIRS=pairs)

    def grid(meta: dict) -> tuple[int, int]:
        tiles = triton.cdiv(h, meta["TH"]) * triton.cdiv(w, meta["TW"])
        return n * tiles, triton.cdiv(c, meta["BLOCK_C"])

    with on_device_of(x):
        if interpreted():
            th, tw, bc, warps = NHWC_CONV_TUNING[0]
            meta = dict(TH=th, TW=tw, BLOCK_C=bc)
            _dw_conv_nhwc_kernel[grid(meta)](*args, **constexprs, **meta, num_warps=warps)
        else:
            _CONV_TUNED[grid](*args, **constexprs)
    return out, pre


def _pairable(t: torch.Tensor) -> bool:
    """Whether `t` can be read as 32-bit bf16 channel pairs: bf16, an even channel count, 4-byte aligned."""
    return t.dtype == torch.bfloat16 and t.shape[1] % 2 == 0 and t.data_ptr() % 4 == 0


def wgrad_nhwc(x: torch.Tensor, gy: torch.Tensor, kernel: tuple[int, int], need_w: bool, splits: int | None = None,
               pairs: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split partial sums (weight [splits, C, KH*KW], bias [splits, C], fp32) for channels_last x, gy;
    `pairs` as in `conv_nhwc`."""
    n, c, h, w = x.shape
    kh, kw = kernel
    rows = kh if need_w else 1
    splits = splits or batch_splits(n, rows * triton.cdiv(c, WGRAD_BLOCK_C))
    n_per_split = triton.cdiv(n, splits)
    splits = triton.cdiv(n, n_per_split)
    dw_part = torch.empty((splits, c, kh * kw), device=x.device, dtype=torch.float32)
    db_part = torch.empty((splits, c), device=x.device, dtype=torch.float32)
    args = (x, gy, dw_part, db_part, n, h, n_per_split)
    can_pair = _pairable(x) and _pairable(gy)
    pairs = can_pair if pairs is None else pairs and can_pair
    constexprs = dict(C=c, W=w, KH=kh, KW=kw, PH=(kh - 1) // 2, PW=(kw - 1) // 2, NEED_W=need_w,
                      C8=kw & 8, C4=kw & 4, C2=kw & 2, C1=kw & 1, PAIRS=pairs)
    grid = (rows, triton.cdiv(c, WGRAD_BLOCK_C), splits)
    with on_device_of(x):
        _dw_wgrad_nhwc_kernel[grid](*args, **constexprs, P=WGRAD_PIXELS, BLOCK_C=WGRAD_BLOCK_C,
                                    num_warps=WGRAD_WARPS)
    return dw_part, db_part
