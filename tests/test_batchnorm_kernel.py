"""The fused activation + training-mode BatchNorm (+ residual) kernels against nn.BatchNorm2d in float64, and
the whole residual branch x + BN(act(dwconv(x))) as one function, through their custom operators.

Without CUDA the kernels run in Triton's CPU interpreter at small shapes (tests/triton_env.py); with CUDA
the compiled kernels run at full ConvMixer shapes.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

from triton_env import DEVICE, ON_GPU, import_kernels, import_ops, interpreter_or_exact_fp32  # noqa: E402, F401

kb = import_kernels("batchnorm")
residual = import_kernels("residual")
ops = import_ops()  # the autograd-level functions, through the custom operators

SHAPES = [(64, 1536, 32, 32), (3, 100, 17, 14)] if ON_GPU else [(2, 5, 13, 13), (3, 70, 7, 12)]
MEMORY = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ACT = {"none": lambda t: t, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
       "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(value).all()
    return ((value.double() - ref).norm() / ref.norm()).item()


def make_case(shape, layout, dtype=torch.float32, seed=0, offset=0.0, with_skip=True, **bn_kwargs):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    fmt = MEMORY[layout]
    src = (torch.randn(shape, generator=gen, device=DEVICE) * 2 + offset).to(dtype).contiguous(memory_format=fmt)
    skip = torch.randn(shape, generator=gen, device=DEVICE).to(dtype).contiguous(memory_format=fmt) \
        if with_skip else None
    bn = torch.nn.BatchNorm2d(shape[1], **bn_kwargs).to(DEVICE)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(shape[1], generator=gen, device=DEVICE) + 0.5)
            bn.bias.copy_(torch.randn(shape[1], generator=gen, device=DEVICE))
    # Running statistics that are not the defaults, so the update's both terms count.
    if bn.track_running_stats:
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
        bn.num_batches_tracked.fill_(4)
    grad = torch.randn(shape, generator=gen, device=DEVICE).to(dtype).contiguous(memory_format=fmt)
    return src, skip, bn, grad


def run_both(src, skip, bn, grad, act):
    """(ours, reference): outputs, gradients and modules after one forward and backward each."""
    ref_bn = copy.deepcopy(bn).double()
    src_k = src.detach().requires_grad_()
    skip_k = skip.detach().requires_grad_() if skip is not None else None
    out = ops.act_batch_norm(src_k, bn, act, skip=skip_k)
    out.backward(grad)
    src_r = src.detach().double().requires_grad_()
    skip_r = skip.detach().double().requires_grad_() if skip is not None else None
    ref = ref_bn(ACT[act](src_r)) + (skip_r if skip is not None else 0)
    ref.backward(grad.double())
    return (out, src_k, skip_k, bn), (ref, src_r, skip_r, ref_bn)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("act", ["gelu", "relu", "none", "gelu_tanh"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_batchnorm_in_float64(shape, layout, act, momentum):
    src, skip, bn, grad = make_case(shape, layout, momentum=momentum)
    (out, src_k, skip_k, bn_k), (ref, src_r, skip_r, bn_r) = run_both(src, skip, bn, grad, act)
    assert out.is_contiguous(memory_format=MEMORY[layout]) and src_k.grad.is_contiguous(memory_format=MEMORY[layout])
    errors = {name: rel_err(a, b) for name, a, b in [
        ("out", out, ref), ("grad_src", src_k.grad, src_r.grad), ("grad_skip", skip_k.grad, skip_r.grad),
        ("grad_weight", bn_k.weight.grad, bn_r.weight.grad), ("grad_bias", bn_k.bias.grad, bn_r.bias.grad),
        ("running_mean", bn_k.running_mean, bn_r.running_mean), ("running_var", bn_k.running_var, bn_r.running_var)]}
    assert all(e < 1e-5 for e in errors.values()), errors
    assert bn_k.num_batches_tracked.item() == bn_r.num_batches_tracked.item() == 5


def test_bf16_within_bf16_rounding():
    src, skip, bn, grad = make_case(SHAPES[0], "nhwc", dtype=torch.bfloat16)
    (out, src_k, skip_k, bn_k), (ref, src_r, skip_r, bn_r) = run_both(src, skip, bn, grad, "gelu")
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2 and rel_err(src_k.grad, src_r.grad) < 1e-2
    assert rel_err(bn_k.running_var, bn_r.running_var) < 1e-5  # statistics accumulate in fp32


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_variance_stays_exact_when_the_mean_is_large(layout):
    """Mean 1000, spread 2: a sum of squares minus the squared mean in fp32 would lose the variance to
    cancellation (relative error ~1e-2); centring each tile on its own mean keeps it."""
    src, _, bn, grad = make_case(SHAPES[0], layout, offset=1000.0, with_skip=False, momentum=1.0)
    (out, *_), (ref, *_, bn_r) = run_both(src, None, bn, grad, "none")
    assert rel_err(bn.running_var, bn_r.running_var) < 1e-5
    assert rel_err(bn.running_mean, bn_r.running_mean) < 1e-6
    plain = torch.nn.BatchNorm2d(src.shape[1]).to(DEVICE)
    plain.load_state_dict(bn_r.state_dict())
    # The output cannot be more exact than fp32's rounding of a mean near 1000 (~3e-5 of the spread), PyTorch's
    # fp32 BatchNorm neither; a cancelled variance would be off by ~1e-2.
    assert rel_err(out, ref) < max(1e-4, 4 * rel_err(plain.float()(src), ref))


def test_without_affine_or_running_statistics():
    src, _, bn, grad = make_case(SHAPES[1], "nhwc", with_skip=False, affine=False, track_running_stats=False)
    (out, src_k, *_), (ref, src_r, *_) = run_both(src, None, bn, grad, "silu")
    assert rel_err(out, ref) < 1e-5 and rel_err(src_k.grad, src_r.grad) < 1e-5


def test_wider_skip_gives_the_wider_dtype_like_pytorch():
    src, skip, bn, grad = make_case(SHAPES[1], "nchw", dtype=torch.bfloat16)
    out = ops.act_batch_norm(src, bn, "gelu", skip=skip.float())
    assert out.dtype == (bn(F.gelu(src)) + skip.float()).dtype == torch.float32


def test_what_is_not_supported_is_refused():
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    bn = torch.nn.BatchNorm2d(4).to(DEVICE)
    assert kb.supports(x, bn) and kb.supports(x.contiguous(memory_format=torch.channels_last), bn)
    assert not kb.supports(x.transpose(2, 3), bn)
    assert not kb.supports(x[:1, :, :1, :1], bn)  # one value per channel: PyTorch refuses to normalise it
    assert not kb.supports(x, torch.nn.SyncBatchNorm(4))
    assert not kb.supports(x, bn.eval())
    with pytest.raises(ValueError, match=r"needs a training-mode nn.BatchNorm2d .* got \(2, 4, 3, 3\)"):
        ops.act_batch_norm(x, bn, "gelu")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ops.act_batch_norm(x, bn.train(), "tanh")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("layout", "act"), [("nchw", "gelu"), ("nhwc", "relu")])
def test_inference_form_uses_the_running_statistics(layout, act, affine):
    src, _, bn, _ = make_case(SHAPES[1], layout, with_skip=False, affine=affine)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    out = ops.eval_act_batch_norm(src, bn, act)
    ref = copy.deepcopy(bn).double()(ACT[act](src.double()))
    assert out.is_contiguous(memory_format=MEMORY[layout]) and rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="needs an eval-mode nn.BatchNorm2d"):
        ops.eval_act_batch_norm(src, bn.train(), act)


@pytest.mark.parametrize(("layout", "dtype", "act", "variant"), [
    ("nchw", torch.float32, "gelu", "direct"), ("nhwc", torch.float32, "relu", "direct"),
    ("nhwc", torch.bfloat16, "gelu", "direct"), ("nchw", torch.bfloat16, "gelu", "mma"),
    ("nchw", torch.float32, "gelu_tanh", "direct")])
def test_residual_branch_matches_float64(layout, dtype, act, variant):
    """x + BN(act(dwconv(x) + b)): output, all five gradients (the input's includes the skip's, added by the
    input-gradient kernel) and the running statistics."""
    shape = SHAPES[0]
    src, _, bn, grad = make_case(shape, layout, dtype=dtype, seed=3)
    conv = torch.nn.Conv2d(shape[1], shape[1], 5, padding=2, groups=shape[1]).to(DEVICE)
    with torch.no_grad():
        gen = torch.Generator(device=DEVICE).manual_seed(4)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, device=DEVICE) / 5)
        conv.bias.copy_(torch.randn(shape[1], generator=gen, device=DEVICE))
    ref_conv, ref_bn = copy.deepcopy(conv).double(), copy.deepcopy(bn).double()
    x = src.detach().requires_grad_()
    assert residual.supports(x, conv, bn)
    out = ops.residual_depthwise_batch_norm(x, conv, bn, act, variant)
    out.backward(grad)
    rx = src.detach().double().requires_grad_()
    ref_pre = ref_conv(rx)
    ref_pre.retain_grad()
    ref = rx + ref_bn(ACT[act](ref_pre))
    ref.backward(grad.double())
    tol = TOLERANCE[dtype]
    errors = {name: rel_err(a, b) for name, a, b in [
        ("out", out, ref), ("grad_x", x.grad, rx.grad), ("grad_w", conv.weight.grad, ref_conv.weight.grad),
        ("grad_gamma", bn.weight.grad, ref_bn.weight.grad), ("grad_beta", bn.bias.grad, ref_bn.bias.grad),
        ("running_var", bn.running_var, ref_bn.running_var)]}
    # The conv bias gradient is the sum of the pre-activation gradient, which BatchNorm's backward makes
    # cancel almost exactly (a shift of BN's input changes nothing): measure its error against the sum of
    # the terms' magnitudes, not against the near-zero result.
    magnitude = ref_pre.grad.abs().sum((0, 2, 3))
    errors["grad_b"] = ((conv.bias.grad.double() - ref_conv.bias.grad).abs() / magnitude).max().item()
    assert all(e < tol for e in errors.values()), errors
    assert out.dtype == dtype and x.grad.is_contiguous(memory_format=MEMORY[layout])


def test_residual_branch_is_refused_where_autocast_would_cast_the_input():
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4).to(DEVICE)
    bn = torch.nn.BatchNorm2d(4).to(DEVICE)
    assert residual.supports(x, conv, bn)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert not residual.supports(x, conv, bn)  # fp32 input, bf16 convolution: the skip would differ
        with pytest.raises(ValueError, match=r"cannot take input \(2, 4, 5, 5\) torch.float32"):
            ops.residual_depthwise_batch_norm(x, conv, bn, "gelu")
