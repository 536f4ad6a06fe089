"""The fast path's custom operators (`convmixer_pt.fast.ops`): `torch.library.opcheck` on every one of them
(schema, autograd registration, fake tensors against the real outputs' shapes and strides, and AOT dispatch
with dynamic shapes, which compares outputs and gradients with eager), and what torch.compile and the FX
tracers make of them. Their numerics against float64 PyTorch are the kernel tests' (test_depthwise_kernel.py,
test_batchnorm_kernel.py), which run through these operators.

Without CUDA the kernels run in Triton's CPU interpreter at small shapes (tests/triton_env.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

from triton_env import DEVICE, import_ops, interpreter_or_exact_fp32  # noqa: E402, F401

from convmixer_pt import create_model  # noqa: E402
from convmixer_pt.fast import FastOptions  # noqa: E402

ops = import_ops()
OPS = torch.ops.convmixer_pt
ALL_CHECKS = {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
MEMORY = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
SHAPE = (2, 4, 5, 6)
CHECKED: set[str] = set()


def opcheck(name: str, args: tuple) -> None:
    result = torch.library.opcheck(getattr(OPS, name).default, args)
    assert set(result) == ALL_CHECKS and set(result.values()) == {"SUCCESS"}, result
    CHECKED.add(name)


def tensors(layout: str = "nchw", grad: bool = True, dtype: torch.dtype = torch.float32, kernel: int = 3,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    c = SHAPE[1]
    x = torch.randn(SHAPE, generator=gen).to(DEVICE, dtype).contiguous(memory_format=MEMORY[layout])
    weight = (torch.randn(c, 1, kernel, kernel, generator=gen) / kernel).to(DEVICE)
    bias = torch.randn(c, generator=gen).to(DEVICE)
    return tuple(t.requires_grad_(grad) for t in (x, weight, bias))


def batch_norm(affine: bool = True, track: bool = True, momentum: float | None = 0.1) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(SHAPE[1], affine=affine, track_running_stats=track, momentum=momentum).to(DEVICE)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    if track:
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
        bn.num_batches_tracked.fill_(3)
    return bn


def bn_args(bn: torch.nn.BatchNorm2d) -> tuple:
    """The BatchNorm arguments the training operators take (the statistics None where not tracked)."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, bn.eps)


def detached(t: torch.Tensor | None) -> torch.Tensor | None:
    """What autograd hands a backward (or an inference-only) operator: tensors that need no gradient."""
    return None if t is None else t.detach()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["none", "gelu", "relu", "silu"])
def test_opcheck_dw_conv_act(act, layout):
    x, weight, bias = tensors(layout)
    opcheck("dw_conv_act", (x, weight, bias, act, act in ops.SMOOTH, "direct"))


def test_opcheck_dw_conv_act_without_bias_or_gradients_and_tensor_cores():
    x, weight, _ = tensors(grad=False)
    opcheck("dw_conv_act", (x, weight, None, "silu", False, "direct"))
    x, weight, bias = tensors(dtype=torch.bfloat16)
    opcheck("dw_conv_act", (x, weight, bias, "gelu", True, "mma"))


@pytest.mark.parametrize(("act", "need_x", "need_w", "layout"), [
    ("gelu", True, True, "nchw"), ("relu", True, False, "nhwc"), ("none", False, True, "nchw"),
    ("silu", True, True, "nhwc")])
def test_opcheck_dw_conv_act_backward(act, need_x, need_w, layout):
    # A backward operator is checked with inputs that need no gradient: it has no autograd of its own.
    x, weight, bias = tensors(layout, grad=False)
    out, pre = OPS.dw_conv_act(x, weight, bias, act, act in ops.SMOOTH, "direct")
    saved = out if act == "relu" else pre if act in ops.SMOOTH else None
    grad = torch.randn_like(out).contiguous()  # NCHW even for a channels_last x: the operator converts it
    opcheck("dw_conv_act_backward", (grad, x, weight, saved, act, need_x, need_w, "direct"))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck_dw_conv_affine_residual(layout):
    x, weight, bias = tensors(layout, grad=False)
    scale, shift = torch.rand(SHAPE[1], device=DEVICE) + 0.5, torch.randn(SHAPE[1], device=DEVICE)
    opcheck("dw_conv_affine_residual", (x, weight, bias, scale, shift, "gelu", "direct"))


@pytest.mark.parametrize(("layout", "skip", "affine", "track", "momentum", "act"), [
    ("nchw", True, True, True, 0.1, "gelu"), ("nhwc", True, True, True, None, "relu"),
    ("nchw", False, False, True, 0.1, "silu"), ("nhwc", False, True, False, 0.1, "none")])
def test_opcheck_act_batch_norm(layout, skip, affine, track, momentum, act):
    src, skip_t = tensors(layout)[0], tensors(layout, seed=1)[0]
    bn = batch_norm(affine, track, momentum)
    opcheck("act_batch_norm", (src, skip_t if skip else None, *bn_args(bn), act))


@pytest.mark.parametrize(("layout", "affine"), [("nchw", True), ("nhwc", False)])
def test_opcheck_act_batch_norm_backward(layout, affine):
    src, _, _ = tensors(layout, grad=False)
    bn = batch_norm(affine)
    _, mean, rstd, _, _ = OPS.act_batch_norm(src, None, *bn_args(bn), "gelu")
    opcheck("act_batch_norm_backward", (torch.randn(SHAPE, device=DEVICE), src, detached(bn.weight), mean, rstd,
                                        "gelu"))


@pytest.mark.parametrize(("layout", "affine"), [("nchw", True), ("nhwc", False)])
def test_opcheck_eval_act_batch_norm(layout, affine):
    src, _, _ = tensors(layout, grad=False)
    bn = batch_norm(affine).eval()
    opcheck("eval_act_batch_norm", (src, bn.running_mean, bn.running_var, detached(bn.weight), detached(bn.bias),
                                    bn.eps, "relu"))


@pytest.mark.parametrize(("layout", "affine", "momentum", "act"), [
    ("nchw", True, 0.1, "gelu"), ("nhwc", False, None, "relu")])
def test_opcheck_residual_dw_batch_norm(layout, affine, momentum, act):
    x, weight, bias = tensors(layout)
    bn = batch_norm(affine, momentum=momentum)
    opcheck("residual_dw_batch_norm", (x, weight, bias, *bn_args(bn), act, "direct"))


@pytest.mark.parametrize(("layout", "need_x", "need_w"), [("nchw", True, True), ("nhwc", True, False)])
def test_opcheck_residual_dw_batch_norm_backward(layout, need_x, need_w):
    x, weight, bias = tensors(layout, grad=False)
    bn = batch_norm()
    _, pre, mean, rstd, _, _ = OPS.residual_dw_batch_norm(x, weight, bias, *bn_args(bn), "gelu", "direct")
    opcheck("residual_dw_batch_norm_backward", (torch.randn(SHAPE, device=DEVICE), x, weight, pre, detached(bn.weight),
                                                mean, rstd, "gelu", need_x, need_w, "direct"))


def test_every_operator_is_opchecked():
    """Runs after the opcheck tests above (file order): an operator added without a check fails here."""
    registered = {name for name in ops.OP_NAMES if hasattr(OPS, name)}
    assert registered == set(ops.OP_NAMES)
    assert CHECKED == set(ops.OP_NAMES)


def test_training_operators_update_running_statistics_as_batchnorm_does():
    """The operators are functional; the functions over them copy the new statistics into the buffers and
    count the batch, as nn.BatchNorm2d does (momentum and cumulative average)."""
    for momentum in (0.1, None):
        src, _, _ = tensors(grad=False)
        bn, reference = batch_norm(momentum=momentum), batch_norm(momentum=momentum)
        ops.act_batch_norm(src, bn, "gelu")
        reference(F.gelu(src))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(bn, name), getattr(reference, name), rtol=1e-5, atol=1e-6, msg=name)


def test_a_backward_operator_refuses_second_derivatives():
    x, weight, bias = tensors()
    bn = batch_norm()
    out = ops.act_batch_norm(ops.depthwise_conv2d(x, weight, bias), bn, "gelu")
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


def test_the_operators_refuse_tensors_the_kernels_cannot_take(monkeypatch):
    x, weight, bias = tensors(grad=False)
    with pytest.raises(RuntimeError, match="read contiguous NCHW or channels_last tensors"):
        OPS.dw_conv_act(x.transpose(2, 3), weight, bias, "gelu", False, "direct")
    monkeypatch.setattr(ops.depthwise, "kernels_can_run", lambda t: False)  # e.g. compiled kernels, a CPU tensor
    with pytest.raises(RuntimeError, match="Triton kernels cannot run on a cpu tensor"):
        OPS.dw_conv_act(x, weight, bias, "gelu", False, "direct")


# ---- the operators in torch.compile's and FX's graphs ------------------------------------------------------

def small_model(fused_batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("convmixer_128_4", num_classes=5, dim=4, depth=2, kernel_size=3,
                        fast=FastOptions(enabled=True, fused_batchnorm=fused_batchnorm)).to(DEVICE)


def graph_ops(graphs: list[torch.fx.GraphModule]) -> list[str]:
    return [str(n.target) for g in graphs for n in g.graph.nodes if "convmixer_pt" in str(n.target)]


@pytest.mark.slow
@pytest.mark.parametrize("fused_batchnorm", [False, True])
def test_compile_keeps_the_operators_in_one_graph(fused_batchnorm):
    """No graph break in training or inference; each block's kernels are operator nodes of the graph."""
    model = small_model(fused_batchnorm)
    x = torch.randn(2, 3, 12, 12, device=DEVICE)
    torch._dynamo.reset()
    train = torch._dynamo.explain(model)(x)
    assert train.graph_count == 1 and train.graph_break_count == 0
    expected = ["convmixer_pt.residual_dw_batch_norm.default", "convmixer_pt.act_batch_norm.default"] \
        if fused_batchnorm else ["convmixer_pt.dw_conv_act.default"]
    assert graph_ops(train.graphs) == expected * 2
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        infer = torch._dynamo.explain(model)(x)
    assert infer.graph_break_count == 0
    expected = ["convmixer_pt.dw_conv_affine_residual.default"] + (
        ["convmixer_pt.eval_act_batch_norm.default"] if fused_batchnorm else [])
    assert graph_ops(infer.graphs) == expected * 2


@pytest.mark.slow
def test_aot_graphs_hold_the_forward_and_backward_operators():
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    seen: dict[str, list[str]] = {}

    def backend(gm, example_inputs):
        def compiler(kind):
            def compile_graph(graph, _):
                seen[kind] = graph_ops([graph])
                return make_boxed_func(graph.forward)
            return compile_graph
        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))

    torch._dynamo.reset()
    model = torch.compile(small_model(fused_batchnorm=True), backend=backend, fullgraph=True)
    model(torch.randn(2, 3, 12, 12, device=DEVICE)).sum().backward()
    assert seen["fw"] == ["convmixer_pt.residual_dw_batch_norm.default", "convmixer_pt.act_batch_norm.default"] * 2
    assert sorted(seen["bw"]) == sorted(["convmixer_pt.residual_dw_batch_norm_backward.default",
                                         "convmixer_pt.act_batch_norm_backward.default"] * 2)


def test_fx_records_an_operator_as_one_node():
    """A module that calls an operator traces to one call_function node (and scripts: TorchScript calls
    registered operators); make_fx of the autograd-level function records the operator, not its kernels."""
    class Depthwise(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, groups=4, padding=1)

        def forward(self, t):  # unannotated: this file's string annotations would reach the traced code
            return torch.ops.convmixer_pt.dw_conv_act(t, self.conv.weight, self.conv.bias, "gelu", False,
                                                      "direct")[0]

    module = Depthwise().to(DEVICE)
    traced = torch.fx.symbolic_trace(module)
    assert [str(n.target) for n in traced.graph.nodes if n.op == "call_function"] == ["convmixer_pt.dw_conv_act",
                                                                                      "<built-in function getitem>"]
    x = torch.randn(SHAPE, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(traced(x), module(x)) and torch.equal(torch.jit.script(traced)(x), module(x))
    from torch.fx.experimental.proxy_tensor import make_fx

    _, weight, bias = tensors(grad=False)
    graph = make_fx(lambda t: ops.depthwise_conv2d(t, weight, bias, "relu"))(x)
    assert graph_ops([graph]) == ["convmixer_pt.dw_conv_act.default"]
