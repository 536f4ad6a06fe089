"""Every checkpoint format behind one pair of functions: `read_weights(path) -> Weights`, `write_weights`.

Every input is read into one form, timm-layout torch tensors plus the architecture inferred from their shapes
(`Weights`), and every output is written from it, so any format converts to any other exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, about
from ..model import ConvMixer
from ..variants import ACTIVATIONS, VARIANTS, match_variant
from . import keymap
from .ms_io import ms_model_from_params, read_ckpt_state, torch_to_ms, write_ckpt
from .torch_io import check_state_dict, file_format, load_state_dict_strict, read_state_dict, write_safetensors

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
TORCH_LAYOUTS = ("timm", "official")


@dataclass
class Weights:
    """One model's tensors in the timm layout, what they were read from, and the architecture they imply."""

    state: dict[str, torch.Tensor]
    arch: dict[str, int]  # dim, depth, kernel_size, patch_size, in_chans, num_classes
    act: str | None  # None when nothing says which activation the weights were trained with
    act_source: str
    framework: str  # "torch" or "mindspore": which model the file is meant for
    path: Path

    @property
    def variant(self) -> str | None:
        return match_variant(self.arch)

    @property
    def model_arch(self) -> dict[str, Any]:
        """Constructor arguments of a model these weights fit (GELU stands in for an unknown activation)."""
        return dict(self.arch, act=self.act or "gelu")


def output_format(path: str | Path) -> str:
    """'mindspore', 'safetensors' or 'torch', from the output file's name."""
    name = Path(path).name.lower()
    if name.endswith(".ckpt"):
        return "mindspore"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise CheckpointError(f"{path}: cannot tell the output format from the name; use .ckpt (MindSpore), "
                          f".safetensors, or {'/'.join(TORCH_SUFFIXES)} (PyTorch)")


def resolve_act(arch: Mapping[str, int], metadata_act: str | None,
                override: str | None) -> tuple[str | None, str]:
    """The activation and where it came from: --act, then the file's own record, then the registry."""
    if override:
        return override, "--act"
    if metadata_act in ACTIVATIONS:
        return metadata_act, "file metadata"
    name = match_variant(arch)
    if name is not None:
        return VARIANTS[name]["act"], f"registry: {name}"
    return None, "unknown"


def read_weights(path: str | Path, use_ema: bool = False, act: str | None = None,
                 progress: bool = False) -> Weights:
    """Any accepted checkpoint, checked to hold exactly one complete ConvMixer."""
    path = Path(path)
    if file_format(path) == "mindspore":
        if use_ema:
            raise CheckpointError(f"{path}: EMA weights were asked for, but a MindSpore .ckpt holds one set "
                                  "of weights")
        state, meta, framework = read_ckpt_state(path, progress), {}, "mindspore"
    else:
        state, meta = read_state_dict(path, use_ema=use_ema)
        framework = "torch"
    with about(path):
        arch = keymap.infer_arch(state)
        resolved, source = resolve_act(arch, meta.get("act"), act)
        with torch.device("meta"):
            check_state_dict(ConvMixer(**arch, act=resolved or "gelu", fast=False), state)
    return Weights(state=state, arch=arch, act=resolved, act_source=source, framework=framework, path=path)


def cast_state(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype` ('keep' leaves them as they are); integer counters stay integers."""
    if dtype == "keep":
        return dict(state)
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose keep, {', '.join(DTYPES)}")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


def with_batch_counters(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full PyTorch state dict: BatchNorm's `num_batches_tracked`, which MindSpore does not keep, as 0."""
    out = {}
    for key, value in state.items():
        out[key] = value
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + "num_batches_tracked"
            out[counter] = state.get(counter, torch.tensor(0, dtype=torch.long))
    return out


def safetensors_metadata(weights: Weights, layout: str) -> dict[str, str]:
    meta = {"format": "pt", "layout": layout, "arch": json.dumps(weights.arch, sort_keys=True)}
    if weights.variant:
        meta["variant"] = weights.variant
    if weights.act:
        meta["act"] = weights.act
    return meta


def write_weights(weights: Weights, path: str | Path, layout: str = "timm", progress: bool = False) -> int:
    """Write in the format `path`'s name asks for (`layout`: PyTorch outputs only); returns the tensor count.

    The file is written in place: callers that need it to appear whole pass a staging path.
    """
    fmt = output_format(path)
    if layout not in TORCH_LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r} for a PyTorch output; choose timm or official")
    if fmt == "mindspore":
        return write_ckpt(weights.state, path, progress=progress)
    full = keymap.convert_state(with_batch_counters(weights.state), layout, src="timm")
    if fmt == "safetensors":
        write_safetensors(full, path, metadata=safetensors_metadata(weights, layout))
    else:
        torch.save(full, path)
    return len(full)


def torch_model(weights: Weights, act: str | None = None, fast: bool | None = None) -> ConvMixer:
    """A float32 PyTorch model holding `weights` (any stored dtype), in eval mode; `act` replaces the
    activation the weights imply, `fast` is the model's fast-path switch."""
    model = ConvMixer(**dict(weights.model_arch, **({"act": act} if act else {})), fast=fast)
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.state.items()}
    with about(weights.path):
        load_state_dict_strict(model, state)
    return model.eval()


def ms_model(weights: Weights, act: str | None = None, arch: Mapping[str, Any] | None = None) -> Any:
    """A float32 MindSpore model holding `weights`, renamed through the key map; `arch` (default: what the
    weights imply) gives the constructor arguments, `act` replaces its activation."""
    named = keymap.convert_state(weights.state, "mindspore", src="timm")
    params = {k: torch_to_ms(v) for k, v in named.items()}
    arch = dict(weights.model_arch if arch is None else arch, **({"act": act} if act else {}))
    with about(weights.path):
        return ms_model_from_params(arch, params)
