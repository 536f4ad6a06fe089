"""The registry: ConvMixer variants, the activations every implementation shares, and evaluation defaults.

Everything above this module (the PyTorch model, the MindSpore cell, the Triton kernels, the converter, the
trainer, validation) reads variants, activations and the published weights' preprocessing from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class Activation:
    """One activation as each implementation spells it."""

    torch: Callable[[], nn.Module]  # the PyTorch module
    mindspore: tuple[str, dict[str, Any]]  # the mindspore.nn cell and its arguments
    kernel: int | None  # its code in the Triton kernels (fast/kernels/common.py); None where they have none


ACTIVATIONS: dict[str, Activation] = {
    "gelu": Activation(nn.GELU, ("GELU", {"approximate": False}), 1),  # exact (erf), as the weights were trained
    # MindSpore's nn.GELU() default, which MindCV's ConvMixer cell uses.
    "gelu_tanh": Activation(lambda: nn.GELU(approximate="tanh"), ("GELU", {"approximate": True}), 4),
    "relu": Activation(nn.ReLU, ("ReLU", {}), 2),
    "silu": Activation(nn.SiLU, ("SiLU", {}), 3),
}


def activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UserError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def mindcv_activation(arch: Mapping[str, Any]) -> str:
    """What MindCV's ConvMixer cell runs for these shapes: ReLU for 768/32, else MindSpore's default
    `nn.GELU()`, the tanh approximation."""
    name = match_variant(arch)
    return "relu" if name is not None and VARIANTS[name]["act"] == "relu" else "gelu_tanh"


def activation_of(module: nn.Module) -> str | None:
    """The registry's name for a PyTorch activation module, or None for one it does not hold."""
    for name, spec in ACTIVATIONS.items():
        ref = spec.torch()
        if type(module) is type(ref) and getattr(module, "approximate", None) == getattr(ref, "approximate", None):
            return name
    return None


# Preprocessing of the published ImageNet weights (timm's protocol, which gives the paper's numbers).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_INPUT_SIZE = 224
EVAL_CROP_PCT = 0.96  # both timm's pretrained configs and MindCV's convmixer configs use 0.96
EVAL_INTERPOLATION = "bicubic"

# The published ImageNet models, plus small ones for CIFAR-size images and quick experiments.
# `timm_name` is the name of the same architecture in timm's registry, if it has one.
VARIANTS: dict[str, dict[str, Any]] = {
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7, act="gelu",
                              timm_name="convmixer_1536_20"),
    # The released 768/32 weights were trained with ReLU (the official model code still says GELU).
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu",
                             timm_name="convmixer_768_32"),
    "convmixer_1024_20": dict(dim=1024, depth=20, kernel_size=9, patch_size=14, act="gelu",
                              timm_name="convmixer_1024_20_ks9_p14"),
    # locuslab/convmixer-cifar10's setting for 32x32 images.
    "convmixer_256_8": dict(dim=256, depth=8, kernel_size=5, patch_size=2, act="gelu", timm_name=None),
    "convmixer_128_4": dict(dim=128, depth=4, kernel_size=5, patch_size=2, act="gelu", timm_name=None),
}
SHAPE_KEYS = ("dim", "depth", "kernel_size", "patch_size")


def list_models() -> list[str]:
    return sorted(VARIANTS)


def variant_arch(name: str) -> dict[str, Any]:
    """The architecture of a registered variant (dim, depth, kernel_size, patch_size, act)."""
    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return {k: v for k, v in VARIANTS[name].items() if k != "timm_name"}


def match_variant(arch: Mapping[str, Any]) -> str | None:
    """The registered variant whose dim/depth/kernel/patch equal `arch`, if any."""
    for name, spec in VARIANTS.items():
        if all(spec[k] == arch[k] for k in SHAPE_KEYS):
            return name
    return None
