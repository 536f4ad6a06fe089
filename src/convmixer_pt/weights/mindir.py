"""Deployment on the MindSpore side: the MindSpore model of any checkpoint the converter reads, exported to MindIR
(`mindspore.export(..., file_format="MINDIR")`), and checked by loading the MindIR back with MindSpore's runtime
(`mindspore.load` + `nn.GraphCell`) and comparing its logits with PyTorch's.

The graph takes any batch size at one image size (MindIR fixes what it is exported with; a dynamic batch
dimension is what serving needs). The activation is the one stated for the weights (`read_weights`), in
MindSpore's implementation, so a tanh-GELU model exports as MindSpore's `nn.GELU(approximate=True)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import atomic_path, check_output
from ..runtime import require_mindspore
from . import parity
from .formats import Weights, ms_model, read_weights, torch_model
from .parity import ParityReport, random_batch, rel_diff, same_top5, torch_runner

SUFFIX = ".mindir"


class ExportError(CheckpointError):
    """The exported MindIR does not reproduce PyTorch's logits; `report` says by how much."""

    def __init__(self, message: str, report: ParityReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class Exported:
    path: Path
    bytes: int
    image_size: int
    seconds: float
    verify: ParityReport | None = None

    def line(self) -> str:
        return (f"wrote {self.path}: MindIR, input [batch, 3, {self.image_size}, {self.image_size}] float32, "
                f"{self.bytes:,} bytes in {self.seconds:.1f} s")


def graph_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of a MindIR file as MindSpore's runtime computes them: `mindspore.load` + `nn.GraphCell`."""
    ms = require_mindspore("loading a MindIR")
    graph = ms.nn.GraphCell(ms.load(str(path)))
    return graph(ms.Tensor(x)).asnumpy()


def check_mindir(weights: Weights, path: Path, image_size: int, batch_size: int = 2, seed: int = 0,
                 shown_as: Path | None = None) -> ParityReport:
    """The MindIR's logits against the PyTorch model of the same weights, on one random batch; the report names
    `shown_as` (the file the user asked for, where `path` is its staging file) or `path`."""
    x = random_batch(weights.arch["in_chans"], batch_size, image_size, seed)
    ref = torch_runner(torch_model(weights))(x)[-1]
    out = graph_logits(path, x)
    return ParityReport([("logits", rel_diff(ref, out))], same_top5(ref, out), parity.DEFAULT_TOL,
                        f"PyTorch {weights.path}", f"MindIR {shown_as or path}", (ref, out))


def export_mindir(src: str | Path, dst: str | Path, *, use_ema: bool = False, act: str | None = None,
                  image_size: int = 224, overwrite: bool = False, verify: bool = False) -> tuple[Weights, Exported]:
    """Export the MindSpore model of `src` to the MindIR `dst`; with `verify`, `dst` appears only if its logits
    match PyTorch's within the parity tolerance."""
    start = time.perf_counter()
    ms = require_mindspore("MindIR export")
    src, dst = Path(src), Path(dst)
    if not dst.name.endswith(SUFFIX):
        raise CheckpointError(f"{dst}: a MindIR file's name ends in {SUFFIX} (MindSpore appends it otherwise)")
    check_output(dst, overwrite)
    weights = read_weights(src, use_ema=use_ema, act=act)
    if image_size < weights.arch["patch_size"]:
        raise CheckpointError(f"image size {image_size} is smaller than one {weights.arch['patch_size']}-pixel patch")
    net = ms_model(weights)
    report = None
    with atomic_path(dst, overwrite=overwrite) as stage:
        shape = [None, weights.arch["in_chans"], image_size, image_size]
        ms.export(net, ms.Tensor(shape=shape, dtype=ms.float32), file_name=str(stage), file_format="MINDIR")
        size = stage.stat().st_size
        if verify:
            report = check_mindir(weights, stage, image_size, shown_as=dst)
            if not report.ok:
                raise ExportError(f"{dst}: not written, since the MindIR does not reproduce PyTorch's logits "
                                  f"(relative difference {report.rel_diff:.3g} > {report.tol:g})", report)
    return weights, Exported(dst, size, image_size, time.perf_counter() - start, report)
