"""The one table that maps ConvMixer tensor names between the three layouts in the wild.

- ``timm``: this package's and timm's module names (``stem.0.weight``, ``blocks.3.1.bias``, ``head.weight``).
- ``official``: locuslab's bare ``nn.Sequential`` (``0.weight``, ``6.1.bias``, head at index depth+5).
- ``mindspore``: MindCV's cell, ``network.`` + the official name, BatchNorm parameters renamed and no
  ``num_batches_tracked``.

The loader, the converter and the tests all go through ``convert_key`` / ``convert_state``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, TypeVar

from ..errors import CheckpointError, brief

LAYOUTS = ("timm", "official", "mindspore")

# (module in timm layout, module in official layout, kind). `{i}` is the block index, `{o}` = 3 + i,
# `{h}` = depth + 5 (the classifier's index in the official Sequential).
MODULES: tuple[tuple[str, str, str], ...] = (
    ("stem.0", "0", "conv"),
    ("stem.2", "2", "bn"),
    ("blocks.{i}.0.fn.0", "{o}.0.fn.0", "conv"),
    ("blocks.{i}.0.fn.2", "{o}.0.fn.2", "bn"),
    ("blocks.{i}.1", "{o}.1", "conv"),
    ("blocks.{i}.3", "{o}.3", "bn"),
    ("head", "{h}", "linear"),
)

# BatchNorm tensor names: PyTorch -> MindSpore. `num_batches_tracked` has no MindSpore counterpart.
BN_TORCH_TO_MS: dict[str, str] = {
    "weight": "gamma",
    "bias": "beta",
    "running_mean": "moving_mean",
    "running_var": "moving_variance",
}
BN_MS_TO_TORCH: dict[str, str] = {v: k for k, v in BN_TORCH_TO_MS.items()}
PARAMS: dict[str, tuple[str, ...]] = {
    "conv": ("weight", "bias"),
    "linear": ("weight", "bias"),
    "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
}
MS_PREFIX = "network."

# Indices have at most 9 digits: int() of a longer run is slow or refused, and no model has that many blocks.
_TIMM_RE = re.compile(r"^(stem\.[02]|blocks\.(\d{1,9})\.(?:0\.fn\.[02]|[13])|head)\.(\w+)$")
_OFFICIAL_RE = re.compile(r"^(\d{1,9})((?:\.0\.fn\.[02]|\.[13])?)\.(\w+)$")
_OFFICIAL_BLOCK_RE = re.compile(r"^(\d{1,9})\.0\.fn\.0\.")


class LayoutError(CheckpointError):
    """A tensor name that belongs to no ConvMixer layout."""


@lru_cache(maxsize=16)
def _module_rows(depth: int) -> tuple[tuple[str, str, str], ...]:
    """(timm module, official module, kind) for every module of a model with `depth` blocks."""
    rows = []
    for timm_mod, off_mod, kind in MODULES:
        for i in (range(depth) if "{i}" in timm_mod else [None]):
            fmt = dict(i=i, o=None if i is None else 3 + i, h=depth + 5)
            rows.append((timm_mod.format(**fmt), off_mod.format(**fmt), kind))
    return tuple(rows)


@lru_cache(maxsize=48)
def _modules_by_name(depth: int, layout: str) -> dict[str, tuple[str, str, str]]:
    column = {"timm": lambda r: r[0], "official": lambda r: r[1], "mindspore": lambda r: MS_PREFIX + r[1]}
    return {column[layout](row): row for row in _module_rows(depth)}


def convert_key(key: str, src: str, dst: str, depth: int) -> str | None:
    """Translate one tensor name; None for a tensor `dst` does not store (MindSpore's num_batches_tracked)."""
    if src == dst:
        return key
    module, _, param = key.rpartition(".")
    row = _modules_by_name(depth, src).get(module)
    if src == "mindspore" and row is not None and row[2] == "bn":
        param = BN_MS_TO_TORCH.get(param, param)
    if row is None or param not in PARAMS[row[2]]:
        raise LayoutError(f"tensor {brief(key)} is not part of a depth-{depth} ConvMixer in the {src} layout")
    timm_mod, official_mod, kind = row
    out_mod = {"timm": timm_mod, "official": official_mod, "mindspore": MS_PREFIX + official_mod}[dst]
    if dst == "mindspore" and kind == "bn":
        if param == "num_batches_tracked":
            return None
        param = BN_TORCH_TO_MS[param]
    return f"{out_mod}.{param}"


def detect_layout(keys: list[str] | Any) -> str:
    """Recognise the layout of a state dict from its names (prefixes already stripped)."""
    keys = list(keys)
    if not keys:
        raise LayoutError("the checkpoint holds no tensors")
    if all(k.startswith(MS_PREFIX) for k in keys):
        return "mindspore"
    if all(_TIMM_RE.match(k) for k in keys):
        return "timm"
    if all(_OFFICIAL_RE.match(k) for k in keys):
        return "official"
    odd = [k for k in keys if not (_TIMM_RE.match(k) or _OFFICIAL_RE.match(k) or k.startswith(MS_PREFIX))]
    if odd:
        raise LayoutError(f"unrecognised tensor name {brief(odd[0])}: not a timm, official (locuslab) or MindSpore "
                          "ConvMixer layout")
    raise LayoutError("the tensor names mix the timm, official (locuslab) and MindSpore layouts")


def infer_depth(keys: list[str] | Any, layout: str) -> int:
    """The number of blocks, from the names alone; at most the number of tensors, so that a name with a huge
    block index is refused before tables or models of that many blocks are built."""
    keys = list(keys)
    if layout == "timm":
        found = [(int(m.group(2)), k) for k in keys if (m := _TIMM_RE.match(k)) and m.group(2) is not None]
        index, key = max(found, default=(-1, ""))
        depth = index + 1
    else:
        names = [(k[len(MS_PREFIX):] if layout == "mindspore" else k, k) for k in keys]
        # Blocks sit at indices 3 .. depth+2 of the official Sequential; an extra tensor elsewhere then shows up
        # as unexpected instead of shifting the depth.
        found = [(int(m.group(1)), k) for n, k in names if (m := _OFFICIAL_BLOCK_RE.match(n))]
        index, key = max(found, default=(2, ""))
        depth = index - 2
    if depth > len(keys):
        raise LayoutError(f"tensor {brief(key)} puts a block at index {index}, but the file holds only {len(keys)} "
                          f"tensors, far fewer than {depth} blocks need")
    return depth


V = TypeVar("V")


def convert_state(state: Mapping[str, V], dst: str, src: str | None = None) -> dict[str, V]:
    """Rename every tensor of `state` from its layout (detected unless given) into `dst`."""
    src = src or detect_layout(state.keys())
    depth = infer_depth(state.keys(), src)
    out: dict[str, V] = {}
    for key, value in state.items():
        new = convert_key(key, src, dst, depth)
        if new is not None:
            out[new] = value
    return out


def infer_arch(state: Mapping[str, Any]) -> dict[str, int]:
    """Architecture from tensor shapes of a timm-layout state dict: dim, depth, kernel, patch, classes."""
    try:
        stem = state["stem.0.weight"]
        head = state["head.weight"]
        dw = state["blocks.0.0.fn.0.weight"]
    except KeyError as e:
        raise LayoutError(f"cannot infer the architecture: tensor {e.args[0]!r} is missing") from None
    return dict(
        dim=int(stem.shape[0]),
        depth=infer_depth(state.keys(), "timm"),
        kernel_size=int(dw.shape[-1]),
        patch_size=int(stem.shape[-1]),
        in_chans=int(stem.shape[1]),
        num_classes=int(head.shape[0]),
    )
