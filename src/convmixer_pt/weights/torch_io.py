"""PyTorch-side checkpoint files, read safely (no pickle ever runs code) and written atomically.

Accepted inputs, recognised from the bytes and the tensor names rather than the file name:
flat state dicts in the timm or official locuslab layout (`.pth`, `.pth.tar`, `.bin`, `.safetensors`),
training checkpoints that wrap them (`state_dict`, `model`, `state_dict_ema`, ...), and names carrying
`module.` (DDP) or `_orig_mod.` (torch.compile) prefixes.
"""

from __future__ import annotations

import argparse
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from ..errors import CheckpointError, about, brief
from ..files import atomic_path, input_problem, writing
from ..variants import VARIANTS
from . import keymap
from .ms_files import canonical_metadata, unshared

# What training checkpoints in the wild pickle besides tensors and builtins: timm's train.py stores
# its `args` as an argparse.Namespace.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COUNTER_SUFFIX = ".num_batches_tracked"  # BatchNorm's integer counter, the one tensor that is not a weight
WRAPPER_KEYS = ("state_dict", "model", "module", "net", "network")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
PREFIXES = ("module.", "_orig_mod.")
# How deeply a pickle may nest containers. Checkpoints nest a few levels (a dict of dicts of tensors, each a
# reduce of a tuple); hashing a tuple nested some 100,000 deep overflows the C stack inside the unpickler.
MAX_PICKLE_DEPTH = 100
# Opcodes that add to a container already on the stack instead of building a new one.
_MUTATORS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})


def file_format(path: str | Path) -> str:
    """'torch-zip', 'torch-legacy', 'safetensors' or 'mindspore', from the first bytes of the file."""
    path = Path(path)
    problem = input_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 8:
        raise CheckpointError(f"{path}: file is empty or truncated ({len(head)} bytes)")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[0] == 0x80:  # a pickle protocol header: torch's legacy (pre-1.6) serialisation
        return "torch-legacy"
    if head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "safetensors"
    if head[:1] == b"\n":  # protobuf field 1 (Checkpoint.value), wire type 2: MindSpore's .ckpt
        return "mindspore"
    raise CheckpointError(f"{path}: not a PyTorch, safetensors or MindSpore checkpoint (unknown file header)")


def unreadable(path: str | Path, what: str, error: BaseException) -> CheckpointError:
    """One line for a file a library could not parse, ending with the first line of the library's reason."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CheckpointError(f"{path}: cannot read it as {what}; the file is truncated or corrupt ({reason})")


class _Node:
    """An object on the simulated pickle stack: how deeply it nests, and whether a container holds it."""

    __slots__ = ("depth", "held")

    def __init__(self, depth: int) -> None:
        self.depth, self.held = depth, False


def pickle_depth(stream: Any, limit: int = MAX_PICKLE_DEPTH) -> int | None:
    """How deeply the next pickle in `stream` nests its containers, found from its opcodes alone (no object is
    built, nothing recurses); None for bytes that are not a pickle, which the unpickler then reports. The scan
    stops once `limit` is passed. An object mutated after a container took it (possible through the memo) may
    deepen containers it cannot see: each such deepening is added to every depth, so the count never falls
    short of the truth."""
    stack: list[_Node] = []
    marks: list[int] = []
    memo: dict[Any, _Node] = {}
    deepest = unseen = 0
    try:
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if name == "STOP":
                break
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
                continue
            if name == "MARK":
                marks.append(len(stack))
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            before = [s.name for s in op.stack_before]
            taken: list[_Node] = []
            if "mark" in before:
                start = marks.pop()
                taken, fixed = stack[start:], before.index("mark")
                del stack[start:]
            else:
                fixed = len(before)
            if fixed:
                if fixed > len(stack):
                    return None
                taken = stack[len(stack) - fixed:] + taken
                del stack[len(stack) - fixed:]
            for node in taken[1:] if name in _MUTATORS else taken:
                node.held = True
            if name in _MUTATORS:
                node = taken[0]
                depth = max([node.depth] + [n.depth + 1 for n in taken[1:]])
                if node.held:
                    unseen += depth - node.depth
                node.depth = depth
            elif op.stack_after:
                node = _Node(max((n.depth for n in taken), default=-1) + 1)
            else:
                continue
            stack.append(node)
            deepest = max(deepest, node.depth)
            if deepest + unseen > limit:
                break
    except (ValueError, IndexError, KeyError, EOFError):
        return None
    return deepest + unseen


def _pickles(path: Path) -> Iterator[Any]:
    """Streams positioned at each pickle torch.load would unpickle from `path`: a zip archive's data.pkl, or
    the first pickles of a legacy file (magic number, protocol, system info, the object, its storage keys)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if re.fullmatch(r"[^/]+/data\.pkl", name):
                    with archive.open(name) as stream:
                        yield stream
        return
    with open(path, "rb") as stream:
        for _ in range(5):
            yield stream


def check_pickle_depth(path: Path, limit: int = MAX_PICKLE_DEPTH) -> None:
    """Refuse a PyTorch file whose pickle nests containers more than `limit` deep, before it is unpickled."""
    try:
        depth = max((pickle_depth(stream, limit) or 0 for stream in _pickles(path)), default=0)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # torch.load reports a corrupt file in its own words
    if depth > limit:
        raise CheckpointError(f"{path}: refused to unpickle it: it nests containers more than {limit} deep, which "
                              "no checkpoint does")


def _torch_load(path: Path) -> Any:
    check_pickle_depth(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds more than tensors and plain data"
        raise CheckpointError(f"{path}: refused to unpickle it: {what}, and loading it could run code") from None
    except Exception as e:  # torch raises many types on corrupt data; all mean the same to the user
        raise unreadable(path, "a PyTorch checkpoint", e) from None


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise unreadable(path, "safetensors", e) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap(obj: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The model weights inside a training checkpoint (or the state dict itself)."""
    if _is_state_dict(obj):
        if use_ema:
            raise CheckpointError("EMA weights were asked for, but it is a plain state dict")
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict or a training checkpoint")
    keys = EMA_KEYS if use_ema else WRAPPER_KEYS
    for key in keys:
        if key in obj and _is_state_dict(obj[key]):
            return dict(obj[key])
    if use_ema:
        raise CheckpointError(f"EMA weights were asked for, but it has none (looked for "
                              f"{', '.join(EMA_KEYS)}; found {brief(list(obj)) if obj else 'nothing'})")
    raise CheckpointError(f"no model weights found (looked for {', '.join(WRAPPER_KEYS)}; "
                          f"found {brief(list(obj)) if obj else 'nothing'})")


def weight_problem(key: str, tensor: torch.Tensor, float64: bool = False) -> str | None:
    """Why `tensor` cannot be a ConvMixer weight, or None: it must be dense, hold data, be float32, float16 or
    bfloat16 (float64 where `float64`, i.e. where it is converted), and have the storage its shape needs,
    which an expanded (stride-0) or a truncated tensor lacks; checked before anything is allocated."""
    if tensor.layout != torch.strided:
        return f"is a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one"
    if tensor.device.type == "meta":
        return "holds no data (a meta tensor)"
    if key.endswith(COUNTER_SUFFIX):
        if tensor.dtype in (torch.int64, torch.int32) and tensor.numel() == 1:
            return None
        return f"is a {str(tensor.dtype).removeprefix('torch.')} of shape {tuple(tensor.shape)}, not BatchNorm's " \
               "integer counter"
    if tensor.dtype not in WEIGHT_DTYPES and not (float64 and tensor.dtype == torch.float64):
        hint = " (convert it with --dtype float32)" if tensor.dtype == torch.float64 else ""
        return f"has dtype {str(tensor.dtype).removeprefix('torch.')}; weights are float32, float16 or " \
               f"bfloat16{hint}"
    needed = (tensor.storage_offset() + tensor.numel()) * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if tensor.numel() and needed > held:
        return f"has shape {tuple(tensor.shape)} ({tensor.numel() * tensor.element_size():,} bytes) but its " \
               f"storage holds {held:,} bytes: an expanded or truncated tensor"
    return None


def check_weights(state: Mapping[str, torch.Tensor], float64: bool = False) -> None:
    """A CheckpointError naming the first tensor that cannot be a weight (`weight_problem`)."""
    for key, tensor in state.items():
        problem = weight_problem(key, tensor, float64)
        if problem:
            raise CheckpointError(f"tensor {brief(key)} {problem}")


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` / `_orig_mod.` wherever they stand at the front, in any order and number."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def read_torch_checkpoint(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The raw object of a PyTorch or safetensors file and its metadata (safetensors only)."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "safetensors":
        return _safetensors_load(path)
    if fmt == "mindspore":
        raise CheckpointError(f"{path}: is a MindSpore checkpoint; read it with convmixer_pt.weights.formats."
                              "read_weights, or convert it with convmixer-convert")
    return _torch_load(path), {}


def recorded_act(obj: Any) -> str | None:
    """The activation a training checkpoint records: ours store `arch` as a dict, timm's as a model name."""
    arch = obj.get("arch") if isinstance(obj, Mapping) else None
    if isinstance(arch, Mapping) and isinstance(arch.get("act"), str):
        return arch["act"]
    if isinstance(arch, str):
        for name, spec in VARIANTS.items():
            if arch in (name, spec["timm_name"]):
                return spec["act"]
    return None


def torch_state(obj: Any, meta: Mapping[str, str], use_ema: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, Any]]:
    """The model weights of a PyTorch-side file's object, renamed into the timm layout, plus the file's metadata
    with the activation and the training config a training checkpoint records."""
    state = keymap.convert_state(strip_prefixes(unwrap(obj, use_ema=use_ema)), "timm")
    meta = dict(meta)
    act = recorded_act(obj)
    if act and "act" not in meta:
        meta["act"] = act
    if isinstance(obj, Mapping) and isinstance(obj.get("config"), Mapping):
        meta["config"] = dict(obj["config"])  # this trainer's config: what validation takes preprocessing from
    return state, meta


def read_state_dict(path: str | Path, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights of any accepted PyTorch-side file, renamed into the timm layout and checked to be real
    weights (`check_weights`), plus what the file records."""
    obj, meta = read_torch_checkpoint(path)
    with about(path):
        state, meta = torch_state(obj, meta, use_ema)
        check_weights(state)
    return state, meta


def mismatch_problems(expected: Mapping[str, Any], found: Mapping[str, Any], optional: tuple[str, ...] = (),
                      compare_dtype: bool = False) -> list[str]:
    """Every missing, unexpected, mis-shaped (and, if asked, mis-typed) tensor, as short phrases."""

    def listed(items: list[str], sep: str = ", ") -> str:
        return sep.join(brief(item, 120).strip("'\"") for item in items[:8]) + (" ..." if len(items) > 8 else "")

    missing = [k for k in expected if k not in found and not k.endswith(optional)]
    unexpected = [k for k in found if k not in expected]
    common = [k for k in found if k in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in common if tuple(found[k].shape) != tuple(expected[k].shape)]
    dtypes = [f"{k} {found[k].dtype} vs model {expected[k].dtype}"
              for k in common if compare_dtype and found[k].dtype != expected[k].dtype]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {listed(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch: {listed(shapes, '; ')}")
    if dtypes:
        problems.append(f"dtype mismatch: {listed(dtypes, '; ')}")
    return problems


def misfit_error(model: Any, problems: list[str]) -> CheckpointError:
    """One sentence naming the model's architecture and every problem."""
    arch = getattr(model, "arch", None)
    what = f" ({', '.join(f'{k}={v}' for k, v in arch.items())})" if arch else ""
    return CheckpointError(f"does not fit the model{what}: {'; '.join(problems)}")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Raise one message naming every missing, unexpected and mis-shaped tensor."""
    problems = mismatch_problems(model.state_dict(), state, optional=("num_batches_tracked",))
    if problems:
        raise misfit_error(model, problems)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strict load; BatchNorm's `num_batches_tracked` may be absent (MindSpore files do not store it). Values
    must fit the model's dtypes (a float64 weight beyond float32's range is refused, not made infinite)."""
    check_state_dict(model, state)
    model_state = model.state_dict()
    for key, value in state.items():
        problem = overflow(value, model_state[key].dtype)
        if problem:
            raise CheckpointError(f"tensor {brief(key)} {problem}")
    full = dict(state)
    for key, value in model.state_dict().items():
        full.setdefault(key, value)
    model.load_state_dict(full, strict=True)


def overflow(tensor: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why some of `tensor`'s finite values would become infinite in `dtype`, or None."""
    if not tensor.is_floating_point() or not dtype.is_floating_point or \
            torch.finfo(dtype).max >= torch.finfo(tensor.dtype).max:
        return None
    lost = torch.isfinite(tensor) & ~torch.isfinite(tensor.to(dtype))
    if not lost.any():
        return None
    largest = float(tensor[lost].abs().max())
    return f"holds {int(lost.sum())} value(s) up to {largest:.6g} in magnitude, beyond " \
           f"{str(dtype).removeprefix('torch.')}'s largest, {torch.finfo(dtype).max:.6g}"


def save_torch(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temporary file, renamed over `path` when complete (the trainer's checkpoints, in the
    run folder it owns)."""
    with atomic_path(path, overwrite=True) as tmp, writing(path):
        torch.save(obj, tmp)


def write_safetensors(state: Mapping[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> None:
    """A safetensors file of `state` with `metadata` in the order given, so the same tensors give the same bytes
    (callers that need it to appear whole write to a staging path)."""
    blob = save(unshared(state.items()), metadata=metadata)
    Path(path).write_bytes(canonical_metadata(blob, metadata or {}))
