"""Do two ConvMixers (PyTorch or MindSpore) compute the same function? Logits, and the first block to differ.

Both run in float32 on one seeded random batch. The measure is the relative max difference
max|a - b| / max|a| (a: the reference), after the stem, after every block and for the logits, so a user
whose checkpoint does not match learns where the two models part ways, not only that they do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import keymap
from .checkpoint import load_state_dict_strict
from .convert import Weights, ms_to_torch, read_weights, torch_to_ms
from .fast import SettingError
from .model import ConvMixer

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


def compare_outputs(a: list[np.ndarray], b: list[np.ndarray], depth: int, tol: float = DEFAULT_TOL,
                    names: tuple[str, str] = ("A", "B")) -> ParityReport:
    """Compare two runs' outputs (after stem, each block, logits); `a` is the reference."""
    diffs = [(name, rel_diff(sa, sb)) for name, sa, sb in zip(stage_names(depth), a, b, strict=True)]
    top5 = [np.argsort(-logits, axis=1, kind="stable")[:, :5] for logits in (a[-1], b[-1])]
    same = all(set(r) == set(o) for r, o in zip(top5[0], top5[1], strict=True))
    return ParityReport(diffs, same, tol, names[0], names[1], (a[-1], b[-1]))


# ---- runners -----------------------------------------------------------------------------------------------

def torch_runner(model: ConvMixer) -> Runner:
    model.eval()

    @torch.no_grad()
    def run(x: np.ndarray) -> list[np.ndarray]:
        h = model.stem(torch.from_numpy(x))
        outs = [h]
        for block in model.blocks:
            h = block(h)
            outs.append(h)
        outs.append(model.forward_head(h))
        return [o.numpy() for o in outs]

    return run


def ms_runner(net) -> Runner:  # net: ms_model.MSConvMixer (typed loosely to keep MindSpore imports lazy)
    from mindspore import Tensor

    net.set_train(False)
    return lambda x: [o.asnumpy() for o in net.stages(Tensor(x))]


def torch_model(weights: Weights, act: str | None = None) -> ConvMixer:
    """A float32 PyTorch model holding `weights` (any stored dtype)."""
    model = ConvMixer(**dict(weights.model_arch, **({"act": act} if act else {})))
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.state.items()}
    load_state_dict_strict(model, state, str(weights.path))
    return model.eval()


def ms_model_from_params(arch: Mapping, params: Mapping, source: str):
    """A float32 MindSpore model holding MindSpore-named `params` (loaded strictly by name)."""
    from .ms_model import MSConvMixer, load_params_strict

    net = MSConvMixer(**arch)
    as_float32 = {k: v if str(v.dtype) == "Float32" else torch_to_ms(ms_to_torch(v).float())
                  for k, v in params.items()}
    load_params_strict(net, as_float32, source)
    return net


def ms_model(weights: Weights, act: str | None = None, arch: Mapping | None = None):
    """A float32 MindSpore model holding `weights`, renamed through the key map.

    `arch` (default: what the weights imply) gives the constructor arguments; `act` replaces its activation.
    """
    named = keymap.convert_state(weights.state, "mindspore", src="timm")
    params = {k: torch_to_ms(v) for k, v in named.items()}
    arch = dict(weights.model_arch if arch is None else arch, **({"act": act} if act else {}))
    return ms_model_from_params(arch, params, str(weights.path))


def ms_model_from_file(path: str | Path, arch: Mapping):
    """A float32 MindSpore model loaded from a `.ckpt` by MindSpore's own names, without the key map."""
    from .ms_model import read_ms_params

    return ms_model_from_params(arch, read_ms_params(path), str(path))


def compare(torch_checkpoint: str | Path, ms_checkpoint: str | Path, act: str | None = None,
            batch_size: int = 2, image_size: int = 224, seed: int = 0,
            tol: float = DEFAULT_TOL) -> ParityReport:
    """Run the PyTorch model of `torch_checkpoint` and the MindSpore model of `ms_checkpoint` on one batch."""
    weights = read_weights(torch_checkpoint, act=act)
    pt = torch_model(weights)
    ms_net = ms_model_from_file(ms_checkpoint, weights.model_arch)
    x = random_batch(weights.arch["in_chans"], batch_size, image_size, seed)
    return compare_runs(torch_runner(pt), ms_runner(ms_net), x, weights.arch["depth"], tol,
                        (f"PyTorch {torch_checkpoint}", f"MindSpore {ms_checkpoint}"))


def main(argv: list[str] | None = None) -> int:
    """`python -m convmixer_pt.parity model.pth model.ckpt`: exit 0 when the two models agree."""
    import argparse
    import sys

    from .checkpoint import CheckpointError
    from .model import ACTIVATIONS

    p = argparse.ArgumentParser(prog="python -m convmixer_pt.parity", description=compare.__doc__)
    p.add_argument("torch_checkpoint", help="any PyTorch-side file the loader accepts")
    p.add_argument("ms_checkpoint", help="a MindSpore .ckpt in MindCV's names")
    p.add_argument("--act", choices=sorted(ACTIVATIONS), help="activation (default: file record or registry)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        report = compare(args.torch_checkpoint, args.ms_checkpoint, act=args.act, batch_size=args.batch_size,
                         image_size=args.image_size, seed=args.seed)
    except (CheckpointError, SettingError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
