"""The converter: exact round trips in every dtype, layouts and metadata, the parity helper, and bad inputs.

Small models only; the full-size parity is in test_ms_model.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mindspore
ms = pytest.importorskip("mindspore")

from convmixer_pt import CheckpointError, ConvMixer  # noqa: E402
from convmixer_pt.cli import convert as convert_cli  # noqa: E402
from convmixer_pt.cli import parity as parity_cli  # noqa: E402
from convmixer_pt.mindspore.model import MSConvMixer  # noqa: E402
from convmixer_pt.weights import keymap, parity  # noqa: E402
from convmixer_pt.weights.convert import convert  # noqa: E402
from convmixer_pt.weights.formats import read_weights, resolve_act  # noqa: E402
from convmixer_pt.weights.ms_io import write_ckpt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_ckpt.py"

# Not a registered variant: the converter must infer everything from the shapes.
ARCH = dict(dim=24, depth=3, kernel_size=5, patch_size=4, in_chans=3, num_classes=7)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
MS_NAMES = {torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16"}


def random_state(dtype: torch.dtype = torch.float32, seed: int = 0,
                 special: bool = True) -> dict[str, torch.Tensor]:
    """Random weights and BN statistics; `special` puts infinities, NaN, -0 and subnormals in the head."""
    gen = torch.Generator().manual_seed(seed)
    model = ConvMixer(**ARCH)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=gen)
            if key.endswith("running_var"):
                value = value.abs() + 0.5
        else:
            value = torch.tensor(int(torch.randint(1, 1000, (1,), generator=gen)))
        state[key] = value.to(dtype) if value.is_floating_point() else value
    if special:
        tiny = torch.finfo(dtype).smallest_normal / 4
        values = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, tiny, torch.finfo(dtype).max])
        state["head.bias"][:6] = values.to(dtype)
    return state


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        if key.endswith("num_batches_tracked"):
            continue  # MindSpore keeps no counter; it comes back regenerated
        view = INT_VIEW[a[key].dtype]
        assert torch.equal(a[key].view(view), b[key].view(view)), key


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


# ---- exactness ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pth_ckpt_pth_is_bit_exact(tmp_path, dtype):
    state = random_state(dtype)
    torch.save(state, tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "mid.ckpt")
    convert(tmp_path / "mid.ckpt", tmp_path / "out.pth")
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert_bit_identical(state, back)
    assert all(int(back[k]) == 0 for k in back if k.endswith("num_batches_tracked"))

    # MindSpore's own reader sees the same dtype and, through its own cast, the same values.
    params = ms.load_checkpoint(str(tmp_path / "mid.ckpt"))
    named = keymap.convert_state(state, "mindspore")
    assert sorted(params) == sorted(named)
    for key, value in named.items():
        assert str(params[key].dtype) == MS_NAMES[dtype]
        as_float = ms.ops.cast(params[key], ms.float32).asnumpy()
        np.testing.assert_array_equal(as_float, value.float().numpy())

    # ckpt -> pth -> ckpt reproduces the MindSpore file byte for byte.
    convert(tmp_path / "out.pth", tmp_path / "again.ckpt")
    assert (tmp_path / "again.ckpt").read_bytes() == (tmp_path / "mid.ckpt").read_bytes()


@pytest.mark.parametrize("target", ["float16", "bfloat16"])
def test_dtype_option_casts_like_torch(tmp_path, target):
    """The head holds float32's largest value, which neither 16-bit type can hold: refused, or with clamp
    saturated to the target's largest; everything else is torch's own cast, bit for bit (inf, NaN, -0 too)."""
    state = random_state()
    torch.save(state, tmp_path / "in.pth")
    with pytest.raises(CheckpointError, match=f"tensor 'head.bias' holds 1 value\\(s\\) up to 3.40282e\\+38 in "
                                              f"magnitude, beyond {target}'s largest"):
        convert(tmp_path / "in.pth", tmp_path / "out.ckpt", dtype=target)
    assert not (tmp_path / "out.ckpt").exists()
    _, summary = convert(tmp_path / "in.pth", tmp_path / "out.ckpt", dtype=target, clamp=True)
    assert summary.clamped == 1 and "clamped 1 value(s)" in summary.line()
    back = read_weights(tmp_path / "out.ckpt").state
    dt = getattr(torch, target)
    limit = torch.finfo(dt).max
    want = {k: (torch.where(torch.isfinite(v), v.clamp(-limit, limit), v) if v.is_floating_point() else v)
            for k, v in state.items()}
    want = {k: v.to(dt) if v.is_floating_point() else v for k, v in want.items()}
    assert back["head.bias"][5] == limit
    assert_bit_identical({k: v for k, v in want.items() if k in back}, back)


# ---- layouts, wrappers, metadata ---------------------------------------------------------------------------

def test_official_layout_and_training_checkpoint_with_ema(tmp_path):
    state, ema = random_state(seed=1), random_state(seed=2)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()},
               "state_dict_ema": ema, "epoch": 3}
    torch.save(wrapped, tmp_path / "train.pth.tar")
    convert(tmp_path / "train.pth.tar", tmp_path / "ema.ckpt", use_ema=True)
    convert(tmp_path / "ema.ckpt", tmp_path / "official.pth", layout="official")
    back = torch.load(tmp_path / "official.pth", weights_only=True)
    assert_bit_identical(keymap.convert_state(ema, "official"), back)


def test_safetensors_output_records_arch_and_act(tmp_path):
    from safetensors import safe_open

    torch.save(keymap.convert_state(random_state(), "official"), tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "unknown.safetensors")
    convert(tmp_path / "in.pth", tmp_path / "relu.safetensors", act="relu")
    convert(tmp_path / "relu.safetensors", tmp_path / "relu.ckpt")
    convert(tmp_path / "relu.ckpt", tmp_path / "again.safetensors", act="silu")
    metas = {}
    for name in ("unknown", "relu", "again"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            metas[name] = f.metadata()
    assert json.loads(metas["unknown"]["arch"]) == ARCH
    assert "act" not in metas["unknown"] and metas["unknown"]["layout"] == "timm"
    assert metas["relu"]["act"] == "relu"
    assert metas["again"]["act"] == "silu"  # --act wins over everything
    assert read_weights(tmp_path / "relu.safetensors").act_source == "file metadata"


def test_activation_comes_from_act_then_metadata_then_registry():
    arch_768 = dict(dim=768, depth=32, kernel_size=7, patch_size=7, in_chans=3, num_classes=1000)
    assert resolve_act(arch_768, None, None) == ("relu", "registry: convmixer_768_32")
    assert resolve_act(dict(arch_768, depth=31), None, None) == (None, "unknown")
    assert resolve_act(arch_768, "gelu", None) == ("gelu", "file metadata")
    assert resolve_act(arch_768, "not-an-activation", None) == ("relu", "registry: convmixer_768_32")
    assert resolve_act(arch_768, "gelu", "silu") == ("silu", "--act")


# ---- parity helper -----------------------------------------------------------------------------------------

def test_parity_compare_finds_the_first_divergent_block(tmp_path):
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v
             for k, v in ConvMixer(**ARCH).state_dict().items()}
    torch.save(state, tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "good.ckpt")
    good = parity.compare(tmp_path / "in.pth", tmp_path / "good.ckpt", image_size=32)
    assert good.ok and good.first_divergent is None and good.rel_diff < 1e-6

    broken = dict(state, **{"blocks.1.1.weight": state["blocks.1.1.weight"] * 1.01})
    write_ckpt(broken, tmp_path / "broken.ckpt")
    bad = parity.compare(tmp_path / "in.pth", tmp_path / "broken.ckpt", image_size=32)
    assert not bad.ok
    assert bad.first_divergent == "block 1"
    assert [name for name, _ in bad.stage_diffs] == ["stem", "block 0", "block 1", "block 2", "logits"]
    assert "first divergence after block 1" in "\n".join(bad.lines())


def test_parity_command_line(tmp_path, capfd):
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v
             for k, v in ConvMixer(**ARCH).state_dict().items()}
    torch.save(state, tmp_path / "in.pth")
    write_ckpt(state, tmp_path / "good.ckpt")
    write_ckpt(dict(state, **{"stem.2.bias": state["stem.2.bias"] + 0.1}), tmp_path / "bad.ckpt")
    assert parity_cli.main([str(tmp_path / "in.pth"), str(tmp_path / "good.ckpt"), "--image-size", "32"]) == 0
    assert capfd.readouterr().out.startswith("match: ")
    assert parity_cli.main([str(tmp_path / "in.pth"), str(tmp_path / "bad.ckpt"), "--image-size", "32"]) == 1
    out = capfd.readouterr().out
    assert out.startswith("DIFFER: ") and "first divergence after stem" in out
    assert parity_cli.main([str(tmp_path / "in.pth"), str(tmp_path / "missing.ckpt")]) == 1
    assert capfd.readouterr().err == f"error: {tmp_path / 'missing.ckpt'}: no such file\n"


# ---- the CLI -----------------------------------------------------------------------------------------------

def run_cli(capfd, *args: str) -> tuple[int, str, str]:
    rc = convert_cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def test_cli_verify_and_summary(tmp_path, capfd):
    torch.save(keymap.convert_state(random_state(special=False), "official"), tmp_path / "in.pth")
    rc, out, err = run_cli(capfd, tmp_path / "in.pth", tmp_path / "out.ckpt", "--verify")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("match: max relative logit difference")
    assert f"wrote {tmp_path / 'out.ckpt'}: 44 tensors" in out
    assert "activation unknown" in out
    assert err.startswith("note: no registered variant has these shapes") and len(err.splitlines()) == 1


def test_cli_failed_verification_writes_nothing(tmp_path, capfd, monkeypatch):
    torch.save(random_state(special=False), tmp_path / "in.pth")
    (tmp_path / "out.ckpt").write_bytes(b"old")
    monkeypatch.setattr(parity, "DEFAULT_TOL", 0.0)  # no two frameworks agree to the last bit
    rc, out, err = run_cli(capfd, tmp_path / "in.pth", tmp_path / "out.ckpt", "--verify", "--force", "--act",
                           "gelu")
    assert rc == 1
    assert out.startswith("DIFFER:")
    assert err.startswith(f"error: {tmp_path / 'out.ckpt'}: not written") and len(err.splitlines()) == 1
    assert (tmp_path / "out.ckpt").read_bytes() == b"old"
    assert files(tmp_path) == ["in.pth", "out.ckpt"]


def _truncated(path: Path, good: Path, keep: float) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BAD_INPUTS = {
    # name: (how to make IN from a good .pth and .ckpt, output name, expected message fragment)
    "truncated pth": (lambda p, pth, ckpt: _truncated(p, pth, 0.5), "in.pth", "out.ckpt",
                      "truncated or corrupt"),
    "truncated ckpt": (lambda p, pth, ckpt: _truncated(p, ckpt, 0.5), "in.ckpt", "out.pth",
                       "truncated or corrupt"),
    "garbage": (lambda p, pth, ckpt: p.write_bytes(b"not a checkpoint " * 100), "in.pth", "out.ckpt",
                "not a PyTorch, safetensors or MindSpore checkpoint"),
    "garbage ckpt": (lambda p, pth, ckpt: p.write_bytes(b"\n\xff\xff\xff\x0f" + b"x" * 100), "in.ckpt",
                     "out.pth", "cannot read it as a MindSpore checkpoint"),
    "empty": (lambda p, pth, ckpt: p.write_bytes(b""), "in.pth", "out.ckpt", "empty or truncated"),
    "missing tensor": (lambda p, pth, ckpt: torch.save(
        {k: v for k, v in random_state().items() if k != "blocks.1.1.weight"}, p), "in.pth", "out.ckpt",
        "missing 1 tensor(s): blocks.1.1.weight"),
    "extra tensor": (lambda p, pth, ckpt: torch.save(dict(random_state(), **{"stem.0.scale": torch.ones(1)}),
                                                     p), "in.pth", "out.ckpt",
                     "unexpected 1 tensor(s): stem.0.scale"),
    "shape mismatch": (lambda p, pth, ckpt: torch.save(
        dict(random_state(), **{"blocks.2.1.weight": torch.zeros(24, 24, 3, 3)}), p), "in.pth", "out.ckpt",
        "shape mismatch: blocks.2.1.weight (24, 24, 3, 3) vs model (24, 24, 1, 1)"),
    "missing tensor in ckpt": (lambda p, pth, ckpt: write_ckpt(
        {k: v for k, v in random_state().items() if k != "blocks.1.3.running_var"}, p), "in.ckpt", "out.pth",
        "missing 1 tensor(s): blocks.1.3.running_var"),
    "no input": (lambda p, pth, ckpt: None, "nothing.pth", "out.ckpt", "no such file"),
    "unknown output type": (lambda p, pth, ckpt: p.write_bytes(pth.read_bytes()), "in.pth", "out.onnx",
                            "cannot tell the output format"),
}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("good")
    torch.save(random_state(), tmp / "good.pth")
    convert(tmp / "good.pth", tmp / "good.ckpt")
    return tmp / "good.pth", tmp / "good.ckpt"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input(tmp_path, capfd, good_files, case):
    make, in_name, out_name, fragment = BAD_INPUTS[case]
    make(tmp_path / in_name, *good_files)
    before = files(tmp_path)
    rc, out, err = run_cli(capfd, tmp_path / in_name, tmp_path / out_name)
    assert rc == 1
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert fragment in err
    assert files(tmp_path) == before


def test_cli_existing_output_needs_force(tmp_path, capfd, good_files):
    (tmp_path / "out.ckpt").write_bytes(b"keep me")
    rc, _, err = run_cli(capfd, good_files[0], tmp_path / "out.ckpt")
    assert rc == 1 and err == f"error: {tmp_path / 'out.ckpt'}: already exists (use --force to overwrite)\n"
    assert (tmp_path / "out.ckpt").read_bytes() == b"keep me"
    rc, _, err = run_cli(capfd, good_files[0], tmp_path / "out.ckpt", "--force")
    assert rc == 0, err
    assert (tmp_path / "out.ckpt").read_bytes() == good_files[1].read_bytes()
    assert files(tmp_path) == ["out.ckpt"]


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_cli_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"state_dict": random_state(), "payload": _RunsCode(marker)}, tmp_path / "evil.pth")
    run = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "evil.pth"), str(tmp_path / "out.ckpt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.startswith(f"error: {tmp_path / 'evil.pth'}: refused to unpickle it")
    assert len(run.stderr.splitlines()) == 1
    assert not marker.exists()
    assert files(tmp_path) == ["evil.pth"]


@pytest.mark.slow
def test_cli_truncated_ckpt_in_a_fresh_process(tmp_path, good_files):
    _truncated(tmp_path / "in.ckpt", good_files[1], 0.7)
    run = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "in.ckpt"), str(tmp_path / "out.pth")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: {tmp_path / 'in.ckpt'}: cannot read it as a MindSpore checkpoint")
    assert len(run.stderr.splitlines()) == 1
    assert files(tmp_path) == ["in.ckpt"]


def test_ckpt_crc_is_written_and_checked(tmp_path, good_files):
    data = bytearray(good_files[1].read_bytes())
    assert data[-17:-10] == b"crc_num"
    data[len(data) // 2] ^= 0x01  # one flipped bit inside a tensor
    (tmp_path / "flipped.ckpt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="its CRC32 does not match its content; the file is corrupt"):
        read_weights(tmp_path / "flipped.ckpt")


def test_mindspore_model_is_mindcv_shaped(good_files):
    net = MSConvMixer(**dict(ARCH, act="gelu"))
    assert sorted(n for n, _ in net.parameters_and_names()) == sorted(ms.load_checkpoint(str(good_files[1])))


@pytest.mark.slow
def test_mindspore_is_imported_only_when_needed():
    code = ("import sys, convmixer_pt, convmixer_pt.weights.convert, convmixer_pt.cli.convert; "
            "print('mindspore' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "False", run.stderr
