"""The layout table against the real module trees it describes."""

from __future__ import annotations

import pytest
import torch
from helpers import official_convmixer

from convmixer_pt import VARIANTS, create_model
from convmixer_pt.variants import match_variant
from convmixer_pt.weights import keymap


@pytest.mark.parametrize("depth", [0, 1, 3, 32])
def test_timm_to_official_gives_locuslabs_names_in_order(depth: int) -> None:
    ours = create_model("convmixer_128_4", dim=4, depth=depth, num_classes=3).state_dict()
    official = official_convmixer(4, depth, 5, 2, n_classes=3).state_dict()
    assert list(keymap.convert_state(ours, "official")) == list(official)
    assert list(keymap.convert_state(official, "timm")) == list(ours)


def test_mindspore_names_rename_batchnorm_and_drop_the_counter() -> None:
    ours = create_model("convmixer_128_4", dim=4, depth=2, num_classes=3).state_dict()
    ms = keymap.convert_state(ours, "mindspore")
    assert "network.2.gamma" in ms and "network.4.0.fn.2.moving_variance" in ms and "network.7.bias" in ms
    assert not any("num_batches_tracked" in k or "running" in k for k in ms)
    assert len(ms) == len([k for k in ours if not k.endswith("num_batches_tracked")])
    back = keymap.convert_state(ms, "timm")
    assert list(back) == [k for k in ours if not k.endswith("num_batches_tracked")]
    assert all(back[k] is ours[k] for k in back)


@pytest.mark.parametrize("name", ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20", "convmixer_256_8"])
def test_infer_arch_and_match_variant(name: str) -> None:
    spec = VARIANTS[name]
    # Shapes alone decide: build the state dict lazily from meta tensors, no memory needed.
    with torch.device("meta"):
        state = create_model(name, num_classes=17, in_chans=2).state_dict()
    arch = keymap.infer_arch(state)
    assert arch == dict(dim=spec["dim"], depth=spec["depth"], kernel_size=spec["kernel_size"],
                        patch_size=spec["patch_size"], in_chans=2, num_classes=17)
    assert match_variant(arch) == name
    assert match_variant(dict(arch, depth=arch["depth"] + 1)) is None


def test_layout_detection_and_errors() -> None:
    ours = create_model("convmixer_128_4", dim=4, depth=2, num_classes=3).state_dict()
    official = keymap.convert_state(ours, "official")
    assert keymap.detect_layout(ours) == "timm"
    assert keymap.detect_layout(official) == "official"
    assert keymap.detect_layout(keymap.convert_state(ours, "mindspore")) == "mindspore"
    with pytest.raises(keymap.LayoutError, match=r"tensor '99\.weight' is not part of a depth-2 ConvMixer"):
        keymap.convert_state(dict(official, **{"99.weight": torch.zeros(1)}), "timm")
    with pytest.raises(keymap.LayoutError, match=r"mix the timm, official"):
        keymap.detect_layout(["stem.0.weight", "0.weight"])
    with pytest.raises(keymap.LayoutError, match=r"unrecognised tensor name 'fc\.weight'"):
        keymap.detect_layout(["stem.0.weight", "fc.weight"])
    with pytest.raises(keymap.LayoutError, match=r"holds no tensors"):
        keymap.detect_layout([])
    with pytest.raises(keymap.LayoutError, match=r"tensor 'head\.weight' is missing"):
        keymap.infer_arch({"stem.0.weight": torch.zeros(4, 3, 2, 2)})
