"""A ConvMixer block's residual branch in training, `x + BN(act(dwconv(x) + b))`, forward and backward.

Why one function and not the depthwise convolution followed by the fused BatchNorm: autograd would add the
skip connection's gradient to the convolution's input gradient in a separate pass (two reads, one write of
a full tensor). Here the input-gradient kernel adds it in its epilogue instead, and the forward is the
depthwise kernel (bias only, the pre-activation is what BatchNorm saves) plus `batchnorm.bn_forward` with
the input as the skip. Autograd joins the two halves in `fast.ops` (`residual_dw_batch_norm`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import batchnorm, depthwise
from .common import MEMORY, layout


def supports(x: torch.Tensor, conv: nn.Conv2d, bn: nn.Module) -> bool:
    """Whether the kernels compute this residual branch: the depthwise kernels take x as it is (no autocast
    cast in between, which would give the skip and the convolution different inputs) and the fused
    BatchNorm takes `bn`."""
    return depthwise.unsupported_reason(x, conv.weight) is None and depthwise.compute_dtype(x) == x.dtype \
        and batchnorm.supports(x, bn)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None,
            beta: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
            factor: float, eps: float, activation: str, kernel_set: str,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                       torch.Tensor | None]:
    """(out, pre-activation, batch mean, 1/std, updated running mean, updated running variance); the running
    statistics given are read, not written (see `batchnorm.bn_forward`)."""
    pre = depthwise.conv(x, weight, bias, sign=1, act="none", save_pre=False, kernel_set=kernel_set)[0]
    out, mean, rstd, new_mean, new_var = batchnorm.bn_forward(pre, x, gamma, beta, running_mean, running_var,
                                                              factor, eps, activation)
    return out, pre, mean, rstd, new_mean, new_var


def backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor,
             gamma: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, activation: str, need_x: bool,
             need_w: bool, kernel_set: str,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                        torch.Tensor | None]:
    """Gradients of x (None unless `need_x`), the conv weight (None unless `need_w`) and bias (the weight's
    dtype), and the BN weight and bias (None without affine)."""
    grad = grad.contiguous(memory_format=MEMORY[layout(x)])
    d_pre, d_gamma, d_beta = batchnorm.bn_backward(pre, gamma, mean, rstd, activation, grad)
    _, d_weight, d_bias = depthwise.weight_grad(x, d_pre, None, tuple(weight.shape[2:]), "none", need_w,
                                                kernel_set=kernel_set)
    # The input gradient: the convolution's, plus the skip connection's (grad itself), in one pass.
    d_x = depthwise.conv(d_pre, weight, None, sign=-1, act="none", save_pre=False, add=grad,
                         kernel_set=kernel_set)[0] if need_x else None
    return (d_x, d_weight.view(weight.shape).to(weight.dtype) if need_w else None, d_bias.to(weight.dtype), d_gamma,
            d_beta)
