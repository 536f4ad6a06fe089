"""PyTorch <-> MindSpore checkpoint conversion, exact to the bit: the library behind the converter CLI.

`convert` reads any accepted checkpoint, optionally casts it, writes the format OUT's name asks for to one
staging file beside OUT, verifies it if asked, and only then gives it OUT's name.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import atomic_path, check_output, writing
from ..runtime import require_mindspore
from .formats import Weights, cast_state, output_layout, read_weights, write_weights
from .parity import DEFAULT_TOL, ParityReport, verify_output

# BatchNorm statistics are buffers, not parameters; they are left out of the parameter count.
_BUFFER_SUFFIXES = (".running_mean", ".running_var", ".num_batches_tracked")


@dataclass
class Summary:
    path: Path
    tensors: int
    parameters: int
    bytes: int
    dtypes: list[str]
    seconds: float
    verify: ParityReport | None = None
    clamped: int = 0  # values saturated to the output dtype's range

    def line(self) -> str:
        return (f"wrote {self.path}: {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes:,} bytes ({', '.join(self.dtypes)}) in {self.seconds:.1f} s"
                + (f"; clamped {self.clamped} value(s) to the {', '.join(self.dtypes)} range" if self.clamped else ""))


class VerificationError(CheckpointError):
    """The written file does not reproduce the input's logits; `report` says by how much and where."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


def activation_clause(weights: Weights) -> str:
    """Where the input's own activation is not the one stated for the output, the words that say so."""
    own, why = weights.reference_act
    if own == (weights.act or "gelu"):
        return ""
    return f"; the input runs {own} ({why}), the output {weights.act} ({weights.act_source})"


def verify_tolerance(original: Weights, written: Weights) -> float | None:
    """The relative logit difference a cast may cause: 8 units in the last place of the narrowest float the
    weights were cast to; None (parity's float32 default) where no weight changed dtype."""
    changed = [w.dtype for k, w in written.state.items()
               if w.is_floating_point() and w.dtype != original.state[k].dtype]
    if not changed:
        return None
    return max(DEFAULT_TOL, 8 * max(torch.finfo(d).eps for d in changed))


def convert(src: str | Path, dst: str | Path, *, layout: str | None = None, use_ema: bool = False,
            dtype: str = "keep", clamp: bool = False, act: str | None = None, overwrite: bool = False,
            verify: bool = False, verify_size: int = 224, progress: bool = False) -> tuple[Weights, Summary]:
    """Read `src`, write `dst` (in `layout`, default: the output format's own); returns the weights as written
    and a summary of the output. No MindSpore is needed unless `verify` has a MindSpore model to run.

    `dtype` casts the floating tensors; values that do not fit it are refused, or with `clamp` saturated and
    counted. `verify` compares the model of the written file with the model of `src` as read, before the
    cast, within the rounding the cast explains. The output appears under its name only when everything,
    verification included, has succeeded.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    layout = output_layout(dst, layout)
    check_output(dst, overwrite, inputs=[src])
    original = read_weights(src, use_ema=use_ema, act=act, float64=dtype != "keep")
    state, clamped = cast_state(original.state, dtype, clamp)
    weights = dataclasses.replace(original, state=state)
    if verify and "mindspore" in (weights.framework, layout):
        require_mindspore("--verify with a MindSpore checkpoint on either side")
    report = None
    with atomic_path(dst, overwrite=overwrite) as stage:
        with writing(dst):
            written = write_weights(weights, stage, layout=layout)
        size = stage.stat().st_size
        if verify:
            report = verify_output(original, stage, image_size=verify_size, progress=progress,
                                   tol=verify_tolerance(original, weights))
            if not report.ok:
                raise VerificationError(f"{dst}: not written, since its model does not reproduce the logits "
                                        f"of {src} (relative difference {report.rel_diff:.3g} > "
                                        f"{report.tol:g}){activation_clause(weights)}", report)
    summary = Summary(
        path=dst,
        tensors=written,
        parameters=sum(v.numel() for k, v in weights.state.items() if not k.endswith(_BUFFER_SUFFIXES)),
        bytes=size,
        dtypes=sorted({str(v.dtype).removeprefix("torch.") for v in weights.state.values()
                       if v.is_floating_point()}),
        seconds=time.perf_counter() - start,
        verify=report,
        clamped=clamped,
    )
    return weights, summary
