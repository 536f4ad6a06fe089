"""ONNX export: every variant, with the fast path on or off, gives onnxruntime the logits PyTorch computes (1e-5
relative, float32, CPU), as standard ONNX with a dynamic batch; tools/export_onnx.py writes a checkpoint's model
whole or not at all.

The fast path runs its Triton kernels in Triton's CPU interpreter here (tests/triton_env.py).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript", "triton")):
    pytest.skip("needs onnx, onnxruntime, onnxscript and triton (the onnx and dev extras)", allow_module_level=True)

import onnx  # noqa: E402
from triton_env import import_ops, interpreter_or_exact_fp32  # noqa: E402, F401

from convmixer_pt import create_model, export  # noqa: E402
from convmixer_pt.cli import export_onnx as cli  # noqa: E402
from convmixer_pt.fast import FastOptions  # noqa: E402
from convmixer_pt.files import STAGING_PREFIX  # noqa: E402
from convmixer_pt.variants import VARIANTS  # noqa: E402
from convmixer_pt.weights import keymap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
import_ops()
STANDARD_OPS = {"Conv", "Gelu", "Relu", "Add", "BatchNormalization", "ReduceMean", "Reshape", "Gemm", "Flatten",
                "Squeeze", "Unsqueeze", "MatMul", "Mul", "Div", "Erf", "GlobalAveragePool", "Identity", "Constant"}
SMALL, FULL = ["convmixer_128_4", "convmixer_256_8"], ["convmixer_768_32", "convmixer_1024_20", "convmixer_1536_20"]


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def check_export(model: torch.nn.Module, path: Path, img_size: int) -> None:
    export.export_onnx(model, path, img_size)
    graph = onnx.load(str(path)).graph
    assert {n.op_type for n in graph.node} <= STANDARD_OPS and {n.domain for n in graph.node} <= {""}
    for batch in (1, 3):  # the batch axis is dynamic
        check = export.verify_onnx(model, path, img_size, batch_size=batch, seed=batch)
        assert check.ok and check.rel_diff <= 1e-5, check.line()


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("name", SMALL)
def test_small_variants_export_with_or_without_the_fast_path(name, fast, tmp_path):
    torch.manual_seed(0)
    options = FastOptions(enabled=True, fused_batchnorm=True) if fast else False
    # 8 channels: the interpreted kernels run one program per image and channel, and no kernel or exported
    # graph depends on the count (16 took twice as long and showed nothing more).
    model = randomize_bn(create_model(name, num_classes=10, dim=8, fast=options))
    check_export(model, tmp_path / "model.onnx", VARIANTS[name]["img_size"])


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_variants_export(name, tmp_path):
    torch.manual_seed(0)
    check_export(randomize_bn(create_model(name)), tmp_path / "model.onnx", 64)


def write_checkpoint(tmp_path: Path, layout: str = "timm") -> Path:
    torch.manual_seed(0)
    model = randomize_bn(create_model("convmixer_768_32", dim=16, depth=2, num_classes=10))
    state = model.state_dict() if layout == "timm" else keymap.convert_state(model.state_dict(), "official")
    path = tmp_path / ("model.pth" if layout == "timm" else "model.pth.tar")
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_cli_exports_a_checkpoint_and_verifies_it(tmp_path):
    checkpoint = write_checkpoint(tmp_path, "official")
    out = tmp_path / "model.onnx"
    cmd = [sys.executable, str(ROOT / "tools" / "export_onnx.py"), str(checkpoint), str(out), "--img-size", "28",
           "--verify"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("match: onnxruntime vs PyTorch, max relative logit difference")
    assert lines[1].startswith(f"wrote {out}: ConvMixer (dim=16, depth=2, kernel_size=7, patch_size=7")
    assert "activation gelu" not in lines[1]  # no registered variant has these shapes: the note says so
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_inputs()[0].shape[1:] == [3, 28, 28]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and again.stderr.strip() == f"error: {out}: already exists (use --force to overwrite)"


def test_a_failed_verification_writes_nothing(tmp_path, monkeypatch, capsys):
    checkpoint = write_checkpoint(tmp_path)
    out = tmp_path / "model.onnx"
    real = export.onnxruntime_logits
    monkeypatch.setattr(export, "onnxruntime_logits", lambda path, x: real(path, x) * (1 + 1e-4))
    assert cli.main([str(checkpoint), str(out), "--img-size", "28", "--verify"]) == 1
    captured = capsys.readouterr()
    found = re.match(r"DIFFER: onnxruntime vs PyTorch, max relative logit difference ([\d.e+-]+) \(tolerance 1e-05\)",
                     captured.out)
    assert found and 0.9e-4 < float(found.group(1)) < 1.1e-4, captured.out
    assert captured.err.strip().splitlines()[-1].endswith("; nothing written")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    checkpoint = write_checkpoint(tmp_path)
    assert cli.main([str(checkpoint), str(tmp_path / "a.onnx"), "--img-size", "5"]) == 1
    assert capsys.readouterr().err == "error: image size 5 is smaller than the model's patch size 7\n"
    assert cli.main([str(tmp_path / "missing.pth"), str(tmp_path / "b.onnx")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.pth'}: no such file\n"
    assert cli.main([str(checkpoint), str(tmp_path / "model.pth")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'model.pth'}: an ONNX file's name ends in .onnx\n"
    (tmp_path / "folder.onnx").mkdir()
    assert cli.main([str(checkpoint), str(tmp_path / "folder.onnx"), "--force"]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'folder.onnx'}: is a folder, not a file\n"
    monkeypatch.setattr(export, "NEEDED", ("onnx", "not_a_package_here"))
    assert cli.main([str(checkpoint), str(tmp_path / "c.onnx")]) == 1
    assert capsys.readouterr().err == 'error: ONNX export needs not_a_package_here: pip install ".[onnx]" in a ' \
        'checkout of convmixer_pt, or pip install "dist/convmixer_pt-<version>-py3-none-any.whl[onnx]" after ' \
        'python -m build\n'
    assert not [p for p in tmp_path.glob("*.onnx") if p.is_file()]


def test_sizes_and_opsets_outside_what_is_written_are_refused_first(tmp_path, capsys):
    # --img-size 100000 asked for a 40 GB example batch; an out-of-range --opset logged a traceback, exited 0
    # and wrote an opset-18 model.
    checkpoint = write_checkpoint(tmp_path)
    out = tmp_path / "m.onnx"
    assert cli.main([str(checkpoint), str(out), "--img-size", "100000"]) == 1
    assert capsys.readouterr().err == "error: image size 100000 is above the largest this package takes, 8,192 pixels\n"
    top = export.max_opset()
    for opset in (7, 17, top + 1, 99):
        assert cli.main([str(checkpoint), str(out), "--opset", str(opset)]) == 1
        assert capsys.readouterr().err == \
            f"error: --opset {opset} is outside the opsets this exporter writes, 18 to {top}\n"
    assert not out.exists()


@pytest.mark.slow
def test_the_opset_asked_for_is_the_one_written(tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path)
    for opset in (18, export.max_opset()):
        out = tmp_path / f"m{opset}.onnx"
        assert cli.main([str(checkpoint), str(out), "--opset", str(opset), "--img-size", "32"]) == 0
        assert export.written_opset(out) == opset


def test_the_image_size_defaults_to_what_the_checkpoints_training_recorded(tmp_path, capsys):
    """validate.py evaluates a trainer's checkpoint at its recorded input size; ONNX export agrees with it."""
    checkpoint = write_checkpoint(tmp_path)
    (tmp_path / "args.yaml").write_text("input_size: 21\n")  # the trainer's record beside its checkpoints
    assert cli.main([str(checkpoint), str(tmp_path / "recorded.onnx")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("input N x 3 x 21 x 21")
    (tmp_path / "args.yaml").unlink()
    assert cli.main([str(checkpoint), str(tmp_path / "default.onnx")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("input N x 3 x 224 x 224")
    shapes = [onnx.load(str(tmp_path / f"{name}.onnx")).graph.input[0].type.tensor_type.shape.dim[2].dim_value
              for name in ("recorded", "default")]
    assert shapes == [21, 224]
