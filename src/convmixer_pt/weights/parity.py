"""Do two ConvMixers (PyTorch or MindSpore) compute the same function? Logits, and the first block to differ.

Both run in float32 on one seeded random batch. The measure is the relative max difference
max|a - b| / max|a| (a: the reference), after the stem, after every block and for the logits, so a user
whose checkpoint does not match learns where the two models part ways, not only that they do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..model import ConvMixer
from ..runtime import require_mindspore
from .formats import Weights, ms_model, read_weights, torch_model
from .ms_net import ms_model_from_file

DEFAULT_TOL = 1e-5  # float32; MindSpore's tanh GELU alone moves ConvMixer logits by ~1e-4

Runner = Callable[[np.ndarray], list[np.ndarray]]  # a batch -> outputs after stem, each block, logits


def rel_diff(ref: np.ndarray, other: np.ndarray) -> float:
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    scale = float(np.abs(ref).max())
    return float(np.abs(ref - other).max()) / (scale if scale > 0 else 1.0)


def stage_names(depth: int) -> list[str]:
    return ["stem", *[f"block {i}" for i in range(depth)], "logits"]


@dataclass
class ParityReport:
    stage_diffs: list[tuple[str, float]]
    top5_equal: bool
    tol: float = DEFAULT_TOL
    reference: str = "A"
    other: str = "B"
    logits: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (reference, other)

    @property
    def rel_diff(self) -> float:
        return self.stage_diffs[-1][1]

    @property
    def first_divergent(self) -> str | None:
        return next((name for name, d in self.stage_diffs if d > self.tol), None)

    @property
    def ok(self) -> bool:
        return self.rel_diff <= self.tol and self.top5_equal

    def lines(self) -> list[str]:
        verdict = "match" if self.ok else "DIFFER"
        out = [f"{verdict}: max relative logit difference {self.rel_diff:.3g} (tolerance {self.tol:g}), "
               f"top-5 {'identical' if self.top5_equal else 'different'}; {self.reference} vs {self.other}"]
        if self.first_divergent is not None:
            name = self.first_divergent
            diff = dict(self.stage_diffs)[name]
            out.append(f"first divergence after {name} (relative difference {diff:.3g}); check that layer's "
                       "weights, activation and padding")
        return out


def random_batch(in_chans: int, batch_size: int = 2, image_size: int = 224, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, in_chans, image_size, image_size, generator=gen).numpy()


def compare_runs(ref: Runner, other: Runner, x: np.ndarray, depth: int, tol: float = DEFAULT_TOL,
                 names: tuple[str, str] = ("A", "B")) -> ParityReport:
    return compare_outputs(ref(x), other(x), depth, tol, names)


def same_top5(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two batches of logits rank the same five classes first, image by image."""
    top5 = [np.argsort(-logits, axis=1, kind="stable")[:, :5] for logits in (a, b)]
    return all(set(r) == set(o) for r, o in zip(top5[0], top5[1], strict=True))


def compare_outputs(a: list[np.ndarray], b: list[np.ndarray], depth: int, tol: float = DEFAULT_TOL,
                    names: tuple[str, str] = ("A", "B")) -> ParityReport:
    """Compare two runs' outputs (after stem, each block, logits); `a` is the reference."""
    diffs = [(name, rel_diff(sa, sb)) for name, sa, sb in zip(stage_names(depth), a, b, strict=True)]
    return ParityReport(diffs, same_top5(a[-1], b[-1]), tol, names[0], names[1], (a[-1], b[-1]))


# ---- runners -----------------------------------------------------------------------------------------------

def torch_runner(model: ConvMixer) -> Runner:
    model.eval()

    @torch.no_grad()
    def run(x: np.ndarray) -> list[np.ndarray]:
        return [o.numpy() for o in model.stages(torch.from_numpy(x))]

    return run


def ms_runner(net: Any) -> Runner:  # net: an MSConvMixer (typed loosely: MindSpore is imported lazily)
    from mindspore import Tensor

    net.set_train(False)
    return lambda x: [o.asnumpy() for o in net.stages(Tensor(x))]


def compare(torch_checkpoint: str | Path, ms_checkpoint: str | Path, act: str | None = None,
            batch_size: int = 2, image_size: int = 224, seed: int = 0,
            tol: float = DEFAULT_TOL) -> ParityReport:
    """Run the PyTorch model of `torch_checkpoint` and the MindSpore model of `ms_checkpoint` on one batch, each
    with its own file's activation (its record), else `act`, else the registry's."""
    require_mindspore("the parity check (it runs the MindSpore model)")
    weights = read_weights(torch_checkpoint, act=act)
    if batch_size < 1 or image_size < weights.arch["patch_size"]:
        raise UserError(f"the batch needs at least one image of at least one {weights.arch['patch_size']}-pixel "
                        f"patch, got batch size {batch_size} and image size {image_size}")
    ms_act, _ = read_weights(ms_checkpoint, act=weights.act or "gelu").reference_act
    pt = torch_model(weights, act=weights.reference_act[0])
    ms_net = ms_model_from_file(ms_checkpoint, dict(weights.model_arch, act=ms_act))
    x = random_batch(weights.arch["in_chans"], batch_size, image_size, seed)
    return compare_runs(torch_runner(pt), ms_runner(ms_net), x, weights.arch["depth"], tol,
                        (f"PyTorch {torch_checkpoint}", f"MindSpore {ms_checkpoint}"))


def output_act(weights: Weights, back: Weights) -> tuple[str, str]:
    """The activation an output runs: its own record, else (a format that cannot record one) what the converter
    states for the weights."""
    if back.act_source == "file metadata" and back.act is not None:
        return back.act, "its metadata"
    return weights.act or "gelu", weights.act_source


def verify_output(weights: Weights, out: Path, image_size: int = 224, seed: int = 0, progress: bool = False,
                  tol: float | None = None) -> ParityReport:
    """The model of `weights` against the model loaded from `out` by its own framework's loader; each model in
    the framework its file is meant for, each with its own file's activation, so weights stated with another
    activation than their file implies fail. `tol` (default DEFAULT_TOL, read when called) bounds the relative
    logit difference."""
    ref_act, _ = weights.reference_act
    if weights.framework == "mindspore":
        ref = ms_runner(ms_model(weights, act=ref_act))
    else:
        ref = torch_runner(torch_model(weights, act=ref_act))
    back = read_weights(out)
    out_act, _ = output_act(weights, back)
    if back.framework == "mindspore":
        other = ms_runner(ms_model_from_file(out, dict(weights.model_arch, act=out_act)))
    else:
        other = torch_runner(torch_model(back, act=out_act))
    x = random_batch(weights.arch["in_chans"], image_size=image_size, seed=seed)
    names = (f"input ({weights.framework}, {ref_act})", f"output ({back.framework}, {out_act})")
    with tqdm(total=2, desc="verify", unit="model", disable=not progress, leave=False) as bar:
        outputs = []
        for run in (ref, other):
            outputs.append(run(x))
            bar.update()
    return compare_outputs(*outputs, weights.arch["depth"], DEFAULT_TOL if tol is None else tol, names)
