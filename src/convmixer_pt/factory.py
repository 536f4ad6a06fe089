"""Building a registered variant, optionally with weights from a file, in either framework.

The counterpart of timm's `create_model`: the model modules build layers only, and this is the layer that joins
them with the checkpoint readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import about
from .model import ConvMixer
from .variants import pretrained_cfg, variant_arch
from .weights.ms_io import load_params_strict, read_ms_params
from .weights.torch_io import load_model_weights


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

    `checkpoint_path` may be an official locuslab file, a timm state dict (.pth/.bin/.safetensors) or a
    training checkpoint; the layout is recognised from the keys and loading is strict. `use_ema` picks the
    EMA weights of a training checkpoint that has them.
    """
    kwargs = variant_arch(name)
    kwargs.update(num_classes=num_classes, **overrides)
    model = ConvMixer(**kwargs)
    # As timm's factory does: the cfg of the name, which describes the variant's (published) weights.
    model.pretrained_cfg = model.default_cfg = pretrained_cfg(name)
    if checkpoint_path is not None:
        load_model_weights(model, checkpoint_path, use_ema=use_ema)
    return model


def create_ms_model(
    name: str,
    num_classes: int = 1000,
    checkpoint_path: str | Path | None = None,
    **overrides: Any,
) -> Any:
    """Build a registered variant in MindSpore (an `MSConvMixer`), as `create_model` does in PyTorch.

    A checkpoint is loaded strictly: every name, shape and dtype must match (a float16 file is refused
    rather than silently cast; convert it with `--dtype float32`).
    """
    from .mindspore.model import MSConvMixer  # imports MindSpore, an optional heavy dependency

    kwargs = variant_arch(name)
    kwargs.update(num_classes=num_classes, **overrides)
    net = MSConvMixer(**kwargs)
    if checkpoint_path is not None:
        params = read_ms_params(checkpoint_path)
        with about(checkpoint_path):
            load_params_strict(net, params)
    return net
