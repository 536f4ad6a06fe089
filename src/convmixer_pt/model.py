"""The PyTorch ConvMixer ("Patches Are All You Need?", Trockman & Kolter).

Module names follow timm's `ConvMixer` exactly (`stem.0`, `stem.2`, `blocks.N.0.fn.0`, ..., `head`), so timm's
published weights load with `strict=True`; other layouts are translated by `weights.keymap`. This file builds
modules only: reading checkpoints is `factory.create_model`'s job.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fast import FastOptions, block_fn, resolve
from .variants import EVAL_CROP_PCT, EVAL_INPUT_SIZE, EVAL_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, activation


class Residual(nn.Module):
    """`fn(x) + x`; the attribute is called `fn` because every published checkpoint names it so."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def make_act(act: str) -> nn.Module:
    return activation(act).torch()


class ConvMixer(nn.Module):
    """Patch embedding, then `depth` blocks of depthwise mixing (residual) and pointwise mixing.

    `fast` says how the blocks run (`fast.FastOptions`; True, False or None set only whether the Triton
    kernels run, the environment's defaults the rest), resolved once, here.
    """

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
        fast: bool | FastOptions | None = None,
    ) -> None:
        super().__init__()
        self.fast = resolve(fast)
        self.dim, self.depth, self.kernel_size, self.patch_size = dim, depth, kernel_size, patch_size
        self.in_chans, self.num_classes, self.act = in_chans, num_classes, act
        self.num_features = dim
        self.grad_checkpointing = False
        self.default_cfg = dict(input_size=(in_chans, EVAL_INPUT_SIZE, EVAL_INPUT_SIZE), crop_pct=EVAL_CROP_PCT,
                                interpolation=EVAL_INTERPOLATION, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                num_classes=num_classes)

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
