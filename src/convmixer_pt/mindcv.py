"""ConvMixer in MindCV's model registry, so that MindCV's own `train.py`, `validate.py` and `infer.py` run it.

MindCV never merged ConvMixer (its pull request #513) and has no plug-in hook: its scripts call
`mindcv.models.create_model(name)` on a registry that `@register_model` fills at import. Importing this module
registers `convmixer_768_32`, `convmixer_1024_20` and `convmixer_1536_20` (the names of MindCV's ConvMixer
configs) there, built from this package's MindSpore cell, whose parameter names are the ones `convmixer-convert`
writes. `convmixer-mindcv SCRIPT ARGS` imports it and then runs a MindCV script.

The activation is exact GELU (ReLU for 768/32), what the published weights were trained with; `act="gelu_tanh"`
gives MindCV's own cell's function (MindSpore's `nn.GELU()` default). Every MindCV argument is accepted:
`drop_rate` and `drop_path_rate` only as 0 (ConvMixer has neither), `pretrained` through MindCV's loader from
the addresses of the published converted weights.

Imports MindSpore and MindCV.
"""

from __future__ import annotations

from typing import Any

from mindcv.models.helpers import load_pretrained
from mindcv.models.registry import register_model

from .errors import UserError
from .mindspore.model import MSConvMixer
from .variants import EVAL_CROP_PCT, EVAL_INPUT_SIZE, IMAGENET_MEAN, IMAGENET_STD, SHAPE_KEYS, variant_arch

MINDCV_NAMES = ("convmixer_768_32", "convmixer_1024_20", "convmixer_1536_20")
# Where MindCV's ConvMixer README (pull request #513) publishes the official weights converted to MindSpore.
PUBLISHED_URL = "https://storage.googleapis.com/huawei-mindspore-hk/ConvMixer/Converted/{}.ckpt"
OVERRIDABLE = (*SHAPE_KEYS, "act")  # what a caller may change beside MindCV's own arguments


def _cfg(name: str) -> dict[str, Any]:
    """MindCV's `default_cfgs` entry: the published weights, and the eval settings of the published table (mean
    and std on MindCV's 0-255 scale, bilinear as MindCV's configs)."""
    return {
        "url": PUBLISHED_URL.format(name), "num_classes": 1000, "input_size": (3, EVAL_INPUT_SIZE, EVAL_INPUT_SIZE),
        "crop_pct": EVAL_CROP_PCT, "interpolation": "bilinear",
        "mean": [m * 255 for m in IMAGENET_MEAN], "std": [s * 255 for s in IMAGENET_STD],
        "first_conv": "network.0", "classifier": f"network.{variant_arch(name)['depth'] + 5}",
    }


# MindCV's registry reads this module-level name (`sys.modules[fn.__module__].default_cfgs`) at registration.
default_cfgs = {name: _cfg(name) for name in MINDCV_NAMES}


def create(name: str, pretrained: bool = False, num_classes: int = 1000, in_channels: int = 3,
           drop_rate: float | None = None, drop_path_rate: float | None = None, **kwargs: Any) -> MSConvMixer:
    """The MindSpore ConvMixer `name` with MindCV's arguments; `kwargs` may change the shape or `act`."""
    for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
        if value:
            raise UserError(f"{name}: {key}={value} asked for, but ConvMixer has no dropout or stochastic depth "
                            f"(use 0)")
    unknown = sorted(set(kwargs) - set(OVERRIDABLE))
    if unknown:
        raise UserError(f"{name}: unknown argument {unknown[0]!r}; a ConvMixer takes MindCV's num_classes, "
                        f"in_channels, pretrained, drop_rate, drop_path_rate and {', '.join(OVERRIDABLE)}")
    if pretrained and (kwargs.keys() & set(SHAPE_KEYS)):
        raise UserError(f"{name}: pretrained weights fit the published shapes; do not change "
                        f"{', '.join(sorted(kwargs.keys() & set(SHAPE_KEYS)))}")
    net = MSConvMixer(**dict(variant_arch(name), **kwargs), in_chans=in_channels, num_classes=num_classes)
    if pretrained:
        load_pretrained(net, default_cfgs[name], num_classes=num_classes, in_channels=in_channels)
    return net


@register_model
def convmixer_768_32(pretrained: bool = False, num_classes: int = 1000, in_channels: int = 3,
                     **kwargs: Any) -> MSConvMixer:
    return create("convmixer_768_32", pretrained, num_classes, in_channels, **kwargs)


@register_model
def convmixer_1024_20(pretrained: bool = False, num_classes: int = 1000, in_channels: int = 3,
                      **kwargs: Any) -> MSConvMixer:
    return create("convmixer_1024_20", pretrained, num_classes, in_channels, **kwargs)


@register_model
def convmixer_1536_20(pretrained: bool = False, num_classes: int = 1000, in_channels: int = 3,
                      **kwargs: Any) -> MSConvMixer:
    return create("convmixer_1536_20", pretrained, num_classes, in_channels, **kwargs)
