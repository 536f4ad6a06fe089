"""The model's fast path (`convmixer_pt.fast`): the same function, gradients and training as the plain
modules, every switch chosen once at construction, and the fused kernels taken only where asked for.

Without CUDA the kernels run in Triton's CPU interpreter at small shapes (tests/triton_env.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

from triton_env import DEVICE, ON_GPU, import_kernels, import_ops, interpreter_or_exact_fp32  # noqa: E402, F401

from convmixer_pt import create_model  # noqa: E402
from convmixer_pt.fast import FastOptions, SettingError  # noqa: E402

ops = import_ops()  # every kernel module, defined for this machine, and the operators over them
MEMORY = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(value).all()
    return ((value.double() - ref).norm() / ref.norm()).item()


# A small model for the whole-model checks; on the GPU a full-width one.
MODEL_KW = dict(dim=1536, depth=2, kernel_size=9, patch_size=7) if ON_GPU else dict(dim=4, depth=2, kernel_size=5)
IMG = (4, 3, 224, 224) if ON_GPU else (2, 3, 12, 12)


def model_pair(act: str, seed: int = 0, **options):
    """A model on the fast path (`options` of FastOptions) and a plain one with the same weights."""
    torch.manual_seed(seed)
    fast = create_model("convmixer_128_4", num_classes=7, act=act, fast=FastOptions(enabled=True, **options),
                        **MODEL_KW).to(DEVICE)
    plain = create_model("convmixer_128_4", num_classes=7, act=act, fast=False, **MODEL_KW).to(DEVICE)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


@pytest.mark.parametrize("fused_bn", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_tanh"])
def test_fast_model_matches_plain_model_in_training_and_inference(act, layout, fused_bn):
    fast, plain = model_pair(act, channels_last=True, fused_batchnorm=fused_bn)
    fast, plain = fast.to(memory_format=MEMORY[layout]), plain.to(memory_format=MEMORY[layout])
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(IMG, device=DEVICE).contiguous(memory_format=MEMORY[layout])
    out_fast, out_plain = fast(x), plain(x)
    assert rel_err(out_fast, out_plain.double()) < 1e-5
    grad = torch.randn_like(out_plain)
    out_fast.backward(grad)
    out_plain.backward(grad)
    # How far rounding alone moves these gradients: the plain model with its depthwise convolutions computed
    # in float64 (a more exact evaluation of the same function). With GELU that is ~1e-6. With ReLU,
    # pre-activations within rounding of 0 flip sides and move every gradient by ~3e-4 at full width, so the
    # bound follows what was measured rather than a fixed number.
    rounded = create_model("convmixer_128_4", num_classes=7, act=act, fast=False, **MODEL_KW).to(DEVICE)
    rounded.load_state_dict(plain.state_dict())
    for block in rounded.blocks:
        conv = block.dw
        conv.forward = lambda t, conv=conv: F.conv2d(t.double(), conv.weight.double(), conv.bias.double(),
                                                     padding=conv.padding, groups=conv.groups).to(t.dtype)
    rounded(x).backward(grad)
    floor = max(rel_err(q.grad, r.grad.double())
                for q, r in zip(plain.parameters(), rounded.parameters(), strict=True))
    bound = max(1e-4, 10 * floor)
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert rel_err(p.grad, q.grad.double()) < bound, (name, bound)
    for (name, b), c in zip(fast.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    fast.eval()
    plain.eval()
    with torch.no_grad():
        assert rel_err(fast(x), plain(x).double()) < 1e-5


def test_switches_are_resolved_once_at_construction(monkeypatch):
    fast, plain = model_pair("gelu")
    x = torch.randn(IMG, device=DEVICE)
    assert not torch.equal(fast(x), plain(x))  # the kernels ran: not the same rounding as PyTorch's
    monkeypatch.setenv("CONVMIXER_FAST", "off")
    assert not torch.equal(fast(x), plain(x))  # the environment is read when a model is built, not in forward
    off = create_model("convmixer_128_4", num_classes=7, act="gelu", **MODEL_KW).to(DEVICE)
    off.load_state_dict(plain.state_dict())
    assert off.fast == FastOptions(enabled=False) and torch.equal(off(x), plain(x))
    monkeypatch.delenv("CONVMIXER_FAST")
    default = create_model("convmixer_128_4", num_classes=7, act="gelu", **MODEL_KW).to(DEVICE)
    default.load_state_dict(plain.state_dict())
    assert default.fast.enabled is None
    assert torch.equal(default(x), plain(x)) == (not ON_GPU)  # default: the kernels for CUDA inputs only
    assert create_model("convmixer_128_4", fast=False).fast.enabled is False


@pytest.mark.parametrize(("variable", "value"), [
    ("CONVMIXER_FAST", "maybe"), ("CONVMIXER_FAST_CHANNELS_LAST", "sometimes"),
    ("CONVMIXER_FAST_BATCHNORM", "perhaps"), ("CONVMIXER_DW_KERNEL", "fastest")])
def test_a_bad_switch_is_refused_when_the_model_is_built(variable, value, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingError, match=f"^{variable}='{value}' is not one of"):
        create_model("convmixer_128_4")
    with pytest.raises(SettingError, match=f"^{variable}='{value}' is not one of"):
        create_model("convmixer_128_4", fast=False)  # a typo shows on every device, kernels or not
    create_model("convmixer_128_4", fast=FastOptions())  # an explicit options object reads no environment


def test_bad_options_are_refused_when_the_model_is_built():
    with pytest.raises(SettingError, match="^kernel_set 'fastest' is not one of 'direct', 'mma'$"):
        create_model("convmixer_128_4", fast=FastOptions(kernel_set="fastest"))
    with pytest.raises(SettingError, match="^fast must be True, False, None or a FastOptions, got 'yes'$"):
        create_model("convmixer_128_4", fast="yes")
    with pytest.raises(SettingError, match="^enabled 'yes' is not one of None, True, False$"):
        FastOptions(enabled="yes")
    with pytest.raises(SettingError, match="^channels_last 1 is not one of True, False$"):
        FastOptions(channels_last=1)
    with pytest.raises(SettingError, match="^fused_batchnorm 'no' is not one of True, False$"):
        FastOptions(fused_batchnorm="no")


def test_environment_gives_the_defaults():
    environ = {"CONVMIXER_FAST": "1", "CONVMIXER_FAST_CHANNELS_LAST": "on", "CONVMIXER_FAST_BATCHNORM": "yes",
               "CONVMIXER_DW_KERNEL": "MMA"}
    assert FastOptions.from_environment(environ) == FastOptions(None, True, True, "mma")
    assert FastOptions.from_environment({"CONVMIXER_FAST": "off"}) == FastOptions(enabled=False)
    assert FastOptions.from_environment({}) == FastOptions()


def test_fused_batchnorm_runs_only_when_switched_on(monkeypatch):
    calls = []
    for name in ("act_batch_norm", "eval_act_batch_norm", "residual_depthwise_batch_norm"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, name=name, original=original, **k:
                            calls.append(name) or original(*a, **k))
    x = torch.randn(IMG, device=DEVICE)
    fast, plain = model_pair("gelu")
    fast(x)
    assert calls == []
    fast, plain = model_pair("gelu", fused_batchnorm=True)
    out = fast(x)
    assert calls == ["residual_depthwise_batch_norm", "act_batch_norm"] * MODEL_KW["depth"]  # both BNs per block
    assert rel_err(out, plain(x).double()) < 1e-5
    calls.clear()
    fast.eval()
    plain.load_state_dict(fast.state_dict())  # the running statistics both updated
    with torch.no_grad():
        out = fast(x)  # the first BN folds into the depthwise kernel, the second runs with its activation
        assert calls == ["eval_act_batch_norm"] * MODEL_KW["depth"]
        assert rel_err(out, plain.eval()(x).double()) < 1e-5
    calls.clear()
    monkeypatch.setenv("CONVMIXER_FAST_BATCHNORM", "1")  # the environment's default, for fast=True as well
    fast = create_model("convmixer_128_4", num_classes=7, act="gelu", fast=True, **MODEL_KW).to(DEVICE)
    fast(x)
    assert calls == ["residual_depthwise_batch_norm", "act_batch_norm"] * MODEL_KW["depth"]


def test_channels_last_takes_the_kernels_only_when_switched_on():
    x = torch.randn(IMG, device=DEVICE).contiguous(memory_format=torch.channels_last)
    for switched_on in (False, True):
        fast, plain = model_pair("gelu", channels_last=switched_on)
        fast, plain = fast.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
        out = fast(x)
        if switched_on:
            assert not torch.equal(out, plain(x)) and rel_err(out, plain(x).double()) < 1e-5
        else:
            assert torch.equal(out, plain(x))  # channels_last runs the plain modules


@pytest.mark.parametrize("kernel_set", ["direct", "mma"])
def test_kernel_set_reaches_the_kernels(kernel_set, monkeypatch):
    depthwise = import_kernels("depthwise")
    seen = []
    original = depthwise.conv
    monkeypatch.setattr(depthwise, "conv", lambda *a, **k: seen.append(k.get("kernel_set")) or original(*a, **k))
    fast, plain = model_pair("gelu", kernel_set=kernel_set)
    x = torch.randn(IMG, device=DEVICE).bfloat16()
    fast.bfloat16()(x).float().sum().backward()
    assert seen and set(seen) == {kernel_set}


@pytest.mark.parametrize("fused_bn", [False, True])
def test_fast_training_follows_plain_training(fused_bn):
    """A few AdamW steps from the same initialisation give the same losses (fp32: to rounding)."""
    fast, plain = model_pair("gelu", seed=3, fused_batchnorm=fused_bn)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(IMG, generator=gen).to(DEVICE), torch.randint(0, 7, (IMG[0],), generator=gen).to(DEVICE))
            for _ in range(2)]
    losses = []
    for model in (fast, plain):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curve = []
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses.append(curve)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)




def test_fast_model_under_bf16_autocast_stays_within_bf16_noise():
    """Under autocast the kernels compute in bf16 like nn.Conv2d would: the fast model is no farther from
    the fp32 result than the plain model under the same autocast (twice its distance, for slack)."""
    fast, plain = model_pair("gelu", seed=5)
    x = torch.randn(IMG, device=DEVICE)
    reference = plain(x).double()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out_fast, out_plain = fast(x), plain(x)
    assert out_fast.dtype == out_plain.dtype
    assert rel_err(out_fast, reference) <= 2 * rel_err(out_plain, reference) + 1e-3




@pytest.mark.gpu
def test_default_model_runs_the_kernels_for_cuda_inputs():
    fast, plain = model_pair("gelu")
    default = create_model("convmixer_128_4", num_classes=7, act="gelu", **MODEL_KW).to("cuda")
    default.load_state_dict(plain.state_dict())
    x = torch.randn(IMG, device="cuda")
    assert torch.equal(default(x), fast(x)) and not torch.equal(default(x), plain(x))
