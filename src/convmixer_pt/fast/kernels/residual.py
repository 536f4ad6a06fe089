"""A ConvMixer block's residual branch in training, `x + BN(act(dwconv(x) + b))`, as one autograd function.

Why one function and not the depthwise convolution followed by the fused BatchNorm: autograd would add the
skip connection's gradient to the convolution's input gradient in a separate pass (two reads, one write of
a full tensor). Here the input-gradient kernel adds it in its epilogue instead, and the forward is the
depthwise kernel (bias only, the pre-activation is what BatchNorm saves) plus `batchnorm.bn_forward` with
the input as the skip.
"""

from __future__ import annotations

import torch
from torch import nn

from . import batchnorm, depthwise
from .common import MEMORY, layout


class _ResidualDepthwiseBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                gamma: torch.Tensor | None, beta: torch.Tensor | None, bn: nn.BatchNorm2d,
                activation: str, kernel_set: str) -> torch.Tensor:
        pre = depthwise.conv(x, weight, bias, sign=1, act="none", save_pre=False, kernel_set=kernel_set)[0]
        out, mean, rstd = batchnorm.bn_forward(pre, x, gamma, beta, bn, activation)
        ctx.save_for_backward(x, weight, pre, gamma, mean, rstd)
        ctx.activation, ctx.has_bias, ctx.kernel_set = activation, bias is not None, kernel_set
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels' gradients carry no autograd history
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, pre, gamma, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous(memory_format=MEMORY[layout(x)])
        d_pre, d_gamma, d_beta = batchnorm.bn_backward(pre, gamma, mean, rstd, ctx.activation, grad)
        _, d_weight, d_bias = depthwise.weight_grad(x, d_pre, None, tuple(weight.shape[2:]), "none", need_w,
                                                    kernel_set=ctx.kernel_set)
        # The input gradient: the convolution's, plus the skip connection's (grad itself), in one pass.
        d_x = depthwise.conv(d_pre, weight, None, sign=-1, act="none", save_pre=False, add=grad,
                             kernel_set=ctx.kernel_set)[0] if need_x else None
        return (d_x, d_weight.view(weight.shape).to(weight.dtype) if need_w else None,
                d_bias.to(weight.dtype) if need_b and ctx.has_bias else None,
                d_gamma if ctx.needs_input_grad[3] else None, d_beta if ctx.needs_input_grad[4] else None,
                None, None, None)


def supports(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Whether the kernels compute this residual branch: the depthwise kernels take x as it is (no autocast
    cast in between, which would give the skip and the convolution different inputs) and the fused
    BatchNorm takes `bn`."""
    return depthwise.unsupported_reason(x, conv.weight) is None and depthwise.compute_dtype(x) == x.dtype \
        and batchnorm.supports(x, bn)


def residual_depthwise_batch_norm(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                                  activation: str, kernel_set: str = "direct") -> torch.Tensor:
    """`x + bn(act(conv(x)))` with `conv` a depthwise 'same' nn.Conv2d and `bn` in training mode (check
    `supports` first)."""
    if activation not in depthwise.ACT_CODES:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(depthwise.ACT_CODES)}")
    if not supports(x, conv, bn):
        raise ValueError(f"residual_depthwise_batch_norm cannot take input {tuple(x.shape)} {x.dtype} with "
                         f"{conv} and {bn}")
    return _ResidualDepthwiseBN.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, bn, activation, kernel_set)
