"""The model computes timm's ConvMixer function, and loads every published checkpoint layout."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import copy_by_position, official_convmixer, randomize_bn, rel_max_diff
from safetensors.torch import save_file
from torch import nn

from convmixer_pt import VARIANTS, create_model, list_models

FULL = ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"]
PARAMS_M = {"convmixer_1536_20": 51.63, "convmixer_768_32": 21.11, "convmixer_1024_20": 24.38}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference_pair(name: str, seed: int = 0) -> tuple[nn.Module, nn.Sequential]:
    """timm's model with random weights and BN statistics, and locuslab's Sequential holding the same tensors."""
    spec = VARIANTS[name]
    torch.manual_seed(seed)
    ref = timm.create_model(spec["timm_name"], pretrained=False).eval()
    randomize_bn(ref, torch.Generator().manual_seed(seed))
    act = nn.ReLU if spec["act"] == "relu" else nn.GELU
    official = official_convmixer(spec["dim"], spec["depth"], spec["kernel_size"], spec["patch_size"], act=act)
    copy_by_position(ref, official.eval())
    return ref, official


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_variant_from_official_file_matches_timm(name: str, tmp_path) -> None:
    ref, official = reference_pair(name)
    # 16 x 16 patches (224 pixels for the patch-14 variant, 112 for the others): every 9 x 9 depthwise window
    # fits inside a plane, as at 224; the weights and the function checked do not depend on the image size.
    size = 16 * VARIANTS[name]["patch_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        # The position copy into locuslab's code is itself checked, so the file below is a real official file.
        assert rel_max_diff(official(x), expected) < 1e-5
    path = tmp_path / f"{name}_official.pth.tar"
    torch.save(official.state_dict(), path)

    model = create_model(name, checkpoint_path=path).eval()
    assert count(model) == count(ref)
    assert round(count(model) / 1e6, 2) == PARAMS_M[name]
    with torch.no_grad():
        got = model(x)
    assert rel_max_diff(got, expected) < 1e-5
    assert torch.equal(got.topk(5).indices, expected.topk(5).indices)

    st_path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st_path))
    from_st = create_model(name, checkpoint_path=st_path).eval()
    with torch.no_grad():
        assert rel_max_diff(from_st(x), expected) < 1e-5


def test_state_dict_keys_are_timms_for_every_full_variant() -> None:
    for name in FULL:
        ref_keys = list(timm.create_model(VARIANTS[name]["timm_name"], pretrained=False).state_dict())
        assert list(create_model(name).state_dict()) == ref_keys


def test_forward_features_and_head_compose() -> None:
    model = create_model("convmixer_128_4", num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, 128, 16, 16)
        assert model.forward_head(feats, pre_logits=True).shape == (3, 128)
        assert torch.equal(model.forward_head(feats), model(x))


def test_overrides_reach_the_constructor() -> None:
    model = create_model("convmixer_256_8", num_classes=10, in_chans=1, act="relu", depth=2, kernel_size=3)
    assert model.arch == dict(dim=256, depth=2, kernel_size=3, patch_size=2, in_chans=1, num_classes=10, act="relu")
    assert isinstance(model.stem[1], nn.ReLU)
    assert model.blocks[0][0].fn[0].weight.shape == (256, 1, 3, 3)
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)


def test_768_32_uses_relu_like_the_released_weights() -> None:
    model = create_model("convmixer_768_32", depth=1)
    assert all(not isinstance(m, nn.GELU) for m in model.modules())
    assert isinstance(model.blocks[0][2], nn.ReLU)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("convmixer_128_4", num_classes=5, dim=32)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for a, b in zip(plain, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


def test_unknown_model_and_activation_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'convmixer_9\d*'.*convmixer_1536_20"):
        create_model("convmixer_999")
    with pytest.raises(ValueError, match=r"unknown activation 'tanh'.*gelu"):
        create_model("convmixer_128_4", act="tanh")


def test_list_models_is_the_registry() -> None:
    assert list_models() == sorted(VARIANTS)
    assert set(FULL) <= set(list_models())


SIZES_BEYOND = [
    (dict(dim=100_000, depth=1), "dim 100000 is above the largest this package builds, 16,384"),
    (dict(dim=8, depth=1_000_000), "depth 1000000 is above the largest this package builds, 1,024"),
    (dict(dim=8, depth=1, kernel_size=10_001), "kernel_size 10001 is above the largest this package builds, 255"),
    (dict(dim=8, depth=1, num_classes=10**9), "num_classes 1000000000 is above the largest this package builds"),
    (dict(dim=16_384, depth=1_000), "a ConvMixer with dim=16384, depth=1000, kernel_size=9, patch_size=7, "
                                    "in_chans=3, num_classes=1000 has 269,945,275,368 weights, above the largest"),
]


def test_sizes_beyond_the_bounds_are_refused_before_allocating() -> None:
    # dim=100000 asked for 40 GB and depth=1000000 ran 109 s and 5 GB before failing: built in a child process
    # capped at 4 GB and 60 s, so that a regression fails here instead of taking the machine.
    import json
    import subprocess
    import sys

    script = ("import json, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
              "from convmixer_pt import ConvMixer, UserError\n"
              "for sizes in json.loads(sys.argv[1]):\n"
              "    try:\n        ConvMixer(**sizes)\n    except UserError as e:\n        print(e, flush=True)")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([s for s, _ in SIZES_BEYOND])],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert len(lines) == len(SIZES_BEYOND), proc.stdout + proc.stderr[-1000:]
    for line, (_, message) in zip(lines, SIZES_BEYOND, strict=True):
        assert line.startswith(message), line


def test_the_bound_counts_what_a_model_holds() -> None:
    from convmixer_pt.variants import parameter_count

    for sizes in (dict(dim=16, depth=2, kernel_size=5, patch_size=2, in_chans=1, num_classes=7),
                  dict(dim=24, depth=3, kernel_size=9, patch_size=7, in_chans=3, num_classes=1000)):
        state = create_model("convmixer_128_4", **sizes).state_dict()
        held = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
        assert parameter_count(**sizes) == held
