"""PyTorch <-> MindSpore checkpoint conversion, exact to the bit: the library behind tools/convert_ckpt.py.

Every input is read into one form, timm-layout torch tensors plus the architecture inferred from their shapes
(`Weights`), and written from it. Tensors cross between the frameworks as raw bytes, never through NumPy,
so float32, float16 and bfloat16 all survive unchanged (NumPy 2 has no bfloat16 MindSpore can use).
MindSpore is imported only when a `.ckpt` is read or written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from . import keymap
from .checkpoint import (
    CheckpointError,
    atomic_path,
    check_state_dict,
    file_format,
    read_state_dict,
    save_safetensors,
)
from .model import ACTIVATIONS, VARIANTS, ConvMixer

if TYPE_CHECKING:
    import mindspore

    from .parity import ParityReport

TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
# BatchNorm statistics are buffers, not parameters; they are left out of the parameter count.
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


@dataclass
class Weights:
    """One model's tensors in the timm layout, what they were read from, and the architecture they imply."""

    state: dict[str, torch.Tensor]
    arch: dict[str, int]  # dim, depth, kernel_size, patch_size, in_chans, num_classes
    act: str | None  # None when nothing says which activation the weights were trained with
    act_source: str
    framework: str  # "torch" or "mindspore": which model the file is meant for
    path: Path

    @property
    def variant(self) -> str | None:
        return keymap.match_variant(self.arch)

    @property
    def model_arch(self) -> dict[str, Any]:
        """Constructor arguments of a model these weights fit (GELU stands in for an unknown activation)."""
        return dict(self.arch, act=self.act or "gelu")


@dataclass
class Summary:
    path: Path
    tensors: int
    parameters: int
    bytes: int
    dtypes: list[str]
    seconds: float
    verify: ParityReport | None = None

    def line(self) -> str:
        return (f"wrote {self.path}: {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes:,} bytes ({', '.join(self.dtypes)}) in {self.seconds:.1f} s")


def output_format(path: str | Path) -> str:
    """'mindspore', 'safetensors' or 'torch', from the output file's name."""
    name = Path(path).name.lower()
    if name.endswith(".ckpt"):
        return "mindspore"
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise CheckpointError(f"{path}: cannot tell the output format from the name; use .ckpt (MindSpore), "
                          f".safetensors, or {'/'.join(TORCH_SUFFIXES)} (PyTorch)")


# ---- tensors across the frameworks, as raw bytes -----------------------------------------------------------

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


# ---- reading -----------------------------------------------------------------------------------------------

def resolve_act(arch: Mapping[str, int], metadata_act: str | None,
                override: str | None) -> tuple[str | None, str]:
    """The activation and where it came from: --act, then the file's own record, then the registry."""
    if override:
        return override, "--act"
    if metadata_act in ACTIVATIONS:
        return metadata_act, "file metadata"
    name = keymap.match_variant(arch)
    if name is not None:
        return VARIANTS[name]["act"], f"registry: {name}"
    return None, "unknown"


def read_ckpt_state(path: str | Path, progress: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a MindSpore `.ckpt`, bit for bit, as timm-layout torch tensors."""
    from .ms_model import read_ms_params

    params = read_ms_params(path)
    bar = tqdm(params.items(), desc="from MindSpore", unit="tensor", disable=not progress, leave=False)
    try:
        return keymap.convert_state({k: ms_to_torch(v) for k, v in bar}, "timm", src="mindspore")
    except keymap.LayoutError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(path: str | Path, use_ema: bool = False, act: str | None = None,
                 progress: bool = False) -> Weights:
    """Any accepted checkpoint, checked to hold exactly one complete ConvMixer."""
    path = Path(path)
    if file_format(path) == "mindspore":
        if use_ema:
            raise CheckpointError(f"{path}: EMA weights were asked for, but a MindSpore .ckpt holds one set "
                                  "of weights")
        state, meta, framework = read_ckpt_state(path, progress), {}, "mindspore"
    else:
        state, meta = read_state_dict(path, use_ema=use_ema)
        framework = "torch"
    try:
        arch = keymap.infer_arch(state)
    except keymap.LayoutError as e:
        raise CheckpointError(f"{path}: {e}") from None
    resolved, source = resolve_act(arch, meta.get("act"), act)
    with torch.device("meta"):
        check_state_dict(ConvMixer(**arch, act=resolved or "gelu"), state, str(path))
    return Weights(state=state, arch=arch, act=resolved, act_source=source, framework=framework, path=path)


# ---- writing -----------------------------------------------------------------------------------------------

def cast_state(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors in `dtype` ('keep' leaves them as they are); integer counters stay integers."""
    if dtype == "keep":
        return dict(state)
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose keep, {', '.join(DTYPES)}")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


def with_batch_counters(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full PyTorch state dict: BatchNorm's `num_batches_tracked`, which MindSpore does not keep, as 0."""
    out = {}
    for key, value in state.items():
        out[key] = value
        if key.endswith(".running_var"):
            counter = key[: -len("running_var")] + "num_batches_tracked"
            out[counter] = state.get(counter, torch.tensor(0, dtype=torch.long))
    return out


def write_ckpt(state: Mapping[str, torch.Tensor], path: str | Path, overwrite: bool = False,
               progress: bool = False) -> int:
    """A MindSpore `.ckpt` in MindCV's names, with a CRC, written beside `path` and renamed onto it."""
    import mindspore as ms

    named = keymap.convert_state(state, "mindspore", src="timm")
    bar = tqdm(named.items(), desc="to MindSpore", unit="tensor", disable=not progress, leave=False)
    items = [{"name": k, "data": torch_to_ms(v)} for k, v in bar]
    with atomic_path(path, overwrite=overwrite) as tmp:
        # save_checkpoint appends ".ckpt" to other names and writes through its own "<name>.tmp" sibling.
        ms_tmp = tmp.with_name(tmp.name + ".ckpt")
        try:
            ms.save_checkpoint(items, str(ms_tmp), crc_check=True)
            ms_tmp.chmod(tmp.stat().st_mode & 0o777)  # MindSpore makes it read-only; match the other outputs
            ms_tmp.replace(tmp)
        finally:
            for leftover in (ms_tmp, ms_tmp.with_name(tmp.name + ".tmp")):
                leftover.unlink(missing_ok=True)
    return len(items)


def write_torch(state: Mapping[str, torch.Tensor], path: str | Path, layout: str = "timm",
                overwrite: bool = False) -> int:
    full = keymap.convert_state(with_batch_counters(state), layout, src="timm")
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(full, tmp)
    return len(full)


def safetensors_metadata(weights: Weights, layout: str) -> dict[str, str]:
    meta = {"format": "pt", "layout": layout, "arch": json.dumps(weights.arch, sort_keys=True)}
    if weights.variant:
        meta["variant"] = weights.variant
    if weights.act:
        meta["act"] = weights.act
    return meta


def write_weights(weights: Weights, path: str | Path, layout: str = "timm", overwrite: bool = False,
                  progress: bool = False) -> int:
    """Write in the format `path`'s name asks for (`layout`: PyTorch outputs only); returns the count."""
    fmt = output_format(path)
    if layout not in ("timm", "official"):
        raise CheckpointError(f"unknown layout {layout!r} for a PyTorch output; choose timm or official")
    if fmt == "mindspore":
        return write_ckpt(weights.state, path, overwrite=overwrite, progress=progress)
    if fmt == "safetensors":
        full = keymap.convert_state(with_batch_counters(weights.state), layout, src="timm")
        save_safetensors(full, path, metadata=safetensors_metadata(weights, layout), overwrite=overwrite)
        return len(full)
    return write_torch(weights.state, path, layout=layout, overwrite=overwrite)


class VerificationError(CheckpointError):
    """The written file does not reproduce the input's logits; `report` says by how much and where."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


def verify_output(weights: Weights, out: Path, image_size: int = 224, seed: int = 0,
                  progress: bool = False) -> ParityReport:
    """The model of `weights` (as written, so rounded to the output dtype) against the model loaded from `out`
    by its own framework's loader; each model in the framework its file is meant for."""
    from . import parity

    ref = (parity.ms_runner(parity.ms_model(weights)) if weights.framework == "mindspore"
           else parity.torch_runner(parity.torch_model(weights)))
    if output_format(out) == "mindspore":
        other = parity.ms_runner(parity.ms_model_from_file(out, weights.model_arch))
    else:
        other = parity.torch_runner(parity.torch_model(read_weights(out, act=weights.model_arch["act"])))
    x = parity.random_batch(weights.arch["in_chans"], image_size=image_size, seed=seed)
    names = ("input" if weights.framework == "torch" else "input (MindSpore)", "output")
    with tqdm(total=2, desc="verify", unit="model", disable=not progress, leave=False) as bar:
        outputs = []
        for run in (ref, other):
            outputs.append(run(x))
            bar.update()
    return parity.compare_outputs(*outputs, weights.arch["depth"], parity.DEFAULT_TOL, names)


def convert(src: str | Path, dst: str | Path, *, layout: str = "timm", use_ema: bool = False,
            dtype: str = "keep", act: str | None = None, overwrite: bool = False, verify: bool = False,
            verify_size: int = 224, progress: bool = False) -> tuple[Weights, Summary]:
    """Read `src`, write `dst`; returns the weights as written and a summary of the output.

    The output appears under its name only when everything, verification included, has succeeded.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    output_format(dst)
    if not overwrite and dst.exists():
        raise CheckpointError(f"{dst}: already exists (use --force to overwrite)")
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: is the input file; write the output elsewhere")
    weights = read_weights(src, use_ema=use_ema, act=act, progress=progress)
    weights.state = cast_state(weights.state, dtype)
    report = None
    with atomic_path(dst, overwrite=overwrite) as stage:
        written = write_weights(weights, stage, layout=layout, overwrite=True, progress=progress)
        size = stage.stat().st_size
        if verify:
            report = verify_output(weights, stage, image_size=verify_size, progress=progress)
            if not report.ok:
                raise VerificationError(f"{dst}: not written, since its model does not reproduce the logits "
                                        f"of {src} (relative difference {report.rel_diff:.3g} > "
                                        f"{report.tol:g})", report)
    summary = Summary(
        path=dst,
        tensors=written,
        parameters=sum(v.numel() for k, v in weights.state.items() if not k.endswith(_BUFFER_SUFFIXES)),
        bytes=size,
        dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in weights.state.values()
                       if v.is_floating_point()}),
        seconds=time.perf_counter() - start,
        verify=report,
    )
    return weights, summary
