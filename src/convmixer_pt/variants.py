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


# One instance of each, to recognise modules by (built once: the fast path asks for every block it runs).
_REFERENCE_MODULES = {name: spec.torch() for name, spec in ACTIVATIONS.items()}


def activation_of(module: nn.Module) -> str | None:
    """The registry's name for a PyTorch activation module, or None for one it does not hold."""
    for name, ref in _REFERENCE_MODULES.items():
        if type(module) is type(ref) and getattr(module, "approximate", None) == getattr(ref, "approximate", None):
            return name
    return None


# Preprocessing of the published ImageNet weights (timm's protocol, which gives the paper's numbers).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_INPUT_SIZE = 224
EVAL_CROP_PCT = 0.96  # both timm's pretrained configs and MindCV's convmixer configs use 0.96
EVAL_INTERPOLATION = "bicubic"
PUBLISHED_TAG = "in1k"  # timm's tag of the published ImageNet-1k weights

# The published ImageNet models, plus small ones for CIFAR-size images and quick experiments.
# `timm_name` is the name of the same architecture in timm's registry, if it has one (and with it weights
# published on the Hugging Face hub); `img_size` the input side the variant is meant for.
VARIANTS: dict[str, dict[str, Any]] = {
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7, act="gelu",
                              timm_name="convmixer_1536_20", img_size=EVAL_INPUT_SIZE),
    # The released 768/32 weights were trained with ReLU (the official model code still says GELU).
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, act="relu",
                             timm_name="convmixer_768_32", img_size=EVAL_INPUT_SIZE),
    "convmixer_1024_20": dict(dim=1024, depth=20, kernel_size=9, patch_size=14, act="gelu",
                              timm_name="convmixer_1024_20_ks9_p14", img_size=EVAL_INPUT_SIZE),
    # locuslab/convmixer-cifar10's setting for 32x32 images.
    "convmixer_256_8": dict(dim=256, depth=8, kernel_size=5, patch_size=2, act="gelu", timm_name=None, img_size=32),
    "convmixer_128_4": dict(dim=128, depth=4, kernel_size=5, patch_size=2, act="gelu", timm_name=None, img_size=32),
}
SHAPE_KEYS = ("dim", "depth", "kernel_size", "patch_size")
_NOT_ARCH = ("timm_name", "img_size")


# Upper bounds on what a user may ask a model or an input to be, checked before anything is built: far beyond
# every published ConvMixer (dim 1536, depth 32, kernel 9, patch 14, 224 pixels, 21,841 classes), far below what
# would take minutes or tens of gigabytes only to fail.
SIZE_LIMITS: dict[str, int] = {"dim": 16_384, "depth": 1_024, "kernel_size": 255, "patch_size": 1_024,
                               "in_chans": 1_024, "num_classes": 1_000_000}
MAX_IMAGE_SIZE = 8_192  # pixels a side
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 weights


def parameter_count(dim: int, depth: int, kernel_size: int, patch_size: int, in_chans: int = 3,
                    num_classes: int = 1000) -> int:
    """The number of weights of a ConvMixer of these sizes (BatchNorm statistics included)."""
    stem = in_chans * dim * patch_size**2 + dim + 4 * dim
    block = dim * kernel_size**2 + dim + 4 * dim + dim * dim + dim + 4 * dim
    return stem + depth * block + dim * num_classes + num_classes


def check_sizes(arch: Mapping[str, Any], img_size: int | None = None) -> None:
    """Refuse, in one line naming the value and its bound, a model or an input size beyond SIZE_LIMITS,
    MAX_IMAGE_SIZE or MAX_PARAMETERS (missing sizes are not checked)."""
    for key, limit in SIZE_LIMITS.items():
        value = arch.get(key)
        if isinstance(value, int) and value > limit:
            raise UserError(f"{key} {value} is above the largest this package builds, {limit:,}")
    if img_size is not None and img_size > MAX_IMAGE_SIZE:
        raise UserError(f"image size {img_size} is above the largest this package takes, {MAX_IMAGE_SIZE:,} pixels")
    sizes = {k: arch[k] for k in ("dim", "depth", "kernel_size", "patch_size", "in_chans", "num_classes")
             if isinstance(arch.get(k), int)}
    if {"dim", "depth", "kernel_size", "patch_size"} <= set(sizes):
        count = parameter_count(**sizes)
        if count > MAX_PARAMETERS:
            shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise UserError(f"a ConvMixer with {shown} has {count:,} weights, above the largest this package "
                            f"builds, {MAX_PARAMETERS:,}")


def list_models() -> list[str]:
    return sorted(VARIANTS)


def variant_arch(name: str) -> dict[str, Any]:
    """The architecture of a registered variant (dim, depth, kernel_size, patch_size, act)."""
    if name not in VARIANTS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return {k: v for k, v in VARIANTS[name].items() if k not in _NOT_ARCH}


def hub_id(name: str) -> str | None:
    """The Hugging Face hub repository of a variant's published weights (timm's, in timm's layout), or None."""
    timm_name = VARIANTS[name]["timm_name"] if name in VARIANTS else None
    return f"timm/{timm_name}.{PUBLISHED_TAG}" if timm_name else None


def eval_cfg(patch_size: int, img_size: int = EVAL_INPUT_SIZE, in_chans: int = 3,
             num_classes: int = 1000) -> dict[str, Any]:
    """timm's `pretrained_cfg` fields for a ConvMixer evaluated the published weights' way (what
    `timm.data.resolve_model_data_config` reads): crop 0.96 and bicubic resizing at 224, no crop for images
    already at a smaller variant's size, ImageNet mean/std, and where the stem and the classifier are."""
    return dict(url="", num_classes=num_classes, input_size=(in_chans, img_size, img_size),
                pool_size=(img_size // patch_size, img_size // patch_size), fixed_input_size=False,
                crop_pct=EVAL_CROP_PCT if img_size == EVAL_INPUT_SIZE else 1.0, crop_mode="center",
                interpolation=EVAL_INTERPOLATION, mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="stem.0",
                classifier="head")


def pretrained_cfg(name: str) -> dict[str, Any]:
    """A registered variant's `pretrained_cfg`: `eval_cfg` at its size, and for the published weights the hub
    id spelled out in full (timm's own ConvMixer loads the same files), the tag and the licence."""
    spec = VARIANTS[name]
    cfg = dict(architecture=name, **eval_cfg(spec["patch_size"], spec["img_size"]))
    if hub_id(name) is not None:
        cfg.update(hf_hub_id=hub_id(name), tag=PUBLISHED_TAG, license="mit")
    return cfg


def match_variant(arch: Mapping[str, Any]) -> str | None:
    """The registered variant whose dim/depth/kernel/patch equal `arch`, if any."""
    for name, spec in VARIANTS.items():
        if all(spec[k] == arch[k] for k in SHAPE_KEYS):
            return name
    return None
