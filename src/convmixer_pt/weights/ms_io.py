"""MindSpore-side checkpoint files: `.ckpt` read and written bit for bit, and strict loading into a cell.

Tensors cross between the frameworks as raw bytes, never through NumPy, so float32, float16 and bfloat16 all
survive unchanged (NumPy 2 has no bfloat16 MindSpore can use). MindSpore is an optional heavy dependency,
imported inside the functions that need it.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from ..errors import CheckpointError, about
from . import keymap
from .torch_io import check_weights, file_format, misfit_error, mismatch_problems, unreadable

if TYPE_CHECKING:
    import mindspore

CRC_TRAILER = b"crc_num"  # MindSpore appends b"crc_num" + 10 bytes of CRC32 when saving with crc_check=True


def _ms_dtypes() -> dict[Any, torch.dtype]:
    import mindspore as ms

    return {ms.float32: torch.float32, ms.float16: torch.float16, ms.bfloat16: torch.bfloat16,
            ms.float64: torch.float64, ms.int64: torch.int64, ms.int32: torch.int32}


def ms_to_torch(tensor: mindspore.Tensor) -> torch.Tensor:
    """A copy of the raw bytes: bfloat16 included, which `asnumpy()` cannot give under NumPy 2."""
    dtypes = _ms_dtypes()
    if tensor.dtype not in dtypes:
        raise CheckpointError(f"tensor {getattr(tensor, 'name', '')!r} has dtype {tensor.dtype}, which has "
                              "no PyTorch counterpart here")
    flat = torch.frombuffer(bytearray(tensor.get_bytes()), dtype=dtypes[tensor.dtype])
    return flat.reshape(tuple(tensor.shape))


def torch_to_ms(tensor: torch.Tensor) -> mindspore.Tensor:
    """A copy of the raw bytes, built the way MindSpore's own `load_checkpoint` builds its tensors."""
    from mindspore import Tensor

    to_ms = {v: k for k, v in _ms_dtypes().items()}
    if tensor.dtype not in to_ms:
        raise CheckpointError(f"a tensor of shape {tuple(tensor.shape)} has dtype {tensor.dtype}, which has "
                              "no MindSpore counterpart here")
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return Tensor(Tensor.convert_bytes_to_tensor(data, tuple(tensor.shape), to_ms[tensor.dtype]))


def check_crc(path: Path) -> None:
    """Verify the CRC32 a `.ckpt` carries, if it carries one.

    Done here because MindSpore's `crc_check=True` reports a mismatch as a possible permission problem
    (and logs it), and warns about files without a CRC.
    """
    data = path.read_bytes()
    if data[-17:-10] != CRC_TRAILER:
        return
    if binascii.crc32(data[:-17]) != int.from_bytes(data[-10:], "big"):
        raise CheckpointError(f"{path}: its CRC32 does not match its content; the file is corrupt")


def read_ms_params(path: str | Path) -> dict[str, mindspore.Parameter]:
    """The `network.*` parameters of a MindSpore `.ckpt`, CRC-checked when the file carries a CRC.

    Entries outside `network.` (optimizer moments, step counters) are training state and are left out,
    as the wrappers of a PyTorch training checkpoint are.
    """
    import mindspore as ms

    path = Path(path)
    if file_format(path) != "mindspore":
        raise CheckpointError(f"{path}: is not a MindSpore checkpoint")
    if not path.name.endswith(".ckpt"):
        raise CheckpointError(f"{path}: MindSpore only reads checkpoints whose name ends in .ckpt; rename it")
    check_crc(path)
    try:
        raw = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError, TypeError, KeyError, OSError) as e:
        raise unreadable(path, "a MindSpore checkpoint", e) from None
    params = {k: v for k, v in raw.items() if k.startswith(keymap.MS_PREFIX) and isinstance(v, ms.Parameter)}
    if not params:
        raise CheckpointError(f"{path}: holds no `network.*` parameters (found {', '.join(list(raw)[:8])})")
    return params


def read_ckpt_state(path: str | Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a MindSpore `.ckpt`, bit for bit, as timm-layout torch tensors."""
    params = read_ms_params(path)
    bar = tqdm(params.items(), desc="from MindSpore", unit="tensor", disable=not progress, leave=False)
    with about(path):
        state = keymap.convert_state({k: ms_to_torch(v) for k, v in bar}, "timm", src="mindspore")
        check_weights(state)
    return state


def write_ckpt(state: Mapping[str, torch.Tensor], path: str | Path, progress: bool = False) -> int:
    """A MindSpore `.ckpt` of timm-layout `state` in MindCV's names, with a CRC; returns the tensor count.

    `path` must end in `.ckpt` (MindSpore appends it to other names); callers that need the file to appear
    whole write to a staging path (`files.atomic_path`) and rename.
    """
    import mindspore as ms

    path = Path(path)
    named = keymap.convert_state(state, "mindspore", src="timm")
    bar = tqdm(named.items(), desc="to MindSpore", unit="tensor", disable=not progress, leave=False)
    items = [{"name": k, "data": torch_to_ms(v)} for k, v in bar]
    existed_mode = path.stat().st_mode & 0o777 if path.exists() else None
    try:
        ms.save_checkpoint(items, str(path), crc_check=True)
    finally:
        path.with_suffix(".tmp").unlink(missing_ok=True)  # MindSpore writes through this sibling
    if existed_mode is not None:
        path.chmod(existed_mode)  # MindSpore makes it read-only; keep the staging file's (umask) mode
    return len(items)


def load_params_strict(net: mindspore.nn.Cell, params: Mapping[str, mindspore.Tensor]) -> None:
    """Load every parameter of `net` from `params`: same names, shapes and dtypes, nothing left over."""
    import mindspore as ms

    problems = mismatch_problems(dict(net.parameters_and_names()), params, compare_dtype=True)
    if not problems:
        as_params = {k: v if isinstance(v, ms.Parameter) else ms.Parameter(v, name=k) for k, v in params.items()}
        not_loaded, not_used = ms.load_param_into_net(net, as_params, strict_load=True)
        if not_loaded or not_used:
            problems.append(f"MindSpore left {len(not_loaded)} model parameter(s) unloaded "
                            f"({', '.join(not_loaded[:8])}) and {len(not_used)} checkpoint tensor(s) unused "
                            f"({', '.join(not_used[:8])})")
    if problems:
        raise misfit_error(net, problems)


def ms_model_from_params(arch: Mapping[str, Any], params: Mapping[str, mindspore.Tensor]) -> mindspore.nn.Cell:
    """A float32 MindSpore ConvMixer holding MindSpore-named `params` (loaded strictly by name)."""
    from ..mindspore.model import MSConvMixer

    net = MSConvMixer(**arch)
    as_float32 = {k: v if str(v.dtype) == "Float32" else torch_to_ms(ms_to_torch(v).float())
                  for k, v in params.items()}
    load_params_strict(net, as_float32)
    return net


def ms_model_from_file(path: str | Path, arch: Mapping[str, Any]) -> mindspore.nn.Cell:
    """A float32 MindSpore ConvMixer loaded from a `.ckpt` by MindSpore's own names, without the key map."""
    params = read_ms_params(path)
    with about(path):
        return ms_model_from_params(arch, params)
