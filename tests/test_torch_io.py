"""Checkpoint formats, wrappers and prefixes load; bad files fail with one clear message and run no code."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from helpers import one_error_line, randomize_bn, run_bounded
from safetensors.torch import save_file

from convmixer_pt import CheckpointError, create_model
from convmixer_pt.files import OutputExistsError, atomic_path
from convmixer_pt.weights import keymap
from convmixer_pt.weights.torch_io import file_format, read_state_dict

SMALL = dict(name="convmixer_128_4", num_classes=5, dim=16, depth=2)


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    args = dict(SMALL)
    return randomize_bn(create_model(args.pop("name"), **args), torch.Generator().manual_seed(seed)).eval()


def load(path, **kw) -> torch.nn.Module:
    args = dict(SMALL)
    return create_model(args.pop("name"), checkpoint_path=path, **args, **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(sa[k], sb[k]), k


def test_official_layout_is_recognised_by_content_not_name(tmp_path) -> None:
    model = small_model()
    path = tmp_path / "weights.bin"
    torch.save(keymap.convert_state(model.state_dict(), "official"), path)
    assert_same_weights(load(path), model)


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_training_checkpoint_wrappers_and_prefixes(tmp_path, wrap: str) -> None:
    model = small_model()
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    ckpt = {wrap: state, "epoch": 3, "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="convmixer_128_4", lr=0.01), "version": 2, "metric": 12.5}
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save(ckpt, path)
    assert_same_weights(load(path), model)


def test_ema_weights_are_an_explicit_choice(tmp_path) -> None:
    model, ema = small_model(0), small_model(1)
    path = tmp_path / "train.pth"
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    assert_same_weights(load(path), model)
    assert_same_weights(load(path, use_ema=True), ema)
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"EMA weights were asked for, but it has none"):
        load(path, use_ema=True)


def test_missing_tensor_names_the_key(tmp_path) -> None:
    state = small_model().state_dict()
    del state["blocks.1.0.fn.2.running_var"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg and "missing 1 tensor(s): blocks.1.0.fn.2.running_var" in msg
    assert "\n" not in msg


def test_wrong_shape_names_key_and_both_shapes(tmp_path) -> None:
    path = tmp_path / "shape.pth"
    torch.save(small_model().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch: head\.weight \(5, 16\) vs model \(7, 16\)"):
        create_model("convmixer_128_4", num_classes=7, dim=16, depth=2, checkpoint_path=path)


def test_extra_block_is_unexpected(tmp_path) -> None:
    torch.manual_seed(0)
    deeper = create_model("convmixer_128_4", num_classes=5, dim=16, depth=3)
    path = tmp_path / "deeper.pth"
    torch.save(deeper.state_dict(), path)
    with pytest.raises(CheckpointError, match=r"unexpected 14 tensor\(s\): blocks\.2\.0\.fn\.0\.weight"):
        load(path)


@pytest.mark.parametrize("kind", ["zip", "safetensors"])
def test_truncated_file_fails_clearly(tmp_path, kind: str) -> None:
    state = small_model().state_dict()
    path = tmp_path / ("w.pth" if kind == "zip" else "w.safetensors")
    if kind == "zip":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt"):
        load(path)


def test_garbage_and_empty_files(tmp_path) -> None:
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"unknown file header"):
        load(garbage)
    empty = tmp_path / "e.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty or truncated"):
        load(empty)
    with pytest.raises(CheckpointError, match=r"no such file"):
        load(tmp_path / "absent.pth")


class _Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_no_code(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": small_model().state_dict(), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"refused to unpickle it: it references posix\.system"):
        load(path)
    assert not marker.exists()


def test_foreign_tensor_names_are_refused(tmp_path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"unrecognised tensor name 'conv1\.weight'"):
        read_state_dict(path)


def test_file_format_sniffing(tmp_path) -> None:
    state = {"head.weight": torch.zeros(2, 2)}
    torch.save(state, tmp_path / "a.safetensors")  # misleading suffix: the content decides
    save_file(state, str(tmp_path / "b.pth"))
    assert file_format(tmp_path / "a.safetensors") == "torch-zip"
    assert file_format(tmp_path / "b.pth") == "safetensors"


def test_atomic_path_leaves_nothing_on_failure(tmp_path) -> None:
    target = tmp_path / "out.pth"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]
    with pytest.raises(OutputExistsError, match=r"already exists"), atomic_path(target, overwrite=False):
        pass


def test_training_checkpoints_record_their_activation(tmp_path) -> None:
    state = small_model().state_dict()
    ours, timm_style, bare = tmp_path / "last.pth", tmp_path / "timm.pth.tar", tmp_path / "bare.pth"
    torch.save({"model": state, "arch": {"dim": 16, "act": "silu"}}, ours)
    torch.save({"state_dict": state, "arch": "convmixer_768_32"}, timm_style)
    torch.save(state, bare)
    assert read_state_dict(ours)[1]["act"] == "silu"
    assert read_state_dict(timm_style)[1]["act"] == "relu"
    assert "act" not in read_state_dict(bare)[1]


NOT_WEIGHTS = {
    "int8": (lambda t: t.to(torch.int8), "has dtype int8; weights are float32, float16 or bfloat16"),
    "uint8": (lambda t: t.to(torch.uint8), "has dtype uint8; weights are float32, float16 or bfloat16"),
    "int16": (lambda t: t.to(torch.int16), "has dtype int16; weights are float32, float16 or bfloat16"),
    "bool": (lambda t: t.bool(), "has dtype bool; weights are float32, float16 or bfloat16"),
    "float8": (lambda t: t.to(torch.float8_e4m3fn),
               "has dtype float8_e4m3fn; weights are float32, float16 or bfloat16"),
    "complex": (lambda t: t.to(torch.complex64), "has dtype complex64; weights are float32, float16 or bfloat16"),
    "float64": (lambda t: t.double(), "has dtype float64; weights are float32, float16 or bfloat16 (convert it "
                                      "with --dtype float32)"),
    "sparse": (lambda t: t.to_sparse(), "is a sparse_coo tensor, not a dense one"),
    "meta": (lambda t: torch.empty(t.shape, device="meta"), "holds no data (a meta tensor)"),
    "expanded": (lambda t: torch.zeros(1).expand(t.shape), "has shape (16, 3, 2, 2) (768 bytes) but its storage "
                                                           "holds 4 bytes: an expanded or truncated tensor"),
}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("kind", sorted(NOT_WEIGHTS))
def test_tensors_that_are_not_weights_are_refused_by_name(tmp_path, kind: str) -> None:
    """Before: int8 loaded as zeros, bool as ones, a meta tensor as nothing; now one error naming the tensor."""
    make, message = NOT_WEIGHTS[kind]
    state = small_model().state_dict()
    state["stem.0.weight"] = make(state["stem.0.weight"])
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "bad.pth")
    assert str(info.value) == f"{tmp_path / 'bad.pth'}: tensor 'stem.0.weight' {message}"


def test_float64_loads_into_a_model_where_it_fits_float32(tmp_path) -> None:
    model = small_model()
    state = {k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "f64.pth")
    assert_same_weights(load(tmp_path / "f64.pth").eval(), model)  # float64 -> float32, as the model asks
    state["head.bias"][0] = 1e300
    torch.save(state, tmp_path / "huge.pth")
    with pytest.raises(CheckpointError, match=r"tensor 'head\.bias' holds 1 value\(s\) up to 1e\+300 in magnitude, "
                                              r"beyond float32's largest"):
        load(tmp_path / "huge.pth")


def test_an_expanded_head_is_refused_before_anything_is_allocated(tmp_path) -> None:
    """65 KB on disk claiming a 2**34-class head: refused from its storage size, not allocated (4.4 TB)."""
    from convmixer_pt.weights.formats import read_weights

    state = small_model().state_dict()
    state["head.weight"] = torch.zeros(1).expand(2**34, 16)
    state["head.bias"] = torch.zeros(1).expand(2**34)
    torch.save(state, tmp_path / "huge.pth")
    assert (tmp_path / "huge.pth").stat().st_size < 100_000
    with pytest.raises(CheckpointError, match=r"tensor 'head\.weight' has shape \(17179869184, 16\) "
                                              r"\(1,099,511,627,776 bytes\) but its storage holds 4 bytes"):
        read_weights(tmp_path / "huge.pth")


def with_pickle(path, pickled: bytes) -> None:
    """Rewrite the zip checkpoint at `path` with `pickled` as its data.pkl (the rest kept)."""
    import io
    import zipfile

    entries = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            entries[name] = pickled if name.endswith("/data.pkl") else archive.read(name)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("depth", [10_000, 200_000])
def test_deeply_nested_pickle_is_refused_without_recursion(tmp_path, depth: int) -> None:
    # A dict keyed by a tuple nested `depth` deep (one byte a level): hashing the key inside the unpickler
    # overflowed the C stack (a segfault at 200,000), printing it raised RecursionError (10,000).
    path = tmp_path / "deep.pth"
    torch.save({}, path)
    with_pickle(path, b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s.")
    proc = run_bounded("convmixer_pt.cli.convert", path, tmp_path / "out.ckpt", timeout=60)
    line = one_error_line(proc)
    assert str(path) in line and "nests containers more than 100 deep" in line
    assert not (tmp_path / "out.ckpt").exists()


def test_pickle_depth_counts_nesting_and_late_mutation(tmp_path) -> None:
    import io
    import pickle

    from convmixer_pt.weights.torch_io import pickle_depth

    def depth(obj) -> int:
        return pickle_depth(io.BytesIO(pickle.dumps(obj, protocol=2)))

    assert (depth(1), depth((1,)), depth({"a": [1, {"b": (2,)}]})) == (0, 1, 4)
    shared = [1]
    assert depth([shared, shared, shared]) == 2  # the memo repeats an object without nesting it deeper
    # A list put in a tuple, then filled through the memo with a tuple nested 9 deep: the outer tuple nests 11
    # deep although it was built when the list was empty.
    late = b"\x80\x02]q\x00\x85q\x010h\x00)" + b"\x85" * 9 + b"a0h\x01."
    assert len(pickle.loads(late)[0][0]) == 1
    assert pickle_depth(io.BytesIO(late)) >= 11
    # A training checkpoint as timm's fork writes it stays well within the limit and loads.
    model = small_model()
    path = tmp_path / "train.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=[0.1, 0.2])}, path)
    assert_same_weights(load(path), model)


def test_a_huge_block_index_is_refused_before_building_anything(tmp_path) -> None:
    # 7 KB naming block 999,999,999 built a 10^9-entry name table (official layout) or a 10^9-block model on
    # the meta device (timm layout).
    for layout, name in (("timm", "blocks.999999999.1.weight"), ("official", "999999999.0.fn.0.weight")):
        state = keymap.convert_state(small_model().state_dict(), layout)
        state[name] = torch.zeros(1)
        path = tmp_path / f"{layout}.pth"
        torch.save(state, path)
        proc = run_bounded("convmixer_pt.cli.convert", path, tmp_path / "out.ckpt", memory_mb=4096, timeout=60)
        line = one_error_line(proc)
        assert f"tensor {name!r} puts a block at index 999999999" in line and str(path) in line, line
        with pytest.raises(CheckpointError, match="puts a block at index"):
            create_model("convmixer_128_4", num_classes=5, dim=16, depth=2, checkpoint_path=path)
    assert not (tmp_path / "out.ckpt").exists()
