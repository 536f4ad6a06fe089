"""Every checkpoint format behind one pair of functions: `read_weights(path) -> Weights`, `write_weights`.

Every input is read into one form, timm-layout torch tensors plus the architecture inferred from their shapes
(`Weights`), and every output is written from it, so any format converts to any other exactly. None of it
needs MindSpore: only `torch_model`'s counterpart `ms_model` runs it.

The activation is not in the tensors. It comes from `--act`, else the file's own record (safetensors metadata,
a training checkpoint's `arch`), else the registered variant with those shapes; a MindSpore training checkpoint
of a GELU-shaped model must be told (MindCV's own cell trains with MindSpore's tanh GELU, this package's MindCV
registration with exact GELU, and nothing in the file says which). What the user states for such a file is what
its weights were trained with: both the input's model and the output's run it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import CheckpointError, about, brief
from ..files import parse_yaml
from ..model import ConvMixer
from ..variants import ACTIVATIONS, VARIANTS, activation, match_variant, mindcv_activation
from . import keymap
from .ms_files import read_ckpt, write_ckpt, write_ms_safetensors
from .ms_io import check_safetensors_crc, is_mindspore_layout, split_training_state
from .ms_net import ms_model_from_params, torch_to_ms
from .torch_io import (
    check_state_dict,
    check_weights,
    file_format,
    load_state_dict_strict,
    overflow,
    read_torch_checkpoint,
    torch_state,
    write_safetensors,
)

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
# The tensor names each output format takes (the first is its default): a .ckpt is always in MindCV's names,
# a PyTorch pickle never.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "mindspore": ("mindspore",),
    "safetensors": ("timm", "official", "mindspore"),
    "torch": ("timm", "official"),
}
FORMAT_NAMES = {"mindspore": "MindSpore .ckpt", "safetensors": ".safetensors", "torch": "PyTorch"}


@dataclass
class Weights:
    """One model's tensors in the timm layout, what they were read from, and the architecture they imply."""

    state: dict[str, torch.Tensor]
    arch: dict[str, int]  # dim, depth, kernel_size, patch_size, in_chans, num_classes
    act: str | None  # the activation stated for the weights (and recorded in outputs); None: nothing says
    act_source: str
    framework: str  # "torch" or "mindspore": which model the file is meant for
    path: Path
    # The activation the file itself records, where that may differ from `act`: what the input's model runs
    # when it is verified against an output.
    input_act: str | None = None
    input_act_source: str = ""
    dropped: str = ""  # one line saying what training state was dropped; "" when nothing was
    training_state: bool = False  # a MindSpore training checkpoint (optimizer, step, loss scale or EMA entries)
    meta: dict[str, Any] = field(default_factory=dict)  # what the file records: metadata, a training config

    @property
    def variant(self) -> str | None:
        return match_variant(self.arch)

    @property
    def model_arch(self) -> dict[str, Any]:
        """Constructor arguments of a model these weights fit (GELU stands in for an unknown activation)."""
        return dict(self.arch, act=self.act or "gelu")

    @property
    def reference_act(self) -> tuple[str, str]:
        """The activation the input's own model runs, and why."""
        if self.input_act is not None:
            return self.input_act, self.input_act_source
        return self.act or "gelu", self.act_source


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


def output_layout(path: str | Path, layout: str | None = None) -> str:
    """The tensor names an output gets: `layout` where its format takes it, else the format's default."""
    allowed = LAYOUTS[output_format(path)]
    if layout is None:
        return allowed[0]
    if layout not in allowed:
        raise CheckpointError(f"{path}: a {FORMAT_NAMES[output_format(path)]} output takes --layout "
                              f"{' or '.join(allowed)}, not {layout!r}")
    return layout


def records_activation(path: str | Path) -> bool:
    """Whether an output of this name records the activation: safetensors metadata can; a bare state dict and
    a `.ckpt` (whose extra entries MindSpore's strict loading would report as unused) cannot."""
    return output_format(path) == "safetensors"


def resolve_act(arch: Mapping[str, int], recorded: str | None, override: str | None,
                training_state: bool = False) -> tuple[str | None, str]:
    """The activation and where it came from: --act, then the file's own record, then the registry.

    MindSpore training state of a model whose activation would default to GELU is refused without --act: MindCV's
    own cell trains with MindSpore's tanh GELU, this package's registration with exact GELU, and the file cannot
    say which it holds.
    """
    if override:
        return override, "--act"
    if recorded in ACTIVATIONS:
        return recorded, "file metadata"
    if training_state and mindcv_activation(arch) == "gelu_tanh":
        raise CheckpointError("holds MindSpore training state and cannot say which GELU it was trained with: pass "
                              "--act gelu_tanh for MindCV's own ConvMixer cell (MindSpore's nn.GELU()), or --act gelu "
                              "for exact GELU (this package's MindCV registration, convmixer-mindcv) "
                              "(act=... in Python)")
    name = match_variant(arch)
    if name is not None:
        return VARIANTS[name]["act"], f"registry: {name}"
    return None, "unknown"


def implied_act(recorded: str | None) -> tuple[str | None, str]:
    """The activation a file itself records, whatever --act says; None where it records none (then what is stated
    for its weights is what its model runs)."""
    if recorded in ACTIVATIONS:
        return recorded, "file metadata"
    return None, ""


def recorded_config(weights: Weights) -> tuple[dict[str, Any], str]:
    """The training config a checkpoint of this trainer records, else its run's args.yaml, else nothing."""
    if isinstance(weights.meta.get("config"), dict):
        return weights.meta["config"], f"{weights.path} (its training config)"
    args = weights.path.parent / "args.yaml"
    if args.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, yaml.YAMLError):
            data = parse_yaml(args.read_text())
            if isinstance(data, dict):
                return data, str(args)
    return {}, "defaults (ImageNet)"


def read_weights(path: str | Path, use_ema: bool = False, act: str | None = None, float64: bool = False) -> Weights:
    """Any accepted checkpoint, checked to hold exactly one complete ConvMixer of real weights (`check_weights`;
    `float64`: float64 weights too, for a caller that converts them)."""
    if act is not None:
        activation(act)  # an unknown name is the caller's error, not the file's
    path = Path(path)
    fmt = file_format(path)
    if fmt == "mindspore":
        with about(path):
            obj, meta = read_ckpt(path), {}
    else:
        obj, meta = read_torch_checkpoint(path)
    with about(path):
        dropped, training = "", False
        if fmt == "mindspore" or (fmt == "safetensors" and is_mindspore_layout(obj)):
            check_safetensors_crc(obj, meta)
            split = split_training_state(obj, use_ema=use_ema)
            state = keymap.convert_state(split.network, "timm", src="mindspore")
            framework, dropped, training = "mindspore", split.dropped_line(), split.training_state
        else:
            state, meta = torch_state(obj, meta, use_ema=use_ema)
            framework = "torch"
        check_weights(state, float64)
        arch = keymap.infer_arch(state)
        recorded = meta.get("act")
        resolved, source = resolve_act(arch, recorded, act, training)
        own, own_source = implied_act(recorded)
        with torch.device("meta"):
            check_state_dict(ConvMixer(**arch, act=resolved or "gelu", fast=False), state)
    return Weights(state=state, arch=arch, act=resolved, act_source=source, framework=framework, path=path,
                   input_act=own, input_act_source=own_source, dropped=dropped, training_state=training, meta=meta)


def cast_state(state: Mapping[str, torch.Tensor], dtype: str,
               clamp: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Floating tensors in `dtype` ('keep' leaves them as they are; integer counters stay integers), and how
    many values were clamped. A finite value beyond `dtype`'s range is an error naming the tensor, or with
    `clamp` saturated to the largest finite value of that sign."""
    if dtype == "keep":
        return dict(state), 0
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose keep, {', '.join(DTYPES)}")
    target, out, clamped = DTYPES[dtype], {}, 0
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        problem = overflow(value, target)
        if problem and not clamp:
            raise CheckpointError(f"tensor {brief(key)} {problem}; pass --clamp to saturate such values")
        if problem:
            limit = torch.finfo(target).max
            finite = torch.isfinite(value)
            clamped += int((finite & (value.abs() > limit)).sum())
            value = torch.where(finite, value.clamp(-limit, limit), value)
        out[key] = value.to(target)
    return out, clamped


def with_batch_counters(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full PyTorch state dict: BatchNorm's `num_batches_tracked`, which MindSpore does not keep, as 0."""
    out = {}
    for key, value in state.items():
        out[key] = value
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + "num_batches_tracked"
            out[counter] = state.get(counter, torch.tensor(0, dtype=torch.long))
    return out


def record(weights: Weights, layout: str) -> dict[str, str]:
    """What a safetensors output records about the model beside its tensors."""
    meta = {"layout": layout, "arch": json.dumps(weights.arch, sort_keys=True)}
    if weights.variant:
        meta["variant"] = weights.variant
    if weights.act:
        meta["act"] = weights.act
    return meta


def write_weights(weights: Weights, path: str | Path, layout: str | None = None) -> int:
    """Write in the format `path`'s name asks for, in `layout` (default: the format's own); returns the tensor
    count. The file is written in place: callers that need it to appear whole pass a staging path."""
    fmt, layout = output_format(path), output_layout(path, layout)
    if layout == "mindspore":
        named = keymap.convert_state(weights.state, "mindspore", src="timm")
        if fmt == "mindspore":
            write_ckpt(named.items(), path)
        else:
            write_ms_safetensors(named.items(), path, extra_metadata=record(weights, layout))
        return len(named)
    full = keymap.convert_state(with_batch_counters(weights.state), layout, src="timm")
    if fmt == "safetensors":
        write_safetensors(full, path, metadata={"format": "pt", **record(weights, layout)})
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


def load_model_weights(model: ConvMixer, path: str | Path, use_ema: bool = False) -> Weights:
    """Load any checkpoint `read_weights` accepts into `model` strictly (the model's activation stands as stated);
    returns what was read."""
    weights = read_weights(path, use_ema=use_ema, act=model.act, float64=True)
    with about(path):
        load_state_dict_strict(model, weights.state)
    return weights
