"""MindSpore's two checkpoint files, read and written byte for byte without MindSpore.

- `.ckpt`: protobuf (proto2) `Checkpoint` messages, one `Value` per record, concatenated, then optionally
  MindSpore's CRC trailer `b"crc_num"` + a 10-byte big-endian CRC32 of everything before it.
- safetensors as MindSpore writes them: metadata `{"format": "ms", "crc_num": "<decimal>"}`, its own CRC over
  the sorted names and their bytes.

What this module writes is what MindSpore 2.10's `save_checkpoint` writes for the same tensors (the tests
compare the bytes), so a MindSpore user cannot tell the files apart, and what MindSpore writes reads back bit for
bit. The schema is this package's own copy of MindSpore's `checkpoint.proto`, built with protobuf's descriptor
API in a private pool: MindSpore's generated `checkpoint_pb2.py` refuses protobuf runtimes older than the one
it was generated with, and a private pool cannot clash with it when both are loaded in one process.
Tensors go through raw bytes only (bfloat16, NaN payloads and -0.0 survive); entries are name -> torch tensor
or `str` (MindSpore stores strings too, e.g. from `append_dict`).
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from safetensors.torch import save

from ..errors import CheckpointError, brief

if sys.byteorder != "little":  # MindSpore writes host order; every host it supports is little-endian
    raise ImportError("convmixer_pt's MindSpore file support assumes a little-endian host")

Entry = torch.Tensor | str

# `save_checkpoint` cuts a tensor's bytes into records of 1024 * SLICE_SIZE bytes (SLICE_SIZE = 512 * 1024,
# "in KB"), each repeating the tag, the full dims and the type: 512 MiB whatever the dtype.
SLICE_BYTES = 1024 * 512 * 1024
CRC_TRAILER = b"crc_num"
_CRC_DIGITS = 10  # crc_num.to_bytes(10, "big")

# `tensor_type` strings: `str(mindspore.Tensor.dtype)`, the loader's table.
TYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "Float32", torch.float16: "Float16", torch.bfloat16: "BFloat16", torch.float64: "Float64",
    torch.int8: "Int8", torch.uint8: "UInt8", torch.int16: "Int16", torch.int32: "Int32", torch.int64: "Int64",
    torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64", torch.bool: "Bool",
}
DTYPES: dict[str, torch.dtype] = {v: k for k, v in TYPE_NAMES.items()}
_INTEGERS = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
             torch.uint64}

# MindSpore's metadata keys, in the order its `save_checkpoint` inserts them. Its loader looks every tensor
# name up in the metadata, so no tensor may carry one of these names.
MS_METADATA_KEYS = ("format", "remove_redundancy", "crc_num")


def _schema() -> type:
    """`Checkpoint` as in MindSpore's checkpoint.proto (proto2: `dims` unpacked, as MindSpore writes it)."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="convmixer_pt/mindspore_checkpoint.proto",
                                               package="convmixer_pt.mindspore", syntax="proto2")

    def add(message: Any, name: str, number: int, label: int, kind: int, type_name: str = "",
            oneof: int | None = None) -> None:
        f = message.field.add(name=name, number=number, label=label, type=kind)
        if type_name:
            f.type_name = f".{proto.package}.{type_name}"
        if oneof is not None:
            f.oneof_index = oneof

    tensor = proto.message_type.add(name="TensorProto")
    add(tensor, "dims", 1, field.LABEL_REPEATED, field.TYPE_INT64)
    add(tensor, "tensor_type", 2, field.LABEL_REQUIRED, field.TYPE_STRING)
    add(tensor, "tensor_content", 3, field.LABEL_REQUIRED, field.TYPE_BYTES)
    map_tensor = proto.message_type.add(name="MapTensorProto")
    add(map_tensor, "tensor", 1, field.LABEL_REPEATED, field.TYPE_MESSAGE, "TensorProto")
    checkpoint = proto.message_type.add(name="Checkpoint")
    value = checkpoint.nested_type.add(name="Value")
    value.oneof_decl.add(name="value")
    add(value, "tag", 1, field.LABEL_REQUIRED, field.TYPE_STRING)
    add(value, "tensor", 2, field.LABEL_OPTIONAL, field.TYPE_MESSAGE, "TensorProto", oneof=0)
    add(value, "maptensor", 3, field.LABEL_OPTIONAL, field.TYPE_MESSAGE, "MapTensorProto", oneof=0)
    add(checkpoint, "value", 1, field.LABEL_REPEATED, field.TYPE_MESSAGE, "Checkpoint.Value")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    descriptor = pool.FindMessageTypeByName(f"{proto.package}.Checkpoint")
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


Checkpoint = _schema()


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """Row-major, little-endian bytes of a tensor: no numeric conversion."""
    flat = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def unshared(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Detached contiguous tensors, none sharing storage with another: a checkpoint may hold one tensor under
    two names (or views of one storage), which safetensors refuses to write; the values are unchanged."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors:
        tensor = tensor.detach().contiguous()
        if tensor.numel():
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:
                tensor = tensor.clone()
                pointer = tensor.untyped_storage().data_ptr()
            seen.add(pointer)
        out[name] = tensor
    return out


def from_raw(data: bytes | bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor owning a copy of `data`, read as `dtype` of `shape`."""
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def type_name(name: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in TYPE_NAMES:
        raise CheckpointError(f"tensor {brief(name)} has dtype {str(tensor.dtype).removeprefix('torch.')}, which "
                              "MindSpore checkpoints cannot hold")
    return TYPE_NAMES[tensor.dtype]


# ---- .ckpt ---------------------------------------------------------------------------------------------------

def _records(entries: Iterable[tuple[str, Entry]], slice_bytes: int) -> Iterator[bytes]:
    """One serialized single-`Value` `Checkpoint` per record, as `save_checkpoint` writes them: a duplicate name
    keeps its first position and its last value; a zero-element tensor writes no record at all."""
    ordered: dict[str, Entry] = {}
    for name, value in entries:
        ordered[name] = value
    for name, value in ordered.items():
        if isinstance(value, str):
            # MindSpore stores np.array(s).tobytes(): UTF-32-LE, the empty string as one NUL code point.
            dims, kind, pieces = [0], "str", [value.encode("utf-32-le") or b"\0" * 4]
        else:
            kind, raw = type_name(name, value), raw_bytes(value)
            dims, pieces = list(value.shape), [raw[i:i + slice_bytes] for i in range(0, len(raw), slice_bytes)]
        for piece in pieces:
            message = Checkpoint()
            record = message.value.add(tag=name)
            record.tensor.dims.extend(dims)
            record.tensor.tensor_type = kind
            record.tensor.tensor_content = piece
            yield message.SerializeToString()


def write_ckpt(entries: Iterable[tuple[str, Entry]], path: str | Path, crc: bool = True, *,
               slice_bytes: int = SLICE_BYTES) -> int:
    """Write `entries` (name, tensor or str) in order, as `save_checkpoint([{"name", "data"}, ...],
    crc_check=crc)` does; returns the number of bytes written. `path` is written in place."""
    checksum, size = 0, 0
    with open(path, "wb") as f:
        for record in _records(entries, slice_bytes):
            checksum = zlib.crc32(record, checksum)
            size += f.write(record)
        if crc:
            size += f.write(CRC_TRAILER + checksum.to_bytes(_CRC_DIGITS, "big"))
    return size


def has_crc(data: bytes) -> bool:
    """MindSpore's own test for the trailer: the 7 bytes `crc_num` at offset -17."""
    return len(data) >= 17 and data[-17:-10] == CRC_TRAILER


def check_ckpt_crc(data: bytes) -> None:
    """Verify the CRC32 a `.ckpt`'s bytes end with, if they carry one."""
    if has_crc(data) and zlib.crc32(memoryview(data)[:-17]) != int.from_bytes(data[-_CRC_DIGITS:], "big"):
        raise CheckpointError("its CRC32 does not match its content; the file is corrupt")


def read_ckpt(path: str | Path) -> dict[str, Entry]:
    """Every entry of a `.ckpt`, in file order, bit for bit; the CRC is checked where the file carries one
    (MindSpore checks it only with `crc_check=True`; a corrupt byte then loads silently)."""
    data = Path(path).read_bytes()
    check_ckpt_crc(data)
    body = memoryview(data)[:-17] if has_crc(data) else memoryview(data)
    message = Checkpoint()
    try:
        message.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read it as a MindSpore checkpoint; the file is truncated or corrupt "
                              f"({reason})") from None
    if len(body) and not len(message.value):
        raise CheckpointError("cannot read it as a MindSpore checkpoint; it holds no records")
    return _join(message.value)


def _join(records: Any) -> dict[str, Entry]:
    """Entries from records: consecutive records with one tag are the slices of one tensor (joined, as
    MindSpore's loader does); a later record with an earlier tag replaces it."""
    out: dict[str, Entry] = {}
    i = 0
    while i < len(records):
        record = records[i]
        tag = record.tag
        if not isinstance(tag, str):  # protobuf hands a proto2 string that is not UTF-8 over as bytes
            raise CheckpointError(f"the name of entry {len(out) + 1}, {brief(tag)}, is not UTF-8 text; the file is "
                                  "corrupt")
        if not record.HasField("tensor"):
            raise CheckpointError(f"entry {brief(tag)} is a MindSpore MapTensor, which only embedding tables use; it "
                                  "is not a ConvMixer checkpoint")
        kind, dims = record.tensor.tensor_type, list(record.tensor.dims)
        pieces = [record.tensor.tensor_content]
        i += 1
        while i < len(records) and records[i].tag == tag:
            piece = records[i].tensor
            if piece.tensor_type != kind or list(piece.dims) != dims:
                raise CheckpointError(f"the slices of entry {brief(tag)} disagree on type or shape; the file is "
                                      "corrupt")
            pieces.append(piece.tensor_content)
            i += 1
        raw = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        out.pop(tag, None)
        out[tag] = _entry(tag, kind, dims, raw)
    return out


def _entry(tag: str, kind: str, dims: list[int], raw: bytes) -> Entry:
    """One entry from its joined bytes; its declared shape is checked against the bytes it holds before anything
    of that shape is made."""
    if kind == "str":
        try:
            return raw.decode("utf-32-le").rstrip("\0")
        except UnicodeDecodeError:
            raise CheckpointError(f"entry {brief(tag)} is a string but not valid UTF-32 text; the file is "
                                  "corrupt") from None
    if kind not in DTYPES:
        raise CheckpointError(f"entry {brief(tag)} has MindSpore type {brief(kind)}, which has no PyTorch "
                              "counterpart here")
    dtype = DTYPES[kind]
    shape = tuple(dims)
    if any(d < 0 for d in shape) or len(shape) > 64 or math.prod(max(d, 1) for d in shape) >= 2**63:
        raise CheckpointError(f"entry {brief(tag)} declares the shape {brief(list(shape))}, which no tensor has; "
                              "the file is corrupt")
    expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if len(raw) != expected:
        raise CheckpointError(f"entry {brief(tag)} holds {len(raw)} bytes where {brief(list(shape))} x {kind} needs "
                              f"{expected}; the file is truncated or corrupt")
    return from_raw(raw, dtype, shape)


# ---- safetensors as MindSpore writes them --------------------------------------------------------------------

def _gf2_apply(matrix: list[int], vector: int) -> int:
    """A 32x32 matrix over GF(2) (one int per column) times a 32-bit vector."""
    out, column = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[column]
        vector >>= 1
        column += 1
    return out


def crc32_zeros(checksum: int, count: int) -> int:
    """`zlib.crc32(b"\\0" * count, checksum)` in O(log count) steps, as zlib's crc32_combine does it: appending
    zeros is linear in the CRC register, and the operator for 2^k zero bytes is the square of the one for 2^(k-1).
    MindSpore's CRC counts a 0-d integer n as n zero bytes; a file of a few bytes must not cost seconds."""
    register = checksum ^ 0xFFFFFFFF  # zlib's pre- and post-conditioning
    one_bit = [0xEDB88320] + [1 << i for i in range(31)]  # the register after one zero bit
    operator = one_bit
    for _ in range(3):  # one zero byte = eight zero bits
        operator = [_gf2_apply(operator, column) for column in operator]
    while count:
        if count & 1:
            register = _gf2_apply(operator, register)
        count >>= 1
        if count:
            operator = [_gf2_apply(operator, column) for column in operator]
    return register ^ 0xFFFFFFFF


def ms_safetensors_crc(tensors: Mapping[str, torch.Tensor]) -> int:
    """The `crc_num` MindSpore stores: over the sorted names, each name's UTF-8 then `bytes(array)`.

    `bytes()` of a 0-d integer NumPy array is `b"\\0" * value`, not its data (Python takes it for an int), and
    MindSpore hashes exactly that; every other array contributes its raw bytes.
    """
    checksum = 0
    for name in sorted(tensors):
        tensor = tensors[name]
        checksum = zlib.crc32(name.encode("utf-8"), checksum)
        if tensor.dim() == 0 and tensor.dtype in _INTEGERS:
            count = int(tensor)
            if not 0 <= count <= 2**32:
                raise CheckpointError(f"tensor {brief(name)} is a 0-d integer {count}, whose CRC MindSpore computes as "
                                      f"{count} zero bytes; it cannot be written with a CRC")
            checksum = crc32_zeros(checksum, count)
        else:
            checksum = zlib.crc32(raw_bytes(tensor), checksum)
    return checksum


def canonical_metadata(blob: bytes, order: Iterable[str]) -> bytes:
    """`blob` (a safetensors file) with its metadata keys in `order`, the rest after them as they stand.

    The safetensors library keeps metadata in a hash map, so the order of its keys, and MindSpore's own files,
    differ from run to run; this makes ours deterministic (one of the orders MindSpore writes). The header is
    rewritten only if the result has the same length and the same JSON, else the library's bytes are kept.
    """
    (length,) = struct.unpack("<Q", blob[:8])
    header = blob[8:8 + length]
    text = header.rstrip(b" ")
    parsed = json.loads(text)
    metadata = parsed.get("__metadata__")
    if not metadata or len(metadata) < 2:
        return blob
    keys = [k for k in order if k in metadata] + [k for k in metadata if k not in order]
    rebuilt = {"__metadata__": {k: metadata[k] for k in keys}, **{k: v for k, v in parsed.items()
                                                                  if k != "__metadata__"}}
    encoded = json.dumps(rebuilt, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(encoded) != len(text) or json.loads(encoded) != parsed:
        return blob
    return blob[:8] + encoded + header[len(text):] + blob[8 + length:]


def write_ms_safetensors(entries: Iterable[tuple[str, torch.Tensor]], path: str | Path, crc: bool = True,
                         extra_metadata: Mapping[str, str] | None = None) -> int:
    """A safetensors file as `save_checkpoint(..., format="safetensors", crc_check=crc)` writes it (metadata
    `format: ms` and `crc_num`), plus `extra_metadata` after MindSpore's keys; returns the bytes written.
    Without extra metadata the bytes are MindSpore's. `path` is written in place."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in entries:
        type_name(name, tensor)
        tensors[name] = tensor
    clash = sorted(set(tensors) & (set(MS_METADATA_KEYS) | set(extra_metadata or {})))
    if clash:
        raise CheckpointError(f"tensor {brief(clash[0])} has the name of a metadata key, which MindSpore's loader "
                              "cannot tell apart from it")
    ordered = unshared((k, tensors[k].cpu()) for k in sorted(tensors))
    metadata = {"format": "ms"}
    if crc:
        metadata["crc_num"] = str(ms_safetensors_crc(ordered))
    metadata.update(extra_metadata or {})
    blob = save(ordered, metadata=metadata) if ordered else save({})
    blob = canonical_metadata(blob, metadata)
    Path(path).write_bytes(blob)
    return len(blob)
