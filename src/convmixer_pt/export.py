"""ONNX export of a ConvMixer, checked against onnxruntime.

Why through torch.export (PyTorch's default ONNX exporter): it records the model's own operators, so the graph
is standard ONNX (Conv, BatchNormalization, Gelu/Relu, ReduceMean, Gemm); the fast path's Triton operators
never reach it (under torch.export the blocks run their plain modules), so a model built with or without them
exports the same graph. The batch axis is dynamic; height and width are fixed at export.

`export_checkpoint` reads any checkpoint the converter reads (official, timm, training checkpoints,
safetensors, MindSpore .ckpt) and writes the .onnx file whole or not at all; with `verify` it first runs
onnxruntime and PyTorch (float32, CPU) on one seeded batch and writes nothing above 1e-5 relative logit
difference or with a different top-5. Needs the `onnx` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError, about
from .files import atomic_path, check_output
from .runtime import MissingDependencyError, install_hint
from .variants import EVAL_INPUT_SIZE, check_sizes
from .weights.formats import Weights, read_weights, recorded_config, torch_model
from .weights.parity import DEFAULT_TOL, random_batch, rel_diff

INPUT_NAME, OUTPUT_NAME = "images", "logits"
NEEDED = ("onnx", "onnxscript", "onnxruntime")
# The opsets torch.export's ONNX exporter writes: 18 natively, later ones up to its table's end. Outside them it
# logged a traceback and wrote opset 18 anyway.
MIN_OPSET = 18


class ExportError(UserError):
    """A model that cannot be exported."""


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime's logits against PyTorch's on one batch."""

    rel_diff: float
    top5_equal: bool
    batch_size: int
    tol: float = DEFAULT_TOL

    @property
    def ok(self) -> bool:
        return self.rel_diff <= self.tol and self.top5_equal

    def line(self) -> str:
        verdict = "match" if self.ok else "DIFFER"
        return (f"{verdict}: onnxruntime vs PyTorch, max relative logit difference {self.rel_diff:.3g} (tolerance "
                f"{self.tol:g}), top-5 {'identical' if self.top5_equal else 'different'}; batch {self.batch_size}, "
                "float32, CPU")


class OnnxVerificationError(UserError):
    """onnxruntime does not compute what PyTorch computes; the report says by how much."""

    def __init__(self, check: OnnxCheck) -> None:
        super().__init__(f"{check.line()}; nothing written")
        self.check = check


def require_onnx() -> None:
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"ONNX export needs {', '.join(missing)}: {install_hint('onnx')}")


def max_opset() -> int:
    """The newest opset the installed exporter knows."""
    from torch.onnx import _constants

    return int(_constants.ONNX_MAX_OPSET)


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter does not write, before any work."""
    if opset is not None and not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"--opset {opset} is outside the opsets this exporter writes, {MIN_OPSET} to {max_opset()}")


def written_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(model: nn.Module, path: str | Path, img_size: int, opset: int | None = None) -> None:
    """Write `model` (float32, eval mode, on the CPU) as ONNX to `path`, one file, the batch axis dynamic."""
    require_onnx()
    example = torch.zeros(2, model.in_chans, img_size, img_size)
    try:
        torch.onnx.export(model.float().cpu().eval(), (example,), str(path), dynamo=True, external_data=False,
                          verbose=False, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # the exporter raises many types; all mean this model did not export
        reason = (re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed: {reason}") from e
    if opset is not None and written_opset(path) != opset:
        raise ExportError(f"torch.onnx.export wrote opset {written_opset(path)}, not the {opset} asked for "
                          "(its version converter failed)")


def onnxruntime_logits(path: str | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def verify_onnx(model: nn.Module, path: str | Path, img_size: int, batch_size: int = 2, seed: int = 0,
                tol: float = DEFAULT_TOL) -> OnnxCheck:
    """onnxruntime on the file at `path` against `model` in PyTorch, on one seeded random batch."""
    x = random_batch(model.in_chans, batch_size, img_size, seed)
    with torch.no_grad():
        reference = model.float().cpu().eval()(torch.from_numpy(x)).numpy()
    got = onnxruntime_logits(path, x)
    top5 = [np.argsort(-logits, axis=1, kind="stable")[:, :5] for logits in (reference, got)]
    same = all(set(a) == set(b) for a, b in zip(top5[0], top5[1], strict=True))
    return OnnxCheck(rel_diff(reference, got), same, batch_size, tol)


def export_checkpoint(checkpoint: str | Path, out: str | Path, act: str | None = None, use_ema: bool = False,
                      img_size: int | None = None, opset: int | None = None, verify: bool = False,
                      overwrite: bool = False) -> tuple[Weights, int, OnnxCheck | None]:
    """The model of a checkpoint file as ONNX in `out` (verified first when `verify`); the weights as read, the
    image size exported (`img_size`, else the size the checkpoint's training recorded, else 224) and the check,
    if it ran."""
    require_onnx()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise ExportError(f"{out}: an ONNX file's name ends in .onnx")
    check_output(out, overwrite)
    check_opset(opset)
    weights = read_weights(checkpoint, use_ema=use_ema, act=act)
    if img_size is None:
        recorded, source = recorded_config(weights)
        try:
            img_size = int(recorded.get("input_size", EVAL_INPUT_SIZE))
        except (TypeError, ValueError):
            raise ExportError(f"{source}: its input_size is not a number of pixels") from None
    check_sizes({}, img_size)
    if img_size < weights.arch["patch_size"]:
        raise ExportError(f"image size {img_size} is smaller than the model's patch size {weights.arch['patch_size']}")
    model = torch_model(weights, fast=False)
    check = None
    with atomic_path(out, overwrite=overwrite) as staged:
        with about(checkpoint):
            export_onnx(model, staged, img_size, opset)
        if verify:
            check = verify_onnx(model, staged, img_size)
            if not check.ok:
                raise OnnxVerificationError(check)
    return weights, img_size, check
