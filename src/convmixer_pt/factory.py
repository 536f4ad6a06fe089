"""Building a registered variant, optionally with weights from a file, in either framework.

The counterpart of timm's `create_model`: the model modules build layers only, and this is the layer that joins
them with the checkpoint readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import about
from .model import ConvMixer
from .runtime import require_mindspore
from .variants import pretrained_cfg, variant_arch
from .weights.formats import read_weights
from .weights.ms_net import load_params_strict, read_ms_params
from .weights.torch_io import load_state_dict_strict


def create_model(
    name: str,
    num_classes: int = 1000,
    checkpoint_path: str | Path | None = None,
    use_ema: bool = False,
    **overrides: Any,
) -> ConvMixer:
    """Build a registered variant; `overrides` change any constructor argument (dim, act, in_chans, global_pool,
    fast, device, dtype, ...). Its `pretrained_cfg` is the variant's (timm's eval preprocessing, the hub id of
    the published weights).

    `checkpoint_path` may be any file the converter reads: an official locuslab file, a timm state dict
    (.pth/.bin/.safetensors), a training checkpoint of either framework, a MindSpore .ckpt or MindSpore-layout
    safetensors; the layout is recognised from the names and loading is strict. The activation is `act` if
    given, else the file's record (safetensors metadata, a training checkpoint's `arch`), else the variant's.
    `use_ema` picks the EMA weights of a training checkpoint that has them.
    """
    kwargs = variant_arch(name)
    kwargs.update(num_classes=num_classes, **overrides)
    weights = None if checkpoint_path is None else \
        read_weights(checkpoint_path, use_ema, overrides.get("act"), float64=True)  # the model's dtype takes it
    if weights is not None and "act" not in overrides and weights.act_source == "file metadata":
        kwargs["act"] = weights.act
    model = ConvMixer(**kwargs)
    # As timm's factory does: the cfg of the name, which describes the variant's (published) weights.
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name)
    if weights is not None:
        with about(checkpoint_path):
            load_state_dict_strict(model, weights.state)
    return model


def create_ms_model(
    name: str,
    num_classes: int = 1000,
    checkpoint_path: str | Path | None = None,
    use_ema: bool = False,
    **overrides: Any,
) -> Any:
    """Build a registered variant in MindSpore (an `MSConvMixer`), as `create_model` does in PyTorch.

    A checkpoint (.ckpt or MindSpore-layout safetensors) is read by MindSpore's own loader and loaded strictly:
    every name, shape and dtype must match (a float16 file is refused rather than silently cast; convert it
    with `--dtype float32`). The activation follows the same rule as `create_model`'s.
    """
    require_mindspore("create_ms_model")
    from .mindspore.model import MSConvMixer

    kwargs = variant_arch(name)
    kwargs.update(num_classes=num_classes, **overrides)
    if checkpoint_path is not None:
        weights = read_weights(checkpoint_path, use_ema, overrides.get("act"))
        if "act" not in overrides and weights.act_source == "file metadata":
            kwargs["act"] = weights.act
    net = MSConvMixer(**kwargs)
    if checkpoint_path is not None:
        params = read_ms_params(checkpoint_path, use_ema=use_ema)
        with about(checkpoint_path):
            load_params_strict(net, params)
    return net
