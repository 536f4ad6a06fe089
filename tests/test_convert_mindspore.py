"""The converter against MindSpore itself: MindSpore reads what we write (loaded strictly into MindCV's cell),
we read what MindSpore writes (real training checkpoints built here, with and without EMA), tanh-GELU weights
keep their function, `--verify` and the parity check run MindSpore's model.

Small models only; the full-size parity is in test_ms_model.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mindspore
ms = pytest.importorskip("mindspore")

import ms_training  # noqa: E402
from test_convert import ARCH, files, random_state, run_cli, write_ms  # noqa: E402

from convmixer_pt import ConvMixer, create_model, create_ms_model  # noqa: E402
from convmixer_pt.cli import parity as parity_cli  # noqa: E402
from convmixer_pt.mindspore.model import MSConvMixer  # noqa: E402
from convmixer_pt.weights import keymap, ms_files, parity  # noqa: E402
from convmixer_pt.weights.convert import convert  # noqa: E402

MS_NAMES = {torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16"}
TOL = 1e-5


def rel_diff(ref: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - other).max() / np.abs(ref).max())


def ms_bytes(params) -> dict[str, bytes]:
    return {k: v.get_bytes() for k, v in params.items()}


# ---- MindSpore reads ours ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mindspore_reads_our_ckpt_in_every_dtype(tmp_path, dtype):
    state = random_state(dtype)
    torch.save(state, tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "mid.ckpt")
    params = ms.load_checkpoint(str(tmp_path / "mid.ckpt"), crc_check=True)
    named = keymap.convert_state(state, "mindspore")
    assert list(params) == list(named)
    for key, value in named.items():
        assert str(params[key].dtype) == MS_NAMES[dtype]
        assert params[key].get_bytes() == ms_files.raw_bytes(value)


def test_mindspore_layout_safetensors_load_strictly_into_mindcvs_cell(tmp_path):
    model = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2, act="gelu_tanh").eval()
    torch.save(model.state_dict(), tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "ms.safetensors", layout="mindspore", act="gelu_tanh")
    params = ms.load_checkpoint(str(tmp_path / "ms.safetensors"), format="safetensors", crc_check=True)
    net = MSConvMixer(dim=16, depth=2, kernel_size=5, patch_size=2, num_classes=5, act="gelu_tanh")
    not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
    assert not_loaded == [] and unused == []  # MindSpore only warns, so the lists are the test
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert rel_diff(ref, net(ms.Tensor(x)).asnumpy()) < TOL
    # MindSpore's own safetensors of the same cell: the same tensors, names and bytes; our metadata adds the
    # model's record to MindSpore's keys.
    ms.save_checkpoint(net, str(tmp_path / "theirs.safetensors"), format="safetensors", crc_check=True)
    ours, theirs = (read_header(tmp_path / f"{n}.safetensors") for n in ("ms", "theirs"))
    assert {k: v for k, v in ours.items() if k != "__metadata__"} == \
        {k: v for k, v in theirs.items() if k != "__metadata__"}
    assert theirs["__metadata__"].items() <= ours["__metadata__"].items()
    assert (tmp_path / "ms.safetensors").read_bytes().endswith(_data(tmp_path / "theirs.safetensors"))


def read_header(path: Path) -> dict:
    import json

    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def _data(path: Path) -> bytes:
    data = path.read_bytes()
    return data[8 + int.from_bytes(data[:8], "little"):]


@pytest.mark.slow
def test_ckpt_written_without_mindspore_is_read_by_mindspore(tmp_path):
    state = random_state(special=False)
    torch.save(state, tmp_path / "in.pth")
    code = ("import sys; sys.modules['mindspore'] = None; from convmixer_pt.cli.convert import main;"
            "rc = main(sys.argv[1:]); assert not [m for m in sys.modules if m.startswith('mindspore.')];"
            "sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pth"), str(tmp_path / "out.ckpt")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    net = MSConvMixer(**ARCH, act="gelu")
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(str(tmp_path / "out.ckpt"), crc_check=True),
                                                strict_load=True)
    assert not_loaded == [] and unused == []
    named = keymap.convert_state(state, "mindspore")
    assert ms_bytes(dict(net.parameters_and_names())) == {k: ms_files.raw_bytes(v) for k, v in named.items()}


# ---- we read MindSpore's -----------------------------------------------------------------------------------

def test_save_checkpoint_of_the_cell_converts_bit_for_bit(tmp_path):
    net = MSConvMixer(**ARCH, act="gelu")
    ms.save_checkpoint(net, str(tmp_path / "net.ckpt"), crc_check=True)
    convert(tmp_path / "net.ckpt", tmp_path / "net.pth", layout="official")
    back = torch.load(tmp_path / "net.pth", weights_only=True)
    expected = keymap.convert_state(ms_bytes(dict(net.parameters_and_names())), "official", src="mindspore")
    assert {k: ms_files.raw_bytes(v) for k, v in back.items() if not k.endswith("num_batches_tracked")} == expected


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two real MindSpore training checkpoints of a MindCV-layout cell with MindCV's tanh GELU."""
    tmp = tmp_path_factory.mktemp("trained")
    nets = {ema: ms_training.train_checkpoint(tmp / f"train_ema{int(ema)}.ckpt", ema=ema, seed=int(ema))
            for ema in (False, True)}
    x = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    return tmp, nets, x


def test_training_checkpoint_without_act_asks_for_it(trained, tmp_path, capfd):
    tmp, _, _ = trained
    rc, out, err = run_cli(capfd, tmp / "train_ema0.ckpt", tmp_path / "w.pth")
    assert rc == 1 and out == "" and "cannot say which GELU it was trained with" in err
    assert files(tmp_path) == []


@pytest.mark.parametrize("out", ["w.pth", "w.safetensors"])
def test_tanh_gelu_weights_keep_mindspores_function(trained, tmp_path, capfd, out):
    tmp, nets, x = trained
    rc, stdout, err = run_cli(capfd, tmp / "train_ema0.ckpt", tmp_path / out, "--act", "gelu_tanh", "--verify")
    assert rc == 0, err
    assert stdout.startswith("match: ") and "input (mindspore, gelu_tanh) vs output (torch, gelu_tanh)" in stdout
    entries = ms_files.read_ckpt(tmp / "train_ema0.ckpt")
    optimizer = sum(n.startswith(("adam_m.", "adam_v.")) for n in entries) + 1  # + learning_rate
    assert f"dropped {len(entries) - 32} entries of MindSpore training state: {optimizer} optimizer" in err
    reference = nets[False](ms.Tensor(x)).asnumpy()
    act = {} if out.endswith(".safetensors") else {"act": "gelu_tanh"}  # safetensors records it
    model = create_model("convmixer_128_4", checkpoint_path=tmp_path / out, **dict(ms_training.ARCH, **act)).eval()
    assert model.act == "gelu_tanh"
    with torch.no_grad():
        assert rel_diff(reference, model(torch.from_numpy(x)).numpy()) < TOL
        exact = create_model("convmixer_128_4", checkpoint_path=tmp_path / out, **dict(ms_training.ARCH, act="gelu"))
        assert rel_diff(reference, exact.eval()(torch.from_numpy(x)).numpy()) > TOL  # the test tells them apart


def test_the_stated_activation_governs_both_sides_of_verify(trained, tmp_path, capfd):
    """The file cannot say which GELU it was trained with: what the user states is what both the input's model
    and the output's run, so the conversion verifies either way, and the statement decides the function."""
    tmp, nets, x = trained
    rc, out, err = run_cli(capfd, tmp / "train_ema0.ckpt", tmp_path / "w.pth", "--act", "gelu", "--verify")
    assert rc == 0, err
    assert "input (mindspore, gelu) vs output (torch, gelu)" in out
    model = create_model("convmixer_128_4", checkpoint_path=tmp_path / "w.pth", **dict(ms_training.ARCH, act="gelu"))
    with torch.no_grad():  # trained with tanh GELU, stated exact: the statement is what the output computes
        assert rel_diff(nets[False](ms.Tensor(x)).asnumpy(), model.eval()(torch.from_numpy(x)).numpy()) > TOL


def test_ema_weights_of_a_real_training_checkpoint(trained, tmp_path, capfd):
    tmp, nets, x = trained
    saved = ms.load_checkpoint(str(tmp / "train_ema1.ckpt"))
    rc, _, err = run_cli(capfd, tmp / "train_ema1.ckpt", tmp_path / "ema.ckpt", "--act", "gelu_tanh", "--ema",
                         "--verify")
    assert rc == 0, err
    ema = ms.load_checkpoint(str(tmp_path / "ema.ckpt"))
    assert ms_bytes(ema) == {k.removeprefix("ema."): v for k, v in ms_bytes(saved).items() if k.startswith("ema.")}
    assert ms_bytes(ema) != {k: v for k, v in ms_bytes(saved).items() if k in ema}  # EMA weights differ
    assert "32 non-EMA weights (network.*)" in err and "1 EMA (updates)" in err
    rc, _, err = run_cli(capfd, tmp / "train_ema1.ckpt", tmp_path / "net.ckpt", "--act", "gelu_tanh")
    assert rc == 0, err
    assert ms_bytes(ms.load_checkpoint(str(tmp_path / "net.ckpt"))) == {k: v for k, v in ms_bytes(saved).items()
                                                                        if k.startswith("network.")}
    assert "33 EMA (ema.*, updates)" in err


# ---- verification and parity -------------------------------------------------------------------------------

def test_cli_verify_runs_mindspore(tmp_path, capfd):
    torch.save(keymap.convert_state(random_state(special=False), "official"), tmp_path / "in.pth")
    rc, out, err = run_cli(capfd, tmp_path / "in.pth", tmp_path / "out.ckpt", "--verify")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("match: max relative logit difference")
    assert "input (torch, gelu) vs output (mindspore, gelu)" in out.splitlines()[0]
    assert f"wrote {tmp_path / 'out.ckpt'}: 44 tensors" in out and "activation unknown" in out


def test_cli_failed_verification_with_mindspore_writes_nothing(tmp_path, capfd, monkeypatch):
    torch.save(random_state(special=False), tmp_path / "in.pth")
    (tmp_path / "out.ckpt").write_bytes(b"old")
    monkeypatch.setattr(parity, "DEFAULT_TOL", 0.0)  # no two frameworks agree to the last bit
    rc, out, err = run_cli(capfd, tmp_path / "in.pth", tmp_path / "out.ckpt", "--verify", "--force", "--act", "gelu")
    assert rc == 1 and out.startswith("DIFFER:")
    assert err.startswith(f"error: {tmp_path / 'out.ckpt'}: not written") and len(err.splitlines()) == 1
    assert (tmp_path / "out.ckpt").read_bytes() == b"old" and files(tmp_path) == ["in.pth", "out.ckpt"]


def test_parity_compare_finds_the_first_divergent_block(tmp_path):
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v
             for k, v in ConvMixer(**ARCH).state_dict().items()}
    torch.save(state, tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "good.ckpt")
    good = parity.compare(tmp_path / "in.pth", tmp_path / "good.ckpt", image_size=32)
    assert good.ok and good.first_divergent is None and good.rel_diff < 1e-6

    write_ms(dict(state, **{"blocks.1.1.weight": state["blocks.1.1.weight"] * 1.01}), tmp_path / "broken.ckpt")
    bad = parity.compare(tmp_path / "in.pth", tmp_path / "broken.ckpt", image_size=32)
    assert not bad.ok
    assert bad.first_divergent == "block 1"
    assert [name for name, _ in bad.stage_diffs] == ["stem", "block 0", "block 1", "block 2", "logits"]
    assert "first divergence after block 1" in "\n".join(bad.lines())


def test_parity_runs_a_training_checkpoint_with_the_stated_activation(trained, tmp_path):
    """A training checkpoint records no activation: it runs what the other file records (each conversion
    matches its source), and a file recording another function differs from it."""
    tmp, _, _ = trained
    convert(tmp / "train_ema0.ckpt", tmp_path / "tanh.safetensors", act="gelu_tanh")
    convert(tmp / "train_ema0.ckpt", tmp_path / "exact.safetensors", act="gelu")
    assert parity.compare(tmp_path / "tanh.safetensors", tmp / "train_ema0.ckpt", image_size=16).ok
    assert parity.compare(tmp_path / "exact.safetensors", tmp / "train_ema0.ckpt", image_size=16).ok
    convert(tmp_path / "exact.safetensors", tmp_path / "exact_ms.safetensors", layout="mindspore")
    assert not parity.compare(tmp_path / "tanh.safetensors", tmp_path / "exact_ms.safetensors", image_size=16).ok


def test_parity_command_line(tmp_path, capfd):
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v
             for k, v in ConvMixer(**ARCH).state_dict().items()}
    torch.save(state, tmp_path / "in.pth")
    write_ms(state, tmp_path / "good.ckpt")
    write_ms(dict(state, **{"stem.2.bias": state["stem.2.bias"] + 0.1}), tmp_path / "bad.ckpt")
    assert parity_cli.main([str(tmp_path / "in.pth"), str(tmp_path / "good.ckpt"), "--image-size", "32"]) == 0
    assert capfd.readouterr().out.startswith("match: ")
    assert parity_cli.main([str(tmp_path / "in.pth"), str(tmp_path / "bad.ckpt"), "--image-size", "32"]) == 1
    out = capfd.readouterr().out
    assert out.startswith("DIFFER: ") and "first divergence after stem" in out
    assert parity_cli.main([str(tmp_path / "in.pth"), str(tmp_path / "missing.ckpt")]) == 1
    assert capfd.readouterr().err == f"error: {tmp_path / 'missing.ckpt'}: no such file\n"


def test_mindspore_model_is_mindcv_shaped(tmp_path):
    write_ms(random_state(), tmp_path / "m.ckpt")
    net = MSConvMixer(**dict(ARCH, act="gelu"))
    assert sorted(n for n, _ in net.parameters_and_names()) == sorted(ms.load_checkpoint(str(tmp_path / "m.ckpt")))


def test_create_ms_model_takes_the_weights_of_a_training_checkpoint(trained):
    tmp, nets, x = trained
    kwargs = dict(ms_training.ARCH, act="gelu_tanh")
    net = create_ms_model("convmixer_128_4", checkpoint_path=tmp / "train_ema0.ckpt", **kwargs)
    assert rel_diff(nets[False](ms.Tensor(x)).asnumpy(), net(ms.Tensor(x)).asnumpy()) == 0.0
    ema = create_ms_model("convmixer_128_4", checkpoint_path=tmp / "train_ema1.ckpt", use_ema=True, **kwargs)
    saved = ms_bytes(ms.load_checkpoint(str(tmp / "train_ema1.ckpt")))
    assert ms_bytes(dict(ema.parameters_and_names())) == {k.removeprefix("ema."): v for k, v in saved.items()
                                                          if k.startswith("ema.")}
