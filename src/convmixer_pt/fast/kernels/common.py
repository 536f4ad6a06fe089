"""What the kernel modules share: activations and their derivatives as jit helpers, the sum combiner, the
elementwise activation-gradient kernel, the two memory layouts they read, and where kernels launch.

Inside the kernels only Triton builtins and our own jit functions are called, not tl.sum, tl.zeros or
tl.sigmoid: those are jit functions of Triton's library, defined when Triton is first imported, so they
would run in the CPU interpreter only if TRITON_INTERPRET was set before anything imported Triton (torch
does). Sums go through tl.reduce with the library's own sum combiner, which the interpreter maps to numpy.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ...variants import ACTIVATIONS

# The code `act` and `act_grad` branch on: "none", then each registry activation the kernels compute
# (variants.ACTIVATIONS[name].kernel: 1 exact GELU, 2 ReLU, 3 SiLU, 4 tanh GELU).
ACT_CODES = {"none": 0, **{name: a.kernel for name, a in ACTIVATIONS.items() if a.kernel is not None}}
SUM = tl.standard._sum_combine


@triton.jit
def sigmoid(y):
    return 1.0 / (1.0 + tl.exp(-y))


@triton.jit
def act(y, ACT: tl.constexpr):
    out = y
    if ACT == 1:
        out = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 2:
        out = tl.maximum(y, 0.0)
    elif ACT == 3:
        out = y * sigmoid(y)
    elif ACT == 4:  # 0.5 y (1 + tanh(u)) = y sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3): no tanh builtin
        out = y * sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    return out


@triton.jit
def act_grad(y, ACT: tl.constexpr):
    d = y * 0.0 + 1.0
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        d = cdf + y * tl.exp(-0.5 * y * y) * 0.3989422804014327
    elif ACT == 2:
        d = tl.where(y > 0.0, 1.0, 0.0)
    elif ACT == 3:
        s = sigmoid(y)
        d = s * (1.0 + y * (1.0 - s))
    elif ACT == 4:  # d/dy [y s(2u)] = s + y s (1 - s) 2u', 2u' = 2 sqrt(2/pi) (1 + 3 * 0.044715 y^2)
        s = sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
        d = s + y * s * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * y * y)
    return d


@triton.jit
def act_grad_kernel(g_ptr, pre_ptr, gy_ptr, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """gy = g * act'(pre), elementwise over memory: any layout, as long as the three tensors share it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    pre = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(gy_ptr + offs, (g * act_grad(pre, ACT)).to(gy_ptr.dtype.element_ty), mask=ok)


def interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(act_grad_kernel, triton.runtime.JITFunction)


def on_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and stream; make that the tensor's device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


MEMORY = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def layout(x: torch.Tensor) -> str | None:
    """'nchw' (contiguous), 'nhwc' (channels_last) or None: the two memory layouts the kernels read. A tensor
    that is both (one channel, or a 1x1 plane) counts as NCHW."""
    if x.dim() != 4:
        return None
    if x.is_contiguous():
        return "nchw"
    return "nhwc" if x.is_contiguous(memory_format=torch.channels_last) else None


def batch_splits(n: int, programs_per_split: int) -> int:
    """How many shares of the batch a weight gradient reduces separately: enough programs to fill a large GPU
    (~2048), each reducing over as much of the batch as possible."""
    return max(1, min(n, 2048 // max(programs_per_split, 1)))
