"""Markers: `mindspore` tests need MindSpore installed, `gpu` tests a CUDA GPU; both skip where it is missing.
`slow` marks tests of more than a few seconds on two CPU cores (`-m "not slow"` for a quick pass)."""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = {"mindspore": importlib.util.find_spec("mindspore") is None, "gpu": not torch.cuda.is_available()}
    reasons = {"mindspore": "MindSpore is not installed", "gpu": "no CUDA GPU"}
    for item in items:
        for marker, absent in missing.items():
            if absent and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))
