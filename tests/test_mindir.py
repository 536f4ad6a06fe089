"""MindIR export: the graph MindSpore's runtime loads back (`mindspore.load` + `nn.GraphCell`) computes the PyTorch
model's logits, at any batch size, with the activation stated for the weights; a failed check writes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.mindspore
ms = pytest.importorskip("mindspore")

import ms_training  # noqa: E402
from test_convert import files, random_state  # noqa: E402

from convmixer_pt import create_model  # noqa: E402
from convmixer_pt.cli import export_mindir as export_cli  # noqa: E402
from convmixer_pt.weights import parity  # noqa: E402


def graph(path):
    return ms.nn.GraphCell(ms.load(str(path)))


def rel_diff(ref: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - other).max() / np.abs(ref).max())


def run(capfd, *args) -> tuple[int, str, str]:
    rc = export_cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def test_export_reproduces_pytorch_at_any_batch_size(tmp_path, capfd):
    model = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2).eval()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    rc, out, err = run(capfd, tmp_path / "w.pth", tmp_path / "w.mindir", "--image-size", "16", "--verify")
    assert rc == 0, err
    assert out.startswith("match: ") and f"wrote {tmp_path / 'w.mindir'}: MindIR, input [batch, 3, 16, 16]" in out
    assert out.splitlines()[0].endswith(f"vs MindIR {tmp_path / 'w.mindir'}")  # the user's file, not its staging
    cell = graph(tmp_path / "w.mindir")
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert rel_diff(ref, cell(ms.Tensor(x)).asnumpy()) < 1e-5


def test_export_of_a_training_checkpoint_keeps_mindcvs_tanh_gelu(tmp_path, capfd):
    net = ms_training.train_checkpoint(tmp_path / "train.ckpt")
    rc, out, err = run(capfd, tmp_path / "train.ckpt", tmp_path / "t.mindir", "--act", "gelu_tanh", "--image-size",
                       "16", "--verify")
    assert rc == 0, err
    assert "activation gelu_tanh (--act)" in out and "dropped" in err
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert rel_diff(net(ms.Tensor(x)).asnumpy(), graph(tmp_path / "t.mindir")(ms.Tensor(x)).asnumpy()) < 1e-6


def test_failed_check_writes_nothing_and_bad_names_are_refused(tmp_path, capfd, monkeypatch):
    torch.save(random_state(special=False), tmp_path / "w.pth")
    monkeypatch.setattr(parity, "DEFAULT_TOL", -1.0)  # even identical logits fail
    rc, out, err = run(capfd, tmp_path / "w.pth", tmp_path / "w.mindir", "--image-size", "16", "--verify")
    assert rc == 1 and out.startswith("DIFFER: ")
    assert err.startswith(f"error: {tmp_path / 'w.mindir'}: not written") and len(err.splitlines()) == 1
    rc, _, err = run(capfd, tmp_path / "w.pth", tmp_path / "w.onnx")
    assert rc == 1 and err == f"error: {tmp_path / 'w.onnx'}: a MindIR file's name ends in .mindir (MindSpore " \
                              "appends it otherwise)\n"
    assert files(tmp_path) == ["w.pth"]
