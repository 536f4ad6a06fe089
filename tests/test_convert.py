"""The converter without MindSpore: exact round trips in every dtype, layouts and metadata, MindSpore training
checkpoints, the activation rule, and bad inputs. Nothing here imports MindSpore (test_convert_mindspore.py
has what MindSpore itself must read or write); one test proves it with MindSpore made unimportable.

Small models only; the full-size parity is in test_ms_model.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from convmixer_pt import CheckpointError, ConvMixer, create_model
from convmixer_pt.cli import convert as convert_cli
from convmixer_pt.weights import keymap, ms_files, parity
from convmixer_pt.weights.convert import convert
from convmixer_pt.weights.formats import read_weights, resolve_act

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_ckpt.py"

# Not a registered variant: the converter must infer everything from the shapes.
ARCH = dict(dim=24, depth=3, kernel_size=5, patch_size=4, in_chans=3, num_classes=7)
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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


def write_ms(state: dict[str, torch.Tensor], path: Path, extra: dict | None = None) -> None:
    """A `.ckpt` of timm-layout `state` in MindCV's names, with `extra` entries after them."""
    ms_files.write_ckpt([*keymap.convert_state(state, "mindspore").items(), *(extra or {}).items()], path)


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata in the order the file holds it (the library's reader shuffles it)."""
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]


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
    # What the .ckpt holds, read by the protobuf schema alone: MindCV's names, the dtype, the same bits.
    entries = ms_files.read_ckpt(tmp_path / "mid.ckpt")
    assert list(entries) == list(keymap.convert_state(state, "mindspore"))
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
    torch.save(keymap.convert_state(random_state(), "official"), tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "unknown.safetensors")
    convert(tmp_path / "in.pth", tmp_path / "relu.safetensors", act="relu")
    convert(tmp_path / "relu.safetensors", tmp_path / "relu.ckpt")
    convert(tmp_path / "relu.ckpt", tmp_path / "again.safetensors", act="silu")
    metas = {name: metadata(tmp_path / f"{name}.safetensors") for name in ("unknown", "relu", "again")}
    assert json.loads(metas["unknown"]["arch"]) == ARCH
    assert "act" not in metas["unknown"] and metas["unknown"]["layout"] == "timm"
    assert metas["relu"]["act"] == "relu"
    assert metas["again"]["act"] == "silu"  # --act wins over everything
    assert read_weights(tmp_path / "relu.safetensors").act_source == "file metadata"
    # The same tensors give the same bytes (the safetensors library orders metadata at random).
    convert(tmp_path / "in.pth", tmp_path / "relu2.safetensors", act="relu")
    assert (tmp_path / "relu2.safetensors").read_bytes() == (tmp_path / "relu.safetensors").read_bytes()
    assert list(metas["relu"]) == ["format", "layout", "arch", "act"]


def test_mindspore_layout_safetensors_is_recognised_by_its_names(tmp_path):
    state = random_state(torch.bfloat16)
    torch.save(state, tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "ms.safetensors", layout="mindspore", act="gelu_tanh")
    convert(tmp_path / "in.pth", tmp_path / "ms.ckpt")
    meta = metadata(tmp_path / "ms.safetensors")
    with safe_open(str(tmp_path / "ms.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(tensors) == sorted(ms_files.read_ckpt(tmp_path / "ms.ckpt"))  # MindCV's names, no counters
    # MindSpore's metadata first, in its order, its CRC over sorted names and bytes; then the model's record.
    assert list(meta)[:2] == ["format", "crc_num"] and meta["format"] == "ms"
    assert meta["crc_num"] == str(ms_files.ms_safetensors_crc(tensors))
    assert (meta["layout"], meta["act"], json.loads(meta["arch"])) == ("mindspore", "gelu_tanh", ARCH)
    weights = read_weights(tmp_path / "ms.safetensors")
    assert (weights.framework, weights.act, weights.act_source) == ("mindspore", "gelu_tanh", "file metadata")
    convert(tmp_path / "ms.safetensors", tmp_path / "back.pth")
    assert_bit_identical(state, torch.load(tmp_path / "back.pth", weights_only=True))
    # The same tensors written twice give the same bytes (the library orders metadata at random).
    convert(tmp_path / "in.pth", tmp_path / "ms2.safetensors", layout="mindspore", act="gelu_tanh")
    assert (tmp_path / "ms2.safetensors").read_bytes() == (tmp_path / "ms.safetensors").read_bytes()


@pytest.mark.parametrize(("out", "layout", "fragment"), [
    ("out.ckpt", "timm", "a MindSpore .ckpt output takes --layout mindspore, not 'timm'"),
    ("out.pth", "mindspore", "a PyTorch output takes --layout timm or official, not 'mindspore'"),
])
def test_layout_must_suit_the_output_format(tmp_path, out, layout, fragment):
    torch.save(random_state(), tmp_path / "in.pth")
    with pytest.raises(CheckpointError, match=fragment):
        convert(tmp_path / "in.pth", tmp_path / out, layout=layout)
    assert files(tmp_path) == ["in.pth"]


def test_activation_comes_from_act_then_metadata_then_registry():
    arch_768 = dict(dim=768, depth=32, kernel_size=7, patch_size=7, in_chans=3, num_classes=1000)
    arch_1536 = dict(arch_768, dim=1536, depth=20, kernel_size=9)
    assert resolve_act(arch_768, None, None) == ("relu", "registry: convmixer_768_32")
    assert resolve_act(dict(arch_768, depth=31), None, None) == (None, "unknown")
    assert resolve_act(arch_768, "gelu", None) == ("gelu", "file metadata")
    assert resolve_act(arch_768, "not-an-activation", None) == ("relu", "registry: convmixer_768_32")
    assert resolve_act(arch_768, "gelu", "silu") == ("silu", "--act")
    # MindSpore training state: MindCV's cell runs ReLU for 768/32 (nothing to ask), tanh GELU for the others.
    assert resolve_act(arch_768, None, None, training_state=True) == ("relu", "registry: convmixer_768_32")
    assert resolve_act(arch_1536, None, "gelu_tanh", training_state=True) == ("gelu_tanh", "--act")
    with pytest.raises(CheckpointError, match=r"holds MindSpore training state and cannot say which GELU it was "
                                              r"trained with: pass --act gelu_tanh .*or --act gelu"):
        resolve_act(arch_1536, None, None, training_state=True)


def test_create_model_reads_every_format_and_keeps_the_recorded_activation(tmp_path):
    model = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2).eval()
    torch.save(model.state_dict(), tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "w.ckpt")
    convert(tmp_path / "in.pth", tmp_path / "w.safetensors", layout="mindspore", act="gelu_tanh")
    x = torch.randn(2, 3, 16, 16)
    from_ckpt = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2, checkpoint_path=tmp_path / "w.ckpt")
    assert from_ckpt.act == "gelu" and torch.equal(from_ckpt.eval()(x), model(x))
    tanh = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2, checkpoint_path=tmp_path / "w.safetensors")
    assert tanh.act == "gelu_tanh"  # recorded in the file, so not the variant's exact GELU
    forced = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2, act="gelu",
                          checkpoint_path=tmp_path / "w.safetensors")
    assert forced.act == "gelu"


# ---- MindSpore training checkpoints ------------------------------------------------------------------------

def training_entries(state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None = None) -> dict:
    """What `save_checkpoint(train_cell)` of MindCV's training step holds beside the weights (one step of
    AdamWeightDecay, a dynamic loss scale; with EMA MindCV's `ema.` copy and counter), in its order."""
    named = keymap.convert_state(state, "mindspore")
    trainable = {k: v for k, v in named.items() if not k.endswith(("moving_mean", "moving_variance"))}
    extra = {"scale_sense": torch.tensor(1024.0)}
    if ema is not None:
        extra["updates"] = torch.tensor(1.0)
        extra.update({f"ema.{k}": v for k, v in keymap.convert_state(ema, "mindspore").items()})
    extra.update({"global_step": torch.tensor([1], dtype=torch.int32), "learning_rate": torch.tensor(1e-3)})
    extra.update({f"adam_m.{k}": torch.zeros_like(v) for k, v in trainable.items()})
    extra.update({f"adam_v.{k}": torch.ones_like(v) for k, v in trainable.items()})
    extra.update({"current_iterator_step": torch.tensor(2, dtype=torch.int32),
                  "last_overflow_iterator_step": torch.tensor(0, dtype=torch.int32)})
    return extra


def test_training_checkpoint_gives_its_weights_and_says_what_was_dropped(tmp_path, capfd):
    state, ema = random_state(seed=3), random_state(seed=4)
    write_ms(state, tmp_path / "train.ckpt", training_entries(state, ema))
    rc, out, err = run_cli(capfd, tmp_path / "train.ckpt", tmp_path / "w.pth", "--act", "gelu_tanh")
    assert rc == 0, err
    assert_bit_identical(state, torch.load(tmp_path / "w.pth", weights_only=True))
    assert err.splitlines() == [
        f"note: {tmp_path / 'train.ckpt'}: dropped 110 entries of MindSpore training state: 61 optimizer (adam_m.*, "
        "adam_v.*, learning_rate); 1 step (global_step); 3 loss scale (current_iterator_step, "
        "last_overflow_iterator_step, scale_sense); 45 EMA (ema.*, updates)",
        f"note: {tmp_path / 'w.pth'}: this format cannot record the activation, and read back without --act it is "
        "taken for GELU (no registered variant has these shapes): state gelu_tanh when loading or converting it "
        "(--act gelu_tanh, act='gelu_tanh'), or write .safetensors, which records it"]
    assert out.endswith("activation gelu_tanh (--act), not recorded: this format cannot hold it\n")

    rc, _, err = run_cli(capfd, tmp_path / "train.ckpt", tmp_path / "ema.safetensors", "--act", "gelu_tanh", "--ema")
    assert rc == 0, err
    assert "44 non-EMA weights (network.*); 61 optimizer" in err and "1 EMA (updates)" in err
    assert_bit_identical(ema, read_weights(tmp_path / "ema.safetensors").state)


def test_training_checkpoint_without_act_asks_for_it(tmp_path, capfd):
    state = random_state()
    write_ms(state, tmp_path / "train.ckpt", training_entries(state))
    rc, out, err = run_cli(capfd, tmp_path / "train.ckpt", tmp_path / "w.pth")
    assert rc == 1 and out == ""
    assert err.startswith(f"error: {tmp_path / 'train.ckpt'}: holds MindSpore training state and cannot say which "
                          "GELU it was trained with")
    assert len(err.splitlines()) == 1 and files(tmp_path) == ["train.ckpt"]


@pytest.mark.parametrize(("extra", "ema", "fragment"), [
    ({"my_counter": torch.tensor(3)}, False,
     "entry 'my_counter' is neither a ConvMixer weight (network.*) nor MindSpore training state"),
    ({"adam_m.head.weight": torch.zeros(7, 24), "note": "text"}, False, "entry 'adam_m.head.weight' (and 1 more)"),
    ({"global_step": torch.tensor([1], dtype=torch.int32)}, True,
     "EMA weights were asked for, but it has none (no ema.network.* entries)"),
])
def test_training_checkpoint_refuses_what_it_cannot_place(tmp_path, extra, ema, fragment):
    write_ms(random_state(), tmp_path / "train.ckpt", extra)
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
                       .replace("*", r"\*")):
        read_weights(tmp_path / "train.ckpt", use_ema=ema, act="gelu")


def test_optimizer_file_without_weights_is_named(tmp_path):
    state = keymap.convert_state(random_state(), "mindspore")
    ms_files.write_ckpt([(f"adam_m.{k}", v) for k, v in state.items()] + [("global_step", torch.tensor([9]))],
                        tmp_path / "optim.ckpt")
    with pytest.raises(CheckpointError, match=r"holds no network\.\* weights \(found adam_m\.network\.0\.weight"):
        read_weights(tmp_path / "optim.ckpt", act="gelu")


# ---- the CLI -----------------------------------------------------------------------------------------------

def run_cli(capfd, *args) -> tuple[int, str, str]:
    rc = convert_cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def test_cli_verify_and_summary_without_mindspore_on_either_side(tmp_path, capfd):
    torch.save(keymap.convert_state(random_state(special=False), "official"), tmp_path / "in.pth")
    rc, out, err = run_cli(capfd, tmp_path / "in.pth", tmp_path / "out.safetensors", "--verify")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("match: max relative logit difference 0 (tolerance 1e-05)")
    assert f"wrote {tmp_path / 'out.safetensors'}: 51 tensors" in out
    assert "activation unknown (no record, no --act, no registered variant of these shapes), none recorded" in out
    assert err.startswith("note: no registered variant has these shapes") and len(err.splitlines()) == 1


def test_cli_failed_verification_writes_nothing(tmp_path, capfd, monkeypatch):
    torch.save(random_state(special=False), tmp_path / "in.pth")
    (tmp_path / "out.pth").write_bytes(b"old")
    monkeypatch.setattr(parity, "DEFAULT_TOL", -1.0)  # even identical logits fail
    rc, out, err = run_cli(capfd, tmp_path / "in.pth", tmp_path / "out.pth", "--verify", "--force", "--act",
                           "gelu")
    assert rc == 1
    assert out.startswith("DIFFER:")
    assert err.startswith(f"error: {tmp_path / 'out.pth'}: not written") and len(err.splitlines()) == 1
    assert (tmp_path / "out.pth").read_bytes() == b"old"
    assert files(tmp_path) == ["in.pth", "out.pth"]


def test_verify_runs_each_file_with_its_own_activation(tmp_path, capfd):
    """A file that records GELU, stated to be SiLU: the two models differ, and --verify says why."""
    torch.save(random_state(special=False), tmp_path / "in.pth")
    convert(tmp_path / "in.pth", tmp_path / "gelu.safetensors", act="gelu")
    rc, out, err = run_cli(capfd, tmp_path / "gelu.safetensors", tmp_path / "out.pth", "--verify", "--act", "silu")
    assert rc == 1 and out.startswith("DIFFER:")
    assert err.rstrip().endswith("the input runs gelu (file metadata), the output silu (--act)")
    assert files(tmp_path) == ["gelu.safetensors", "in.pth"]


def _truncated(path: Path, good: Path, keep: float) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _unknown_type(path: Path) -> None:
    message = ms_files.Checkpoint()
    record = message.value.add(tag="network.0.weight")
    record.tensor.dims.append(1)
    record.tensor.tensor_type, record.tensor.tensor_content = "Complex64", b"\0" * 8
    path.write_bytes(message.SerializeToString())


BAD_INPUTS = {
    # name: (how to make IN from a good .pth and .ckpt, output name, expected message fragment)
    "truncated pth": (lambda p, pth, ckpt: _truncated(p, pth, 0.5), "in.pth", "out.ckpt",
                      "truncated or corrupt"),
    "truncated ckpt": (lambda p, pth, ckpt: _truncated(p, ckpt, 0.5), "in.ckpt", "out.pth",
                       "cannot read it as a MindSpore checkpoint; the file is truncated or corrupt"),
    "garbage": (lambda p, pth, ckpt: p.write_bytes(b"not a checkpoint " * 100), "in.pth", "out.ckpt",
                "not a PyTorch, safetensors or MindSpore checkpoint"),
    "garbage ckpt": (lambda p, pth, ckpt: p.write_bytes(b"\n\xff\xff\xff\x0f" + b"x" * 100), "in.ckpt",
                     "out.pth", "cannot read it as a MindSpore checkpoint"),
    "unknown tensor type": (lambda p, pth, ckpt: _unknown_type(p), "in.ckpt", "out.pth",
                            "entry 'network.0.weight' has MindSpore type 'Complex64'"),
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
    "missing tensor in ckpt": (lambda p, pth, ckpt: write_ms(
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


# ---- CRC -----------------------------------------------------------------------------------------------------

def _flip(path: Path, out: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    out.write_bytes(bytes(data))


def test_ckpt_crc_is_written_and_checked(tmp_path, good_files):
    data = good_files[1].read_bytes()
    assert data[-17:-10] == b"crc_num"
    _flip(good_files[1], tmp_path / "flipped.ckpt", 0.5)  # one flipped bit inside a tensor
    with pytest.raises(CheckpointError, match="flipped.ckpt: its CRC32 does not match its content; the file is "
                                              "corrupt"):
        read_weights(tmp_path / "flipped.ckpt")


def test_mindspore_safetensors_crc_is_checked(tmp_path, good_files):
    convert(good_files[0], tmp_path / "ms.safetensors", layout="mindspore")
    _flip(tmp_path / "ms.safetensors", tmp_path / "flipped.safetensors", 0.9)
    with pytest.raises(CheckpointError, match=r"flipped.safetensors: its CRC32 \(crc_num\) does not match its "
                                              r"content; the file is corrupt"):
        read_weights(tmp_path / "flipped.safetensors")


# ---- without MindSpore -------------------------------------------------------------------------------------

NO_MINDSPORE = """
import sys
sys.modules["mindspore"] = None  # any `import mindspore` now raises ImportError
from pathlib import Path
import torch
from convmixer_pt.cli import convert, export_mindir, parity, validate
from convmixer_pt.weights import keymap
tmp = Path(sys.argv[1])
torch.manual_seed(0)
from convmixer_pt import create_model
state = create_model("convmixer_128_4", num_classes=5, dim=16, depth=2).state_dict()
torch.save(keymap.convert_state(state, "official"), tmp / "official.pth.tar")
assert convert.main([str(tmp / "official.pth.tar"), str(tmp / "w.ckpt")]) == 0
assert convert.main([str(tmp / "w.ckpt"), str(tmp / "w.pth"), "--layout", "official"]) == 0
assert convert.main([str(tmp / "w.ckpt"), str(tmp / "w.safetensors"), "--layout", "mindspore"]) == 0
back = torch.load(tmp / "w.pth", weights_only=True)
ref = torch.load(tmp / "official.pth.tar", weights_only=True)
assert list(back) == list(ref)
assert all(torch.equal(back[k], ref[k]) for k in ref if not k.endswith("num_batches_tracked")), "not bit-exact"
print("@@ converted")
for name, main, args in [
        ("verify", convert.main, [str(tmp / "official.pth.tar"), str(tmp / "v.ckpt"), "--verify"]),
        ("parity", parity.main, [str(tmp / "official.pth.tar"), str(tmp / "w.ckpt")]),
        ("export", export_mindir.main, [str(tmp / "w.ckpt"), str(tmp / "w.mindir")]),
        ("validate", validate.main, ["--model", "convmixer_128_4", "--checkpoint", str(tmp / "w.ckpt"),
                                     "--data-dir", str(tmp)])]:
    assert main(args) == 1, name
    print("@@", name, "refused")
assert not [m for m in sys.modules if m == "mindspore" and sys.modules[m] is not None or m.startswith("mindspore.")]
"""


@pytest.mark.slow
def test_package_converts_without_mindspore_and_names_what_needs_it(tmp_path):
    run = subprocess.run([sys.executable, "-c", NO_MINDSPORE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [line for line in run.stdout.splitlines() if line.startswith("@@ ")] == [
        "@@ converted", "@@ verify refused", "@@ parity refused", "@@ export refused", "@@ validate refused"]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4 and all('needs MindSpore, which is not installed here: pip install ".[mindspore]" in a '
                                    'checkout of convmixer_pt, or pip install "dist/convmixer_pt-<version>-py3-none-'
                                    'any.whl[mindspore]" after python -m build' in line for line in errors), run.stderr
    assert not (tmp_path / "v.ckpt").exists() and not (tmp_path / "w.mindir").exists()


@pytest.mark.slow
def test_mindspore_is_imported_only_when_needed():
    code = ("import sys, convmixer_pt, convmixer_pt.weights.convert, convmixer_pt.cli.convert, "
            "convmixer_pt.cli.export_mindir, convmixer_pt.cli.validate, convmixer_pt.cli.parity; "
            "print('mindspore' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "False", run.stderr


def test_tensors_sharing_storage_are_written_as_copies(tmp_path, capfd):
    # One tensor under two names (torch.save keeps the sharing): safetensors refused it and the converter
    # reported "OUT: cannot write it".
    state = random_state()
    state["stem.2.running_var"] = state["stem.2.running_mean"]
    src = tmp_path / "shared.pth"
    torch.save(state, src)
    for out, layout in (("t.safetensors", "timm"), ("m.safetensors", "mindspore")):
        assert convert_cli.main([str(src), str(tmp_path / out), "--layout", layout]) == 0, capfd.readouterr().err
        back = read_weights(tmp_path / out).state
        assert torch.equal(back["stem.2.running_var"], state["stem.2.running_mean"])
        assert_bit_identical({k: v for k, v in back.items() if not k.endswith("num_batches_tracked")},
                             {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})


def test_a_bad_environment_variable_is_not_blamed_on_the_file(tmp_path):
    src = tmp_path / "in.pth"
    torch.save(random_state(), src)
    proc = subprocess.run([sys.executable, "-m", "convmixer_pt.cli.convert", str(src), str(tmp_path / "o.pth")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CONVMIXER_FAST": "maybe"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: CONVMIXER_FAST='maybe' is not one of 1/true/on or 0/false/off"
