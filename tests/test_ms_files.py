"""MindSpore's files without MindSpore (`weights.ms_files`) against MindSpore 2.10 itself: the same bytes as
`save_checkpoint` for the same tensors (slices and CRC included), each side reading the other's files, and
corruption caught. MindSpore is imported inside the tests marked `mindspore` only.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, run_bounded

from convmixer_pt.errors import CheckpointError
from convmixer_pt.weights import ms_files

MS_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool_")


def bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaN payloads, subnormals, -0 included) of `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen) == 1
    size = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * size,), dtype=torch.uint8,
                         generator=gen).view(dtype)[:torch.Size(shape).numel()].reshape(shape).clone()


def mixed_entries() -> list[tuple[str, torch.Tensor | str]]:
    return [
        ("network.0.weight", bits((8, 3, 3, 3), torch.float32, 1)),
        ("network.0.bias", torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-40, 3e38])),
        ("fp16", bits((5, 7), torch.float16, 2)),
        ("bf16", bits((4, 9), torch.bfloat16, 3)),
        ("f64", bits((3,), torch.float64, 4)),
        ("global_step", torch.tensor([123], dtype=torch.int32)),
        ("epoch_num", torch.tensor(-5, dtype=torch.int64)),
        ("scale_sense", torch.tensor(1024.0)),
        ("i8", torch.tensor([-128, 127], dtype=torch.int8)),
        ("u8", torch.tensor([0, 255], dtype=torch.uint8)),
        ("i16", torch.tensor([-3], dtype=torch.int16)),
        ("flags", torch.tensor([True, False, True])),
        ("unicodé.名前", torch.ones(2, 2)),
        ("transposed", torch.arange(12, dtype=torch.float32).reshape(3, 4).t()),
        ("note", "héllo"),
        ("empty_note", ""),
    ]


def ckpt_bytes(entries, **kwargs) -> bytes:
    """What `write_ckpt` writes for `entries`."""
    with tempfile.TemporaryDirectory() as tmp:
        ms_files.write_ckpt(entries, Path(tmp) / "x.ckpt", **kwargs)
        return (Path(tmp) / "x.ckpt").read_bytes()


def to_ms(tensor: torch.Tensor):
    """A MindSpore tensor of exactly these bytes (bfloat16 included), as MindSpore's loader builds them."""
    import mindspore as ms

    name = "bool_" if tensor.dtype == torch.bool else str(tensor.dtype).removeprefix("torch.")
    raw = ms_files.raw_bytes(tensor)
    return ms.Tensor(ms.Tensor.convert_bytes_to_tensor(raw, tuple(tensor.shape), getattr(ms, name)))


def ms_save(entries, path: Path, **kwargs) -> bytes:
    """`save_checkpoint` of `entries`; strings, which it takes only through `append_dict`, must come last."""
    import mindspore as ms

    tensors = [{"name": n, "data": to_ms(v)} for n, v in entries if not isinstance(v, str)]
    strings = {n: v for n, v in entries if isinstance(v, str)}
    ms.save_checkpoint(tensors, str(path), append_dict=strings or None, **kwargs)
    return path.read_bytes()


def assert_same(a: torch.Tensor | str, b: torch.Tensor | str) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
    else:
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)) and ms_files.raw_bytes(a) == ms_files.raw_bytes(b)


# ---- without MindSpore ---------------------------------------------------------------------------------------

def test_every_entry_reads_back_bit_for_bit(tmp_path):
    entries = mixed_entries()
    ms_files.write_ckpt(entries, tmp_path / "a.ckpt")
    got = ms_files.read_ckpt(tmp_path / "a.ckpt")
    assert list(got) == [n for n, _ in entries]
    for name, value in entries:
        assert_same(got[name], value.contiguous() if isinstance(value, torch.Tensor) else value)


def test_slices_are_joined_and_a_missing_one_is_caught_without_crc(tmp_path):
    big = bits((1000,), torch.float32, 5)
    data = ckpt_bytes([("x", big), ("y", torch.ones(3))], crc=False, slice_bytes=1024)
    message = ms_files.Checkpoint()
    message.ParseFromString(data)
    assert [len(v.tensor.tensor_content) for v in message.value] == [1024, 1024, 1024, 928, 12]
    (tmp_path / "sliced.ckpt").write_bytes(data)
    assert_same(ms_files.read_ckpt(tmp_path / "sliced.ckpt")["x"], big)
    pieces = list(ms_files._records([("x", big)], 1024))
    (tmp_path / "short.ckpt").write_bytes(b"".join(pieces[:-1]))
    with pytest.raises(CheckpointError, match=r"entry 'x' holds 3072 bytes where \[1000\] x Float32 needs 4000"):
        ms_files.read_ckpt(tmp_path / "short.ckpt")


def test_corruption_and_truncation_are_caught(tmp_path):
    good = ckpt_bytes([("w", bits((32, 32), torch.float32, 6)), ("b", torch.ones(32))])
    for where, name in ((len(good) // 2, "data"), (len(good) - 1, "crc")):
        bad = bytearray(good)
        bad[where] ^= 0x01
        (tmp_path / f"{name}.ckpt").write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="its CRC32 does not match its content; the file is corrupt"):
            ms_files.read_ckpt(tmp_path / f"{name}.ckpt")
    plain = ckpt_bytes([("w", torch.ones(10, 10))], crc=False)
    for cut in (5, 50, len(plain) - 3):
        (tmp_path / "cut.ckpt").write_bytes(plain[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            ms_files.read_ckpt(tmp_path / "cut.ckpt")


def test_zero_element_tensors_and_duplicate_names_follow_mindspore(tmp_path):
    entries = [("a", torch.ones(2)), ("empty", torch.zeros(0, 3)), ("b", torch.ones(1)), ("a", torch.zeros(3))]
    ms_files.write_ckpt(entries, tmp_path / "d.ckpt")
    got = ms_files.read_ckpt(tmp_path / "d.ckpt")
    assert list(got) == ["a", "b"] and torch.equal(got["a"], torch.zeros(3))


def test_safetensors_crc_hashes_0d_integers_as_mindspore_does():
    assert ms_files.ms_safetensors_crc({"s": torch.tensor(7)}) == zlib.crc32(b"\0" * 7, zlib.crc32(b"s"))
    assert ms_files.ms_safetensors_crc({"f": torch.tensor(7.0)}) == zlib.crc32(struct.pack("<f", 7.0),
                                                                               zlib.crc32(b"f"))
    with pytest.raises(CheckpointError, match="0-d integer -1"):
        ms_files.ms_safetensors_crc({"n": torch.tensor(-1)})


def test_crc_of_0d_integers_costs_no_more_than_their_bytes(tmp_path):
    # MindSpore's CRC counts a 0-d integer n as n zero bytes: 32 such entries of 2^32 (a few hundred bytes of
    # file) took ~50 s to verify. The same value comes from zlib's own arithmetic, in O(log n).
    for n in (0, 1, 7, 8, 9, 255, 4096, 65_537, 3_000_001):
        for start in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
            assert ms_files.crc32_zeros(start, n) == zlib.crc32(b"\0" * n, start), (n, start)
    entries = [(f"network.x{i}", torch.tensor(2**32, dtype=torch.int64)) for i in range(32)]
    path = tmp_path / "zeros.safetensors"
    ms_files.write_ms_safetensors(entries, path)
    proc = run_bounded("convmixer_pt.cli.convert", path, tmp_path / "out.pth", timeout=30)
    assert "'network.x0' is not part of" in one_error_line(proc)  # the CRC matched; the names are not a model


def one_record(tag: str | bytes, dims: list[int], kind: str, content: bytes) -> bytes:
    """A `.ckpt` of one record, written field by field (a tag that is not UTF-8 included)."""
    message = ms_files.Checkpoint()
    record = message.value.add(tag="T")
    record.tensor.dims.extend(dims)
    record.tensor.tensor_type = kind
    record.tensor.tensor_content = content
    data = message.SerializeToString()
    tag = tag if isinstance(tag, bytes) else tag.encode()
    # the tag is field 1 of the Value: length-prefixed; a one-byte length keeps the outer lengths valid
    assert len(tag) == 1
    return data.replace(b"\x0a\x01T", b"\x0a\x01" + tag, 1)


@pytest.mark.parametrize("case, expected", [
    ((["network.0.weight", [-2, -2], "Float32", bytes(16)]), "declares the shape [-2, -2], which no tensor has"),
    ((["network.0.weight", [2**62, 2**62, 0], "Float32", b""]), "declares the shape [4611686018427387904, "),
    ((["network.0.weight", [2**32 - 1] * 3, "Float32", bytes(4)]), "declares the shape [4294967295, "),
    ((["note", [0], "str", b"\xff\xff\xff\xff"]), "entry 'note' is a string but not valid UTF-32 text"),
])
def test_records_that_no_writer_makes_are_one_line(tmp_path, case, expected):
    # Negative or overflowing dims gave RuntimeError tracebacks (after asking for terabytes), an invalid UTF-32
    # string a UnicodeDecodeError; each is now refused before anything of the declared size is made.
    tag, dims, kind, content = case
    message = ms_files.Checkpoint()
    record = message.value.add(tag=tag)
    record.tensor.dims.extend(dims)
    record.tensor.tensor_type = kind
    record.tensor.tensor_content = content
    path = tmp_path / "bad.ckpt"
    path.write_bytes(message.SerializeToString())
    line = one_error_line(run_bounded("convmixer_pt.cli.convert", path, tmp_path / "out.pth", memory_mb=4096,
                                      timeout=60))
    assert line.startswith(f"error: {path}: ") and expected in line, line
    assert not (tmp_path / "out.pth").exists()


def test_a_tag_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "tag.ckpt"
    path.write_bytes(one_record(b"\xff", [1], "Float32", bytes(4)))
    with pytest.raises(CheckpointError, match=r"the name of entry 1, b'\\xff', is not UTF-8 text"):
        ms_files.read_ckpt(path)


def test_metadata_key_is_no_tensor_name(tmp_path):
    with pytest.raises(CheckpointError, match="tensor 'format' has the name of a metadata key"):
        ms_files.write_ms_safetensors([("format", torch.ones(1))], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_pure_python_protobuf_writes_the_same_bytes(tmp_path):
    """The descriptor-built schema needs no generated code: protobuf's pure-Python backend gives the bytes
    of its C (upb) backend."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
            "from google.protobuf.internal import api_implementation as impl;"
            "from test_ms_files import mixed_entries; from convmixer_pt.weights import ms_files;"
            "ms_files.write_ckpt(mixed_entries(), Path(sys.argv[1])); print(impl.Type())")
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "py.ckpt"), str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "python", run.stderr[-2000:]
    assert (tmp_path / "py.ckpt").read_bytes() == ckpt_bytes(mixed_entries())


# ---- against MindSpore ---------------------------------------------------------------------------------------

@pytest.mark.mindspore
def test_schema_is_mindspores():
    from google.protobuf import descriptor_pb2
    from mindspore.train import checkpoint_pb2

    def fields(file_proto):
        out = {}
        stack = [(m.name, m) for m in file_proto.message_type]
        while stack:
            name, message = stack.pop()
            out[name] = sorted((f.name, f.number, f.label, f.type, f.type_name.split(".")[-1],
                                f.HasField("oneof_index")) for f in message.field)
            stack += [(f"{name}.{n.name}", n) for n in message.nested_type]
        return out

    theirs, ours = descriptor_pb2.FileDescriptorProto(), descriptor_pb2.FileDescriptorProto()
    checkpoint_pb2.DESCRIPTOR.CopyToProto(theirs)
    ms_files.Checkpoint.DESCRIPTOR.file.CopyToProto(ours)
    assert fields(theirs) == fields(ours) and {theirs.syntax, ours.syntax} <= {"", "proto2"}


@pytest.mark.mindspore
@pytest.mark.parametrize("crc", [True, False])
def test_ckpt_is_what_save_checkpoint_writes(tmp_path, crc):
    entries = mixed_entries()
    theirs = ms_save(entries, tmp_path / "ms.ckpt", crc_check=crc)
    assert ckpt_bytes(entries, crc=crc) == theirs
    ms_files.write_ckpt(entries, tmp_path / "ours.ckpt", crc=crc)
    assert (tmp_path / "ours.ckpt").read_bytes() == theirs


@pytest.mark.mindspore
def test_each_reads_the_others_files(tmp_path):
    import mindspore as ms

    entries = mixed_entries()
    ms_save(entries, tmp_path / "ms.ckpt")  # no CRC: read as MindSpore reads such files
    got = ms_files.read_ckpt(tmp_path / "ms.ckpt")
    for name, value in entries:
        assert_same(got[name], value.contiguous() if isinstance(value, torch.Tensor) else value)
    ms_files.write_ckpt(entries, tmp_path / "ours.ckpt")
    back = ms.load_checkpoint(str(tmp_path / "ours.ckpt"), crc_check=True)
    assert list(back) == [n for n, _ in entries]
    for name, value in entries:
        if isinstance(value, str):
            assert back[name] == value
        else:
            assert tuple(back[name].shape) == tuple(value.shape) and back[name].get_bytes() == ms_files.raw_bytes(value)


@pytest.mark.mindspore
def test_slices_are_cut_where_mindspore_cuts_them(tmp_path, monkeypatch):
    """MindSpore's slice size is a module global (KiB): at 1 KiB its slicing shows on small tensors."""
    import mindspore as ms
    import mindspore.train.serialization as serialization

    monkeypatch.setattr(serialization, "SLICE_SIZE", 1)
    entries = [("big", bits((1000, 3), torch.float32, 11)), ("bf", bits((1500,), torch.bfloat16, 12)),
               ("small", torch.tensor(1.0)), ("i64", bits((300,), torch.int64, 13))]
    theirs = ms_save(entries, tmp_path / "ms.ckpt", crc_check=True)
    assert ckpt_bytes(entries, slice_bytes=1024) == theirs
    ms_files.write_ckpt(entries, tmp_path / "ours.ckpt", slice_bytes=1024)
    back = ms.load_checkpoint(str(tmp_path / "ours.ckpt"), crc_check=True)
    assert all(back[n].get_bytes() == ms_files.raw_bytes(v) for n, v in entries)


@pytest.mark.mindspore
@pytest.mark.slow
def test_a_tensor_over_512_mib_is_sliced_as_mindspore_slices_it(tmp_path):

    big = torch.arange(ms_files.SLICE_BYTES // 4 + 3, dtype=torch.int32).view(torch.float32)  # 512 MiB + 12 B
    entries = [("head", torch.ones(3)), ("big", big)]
    ms_files.write_ckpt(entries, tmp_path / "ours.ckpt")
    theirs = ms_save(entries, tmp_path / "ms.ckpt", crc_check=True)
    assert (tmp_path / "ours.ckpt").read_bytes() == theirs
    del theirs
    message = ms_files.Checkpoint()
    message.ParseFromString((tmp_path / "ours.ckpt").read_bytes()[:-17])
    assert [len(v.tensor.tensor_content) for v in message.value if v.tag == "big"] == [ms_files.SLICE_BYTES, 12]
    del message
    assert torch.equal(ms_files.read_ckpt(tmp_path / "ms.ckpt")["big"].view(torch.int32), big.view(torch.int32))


@pytest.mark.mindspore
@pytest.mark.filterwarnings("ignore:getName:DeprecationWarning")  # MindSpore's own async-save thread
def test_mindcv_async_save_is_read(tmp_path, monkeypatch):
    """MindCV saves with async_save=True: MindSpore's NumPy path, the same bytes unsliced, row-wise slices
    otherwise, both read back."""
    import mindspore as ms
    import mindspore.train.serialization as serialization

    entries = [("w", bits((6, 5), torch.float32, 21)), ("s", torch.tensor(3))]
    for slice_kib, name in ((512 * 1024, "plain"), (0.05, "sliced")):
        monkeypatch.setattr(serialization, "SLICE_SIZE", slice_kib)
        ms.save_checkpoint([{"name": k, "data": to_ms(v)} for k, v in entries], str(tmp_path / f"{name}.ckpt"),
                           async_save=True, crc_check=True)
        serialization._wait_async_thread_save_ckpt()
        got = ms_files.read_ckpt(tmp_path / f"{name}.ckpt")
        assert all(ms_files.raw_bytes(got[k]) == ms_files.raw_bytes(v) for k, v in entries)
    assert (tmp_path / "plain.ckpt").read_bytes() == ckpt_bytes(entries)
    assert (tmp_path / "sliced.ckpt").read_bytes() != ckpt_bytes(entries)


@pytest.mark.mindspore
def test_mindspore_catches_corruption_only_when_asked(tmp_path):
    """Why the converter checks the CRC itself: MindSpore loads a flipped byte silently by default."""
    import mindspore as ms

    weight = bits((64, 64), torch.float32, 5)
    data = bytearray(ckpt_bytes([("w", weight)]))
    data[len(data) // 2] ^= 0x01
    (tmp_path / "bad.ckpt").write_bytes(bytes(data))
    assert ms.load_checkpoint(str(tmp_path / "bad.ckpt"))["w"].get_bytes() != ms_files.raw_bytes(weight)
    with pytest.raises(ValueError) as caught:
        ms.load_checkpoint(str(tmp_path / "bad.ckpt"), crc_check=True)
    assert "crc check is failed" in str(caught.value.__cause__)
    with pytest.raises(CheckpointError, match="CRC32 does not match"):
        ms_files.read_ckpt(tmp_path / "bad.ckpt")


def _header(blob: bytes) -> tuple[int, dict, bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return length, json.loads(blob[8:8 + length]), blob[8 + length:]


@pytest.mark.mindspore
@pytest.mark.parametrize("crc", [True, False])
def test_safetensors_are_what_save_checkpoint_writes(tmp_path, crc):
    import mindspore as ms

    entries = [("network.z", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", bits((4,), torch.float16, 9)),
               ("step", torch.tensor(7)), ("e", torch.tensor([1, 2], dtype=torch.int32)), ("flag", torch.tensor(True)),
               ("f64", torch.tensor([1.0], dtype=torch.float64))]
    theirs = ms_save(entries, tmp_path / "ms.safetensors", crc_check=crc, format="safetensors")
    ms_files.write_ms_safetensors(entries, tmp_path / "ours.safetensors", crc=crc)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    # MindSpore's own files order their metadata keys at random (a hash map in the safetensors library).
    assert ours == ms_files.canonical_metadata(theirs, ms_files.MS_METADATA_KEYS)
    assert _header(ours)[1] == _header(theirs)[1]
    back = ms.load_checkpoint(str(tmp_path / "ours.safetensors"), format="safetensors", crc_check=crc)
    assert all(back[n].get_bytes() == ms_files.raw_bytes(v) for n, v in entries)


@pytest.mark.mindspore
def test_mindspores_crc_of_a_large_0d_integer_verifies(tmp_path):
    import mindspore as ms

    from convmixer_pt.weights.ms_io import check_safetensors_crc

    entries = [("global_step", torch.tensor(5_000_003)), ("network.w", bits((3,), torch.float32, 15))]
    ms_save(entries, tmp_path / "ms.safetensors", crc_check=True, format="safetensors")
    ms.load_checkpoint(str(tmp_path / "ms.safetensors"), format="safetensors", crc_check=True)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ms.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    check_safetensors_crc(tensors, metadata)
    tensors["global_step"] = torch.tensor(5_000_004)
    with pytest.raises(CheckpointError, match="crc_num"):
        check_safetensors_crc(tensors, metadata)


@pytest.mark.mindspore
def test_mindspore_catches_safetensors_corruption_with_our_crc(tmp_path):
    import mindspore as ms

    ms_files.write_ms_safetensors([("w", bits((32, 32), torch.float32, 14))], tmp_path / "ok.safetensors")
    data = bytearray((tmp_path / "ok.safetensors").read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    ms.load_checkpoint(str(tmp_path / "ok.safetensors"), format="safetensors", crc_check=True)
    with pytest.raises(ValueError, match="crc check has failed"):
        ms.load_checkpoint(str(tmp_path / "bad.safetensors"), format="safetensors", crc_check=True)
