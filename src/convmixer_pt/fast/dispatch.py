"""How a ConvMixer block runs on the fast path: its depthwise part through the Triton kernels' operators.

Why this shape: the depthwise convolution dominates ConvMixer's time on GPUs (docs/performance.md), and the
kernels can also absorb what surrounds it. The model's modules are not replaced, only how a block is
evaluated, so parameters, buffers and `state_dict` keys stay exactly timm's and a checkpoint written with the
fast path on loads with it off and vice versa.

Per block (a `model.Block`: `dw`, `dw_act`, `dw_bn` inside the residual, then `pw`, `pw_act`, `pw_bn`):
- training (or whenever autograd needs gradients): one kernel computes act(dw(x) + b) and keeps the
  pre-activation; BatchNorm (batch statistics, running-stat updates) and the residual add run through the
  block's own modules. With `fused_batchnorm` the residual branch x + BN(act(dw(x) + b)) is one operator
  (`ops.residual_dw_batch_norm`: the depthwise kernel adds the bias only, the BatchNorm kernels compute
  BN(act(.)) + x in two passes each way, and the input-gradient kernel adds the skip's gradient), and
  BN(act(.)) after the 1x1 convolution is fused the same way.
- inference (BN in eval mode and no gradient needed): one kernel computes x + BN(act(dw(x) + b)) with BN
  folded to a per-channel scale and shift; with `fused_batchnorm` the pointwise branch's activation and BN
  are one pass as well.
The 1x1 convolution always runs through the block's own module.

The kernels run as custom operators (`fast.ops`), so torch.compile traces this function and keeps them as
nodes of its graph. Anything they do not cover (other layouts, dtypes, activations, strides, a missing
Triton) runs the block's plain modules, and so do torch.export (hence ONNX) and torch.jit.trace, whose graphs
are meant for other runtimes.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from ..variants import ACTIVATIONS, activation_of
from .settings import FastOptions


def _ops() -> ModuleType | None:
    """The operators (they import Triton, an optional dependency), or None where Triton is not installed."""
    try:
        from . import ops
    except ImportError:
        return None
    return ops


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


def kernels_for(options: FastOptions, x: torch.Tensor) -> ModuleType | None:
    """The operators module if the kernels are to run for input `x`, else None (the plain modules)."""
    if options.enabled is False or (options.enabled is None and not x.is_cuda):
        return None
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return None
    ops = _ops()
    if ops is None or not ops.depthwise.kernels_can_run(x):
        return None
    return ops


def run_block(block: nn.Module, x: torch.Tensor, options: FastOptions) -> torch.Tensor:
    """One ConvMixer block (a `model.Block`) through the kernels where they cover it, else its own modules.

    Torch.fx's symbolic traces record the block as one leaf (`model.Block`): the choice depends on the input's
    device, dtype and layout, which a symbolic trace does not know. Where the kernels do not cover the input,
    the block's plain modules run (`block.plain`)."""
    ops = kernels_for(options, x)
    if ops is None or not hasattr(block, "dw_bn"):
        return block.plain(x)
    dw, act, bn = block.dw, block.dw_act, block.dw_bn
    activation = kernel_activation(act)
    if activation is None or not conv_supported(dw):
        return block.plain(x)
    depthwise = ops.depthwise
    if depthwise.unsupported_reason(x, dw.weight, depthwise.compute_dtype(x)) is not None:
        return block.plain(x)
    if depthwise.layout(x) == "nhwc" and not options.channels_last:
        return block.plain(x)
    kernel_set = options.kernel_set
    params = (x, dw.weight, dw.bias, *bn.parameters())
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    fused_bn = options.fused_batchnorm
    pointwise_act = kernel_activation(block.pw_act)
    if _bn_is_eval_affine(bn) and not needs_grad:
        scale, shift = _bn_affine(bn)
        y = ops.depthwise_conv2d_affine_residual(x, dw.weight, dw.bias, scale, shift, activation, kernel_set)
        p = block.pw(y)
        pointwise_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (p, *block.pw_bn.parameters()))
        if fused_bn and pointwise_act is not None and not pointwise_grad \
                and ops.batchnorm.supports_eval(p, block.pw_bn):
            return ops.eval_act_batch_norm(p, block.pw_bn, pointwise_act)
        return block.pw_bn(block.pw_act(p))
    if fused_bn and ops.residual.supports(x, dw, bn):
        y = ops.residual_depthwise_batch_norm(x, dw, bn, activation, kernel_set)
    elif fused_bn and ops.batchnorm.supports(x, bn):
        y = ops.act_batch_norm(ops.depthwise_conv2d(x, dw.weight, dw.bias, kernel_set=kernel_set), bn, activation,
                               skip=x)
    else:
        y = bn(ops.depthwise_conv2d(x, dw.weight, dw.bias, activation, kernel_set)) + x
    p = block.pw(y)
    if fused_bn and pointwise_act is not None and ops.batchnorm.supports(p, block.pw_bn):
        return ops.act_batch_norm(p, block.pw_bn, pointwise_act)
    return block.pw_bn(block.pw_act(p))


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
