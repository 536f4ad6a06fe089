"""The fast path's Triton kernels as PyTorch custom operators (`torch.library.custom_op`, namespace `convmixer_pt`).

Why operators: torch.compile, torch.export and FX's tracers cannot look inside a Triton launch. As an operator
with a fake implementation (the outputs' shapes, dtypes and strides, computed without running anything) each
kernel call is one node of their graphs, so a compiled model runs these kernels and fuses what surrounds them;
the autograd formulas are registered with the operators, so their backward operators are graph nodes as well.

All eight are functional: they allocate their outputs and change none of their inputs (PyTorch registers
autograd formulas for functional operators only). Where the kernels update BatchNorm's running statistics, the
operator returns the updated statistics, and the functions at the end of this module copy them into the
module's buffers and count `num_batches_tracked`, as nn.BatchNorm2d does.

| operator | computes | backward operator |
|---|---|---|
| dw_conv_act | act(dwconv(x) + b) and, for GELU/SiLU gradients, the pre-activation | dw_conv_act_backward |
| dw_conv_affine_residual | x + act(dwconv(x) + b) * scale + shift (inference, BatchNorm folded) | none |
| act_batch_norm | training BN(act(src)) [+ skip], batch mean, 1/std, updated statistics | act_batch_norm_backward |
| eval_act_batch_norm | eval-mode BN(act(src)) | none |
| residual_dw_batch_norm | x + BN(act(dwconv(x) + b)) in training, and what its backward reads | ..._backward |

The backward operators have no autograd of their own (second derivatives are refused). Operators are
registered for CPU and CUDA: CUDA runs the compiled kernels, the CPU runs them only where they were defined
under Triton's interpreter (TRITON_INTERPRET=1, as the tests do). This module imports Triton; `fast.dispatch`
imports it only where Triton is installed. The kernel modules are looked up at call time (`depthwise.conv`),
so the tests' reloading of them under the interpreter needs no new registration.

The functions below the operators (`depthwise_conv2d`, ..., `DepthwiseConv2d`) are the autograd-level API:
they check their operands, cast to autocast's dtype (an operator has no autocast rule) and call the operators.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .kernels import batchnorm, depthwise, residual
from .kernels.common import ACT_CODES, MEMORY, layout

NAMESPACE = "convmixer_pt"
DEVICES = ("cpu", "cuda")
# The activations whose derivative reads the pre-activation (ReLU's reads its output, "none" nothing).
SMOOTH = tuple(name for name in ACT_CODES if name not in ("none", "relu"))
OP_NAMES = ("dw_conv_act", "dw_conv_act_backward", "dw_conv_affine_residual", "act_batch_norm",
            "act_batch_norm_backward", "eval_act_batch_norm", "residual_dw_batch_norm",
            "residual_dw_batch_norm_backward")


def _runnable(x: Tensor) -> None:
    """The kernels' two preconditions that no caller may skip: a device they run on and a layout they read."""
    if not depthwise.kernels_can_run(x):
        mode = "interpreted (TRITON_INTERPRET=1 when they were defined)" if depthwise.interpreted() else "compiled"
        raise RuntimeError(f"{NAMESPACE}: the {mode} Triton kernels cannot run on a {x.device.type} tensor")
    if layout(x) is None:
        raise RuntimeError(f"{NAMESPACE}: the kernels read contiguous NCHW or channels_last tensors, got strides "
                           f"{tuple(x.stride())} for shape {tuple(x.shape)}")


def _none(like: Tensor) -> Tensor:
    """The stand-in for an output that is not needed: operators return tensors only, and no output may alias
    an input."""
    return like.new_empty(0)


def _factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """How much of the batch's statistics a running statistic takes in: nn.BatchNorm2d's rule."""
    if momentum is not None:
        return momentum
    return 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0


# ---- depthwise convolution + activation ----------------------------------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::dw_conv_act", mutates_args=(), device_types=DEVICES)
def _dw_conv_act(x: Tensor, weight: Tensor, bias: Tensor | None, act: str, save_pre: bool,
                 kernel_set: str) -> tuple[Tensor, Tensor]:
    _runnable(x)
    out, pre = depthwise.conv(x, weight, bias, sign=1, act=act, save_pre=save_pre, kernel_set=kernel_set)
    return out, pre if pre is not None else _none(x)


@_dw_conv_act.register_fake
def _(x, weight, bias, act, save_pre, kernel_set):
    return depthwise.out_like(x), depthwise.out_like(x) if save_pre else _none(x)


def _dw_conv_act_setup(ctx, inputs, output) -> None:
    x, weight, bias, act, save_pre, kernel_set = inputs
    out, pre = output
    ctx.mark_non_differentiable(pre)
    # ReLU's derivative reads off its output (which the BatchNorm after it keeps anyway): no extra copy.
    ctx.save_for_backward(x, weight, out if act == "relu" else pre if save_pre else None)
    ctx.act, ctx.save_pre, ctx.kernel_set, ctx.has_bias = act, save_pre, kernel_set, bias is not None


@once_differentiable
def _dw_conv_act_backward(ctx, grad: Tensor, _grad_pre: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, saved = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if ctx.act in SMOOTH and not ctx.save_pre:
        raise RuntimeError(f"{NAMESPACE}::dw_conv_act ran with save_pre=False, but the {ctx.act} gradient needs "
                           "the pre-activation")
    gx, gw, gb = torch.ops.convmixer_pt.dw_conv_act_backward.default(grad, x, weight, saved, ctx.act, need_x,
                                                                     need_w, ctx.kernel_set)
    return gx if need_x else None, gw if need_w else None, gb if need_b and ctx.has_bias else None, None, None, None


_dw_conv_act.register_autograd(_dw_conv_act_backward, setup_context=_dw_conv_act_setup)


@torch.library.custom_op(f"{NAMESPACE}::dw_conv_act_backward", mutates_args=(), device_types=DEVICES)
def _dw_conv_act_backward_op(grad: Tensor, x: Tensor, weight: Tensor, saved: Tensor | None, act: str, need_x: bool,
                             need_w: bool, kernel_set: str) -> tuple[Tensor, Tensor, Tensor]:
    _runnable(x)
    gx, gw, gb = depthwise.conv_backward(grad, x, weight, saved, act, need_x, need_w, kernel_set)
    return gx if gx is not None else _none(x), gw if gw is not None else _none(weight), gb


@_dw_conv_act_backward_op.register_fake
def _(grad, x, weight, saved, act, need_x, need_w, kernel_set):
    gx = depthwise.out_like(grad.contiguous(memory_format=MEMORY[layout(x)])) if need_x else _none(x)
    return gx, weight.new_empty(weight.shape) if need_w else _none(weight), weight.new_empty(weight.shape[0])


@torch.library.custom_op(f"{NAMESPACE}::dw_conv_affine_residual", mutates_args=(), device_types=DEVICES)
def _dw_conv_affine_residual(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor, act: str,
                             kernel_set: str) -> Tensor:
    _runnable(x)
    return depthwise.conv(x, weight, bias, sign=1, act=act, save_pre=False, scale=scale, shift=shift,
                          kernel_set=kernel_set)[0]


@_dw_conv_affine_residual.register_fake
def _(x, weight, bias, scale, shift, act, kernel_set):
    return depthwise.out_like(x)


# ---- BatchNorm fused with the activation before it (and a residual add after it) ------------------------------

@torch.library.custom_op(f"{NAMESPACE}::act_batch_norm", mutates_args=(), device_types=DEVICES)
def _act_batch_norm(src: Tensor, skip: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                    running_mean: Tensor | None, running_var: Tensor | None, num_batches_tracked: Tensor | None,
                    momentum: float | None, eps: float, act: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _runnable(src)
    out, mean, rstd, new_mean, new_var = batchnorm.bn_forward(
        src, skip, weight, bias, running_mean, running_var, _factor(momentum, num_batches_tracked), eps, act)
    return out, mean, rstd, new_mean if new_mean is not None else _none(src), \
        new_var if new_var is not None else _none(src)


def _stats_fake(src: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> tuple[Tensor, ...]:
    """Batch mean and 1/std (fp32, one per channel), then the updated running statistics or stand-ins."""
    channel = src.new_empty(src.shape[1], dtype=torch.float32)
    return (channel, torch.empty_like(channel),
            torch.empty_like(running_mean) if running_mean is not None and running_var is not None else _none(src),
            torch.empty_like(running_var) if running_mean is not None and running_var is not None else _none(src))


@_act_batch_norm.register_fake
def _(src, skip, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, act):
    return batchnorm.out_like(src, skip), *_stats_fake(src, running_mean, running_var)


def _act_batch_norm_setup(ctx, inputs, output) -> None:
    src, skip, weight = inputs[:3]
    out, mean, rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(mean, rstd, new_mean, new_var)
    ctx.save_for_backward(src, weight, mean, rstd)
    ctx.act = inputs[-1]


@once_differentiable
def _act_batch_norm_backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
    src, weight, mean, rstd = ctx.saved_tensors
    d_src, d_weight, d_bias = torch.ops.convmixer_pt.act_batch_norm_backward.default(grad, src, weight, mean, rstd,
                                                                                     ctx.act)
    need = ctx.needs_input_grad
    return (d_src if need[0] else None, grad if need[1] else None, d_weight if need[2] else None,
            d_bias if need[3] else None, None, None, None, None, None, None)


_act_batch_norm.register_autograd(_act_batch_norm_backward, setup_context=_act_batch_norm_setup)


@torch.library.custom_op(f"{NAMESPACE}::act_batch_norm_backward", mutates_args=(), device_types=DEVICES)
def _act_batch_norm_backward_op(grad: Tensor, src: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor,
                                act: str) -> tuple[Tensor, Tensor, Tensor]:
    _runnable(src)
    d_src, d_weight, d_bias = batchnorm.bn_backward(src, weight, mean, rstd, act, grad)
    return d_src, d_weight if d_weight is not None else _none(src), d_bias if d_bias is not None else _none(src)


@_act_batch_norm_backward_op.register_fake
def _(grad, src, weight, mean, rstd, act):
    if weight is None:
        return torch.empty_like(src), _none(src), _none(src)
    return torch.empty_like(src), torch.empty_like(weight), torch.empty_like(weight)


@torch.library.custom_op(f"{NAMESPACE}::eval_act_batch_norm", mutates_args=(), device_types=DEVICES)
def _eval_act_batch_norm(src: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                         bias: Tensor | None, eps: float, act: str) -> Tensor:
    _runnable(src)
    return batchnorm.eval_forward(src, running_mean, running_var, weight, bias, eps, act)


@_eval_act_batch_norm.register_fake
def _(src, running_mean, running_var, weight, bias, eps, act):
    return torch.empty_like(src)


# ---- the residual branch in training: x + BN(act(dwconv(x) + b)) ------------------------------------------

@torch.library.custom_op(f"{NAMESPACE}::residual_dw_batch_norm", mutates_args=(), device_types=DEVICES)
def _residual_dw_batch_norm(x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor | None,
                            beta: Tensor | None, running_mean: Tensor | None, running_var: Tensor | None,
                            num_batches_tracked: Tensor | None, momentum: float | None, eps: float, act: str,
                            kernel_set: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _runnable(x)
    out, pre, mean, rstd, new_mean, new_var = residual.forward(
        x, weight, bias, gamma, beta, running_mean, running_var, _factor(momentum, num_batches_tracked), eps, act,
        kernel_set)
    return out, pre, mean, rstd, new_mean if new_mean is not None else _none(x), \
        new_var if new_var is not None else _none(x)


@_residual_dw_batch_norm.register_fake
def _(x, weight, bias, gamma, beta, running_mean, running_var, num_batches_tracked, momentum, eps, act, kernel_set):
    pre = depthwise.out_like(x)
    return batchnorm.out_like(pre, x), pre, *_stats_fake(x, running_mean, running_var)


def _residual_setup(ctx, inputs, output) -> None:
    x, weight, bias, gamma = inputs[:4]
    out, pre, mean, rstd, new_mean, new_var = output
    ctx.mark_non_differentiable(pre, mean, rstd, new_mean, new_var)
    ctx.save_for_backward(x, weight, pre, gamma, mean, rstd)
    ctx.act, ctx.kernel_set, ctx.has_bias = inputs[10], inputs[11], bias is not None


@once_differentiable
def _residual_backward(ctx, grad: Tensor, *_unused: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, pre, gamma, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_x, d_weight, d_bias, d_gamma, d_beta = torch.ops.convmixer_pt.residual_dw_batch_norm_backward.default(
        grad, x, weight, pre, gamma, mean, rstd, ctx.act, need[0], need[1], ctx.kernel_set)
    return (d_x if need[0] else None, d_weight if need[1] else None, d_bias if need[2] and ctx.has_bias else None,
            d_gamma if need[3] else None, d_beta if need[4] else None, None, None, None, None, None, None, None)


_residual_dw_batch_norm.register_autograd(_residual_backward, setup_context=_residual_setup)


@torch.library.custom_op(f"{NAMESPACE}::residual_dw_batch_norm_backward", mutates_args=(), device_types=DEVICES)
def _residual_backward_op(grad: Tensor, x: Tensor, weight: Tensor, pre: Tensor, gamma: Tensor | None, mean: Tensor,
                          rstd: Tensor, act: str, need_x: bool, need_w: bool,
                          kernel_set: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _runnable(x)
    d_x, d_weight, d_bias, d_gamma, d_beta = residual.backward(grad, x, weight, pre, gamma, mean, rstd, act, need_x,
                                                               need_w, kernel_set)
    return (d_x if d_x is not None else _none(x), d_weight if d_weight is not None else _none(weight), d_bias,
            d_gamma if d_gamma is not None else _none(x), d_beta if d_beta is not None else _none(x))


@_residual_backward_op.register_fake
def _(grad, x, weight, pre, gamma, mean, rstd, act, need_x, need_w, kernel_set):
    d_x = depthwise.out_like(torch.empty_like(pre)) if need_x else _none(x)
    d_weight = weight.new_empty(weight.shape) if need_w else _none(weight)
    d_gamma = torch.empty_like(gamma) if gamma is not None else _none(x)
    return d_x, d_weight, weight.new_empty(weight.shape[0]), d_gamma, torch.empty_like(d_gamma)


# ---- the autograd-level API: checked operands, autocast's dtype, BatchNorm's buffers ----------------------------

def _check_activation(activation: str) -> None:
    if activation not in ACT_CODES:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACT_CODES)}")


def _checked_input(x: Tensor, weight: Tensor) -> Tensor:
    """x in the dtype nn.Conv2d would compute in (autocast's), after checking that the kernels take it."""
    dtype = depthwise.compute_dtype(x)
    reason = depthwise.unsupported_reason(x, weight, dtype)
    if reason is not None:
        raise ValueError(f"depthwise kernel cannot run: {reason}")
    return x.to(dtype)


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "none",
                     kernel_set: str = "direct") -> Tensor:
    """`act(conv2d(x, weight, bias, padding='same', groups=C))` with autograd; weight is [C, 1, KH, KW].
    `kernel_set`: 'direct' or 'mma' (tensor cores, for fp16/bf16 NCHW where the plane fits)."""
    _check_activation(activation)
    x = _checked_input(x, weight)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    return torch.ops.convmixer_pt.dw_conv_act.default(x, weight, bias, activation, activation in SMOOTH and needs_grad,
                                                      kernel_set)[0]


@torch.no_grad()
def depthwise_conv2d_affine_residual(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, shift: Tensor,
                                     activation: str, kernel_set: str = "direct") -> Tensor:
    """`x + act(conv2d(x, weight, bias, 'same')) * scale + shift` per channel, in one pass (inference only)."""
    _check_activation(activation)
    x = _checked_input(x, weight)
    return torch.ops.convmixer_pt.dw_conv_affine_residual.default(
        x, weight, bias, scale.to(torch.float32).contiguous(), shift.to(torch.float32).contiguous(), activation,
        kernel_set)


def _tracked(bn: nn.BatchNorm2d) -> bool:
    """Whether a training-mode forward updates `bn`'s running statistics (and counts the batch first)."""
    tracked = bn.track_running_stats and bn.running_mean is not None
    if tracked:
        bn.num_batches_tracked.add_(1)
    return tracked


def _store(bn: nn.BatchNorm2d, tracked: bool, new_mean: Tensor, new_var: Tensor) -> None:
    if tracked:
        bn.running_mean.copy_(new_mean)
        bn.running_var.copy_(new_var)


def act_batch_norm(src: Tensor, bn: nn.BatchNorm2d, activation: str = "none", skip: Tensor | None = None) -> Tensor:
    """`bn(act(src)) [+ skip]` with `bn` in training mode (check `batchnorm.supports` first), in two passes
    forward and two backward, updating bn's running statistics as nn.BatchNorm2d does."""
    _check_activation(activation)
    if not batchnorm.supports(src, bn):
        raise ValueError("act_batch_norm needs a training-mode nn.BatchNorm2d and a contiguous NCHW or "
                         f"channels_last input with more than one value per channel, got {tuple(src.shape)}")
    tracked = _tracked(bn)
    out, _, _, new_mean, new_var = torch.ops.convmixer_pt.act_batch_norm.default(
        src, skip, bn.weight, bn.bias, bn.running_mean if tracked else None, bn.running_var if tracked else None,
        bn.num_batches_tracked if tracked else None, bn.momentum, bn.eps, activation)
    _store(bn, tracked, new_mean, new_var)
    return out


@torch.no_grad()
def eval_act_batch_norm(src: Tensor, bn: nn.BatchNorm2d, activation: str) -> Tensor:
    """`bn(act(src))` with `bn` in eval mode (running statistics), in one pass; inference only, no autograd."""
    _check_activation(activation)
    if not batchnorm.supports_eval(src, bn):
        raise ValueError("eval_act_batch_norm needs an eval-mode nn.BatchNorm2d with running statistics and a "
                         f"contiguous NCHW or channels_last input, got {tuple(src.shape)}")
    return torch.ops.convmixer_pt.eval_act_batch_norm.default(src, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                              bn.eps, activation)


def residual_depthwise_batch_norm(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str,
                                  kernel_set: str = "direct") -> Tensor:
    """`x + bn(act(conv(x)))` with `conv` a depthwise 'same' nn.Conv2d and `bn` in training mode (check
    `residual.supports` first)."""
    _check_activation(activation)
    if not residual.supports(x, conv, bn):
        raise ValueError(f"residual_depthwise_batch_norm cannot take input {tuple(x.shape)} {x.dtype} with "
                         f"{conv} and {bn}")
    tracked = _tracked(bn)
    out, _, _, _, new_mean, new_var = torch.ops.convmixer_pt.residual_dw_batch_norm.default(
        x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean if tracked else None,
        bn.running_var if tracked else None, bn.num_batches_tracked if tracked else None, bn.momentum, bn.eps,
        activation, kernel_set)
    _store(bn, tracked, new_mean, new_var)
    return out


class DepthwiseConv2d(nn.Conv2d):
    """A drop-in `nn.Conv2d(C, C, k, groups=C, padding='same')` (same parameters and state_dict keys) that
    runs the Triton kernels where they can run and `nn.Conv2d` elsewhere."""

    def __init__(self, channels: int, kernel_size: int | tuple[int, int], bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(channels, channels, kernel_size, groups=channels, padding="same", bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if depthwise.kernels_can_run(x) and depthwise.unsupported_reason(x, self.weight,
                                                                         depthwise.compute_dtype(x)) is None:
            return depthwise_conv2d(x, self.weight, self.bias)
        return super().forward(x)
