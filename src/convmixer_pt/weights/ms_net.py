"""The MindSpore model from tensors: a raw-bytes bridge between PyTorch and MindSpore tensors, strict loading into
the cell, and MindSpore's own loader for files this package wrote (what verification and parity rely on).

Only running the MindSpore model needs MindSpore; every function here imports it, through
`runtime.require_mindspore`, so a machine without it gets one line saying what to install. Reading and writing
MindSpore's files does not need it (`ms_files`, `ms_io`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckpointError, about
from ..runtime import require_mindspore
from .ms_files import DTYPES, TYPE_NAMES, check_ckpt_crc
from .ms_io import check_safetensors_crc, split_training_state
from .torch_io import file_format, misfit_error, mismatch_problems, read_torch_checkpoint, unreadable

if TYPE_CHECKING:
    import mindspore


def _ms_dtype(dtype: torch.dtype) -> Any:
    ms = require_mindspore("running the MindSpore model")
    return getattr(ms, "bool_" if dtype == torch.bool else str(dtype).removeprefix("torch."))


def ms_to_torch(tensor: mindspore.Tensor) -> torch.Tensor:
    """A copy of the raw bytes: bfloat16 included, which `asnumpy()` cannot give under NumPy 2."""
    name = str(tensor.dtype)
    if name not in DTYPES:
        raise CheckpointError(f"tensor {getattr(tensor, 'name', '')!r} has dtype {name}, which has no PyTorch "
                              "counterpart here")
    flat = torch.frombuffer(bytearray(tensor.get_bytes()), dtype=DTYPES[name])
    return flat.reshape(tuple(tensor.shape))


def torch_to_ms(tensor: torch.Tensor) -> mindspore.Tensor:
    """A copy of the raw bytes, built the way MindSpore's own `load_checkpoint` builds its tensors."""
    ms = require_mindspore("running the MindSpore model")
    if tensor.dtype not in TYPE_NAMES:
        raise CheckpointError(f"a tensor of shape {tuple(tensor.shape)} has dtype {tensor.dtype}, which has no "
                              "MindSpore counterpart here")
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return ms.Tensor(ms.Tensor.convert_bytes_to_tensor(data, tuple(tensor.shape), _ms_dtype(tensor.dtype)))


def _check_crc(path: Path, fmt: str) -> None:
    """The CRC a file carries, verified here: MindSpore's own `crc_check=True` reports a `.ckpt` mismatch as a
    possible permission problem, and warns about files without one."""
    with about(path):
        if fmt == "mindspore":
            check_ckpt_crc(path.read_bytes())
        else:
            check_safetensors_crc(*read_torch_checkpoint(path))


def read_ms_params(path: str | Path, use_ema: bool = False) -> dict[str, mindspore.Parameter]:
    """The network's parameters of a `.ckpt` or MindSpore-layout safetensors file, read by MindSpore's own
    `load_checkpoint` (CRC-checked where the file has one); training state is left out, as in `read_weights`."""
    ms = require_mindspore("reading a checkpoint with MindSpore's loader")
    path = Path(path)
    fmt = file_format(path)
    suffix = {"mindspore": ".ckpt", "safetensors": ".safetensors"}.get(fmt)
    if suffix is None:
        raise CheckpointError(f"{path}: is not a MindSpore checkpoint (.ckpt or MindSpore-layout safetensors)")
    if not path.name.endswith(suffix):
        raise CheckpointError(f"{path}: MindSpore reads this format only from names ending in {suffix}; rename it")
    _check_crc(path, fmt)
    try:
        raw = ms.load_checkpoint(str(path), format="ckpt" if fmt == "mindspore" else "safetensors")
    except (ValueError, RuntimeError, TypeError, KeyError, OSError) as e:
        raise unreadable(path, "a MindSpore checkpoint", e) from None
    with about(path):
        return split_training_state(raw, use_ema=use_ema).network  # type: ignore[return-value]


def load_params_strict(net: mindspore.nn.Cell, params: Mapping[str, mindspore.Tensor]) -> None:
    """Load every parameter of `net` from `params`: same names, shapes and dtypes, nothing left over."""
    ms = require_mindspore("running the MindSpore model")
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
    require_mindspore("running the MindSpore model")
    from ..mindspore.model import MSConvMixer

    net = MSConvMixer(**arch)
    as_float32 = {k: v if str(v.dtype) == "Float32" else torch_to_ms(ms_to_torch(v).float())
                  for k, v in params.items()}
    load_params_strict(net, as_float32)
    return net


def ms_model_from_file(path: str | Path, arch: Mapping[str, Any], use_ema: bool = False) -> mindspore.nn.Cell:
    """A float32 MindSpore ConvMixer loaded from a file by MindSpore's own loader and names, without the key map."""
    params = read_ms_params(path, use_ema=use_ema)
    with about(path):
        return ms_model_from_params(arch, params)
