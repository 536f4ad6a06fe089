"""The model under PyTorch's tools, with the fast path on (its kernels in Triton's CPU interpreter here) and off:
torch.compile gives the eager logits and gradients, torch.fx traces forward and backward (and then scripts),
TorchScript gives the eager logits, gradient checkpointing changes nothing but BatchNorm's running statistics,
and without Triton the model still builds and runs.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

from triton_env import DEVICE, import_ops, interpreter_or_exact_fp32  # noqa: E402, F401

from convmixer_pt import create_model  # noqa: E402
from convmixer_pt.fast import FastOptions  # noqa: E402

import_ops()
OPTIONS = {
    "plain": False,  # never the kernels
    "default": None,  # the kernels for CUDA inputs: the plain modules for these CPU inputs
    "fast": FastOptions(enabled=True),
    "fast_fused_bn": FastOptions(enabled=True, fused_batchnorm=True),
}
IMG = (2, 3, 12, 12)


def model_for(option: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("convmixer_128_4", num_classes=5, dim=4, depth=2, kernel_size=3, fast=OPTIONS[option],
                         **kwargs).to(DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the gradients of the input and every parameter, for one training forward and backward."""
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [x.grad, *(p.grad for p in model.parameters())]


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    return ((value.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_same_run(a: tuple, b: tuple, tol: float) -> None:
    assert rel_err(a[0], b[0]) < tol
    for u, v in zip(a[1], b[1], strict=True):
        assert rel_err(u, v) < tol


@pytest.mark.slow
@pytest.mark.parametrize("option", ["default", "fast", "fast_fused_bn"])
def test_compile_gives_the_eager_logits_and_gradients(option):
    """torch.compile with its default backend (inductor; on the CPU its C++ code around the operators):
    training step, running statistics and inference as in eager mode, to float32 rounding."""
    torch._dynamo.reset()
    model = model_for(option)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=option != "default")
    x = torch.randn(IMG, device=DEVICE)
    assert_same_run(step(compiled, x), step(model, x), 1e-5)
    for (name, b), c in zip(compiled.named_buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        assert rel_err(compiled.eval()(x), model.eval()(x)) < 1e-5


@pytest.mark.slow
def test_compile_under_autocast_gives_the_eager_logits():
    """The operators have no autocast rule: the functions over them cast to autocast's dtype, in the graph as
    in eager mode."""
    torch._dynamo.reset()
    model = model_for("fast")
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(IMG, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        eager, graph = step(model, x), step(compiled, x)
    assert eager[0].dtype == graph[0].dtype == torch.bfloat16
    assert_same_run(graph, eager, 1e-6)


@pytest.mark.slow
def test_compile_with_grad_checkpointing_gives_the_eager_gradients():
    torch._dynamo.reset()
    model = model_for("fast")
    model.set_grad_checkpointing()
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager", fullgraph=True)
    x = torch.randn(IMG, device=DEVICE)
    assert_same_run(step(compiled, x), step(model, x), 1e-6)


@pytest.mark.parametrize("option", ["plain", "default", "fast", "fast_fused_bn"])
def test_fx_traces_forward_and_backward(option):
    """symbolic_trace: each block one `call_module` leaf while the fast path can run (it decides per input),
    the blocks' own modules when it is off; the traced model computes what the model computes, bit for bit."""
    model = model_for(option)
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    leaves = [n.target for n in traced.graph.nodes if n.op == "call_module" and n.target.startswith("blocks.")]
    parts = ("0.fn.0", "0.fn.1", "0.fn.2", "1", "2", "3")
    assert leaves == (["blocks.0", "blocks.1"] if option != "plain" else
                      [f"blocks.{i}.{part}" for i in range(2) for part in parts])
    x = torch.randn(IMG, device=DEVICE)
    ours, theirs = step(traced, x), step(model, x)
    assert torch.equal(ours[0], theirs[0]) and all(torch.equal(a, b) for a, b in zip(ours[1], theirs[1],
                                                                                     strict=True))
    traced.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


@pytest.mark.parametrize("option", ["plain", "default", "fast"])
def test_fx_then_torchscript_gives_the_eager_logits(option):
    """FX then TorchScript, the route of timm's feature-extraction users: with the fast path off the trace holds
    the plain modules, with it on one leaf per block, whose plain modules TorchScript compiles."""
    model = model_for(option).eval()
    scripted = torch.jit.script(torch.fx.symbolic_trace(model))
    x = torch.randn(IMG, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(scripted(x), model_for("plain").eval()(x))
        assert rel_err(scripted(x), model(x)) < 1e-5  # the kernels' rounding where they ran


def test_fx_then_torchscript_of_the_default_model():
    """The issue's own line: `create_model`'s defaults (fast path for CUDA inputs), traced then scripted."""
    model = create_model("convmixer_128_4", num_classes=10).eval()
    scripted = torch.jit.script(torch.fx.symbolic_trace(model))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


@pytest.mark.parametrize("option", ["plain", "default", "fast"])
def test_torchscript_gives_the_eager_logits(option):
    """torch.jit.script always compiles the plain modules (checkpointing on or off); the logits are the
    eager model's, to the kernels' rounding where they ran."""
    model = model_for(option).eval()
    model.set_grad_checkpointing()
    scripted = torch.jit.script(model)
    x = torch.randn(IMG, device=DEVICE)
    with torch.no_grad():
        assert rel_err(scripted(x), model(x)) < 1e-5
        plain = model_for("plain").eval()
        assert torch.equal(scripted(x), plain(x))
        taps = scripted.forward_intermediates(x, [0, 1], intermediates_only=True) \
            if hasattr(scripted, "forward_intermediates") else None
        assert taps is None or len(taps) == 2


def test_jit_trace_records_the_plain_modules():
    """torch.jit.trace (and the legacy ONNX exporter over it) gets the blocks' plain modules: its graph is for
    other runtimes, which have no Triton operators."""
    model = model_for("fast").eval()
    x = torch.randn(IMG, device=DEVICE)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert "convmixer_pt::" not in str(traced.inlined_graph)  # no operator of ours in the graph
        assert torch.equal(traced(x), model_for("plain").eval()(x))


@pytest.mark.parametrize("option", ["plain", "fast"])
def test_grad_checkpointing_changes_no_gradient_and_updates_batchnorm_twice(option):
    """Checkpointing recomputes each block in the backward pass, BatchNorm's running-statistics update
    included (as with timm's checkpoint_seq): the counters then advance by two per training step."""
    model, checkpointed = model_for(option), model_for(option)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(IMG, device=DEVICE)
    assert_same_run(step(checkpointed, x), step(model, x), 1e-6)
    counters = [b.num_batches_tracked.item() for b in checkpointed.blocks.modules()
                if isinstance(b, torch.nn.BatchNorm2d)]
    assert counters == [2] * len(counters) and model.blocks[0].dw_bn.num_batches_tracked.item() == 1


BLOCK_TRITON = r"""
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder, importlib.abc.Loader):  # as if Triton were not installed
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            return importlib.util.spec_from_loader(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
import importlib.util
sys.meta_path.insert(0, NoTriton())
import torch
from convmixer_pt import create_model
from convmixer_pt.fast import FastOptions, dispatch
model = create_model("convmixer_128_4", num_classes=5, dim=4, depth=2, fast=FastOptions(enabled=True))
plain = create_model("convmixer_128_4", num_classes=5, dim=4, depth=2, fast=False)
plain.load_state_dict(model.state_dict())
x = torch.randn(2, 3, 12, 12)
assert dispatch._ops() is None and "triton" not in sys.modules
assert torch.equal(model(x), plain(x))
model(x).sum().backward()
print("plain path without Triton")
"""


@pytest.mark.slow
def test_without_triton_the_model_builds_and_runs_its_plain_modules():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_TRITON], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "plain path without Triton", proc.stderr[-2000:]
