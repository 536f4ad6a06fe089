"""The PyTorch ConvMixer ("Patches Are All You Need?", Trockman & Kolter) and its variant registry.

Module names follow timm's `ConvMixer` exactly (`stem.0`, `stem.2`, `blocks.N.0.fn.0`, ..., `head`), so timm's
published weights load with `strict=True`; other layouts are translated by `keymap`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fast import block_fn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}

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

# Evaluation defaults of the published ImageNet weights (timm's protocol, which gives the paper's numbers).
DEFAULT_CFG: dict[str, Any] = dict(
    input_size=(3, 224, 224), crop_pct=0.96, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
)


class Residual(nn.Module):
    """`fn(x) + x`; the attribute is called `fn` because every published checkpoint names it so."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def make_act(act: str) -> nn.Module:
    try:
        return ACTIVATIONS[act]()
    except KeyError:
        raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}") from None


class ConvMixer(nn.Module):
    """Patch embedding, then `depth` blocks of depthwise mixing (residual) and pointwise mixing."""

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        act: str = "gelu",
        drop_rate: float = 0.0,
        fast: bool | None = None,
    ) -> None:
        super().__init__()
        self.fast = fast  # how blocks run (convmixer_pt.fast): None = Triton kernels on CUDA, False = never
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size
        self.in_chans, self.num_classes, self.act = in_chans, num_classes, act
        self.num_features = dim
        self.grad_checkpointing = False
        self.default_cfg = dict(DEFAULT_CFG, num_classes=num_classes)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            make_act(act),
            nn.BatchNorm2d(dim),
        )
        self.blocks = nn.Sequential(*[
            nn.Sequential(
                Residual(nn.Sequential(
                    nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                    make_act(act),
                    nn.BatchNorm2d(dim),
                )),
                nn.Conv2d(dim, dim, kernel_size=1),
                make_act(act),
                nn.BatchNorm2d(dim),
            )
            for _ in range(depth)
        ])
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    @property
    def arch(self) -> dict[str, Any]:
        """The constructor arguments that fix the architecture (what a checkpoint must match)."""
        return dict(dim=self.dim, depth=self.depth, kernel_size=self.kernel_size, patch_size=self.patch_size,
                    in_chans=self.in_chans, num_classes=self.num_classes, act=self.act)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        run = block_fn(self.fast, x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            for block in self.blocks:
                x = checkpoint(run, block, x, use_reentrant=False)
            return x
        for block in self.blocks:
            x = run(block, x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # the same reduction as timm's, bit for bit
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def list_models() -> list[str]:
    return sorted(VARIANTS)


def variant_arch(name: str) -> dict[str, Any]:
    """The architecture of a registered variant (dim, depth, kernel_size, patch_size, act)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return {k: v for k, v in VARIANTS[name].items() if k != "timm_name"}


def create_model(
    name: str,
    num_classes: int = 1000,
    checkpoint_path: str | Path | None = None,
    use_ema: bool = False,
    **overrides: Any,
) -> ConvMixer:
    """Build a registered variant; `overrides` change any constructor argument (dim, act, in_chans, ...).

    `checkpoint_path` may be an official locuslab file, a timm state dict (.pth/.bin/.safetensors) or a
    training checkpoint; the layout is recognised from the keys and loading is strict. `use_ema` picks the
    EMA weights of a training checkpoint that has them.
    """
    kwargs = variant_arch(name)
    kwargs.update(num_classes=num_classes, **overrides)
    model = ConvMixer(**kwargs)
    if checkpoint_path is not None:
        from .checkpoint import load_model_weights

        load_model_weights(model, checkpoint_path, use_ema=use_ema)
    return model
