"""This package's ConvMixer in timm's model registry: `import convmixer_pt.timm_models`, then
`timm.create_model("convmixer_pt_1536_20", pretrained=True)` and everything else timm does with a model name.

Names: `convmixer_pt_` + timm's spelling of the architecture (`convmixer_pt_1536_20`, `convmixer_pt_768_32`,
`convmixer_pt_1024_20_ks9_p14`, and `convmixer_pt_256_8`, `convmixer_pt_128_4` without published weights).
They never replace timm's own ConvMixer: registering a name timm has overwrites it, for every user of timm
in the process.

Weights: the published variants' cfgs point at the files timm's own ConvMixer loads (`hf_hub_id`
`timm/convmixer_1536_20.in1k`, ...), spelled out in full (timm would complete the shorthand 'timm/' with
the entrypoint's own name, a repository that does not exist). `pretrained_cfg_overlay=dict(file=PATH)` also
takes locuslab's official files: `checkpoint_filter_fn` translates their names. `features_only=True` gives
timm's `FeatureGetterNet` over the last three blocks (`out_indices` picks others), as for timm's ConvMixer.

Built under `timm.layers.set_scriptable(True)` or `set_exportable(True)` a model's fast path is off (unless
`fast` is given): its graph is then the plain modules, which TorchScript and exporters take whole.

Importing this module imports timm.models (about 2 s), which is why `import convmixer_pt` does not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from timm.layers import is_exportable, is_scriptable
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .model import ConvMixer
from .variants import VARIANTS, pretrained_cfg, variant_arch
from .weights import keymap

# This package's variant name -> its name in timm's registry.
TIMM_NAMES: dict[str, str] = {
    name: "convmixer_pt_" + (spec["timm_name"] or name).removeprefix("convmixer_") for name, spec in VARIANTS.items()
}


def _registry_cfg(name: str) -> tuple[str, dict[str, Any]]:
    """(`architecture[.tag]`, the cfg): timm's registry adds the architecture and the tag itself."""
    cfg = pretrained_cfg(name)
    del cfg["architecture"]
    tag = cfg.pop("tag", None)
    return TIMM_NAMES[name] + (f".{tag}" if tag else ""), cfg


# The registry reads `default_cfgs` from the entrypoints' module when they are registered: it comes first.
default_cfgs = generate_default_cfgs(dict(_registry_cfg(name) for name in VARIANTS))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: ConvMixer) -> dict[str, torch.Tensor]:
    """timm's hook for weights in another layout: locuslab's official names (or MindSpore's, in a PyTorch
    file) become timm's; timm-named weights pass unchanged."""
    return keymap.convert_state(state_dict, "timm")


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last three blocks, as timm's ConvMixer
    if is_scriptable() or is_exportable():
        kwargs.setdefault("fast", False)
    return build_model_with_cfg(ConvMixer, TIMM_NAMES[variant], pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **{**variant_arch(variant), **kwargs})


@register_model
def convmixer_pt_1536_20(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    return _create("convmixer_1536_20", pretrained, **kwargs)


@register_model
def convmixer_pt_768_32(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    return _create("convmixer_768_32", pretrained, **kwargs)


@register_model
def convmixer_pt_1024_20_ks9_p14(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    return _create("convmixer_1024_20", pretrained, **kwargs)


@register_model
def convmixer_pt_256_8(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    return _create("convmixer_256_8", pretrained, **kwargs)


@register_model
def convmixer_pt_128_4(pretrained: bool = False, **kwargs: Any) -> ConvMixer:
    return _create("convmixer_128_4", pretrained, **kwargs)
