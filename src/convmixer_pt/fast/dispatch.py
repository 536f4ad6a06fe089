"""How a ConvMixer block runs on the fast path: its depthwise part through the Triton kernels.

Why this shape: the depthwise convolution dominates ConvMixer's time on GPUs (docs/performance.md), and the
kernels can also absorb what surrounds it. The model's modules are not replaced, only how a block is
evaluated, so parameters, buffers and `state_dict` keys stay exactly timm's and a checkpoint written with the
fast path on loads with it off and vice versa.

Per block, `Residual(dw conv, act, BN) -> 1x1 conv -> act -> BN`:
- training (or whenever autograd needs gradients): one kernel computes act(dw(x) + b) and keeps the
  pre-activation; BatchNorm (batch statistics, running-stat updates) and the residual add run through the
  block's own modules. With `fused_batchnorm` the residual branch x + BN(act(dw(x) + b)) is one function
  (`kernels.residual`: the depthwise kernel adds the bias only, `kernels.batchnorm` computes BN(act(.)) + x in
  two passes each way, and the input-gradient kernel adds the skip's gradient), and BN(act(.)) after the 1x1
  convolution is fused the same way.
- inference (BN in eval mode and no gradient needed): one kernel computes x + BN(act(dw(x) + b)) with BN
  folded to a per-channel scale and shift; with `fused_batchnorm` the pointwise branch's activation and BN
  are one pass as well.
The 1x1 convolution always runs through the block's own module.

Anything the kernels do not cover (other layouts, dtypes, activations, strides, torch.compile tracing, a
missing Triton) falls back to the plain modules for that block.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from ..variants import ACTIVATIONS, activation_of
from .settings import FastOptions

BlockFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _kernels() -> ModuleType | None:
    """The kernel package, or None where Triton (an optional dependency) is not installed."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def kernel_activation(module: nn.Module) -> str | None:
    """The activation's name where the kernels compute it exactly, else None."""
    name = activation_of(module)
    return name if name is not None and ACTIVATIONS[name].kernel is not None else None


def _same_padding(conv: nn.Conv2d) -> bool:
    if conv.padding == "same":
        return True
    kh, kw = conv.kernel_size
    return kh % 2 == 1 and kw % 2 == 1 and tuple(conv.padding) == ((kh - 1) // 2, (kw - 1) // 2)


def conv_supported(conv: nn.Module) -> bool:
    """A depthwise, stride-1, 'same', zero-padded nn.Conv2d: what the kernels compute."""
    return isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels \
        and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros" \
        and _same_padding(conv)


def block_fn(options: FastOptions, x: torch.Tensor) -> BlockFn:
    """How to evaluate the blocks for input `x`: the fused path or each block's own modules."""
    if options.enabled is False or (options.enabled is None and not x.is_cuda):
        return run_plain
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return run_plain
    kernels = _kernels()
    if kernels is None or not kernels.depthwise.kernels_can_run(x):
        return run_plain
    return lambda block, t: run_fused(block, t, options)


def run_plain(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, in fp32."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return scale, shift


def _bn_is_eval_affine(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None


def run_fused(block: nn.Module, x: torch.Tensor, options: FastOptions) -> torch.Tensor:
    """One ConvMixer block through the kernels; the plain modules where the kernels don't cover it."""
    kernels = _kernels()
    if kernels is None or len(block) != 4 or len(getattr(block[0], "fn", ())) != 3:
        return block(x)
    depthwise = kernels.depthwise
    dw, act, bn = block[0].fn
    activation = kernel_activation(act)
    if activation is None or not conv_supported(dw):
        return block(x)
    if depthwise.unsupported_reason(x, dw.weight, depthwise.compute_dtype(x)) is not None:
        return block(x)
    if depthwise.layout(x) == "nhwc" and not options.channels_last:
        return block(x)
    kernel_set = options.kernel_set
    params = (x, dw.weight, dw.bias, *bn.parameters())
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    fused_bn, residual = (kernels.batchnorm, kernels.residual) if options.fused_batchnorm else (None, None)
    pointwise_act = kernel_activation(block[2])
    if _bn_is_eval_affine(bn) and not needs_grad:
        scale, shift = _bn_affine(bn)
        y = depthwise.depthwise_conv2d_affine_residual(x, dw.weight, dw.bias, scale, shift, activation, kernel_set)
        p = block[1](y)
        pointwise_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (p, *block[3].parameters()))
        if fused_bn is not None and pointwise_act is not None and not pointwise_grad \
                and fused_bn.supports_eval(p, block[3]):
            return fused_bn.eval_act_batch_norm(p, block[3], pointwise_act)
        return block[3](block[2](p))
    if residual is not None and residual.supports(x, dw, bn):
        y = residual.residual_depthwise_batch_norm(x, dw, bn, activation, kernel_set)
    elif fused_bn is not None and fused_bn.supports(x, bn):
        y = fused_bn.act_batch_norm(depthwise.depthwise_conv2d(x, dw.weight, dw.bias, kernel_set=kernel_set), bn,
                                    activation, skip=x)
    else:
        y = bn(depthwise.depthwise_conv2d(x, dw.weight, dw.bias, activation, kernel_set)) + x
    p = block[1](y)
    if fused_bn is not None and pointwise_act is not None and fused_bn.supports(p, block[3]):
        return fused_bn.act_batch_norm(p, block[3], pointwise_act)
    return block[3](block[2](p))
