"""The CUDA fast path: its settings, the block dispatch, and the Triton kernels (`fast.kernels`, which import
nothing from this layer)."""

from .dispatch import block_fn
from .settings import FastOptions, SettingError, resolve

__all__ = ["FastOptions", "SettingError", "block_fn", "resolve"]
