"""timm's model protocol on every registered variant, as timm's own tests check it.

Each test re-expresses one test of timm's tests/test_models.py (timm 1.0.31; named in its docstring) on our
names in timm's registry, at small inputs; tests/test_timm_suite.py runs timm's own test functions where a
copy of that file is given. References are independent of this package: timm's own ConvMixer (data config,
pretrained loading, feature maps), eager PyTorch (traced and scripted models), timm's and torchvision's
tracers and FeatureGetterNet.
"""

from __future__ import annotations

import copy
import inspect
import math
import subprocess
import sys

import pytest
import timm
import torch
from timm.layers import set_scriptable
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import group_parameters
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

import convmixer_pt
from convmixer_pt.model import ConvMixer
from convmixer_pt.timm_models import TIMM_NAMES
from convmixer_pt.variants import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, VARIANTS

NAMES = timm.list_models("convmixer_pt_*")
TAGGED = timm.list_models("convmixer_pt_*", include_tags=True)
FULL = ["convmixer_pt_768_32", "convmixer_pt_1024_20_ks9_p14", "convmixer_pt_1536_20"]
SMALL = ["convmixer_pt_128_4", "convmixer_pt_256_8"]
# The full-size variants build 21-52M parameters: more than a few seconds per test on two cores.
EVERY = SMALL + [pytest.param(n, marks=pytest.mark.slow) for n in FULL]
PAIRS = [(TIMM_NAMES[n], spec["timm_name"]) for n, spec in VARIANTS.items() if spec["timm_name"]]


def input_size(model: torch.nn.Module | None = None, name: str = "", target: int = 64) -> tuple[int, ...]:
    """timm's `_get_input_size`: the cfg's input size (of the model, else of the registry's name), each side
    clamped to `target`."""
    size = model.default_cfg["input_size"] if model is not None else timm.get_pretrained_cfg_value(name, "input_size")
    return tuple(min(s, target) for s in size)


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's `_create_fx_model`: torchvision's feature extractor with timm's leaf modules and functions,
    returning the last node (in training, the nodes that feed the output)."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n.name)] for n in nodes[0]._input_nodes]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def params_all_have_gradients(model: torch.nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", EVERY)
def test_forward(name):
    """test_model_forward: one image, no NaN; grad checkpointing leaves the output as it was."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(model, target=96))
    out = model(x)
    assert out.shape == (1, 1000) and not out.isnan().any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", EVERY)
def test_backward(name):
    """test_model_backward: num_classes=42 in training; every parameter gets a gradient."""
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *input_size(name=name)))
    out.mean().backward()
    params_all_have_gradients(model)
    assert out.shape == (2, 42) and not out.isnan().any()


def _api_contract(model: ConvMixer, name: str) -> None:
    """_assert_model_api_contract: unknown arguments raise, reset_classifier keeps the pooling by default,
    group_matcher makes more than one group."""
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    assert len(set(group_parameters(model, model.group_matcher(coarse=False), reverse=True).values())) > 1


def _device_dtype_and_frozen(model: ConvMixer, name: str, reset_pool: bool) -> None:
    """_assert_reset_classifier_preserves_parent_device_dtype, _assert_factory_device and
    _assert_frozen_survives_reset_and_resize."""
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.get_classifier().parameters())
    assert all(m.training == model.training for m in model.modules())
    built = timm.create_model(name, device="meta", dtype=torch.float32)
    assert all(t.device.type == "meta" for t in [*built.parameters(), *built.buffers()])
    built.requires_grad_(False)
    built.reset_classifier(0)
    if reset_pool:
        built.reset_classifier(0, "")
    assert not [n for n, p in built.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("name", TAGGED)
def test_default_cfgs(name):
    """test_model_default_cfgs (timm's standard models' test; timm's own ConvMixer fails it for want of a
    pool_size): on the meta device, feature and head shapes, pooled and unpooled, bf16, names in the cfg."""
    with torch.device("meta"):
        model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    _api_contract(model, name)
    cfg = model.default_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert model.in_chans == cfg["input_size"][0]
    x = torch.randn(1, *cfg["input_size"], device="meta")
    features = model.forward_features(x)
    assert tuple(features.shape[-2:]) == cfg["pool_size"] and features.shape[1] == model.num_features
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape[1] == model.head_hidden_size
    assert model.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre_logits.shape
    model.reset_classifier(0, "")
    assert model(x).ndim == 4 and tuple(model(x).shape[-2:]) == cfg["pool_size"]
    headless = timm.create_model(name, num_classes=0, device="meta", dtype=torch.float32)
    assert headless(x).shape == pre_logits.shape and headless(x).shape[1] == headless.head_hidden_size
    unpooled = timm.create_model(name, num_classes=0, global_pool="", device="meta", dtype=torch.float32)
    assert tuple(unpooled(x).shape[-2:]) == cfg["pool_size"]
    state = model.state_dict()
    assert f"{cfg['classifier']}.weight" in timm.create_model(name, device="meta").state_dict()
    assert f"{cfg['first_conv']}.weight" in state
    _device_dtype_and_frozen(model, name, reset_pool=True)


@pytest.mark.parametrize("name", TAGGED)
def test_default_cfgs_non_std(name):
    """test_model_default_cfgs_non_std (where timm runs `*mixer_*` models): features on the channel axis,
    a headless model's output as wide as both num_features and head_hidden_size."""
    with torch.device("meta"):
        model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    _api_contract(model, name)
    cfg = model.default_cfg
    x = torch.randn(1, *cfg["input_size"], device="meta")
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[1] == model.num_features and pre_logits.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape[1] == model.head_hidden_size
    headless = timm.create_model(name, num_classes=0, device="meta", dtype=torch.float32).eval()
    assert headless(x).shape[1] == headless.num_features == headless.head_hidden_size
    state = timm.create_model(name, device="meta").state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    _device_dtype_and_frozen(model, name, reset_pool=False)


@pytest.mark.parametrize("name", EVERY)
def test_forward_torchscript(name):
    """test_model_forward_torchscript, built under set_scriptable(True); and the scripted logits are the
    eager model's."""
    with set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(1, *input_size(name=name))
    with torch.no_grad():
        out = scripted(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    assert out.shape[0] == 1 and not out.isnan().any()


@pytest.mark.parametrize("name", EVERY)
def test_forward_fx(name):
    """test_model_forward_fx: torchvision's tracer with timm's leaf lists, under inference_mode."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *input_size(model))
    with torch.inference_mode():
        out = model(x)
        traced = torch.cat(tuple(fx_model(model)(x).values()))
    torch.testing.assert_close(traced, out, rtol=1e-4, atol=1e-5)
    assert not out.isnan().any()


@pytest.mark.parametrize("name", EVERY)
def test_backward_fx(name):
    """test_model_backward_fx: the traced training model's parameters all get gradients."""
    model = fx_model(timm.create_model(name, num_classes=42).train(), train=True)
    out = torch.cat(tuple(model(torch.randn(2, *input_size(name=name))).values()))
    out.mean().backward()
    params_all_have_gradients(model)
    assert out.shape[-1] == 42 and not out.isnan().any()


@pytest.mark.parametrize("name", EVERY)
def test_forward_fx_torchscript(name):
    """test_model_forward_fx_torchscript: traced, then scripted (built under set_scriptable(True)); and the
    logits are the eager model's."""
    with set_scriptable(True):
        model = timm.create_model(name).eval()
    scripted = torch.jit.script(fx_model(model))
    x = torch.randn(1, *input_size(name=name))
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(x).values()))
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def _check_feature_maps(outputs: list[torch.Tensor], info: FeatureInfo, size: tuple[int, ...]) -> None:
    assert len(outputs) == len(info.channels())
    for channels, reduction, o in zip(info.channels(), info.reduction(), outputs, strict=True):
        assert o.shape[1] == channels and o.shape[0] == 1 and not o.isnan().any()
        assert all(o.shape[2 + i] <= math.ceil(size[-2 + i] / reduction) + 1 for i in range(2))


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates_and_features(name):
    """test_model_forward_intermediates (one map per feature_info entry, the final features those of
    forward_features, also with checkpointing), test_model_forward_intermediates_features and
    test_model_forward_features (features_only=True: timm's FeatureGetterNet, at least three maps)."""
    model = timm.create_model(name).eval()
    size = input_size(model)
    x = torch.randn(1, *size)
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    _check_feature_maps(intermediates, info, size)
    torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)
    for kwargs in (dict(), dict(feature_cls="getter")):
        features = timm.create_model(name, features_only=True, **kwargs).eval()
        assert isinstance(features, FeatureGetterNet) and len(features.feature_info.channels()) >= 3
        _check_feature_maps(features(x), features.feature_info, size)


def test_forward_intermediates_indices_and_stop_early():
    """Indices as timm's feature_take_indices reads them (None: all, n: the last n, a list: those, negative
    from the end), and stop_early ends at the last block asked for; the blocks run one by one are the
    reference."""
    model = timm.create_model("convmixer_pt_256_8", depth=6).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        reference, h = [], model.stem(x)
        for block in model.blocks:
            h = block(h)
            reference.append(h)
        for indices, expected in [(None, range(6)), (2, [4, 5]), ([0, -1], [0, 5]), ((1, 3), [1, 3])]:
            got = model.forward_intermediates(x, indices, intermediates_only=True)
            assert len(got) == len(expected)
            assert all(torch.equal(g, reference[i]) for g, i in zip(got, expected, strict=True))
        final, taps = model.forward_intermediates(x, [1], stop_early=True)
        assert torch.equal(final, reference[1]) and torch.equal(taps[0], reference[1])
        assert torch.equal(model.forward_intermediates(x, [1])[0], reference[-1])
        for bad in (7, [6], [-7]):
            with pytest.raises(ValueError, match="out of range"):
                model.forward_intermediates(x, bad)
        with pytest.raises(ValueError, match="NCHW only"):
            model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", SMALL)
def test_feature_getter_stage_ends_torchscript(name):
    """test_feature_getter_stage_ends_torchscript: FeatureGetterNet over forward_intermediates, eager and
    scripted, gives forward_intermediates' maps."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(0, 1, 2), intermediates_only=True)
        getter = FeatureGetterNet(model, out_indices=(0, 1, 2)).eval()
        torch.testing.assert_close(getter(x), expected)
        torch.testing.assert_close(torch.jit.script(getter)(x), expected)


@pytest.mark.parametrize("name", SMALL)
def test_prune_intermediate_layers_params_used(name):
    """test_prune_intermediate_layers_params_used: pruned as FeatureGetterNet prunes, no parameter is left
    without a gradient (DDP would fail) and an eval model stays deterministic."""
    model = timm.create_model(name, drop_rate=0.5)
    x = torch.randn(2, *input_size(model))
    count = len(model.feature_info)
    for indices, prune_norm in (([0], False), ([count - 1], False), (list(range(count)), True)):
        pruned = copy.deepcopy(model).train()
        take = pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        assert len(pruned.blocks) == max(take) + 1 and pruned.arch["depth"] == max(take) + 1
        sum(f.sum() for f in pruned.forward_intermediates(x, indices=take, intermediates_only=True)).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None]
        pruned = copy.deepcopy(model).eval()
        pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        with torch.no_grad():
            assert torch.equal(pruned(x), pruned(x))


@pytest.mark.parametrize("name", SMALL)
def test_head_hidden_size(name):
    """test_head_hidden_size: the pre-logits width without a classifier, with concatenated pooling (twice as
    wide) and after pruning."""
    model = timm.create_model(name, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)

    def check(num_classes: int) -> None:
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape[1] == model.head_hidden_size
        assert model(x).shape[1] == (num_classes or model.head_hidden_size)

    with torch.no_grad():
        check(0)
        for pool in ("avg", "catavgmax"):
            model.reset_classifier(7, pool)
            check(7)
        assert model.head_hidden_size == 2 * model.num_features
        index = len(model.feature_info) - 2
        model.prune_intermediate_layers([index], prune_norm=True)
        model.reset_classifier(7, "avg")
        check(7)
        assert model.head_hidden_size == model.feature_info[index]["num_chs"]


@pytest.mark.parametrize("name", SMALL)
def test_reset_classifier_keeps_pool(name):
    """test_reset_classifier_keeps_pool: global_pool='max' survives reset_classifier(5), 'avg' replaces it."""
    model = timm.create_model(name, global_pool="max").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(5)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), expected)
        assert model(x).shape == (2, 5)
        model.reset_classifier(5, "avg")
        assert not torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), expected)


@pytest.mark.parametrize("pool", ["", "avg", "max", "avgmax", "catavgmax"])
def test_pooling_is_timms(pool):
    """Every pool type reduces as timm's SelectAdaptivePool2d does, bit for bit (timm's ConvMixer as the
    reference, with the same weights)."""
    ours = timm.create_model("convmixer_pt_128_4", global_pool=pool, num_classes=0).eval()
    from timm.models.convmixer import ConvMixer as TimmConvMixer

    theirs = TimmConvMixer(128, 4, 5, 2, global_pool=pool, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ours.head_hidden_size == theirs.head_hidden_size
    with pytest.raises(convmixer_pt.UserError, match="^global_pool 'mean' is not one of"):
        timm.create_model("convmixer_pt_128_4", global_pool="mean")


# ---- what a user gets from timm's API ------------------------------------------------------------------------

@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_data_config_is_timms_convmixer(ours, theirs):
    """resolve_model_data_config gives the published weights' eval preprocessing (crop 0.96, bicubic), as
    for timm's own ConvMixer, whichever way the model was built; the cfg names the same hub weights."""
    reference = timm.create_model(theirs, device="meta")
    expected = timm.data.resolve_model_data_config(reference)
    assert expected["crop_pct"] == EVAL_CROP_PCT and expected["interpolation"] == "bicubic"
    package_name = next(n for n, t in TIMM_NAMES.items() if t == ours)
    for model in (timm.create_model(ours, device="meta"), convmixer_pt.create_model(package_name, device="meta")):
        assert timm.data.resolve_model_data_config(model) == expected
        assert model.pretrained_cfg["hf_hub_id"] == reference.pretrained_cfg["hf_hub_id"] == f"timm/{theirs}.in1k"
        assert model.default_cfg is model.pretrained_cfg
    assert timm.is_model_pretrained(ours)


def test_direct_construction_gets_the_eval_preprocessing():
    model = ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=7, device="meta")
    config = timm.data.resolve_model_data_config(model)
    assert config == dict(input_size=(3, 224, 224), interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          crop_pct=0.96, crop_mode="center")


def test_registry_names_do_not_touch_timms():
    """Our names, one per variant, beside timm's ConvMixer, which stays timm's."""
    assert sorted(NAMES) == sorted(TIMM_NAMES.values()) and len(NAMES) == len(VARIANTS)
    assert sorted(timm.list_pretrained("convmixer_pt_*")) == sorted(f"{ours}.in1k" for ours, _ in PAIRS)
    assert sorted(timm.list_models("convmixer_*", exclude_filters=["convmixer_pt_*"])) == \
        sorted(theirs for _, theirs in PAIRS)
    assert type(timm.create_model("convmixer_768_32", device="meta")).__module__ == "timm.models.convmixer"


@pytest.mark.slow
def test_importing_the_package_leaves_timm_models_alone_and_registration_warns_nothing():
    code = ("import sys, warnings; import convmixer_pt; "
            "assert 'timm.models' not in sys.modules, 'import convmixer_pt imported timm.models'; "
            "warnings.simplefilter('always'); "
            "import convmixer_pt.timm_models, timm; print(len(timm.list_models('convmixer_pt_*')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(len(VARIANTS)) and "Overwriting" not in proc.stderr  # timm's collision warning


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """timm's ConvMixer-1024/20 (3 blocks) with random weights and BN statistics, saved as timm's hub file
    would hold it, and in locuslab's official layout."""
    from timm.models.convmixer import ConvMixer as TimmConvMixer

    torch.manual_seed(0)
    reference = TimmConvMixer(1024, 3, kernel_size=9, patch_size=14).eval()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    from convmixer_pt.weights import keymap

    folder = tmp_path_factory.mktemp("weights")
    torch.save(reference.state_dict(), folder / "timm.pth")
    torch.save(keymap.convert_state(reference.state_dict(), "official"), folder / "official.pth.tar")
    return reference, folder


@pytest.mark.parametrize("layout", ["timm", "official"])
def test_pretrained_loads_through_timms_loader(layout, timm_weights):
    """pretrained=True through timm's load_pretrained (a local file instead of the hub), strict; official
    files through checkpoint_filter_fn. The outputs, a new head, a one-channel stem and features_only follow
    timm's ConvMixer with the same weights."""
    reference, folder = timm_weights
    path = folder / ("timm.pth" if layout == "timm" else "official.pth.tar")
    load = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), depth=3)
    model = timm.create_model("convmixer_pt_1024_20_ks9_p14", **load).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        fresh = timm.create_model("convmixer_pt_1024_20_ks9_p14", features_only=True, **load).eval()
        for got, expected in zip(fresh(x), FeatureGetterNet(copy.deepcopy(reference), out_indices=3).eval()(x),
                                 strict=True):
            assert torch.equal(got, expected)
    adapted = timm.create_model("convmixer_pt_1024_20_ks9_p14", in_chans=1, num_classes=5, **load)
    assert adapted.stem[0].in_channels == 1 and adapted.head.out_features == 5
