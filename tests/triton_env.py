"""Where the Triton kernel tests run: the compiled kernels on a GPU, Triton's CPU interpreter elsewhere.

Triton decides interpreter or compiler when a kernel is defined (and reads the variable again while running
one), so TRITON_INTERPRET=1 is set around the import of the kernel modules (re-imported, all of them, if
they were defined the other way) and, by the fixture below, while a test module runs; it is restored
afterwards, so no other test module sees it. With CUDA (and TRITON_INTERPRET unset) the compiled kernels run.
The operators of `convmixer_pt.fast.ops` are registered once and call whatever kernels are defined.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_MODULES = ("common", "depthwise_nhwc", "batchnorm", "depthwise", "residual")  # dependencies first


def import_kernels(name: str) -> ModuleType:
    """convmixer_pt.fast.kernels.<name>, defined for this machine (compiled on a GPU, interpreted on a CPU)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0" if ON_GPU else "1"
    try:
        if importlib.import_module("convmixer_pt.fast.kernels.common").interpreted() == ON_GPU:
            for module in KERNEL_MODULES:
                importlib.reload(importlib.import_module(f"convmixer_pt.fast.kernels.{module}"))
        return importlib.import_module(f"convmixer_pt.fast.kernels.{name}")
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def import_ops() -> ModuleType:
    """convmixer_pt.fast.ops (the kernels as PyTorch operators) over the kernels defined for this machine; the
    operators look their kernel modules up when they run, so they follow a reload."""
    import_kernels("residual")
    return importlib.import_module("convmixer_pt.fast.ops")


@pytest.fixture(autouse=True, scope="module")
def interpreter_or_exact_fp32():
    """CPU: the interpreter. GPU: no TF32 in the surrounding PyTorch ops, so fp32 comparisons stay fp32."""
    with pytest.MonkeyPatch.context() as patch:
        if ON_GPU:
            patch.setattr(torch.backends.cudnn, "allow_tf32", False)
            patch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        else:
            patch.setenv("TRITON_INTERPRET", "1")
        yield
