"""The MindSpore twin against the PyTorch model, for the three published variants at full size.

Each variant gets random weights with trained-like BatchNorm statistics, is saved as an official-layout file
(as locuslab publishes them), converted to .ckpt (1536/20 through the CLI with no flags, the issue's
"done when"), loaded strictly into the MindSpore model and compared on logits. A tanh GELU, MindSpore's
default, must fail the same tolerance. Inputs are 8x8 patches (56 px, 112 px for patch 14) to keep CPU
time down; dims and depths are full.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.mindspore, pytest.mark.slow]
pytest.importorskip("mindspore")

from mindspore import Tensor  # noqa: E402
from test_convert import write_ms  # noqa: E402

from convmixer_pt import VARIANTS, CheckpointError, create_model, create_ms_model  # noqa: E402
from convmixer_pt.mindspore.model import MSConvMixer  # noqa: E402
from convmixer_pt.weights import keymap  # noqa: E402
from convmixer_pt.weights.convert import convert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
PUBLISHED = ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"]


def trained_like(model: torch.nn.Module, seed: int, image_size: int) -> torch.nn.Module:
    """Random weights whose activations stay O(1) through every block, as in a trained network.

    Variance-preserving convolutions; BatchNorm statistics measured on a random batch, then shifted and
    widened at random (so they are not the batch's own, and the blocks damp rather than amplify rounding).
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()), generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
        for bn in bns:
            bn.weight.copy_(1 + 0.2 * torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=gen))
            bn.momentum = None  # a cumulative average: after one batch, that batch's statistics
            bn.reset_running_stats()
        model.train()
        model(torch.randn(4, model.in_chans, image_size, image_size, generator=gen))
        model.eval()
        for bn in bns:
            bn.momentum = 0.1
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn(bn.num_features, generator=gen))
            bn.running_var.mul_(2 + torch.rand(bn.num_features, generator=gen))
    return model


def rel_diff(ref: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(ref.astype(np.float64) - other).max() / np.abs(ref).max())


def top5(logits: np.ndarray) -> list[set[int]]:
    return [set(row.tolist()) for row in np.argsort(-logits, axis=1)[:, :5]]


@pytest.fixture(scope="module", params=PUBLISHED)
def converted(request, tmp_path_factory):
    name = request.param
    model = create_model(name)
    size = 8 * model.patch_size
    trained_like(model, seed=PUBLISHED.index(name), image_size=size)
    tmp = tmp_path_factory.mktemp(name)
    src, out = tmp / f"{name}.pth.tar", tmp / f"{name}.ckpt"
    torch.save(keymap.convert_state(model.state_dict(), "official"), src)
    if name == "convmixer_1536_20":
        run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"), str(src), str(out)],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""
        assert run.stdout.startswith(f"wrote {out}: 248 tensors, ")
    else:
        convert(src, out)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(100)).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return name, out, x, ref


def test_converted_ckpt_gives_pytorch_logits(converted):
    name, ckpt, x, ref = converted
    net = create_ms_model(name, checkpoint_path=ckpt)
    logits = net(Tensor(x)).asnumpy()
    assert rel_diff(ref, logits) < TOL
    assert top5(logits) == top5(ref)


def test_wrong_activation_fails_the_tolerance(converted):
    """Negative control: MindSpore's default tanh GELU (or, for the ReLU-trained 768/32, any GELU) is caught."""
    name, ckpt, x, ref = converted
    wrong = "gelu_tanh" if VARIANTS[name]["act"] == "gelu" else "gelu"
    net = create_ms_model(name, checkpoint_path=ckpt, act=wrong)
    assert rel_diff(ref, net(Tensor(x)).asnumpy()) > TOL


# ---- small models: names, strictness ---------------------------------------------------------------------

def small_state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    model = create_model("convmixer_128_4", num_classes=10)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_parameter_names_are_mindcv_layout():
    net = MSConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, num_classes=5)
    names = [n for n, _ in net.parameters_and_names()]
    expected = keymap.convert_state(create_model("convmixer_128_4", dim=16, depth=2, kernel_size=3,
                                                 num_classes=5).state_dict(), "mindspore")
    assert sorted(names) == sorted(expected)
    assert "network.7.weight" in names and "network.3.0.fn.2.moving_variance" in names


def test_ckpt_loads_strictly_with_mindspore_own_loader(tmp_path):
    import mindspore as ms

    write_ms(small_state(), tmp_path / "m.ckpt")
    net = MSConvMixer(**dict(keymap.infer_arch(small_state()), act="gelu"))
    not_loaded, unused = ms.load_param_into_net(net, ms.load_checkpoint(str(tmp_path / "m.ckpt")),
                                                strict_load=True)
    assert not_loaded == [] and unused == []


def test_create_ms_model_refuses_other_dtype(tmp_path):
    write_ms(small_state(torch.float16), tmp_path / "h.ckpt")
    with pytest.raises(CheckpointError, match=r"dtype mismatch: network\.0\.weight Float16 vs model Float32"):
        create_ms_model("convmixer_128_4", num_classes=10, checkpoint_path=tmp_path / "h.ckpt")


def test_create_ms_model_names_mismatched_tensors(tmp_path):
    write_ms(small_state(), tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"shape mismatch: network\.9\.weight \(10, 128\) vs model "
                                              r"\(1000, 128\)"):
        create_ms_model("convmixer_128_4", checkpoint_path=tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"missing 14 tensor\(s\): network\.7\.0\.fn\.0\.weight.*"
                                              r"unexpected 2 tensor\(s\): network\.9\.weight"):
        create_ms_model("convmixer_128_4", num_classes=10, depth=5, checkpoint_path=tmp_path / "m.ckpt")
