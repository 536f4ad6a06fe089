"""The PyTorch ConvMixer ("Patches Are All You Need?", Trockman & Kolter), with timm's model protocol.

Module names follow timm's `ConvMixer` exactly (`stem.0`, `stem.2`, `blocks.N.0.fn.0`, ..., `head`), so timm's
published weights load with `strict=True`; other layouts are translated by `weights.keymap`. This file builds
modules only: reading checkpoints is `factory.create_model`'s job, registering in timm's registry
`timm_models`'s.

What timm's models offer, this one does too: `pretrained_cfg` / `default_cfg` (what
`timm.data.resolve_model_data_config` reads), `num_features`, `head_hidden_size`, `get_classifier`,
`reset_classifier`, `global_pool`, `set_grad_checkpointing`, `group_matcher`, `feature_info`,
`forward_intermediates` and `prune_intermediate_layers` (timm's `features_only=True` uses the last two), and
`device` / `dtype` arguments. It scripts (TorchScript runs the plain modules), traces with torch.fx (each block one
`call_module` leaf while the fast path can run, which then scripts too; the plain modules when it is off), compiles with
torch.compile (the kernels stay in the graph as operators) and exports (torch.export and ONNX get the
plain modules).

No `from __future__ import annotations` here: torch.fx copies the root `forward`'s annotations into the code
it generates, and as strings they name types TorchScript cannot resolve in a traced-then-scripted model.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .fast import FastOptions, resolve, run_block
from .variants import EVAL_INPUT_SIZE, activation, check_sizes, eval_cfg

POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax")


class Residual(nn.Module):
    """`fn(x) + x`; the attribute is called `fn` because every published checkpoint names it so."""

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def make_act(act: str) -> nn.Module:
    return activation(act).torch()


class Block(nn.Sequential):
    """One block, `Residual(dw conv, act, BN) -> 1x1 conv -> act -> BN`, as the nn.Sequential every published
    checkpoint names (`0.fn.0`, `0.fn.2`, `1`, `3`), with its layers by role: the one description of a block,
    which the fast path and every other reader use."""

    __jit_unused_properties__ = ["residual", "dw", "dw_act", "dw_bn", "pw", "pw_act", "pw_bn"]
    # How the block runs; the model sets its own options on each of its blocks.
    options = FastOptions(enabled=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles the plain modules, never the kernels
            return self.plain(x)
        return self._forward_fast(x)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The block's own modules, in order."""
        for layer in self:
            x = layer(x)
        return x

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The kernels where `options` and the input allow (`fast.run_block`), else the plain modules. A symbolic
        trace (torch.fx, timm's, torchvision's) records the block as one `call_module` leaf while the kernels
        could run, since which run depends on the input's device, dtype and layout: the traced model then
        decides per input as this one does, and TorchScript compiles the leaf's plain modules. With the
        kernels off the trace goes through the plain modules."""
        if self.options.enabled is False:
            return self.plain(x)
        if isinstance(x, torch.fx.Proxy):
            return x.tracer.create_proxy("call_module", x.tracer.path_of_module(self), (x,), {})
        return run_block(self, x, self.options)

    @classmethod
    def build(cls, dim: int, kernel_size: int, act: str, device: Any = None, dtype: Any = None) -> "Block":
        dd = dict(device=device, dtype=dtype)
        return cls(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same", **dd),
                make_act(act),
                nn.BatchNorm2d(dim, **dd),
            )),
            nn.Conv2d(dim, dim, kernel_size=1, **dd),
            make_act(act),
            nn.BatchNorm2d(dim, **dd),
        )

    @property
    def residual(self) -> Residual:
        return self[0]

    @property
    def dw(self) -> nn.Module:
        """The depthwise convolution."""
        return self[0].fn[0]

    @property
    def dw_act(self) -> nn.Module:
        return self[0].fn[1]

    @property
    def dw_bn(self) -> nn.Module:
        return self[0].fn[2]

    @property
    def pw(self) -> nn.Module:
        """The pointwise (1x1) convolution."""
        return self[1]

    @property
    def pw_act(self) -> nn.Module:
        return self[2]

    @property
    def pw_bn(self) -> nn.Module:
        return self[3]


class GlobalPool(nn.Module):
    """timm's `SelectAdaptivePool2d(pool_type, flatten=bool(pool_type))` for NCHW maps, with the same reductions:
    '' keeps the map, 'avg', 'max', 'avgmax' (their mean) or 'catavgmax' (both, concatenated: twice the
    features) pool it to a vector. Here rather than timm's own so that building a model never imports
    timm.models (~2 s)."""

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise UserError(f"global_pool {pool_type!r} is not one of {', '.join(map(repr, POOL_TYPES))}")
        self.pool_type = pool_type

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "":
            return x
        if self.pool_type == "avg":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.pool_type == "max":
            x = F.adaptive_max_pool2d(x, 1)
        elif self.pool_type == "avgmax":
            x = 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1))
        else:
            x = torch.cat((F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)), 1)
        return x.flatten(1)

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def feature_indices(count: int, indices: int | list[int] | None = None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: the absolute indices of `indices` among `count` features (None: all;
    an int n: the last n; a list: those, negative from the end) and the largest of them."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {count})")
        take = [count - indices + i for i in range(indices)]
    else:
        take: list[int] = []
        for i in indices:
            index = count + i if i < 0 else i
            if not 0 <= index < count:
                raise ValueError(f"feature index {index} is out of range (0 to {count - 1})")
            take.append(index)
    return take, max(take)


class ConvMixer(nn.Module):
    """Patch embedding, then `depth` blocks of depthwise mixing (residual) and pointwise mixing, then pooling
    (`global_pool`: 'avg', '' for the unpooled map, or timm's other pool types) and the classifier.

    `fast` says how the blocks run (`fast.FastOptions`; True, False or None set only whether the Triton
    kernels run, the environment's defaults the rest), resolved once, here. `device` and `dtype` place the
    parameters (timm builds models on the meta device).
    """

    __jit_unused_properties__ = ["depth", "arch"]

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        act: str = "gelu",
        drop_rate: float = 0.0,
        fast: bool | FastOptions | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size, in_chans=in_chans,
                         num_classes=num_classes))  # before a layer of those sizes is allocated
        self.fast = resolve(fast)
        dd = dict(device=device, dtype=dtype)
        self.dim, self.kernel_size, self.patch_size = dim, kernel_size, patch_size
        self.in_chans, self.num_classes, self.act = in_chans, num_classes, act
        self.num_features = dim
        self.grad_checkpointing = False
        # Replaced by the registered variant's cfg where one is built by name (factory, timm's registry).
        self.pretrained_cfg = eval_cfg(patch_size, EVAL_INPUT_SIZE, in_chans, num_classes)
        self.default_cfg = self.pretrained_cfg  # timm's other name for it: one object

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, **dd),
            make_act(act),
            nn.BatchNorm2d(dim, **dd),
        )
        self.blocks = nn.Sequential(*[Block.build(dim, kernel_size, act, **dd) for _ in range(depth)])
        for block in self.blocks:
            block.options = self.fast
        # Feature i is block i's output, as in timm's ConvMixer (the stem's is none).
        self.feature_info = [dict(num_chs=dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.global_pool = GlobalPool(global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def arch(self) -> dict[str, Any]:
        """The constructor arguments that fix the architecture (what a checkpoint must match)."""
        return dict(dim=self.dim, depth=self.depth, kernel_size=self.kernel_size, patch_size=self.patch_size,
                    in_chans=self.in_chans, num_classes=self.num_classes, act=self.act)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's optimizer factory and layer-wise learning-rate decay."""
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations (timm's semantics:
        whenever gradients are computed). In training, BatchNorm then updates its running statistics twice per
        step (forward and recomputation), as with timm's `checkpoint_seq`."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for `num_classes` (0: none, the model then returns features); `global_pool` None
        keeps the pooling, '' removes it. New modules take the model's device, dtype and mode."""
        reference = next(self.parameters())
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = GlobalPool(global_pool)
            self.global_pool.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes, device=reference.device, dtype=reference.dtype) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.unused
    def _forward_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if torch.jit.is_scripting():
            x = self.blocks(x)
        else:
            for block in self.blocks:
                x = self._forward_block(block, x)
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs by index (timm's protocol): `indices` None for every block, an int n for the last n, a
        list for those (negative from the end); the final features too unless `intermediates_only`.
        `stop_early` skips the blocks after the last one asked for (the final features are then that block's
        output); `norm` is accepted and has nothing to do (ConvMixer has no final norm); NCHW only."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt '{output_fmt}': ConvMixer's features are NCHW only")
        take, last = feature_indices(len(self.blocks), indices)
        intermediates: list[torch.Tensor] = []
        x = self.stem(x)
        if torch.jit.is_scripting():  # TorchScript cannot slice a Sequential at run time
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in take:
                    intermediates.append(x)
        else:
            for i, block in enumerate(self.blocks[:last + 1] if stop_early else self.blocks):
                x = self._forward_block(block, x)
                if i in take:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices`, and the pooling and classifier unless `prune_head` is
        False; the absolute indices kept (timm's `features_only` models are built so)."""
        take, last = feature_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)  # 'avg': adaptive_avg_pool2d(x, 1).flatten(1), timm's reduction bit for bit
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.unused
    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs after the stem and after each block, then the logits: where two models part ways (the
        MindSpore cell's `stages`)."""
        x = self.stem(x)
        outs = [x]
        for block in self.blocks:
            x = self._forward_block(block, x)
            outs.append(x)
        return [*outs, self.forward_head(x)]
