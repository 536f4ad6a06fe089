"""The CUDA fast path: its settings, the block dispatch, the kernels as PyTorch operators (`fast.ops`, which
imports Triton) and the Triton kernels themselves (`fast.kernels`, which import nothing from this layer)."""

from .dispatch import run_block
from .settings import FastOptions, SettingError, resolve

__all__ = ["FastOptions", "SettingError", "resolve", "run_block"]
