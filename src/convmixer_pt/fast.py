"""The fast path: ConvMixer blocks that run their depthwise convolution through the Triton kernels.

Why this shape: the depthwise convolution dominates ConvMixer's time on GPUs (see docs/performance.md), and
the kernels can also absorb what surrounds it. The modules of the model are not replaced, only how a block
is evaluated, so parameters, buffers and `state_dict` keys stay exactly timm's and a checkpoint written with
the fast path on loads with it off and vice versa.

Per block, `Residual(dw conv, act, BN) -> 1x1 conv -> act -> BN`:
- training (or whenever autograd needs gradients): one kernel computes act(dw(x) + b) and keeps the
  pre-activation; BatchNorm (batch statistics, running-stat updates) and the residual add run in PyTorch
  through the block's own modules. With CONVMIXER_FAST_BATCHNORM=1 (untimed, so off by default) the
  residual branch x + BN(act(dw(x) + b)) is one function (`kernels.residual`: the depthwise kernel adds the
  bias only, `kernels.batchnorm` computes BN(act(.)) + x in two passes each way, and the input gradient
  kernel adds the skip's gradient), and BN(act(.)) after the 1x1 convolution is fused the same way; in
  inference it also computes BN(act(.)) after the 1x1 convolution in one pass.
- inference (BN in eval mode and no gradient needed): one kernel computes x + BN(act(dw(x) + b)) with
  BN folded to a per-channel scale and shift.
The 1x1 convolution runs through the block's own module in both cases, and so do its activation and BN
unless CONVMIXER_FAST_BATCHNORM fuses them.

Switch: `ConvMixer(fast=...)` / `create_model(..., fast=...)`. None (default) uses the kernels for CUDA
inputs (measured faster on an H200 for all three ImageNet variants, docs/performance.md) unless the
environment variable CONVMIXER_FAST is 0/false/off; True uses them wherever they can run (CUDA, or CPU when
the kernels were imported under TRITON_INTERPRET=1, which is how the tests run them); False never.

Layouts: NCHW inputs take the NCHW kernels. channels_last inputs take the channels_last kernels only when
CONVMIXER_FAST_CHANNELS_LAST is 1/true/on: they pass the same tests, but no GPU has timed them yet, so by
default channels_last runs the plain modules (cuDNN), which is what was measured.
Anything the kernels do not cover (other layouts, dtypes, activations, strides, torch.compile tracing, a
missing Triton) falls back to the plain modules for that block.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

ENV_VAR = "CONVMIXER_FAST"
CHANNELS_LAST_ENV_VAR = "CONVMIXER_FAST_CHANNELS_LAST"
BATCHNORM_ENV_VAR = "CONVMIXER_FAST_BATCHNORM"
BlockFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class SettingError(ValueError):
    """An environment variable of this package (CONVMIXER_FAST, CONVMIXER_FAST_CHANNELS_LAST,
    CONVMIXER_FAST_BATCHNORM, CONVMIXER_DW_KERNEL) holds an unknown value."""


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"{name}={value!r} is not one of 1/true/on or 0/false/off")


def env_disabled() -> bool:
    """True when CONVMIXER_FAST is 0/false/no/off; unset or empty leaves the default (on for CUDA)."""
    return not _env_flag(ENV_VAR, True)


def channels_last_enabled() -> bool:
    """Whether channels_last inputs take the channels_last kernels (CONVMIXER_FAST_CHANNELS_LAST; off by default
    until timed on a GPU)."""
    return _env_flag(CHANNELS_LAST_ENV_VAR, False)


def batchnorm_enabled() -> bool:
    """Whether training-mode BatchNorm runs fused with its activation and the residual add
    (CONVMIXER_FAST_BATCHNORM; off by default until timed on a GPU)."""
    return _env_flag(BATCHNORM_ENV_VAR, False)


def _kernels() -> ModuleType | None:
    try:
        from .kernels import depthwise
    except ImportError:
        return None
    return depthwise


def _batchnorm_kernels() -> ModuleType:
    from .kernels import batchnorm  # Triton is there: the depthwise kernels imported

    return batchnorm


def _residual_kernels() -> ModuleType:
    from .kernels import residual

    return residual


def activation_name(module: nn.Module) -> str | None:
    """The kernels' name for an activation module, or None where they have no exact equivalent."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.SiLU):
        return "silu"
    return None


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


def check_switches() -> None:
    """A SettingError for a bad value of any of this module's switches, on every device: the last two are
    read only where the kernels run, and a typo should not pass unnoticed on a CPU."""
    env_disabled()
    channels_last_enabled()
    batchnorm_enabled()


def block_fn(fast: bool | None, x: torch.Tensor) -> BlockFn:
    """How to evaluate the blocks for input `x`: the fused path or each block's own modules."""
    if fast is False:
        return run_plain
    check_switches()
    if fast is None and (env_disabled() or not x.is_cuda):
        return run_plain
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return run_plain
    kernels = _kernels()
    if kernels is None or not kernels.kernels_can_run(x):
        return run_plain
    return run_fused


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


def run_fused(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One ConvMixer block through the kernels; the plain modules where the kernels don't cover it."""
    kernels = _kernels()
    if kernels is None or len(block) != 4 or len(getattr(block[0], "fn", ())) != 3:
        return block(x)
    dw, act, bn = block[0].fn
    activation = activation_name(act)
    if activation is None or not conv_supported(dw):
        return block(x)
    if kernels.unsupported_reason(x, dw.weight, kernels.compute_dtype(x)) is not None:
        return block(x)
    if kernels.layout(x) == "nhwc" and not channels_last_enabled():
        return block(x)
    params = (x, dw.weight, dw.bias, *bn.parameters())
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    fused_bn = _batchnorm_kernels() if batchnorm_enabled() else None
    pointwise_act = activation_name(block[2])
    if _bn_is_eval_affine(bn) and not needs_grad:
        scale, shift = _bn_affine(bn)
        y = kernels.depthwise_conv2d_affine_residual(x, dw.weight, dw.bias, scale, shift, activation)
        p = block[1](y)
        pointwise_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (p, *block[3].parameters()))
        if fused_bn is not None and pointwise_act is not None and not pointwise_grad \
                and fused_bn.supports_eval(p, block[3]):
            return fused_bn.eval_act_batch_norm(p, block[3], pointwise_act)
        return block[3](block[2](p))
    if fused_bn is not None and _residual_kernels().supports(x, dw, bn):
        y = _residual_kernels().residual_depthwise_batch_norm(x, dw, bn, activation)
    elif fused_bn is not None and fused_bn.supports(x, bn):
        y = fused_bn.act_batch_norm(kernels.depthwise_conv2d(x, dw.weight, dw.bias), bn, activation, skip=x)
    else:
        y = bn(kernels.depthwise_conv2d(x, dw.weight, dw.bias, activation)) + x
    p = block[1](y)
    if fused_bn is not None and pointwise_act is not None and fused_bn.supports(p, block[3]):
        return fused_bn.act_batch_norm(p, block[3], pointwise_act)
    return block[3](block[2](p))
