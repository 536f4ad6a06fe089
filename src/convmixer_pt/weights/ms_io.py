"""MindSpore-side checkpoints without MindSpore: which entries are ConvMixer weights, and what the rest is.

A MindSpore training checkpoint (`save_checkpoint(train_cell)` of a `TrainOneStep...Cell`, as MindCV saves
them) holds, beside the network's `network.*` parameters, the optimizer's slots (`adam_m.network.*`,
`moment1.network.*`, ...) and scalars (`learning_rate`, `beta1_power`, ...), the step (`global_step`), the loss
scale and its counters, and with MindCV's EMA an `ema.` copy of every parameter plus its update counter. The
weights are taken, the rest is counted by kind and dropped, and an entry of no known kind is an error, so
nothing disappears unnoticed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import CheckpointError, brief
from . import keymap
from .ms_files import ms_safetensors_crc

V = TypeVar("V")

EMA_PREFIX = "ema."  # MindCV's EMA: `ParameterTuple(network.get_parameters()).clone("ema")`
# The per-parameter slots of MindSpore's optimizers (`parameters.clone(prefix=...)` in mindspore.nn.optim and
# mindspore.experimental.optim), of MindCV 0.3.0's own (AdamW adam_m / adam_v, Adan moment1-3 and prev_gradient,
# Lion lion_m, NAdam nadam_m / nadam_v) and of the gradient accumulation MindCV's train step uses.
OPTIMIZER_SLOTS = ("adam_m", "adam_v", "moment1", "moment2", "moment3", "prev_gradient", "lion_m", "nadam_m",
                   "nadam_v", "vhat", "moments", "moment", "accum", "accum_update", "exp_avg", "exp_avg_sq",
                   "max_exp_avg_sq", "exp_inf", "lamb_m", "lamb_v", "mean_grad", "mean_square", "linear", "prev",
                   "step_size", "stat", "grad_accumulation")
# Single entries: the optimizer's scalars, the step, the loss-scale cell's state, the EMA update counter.
SCALARS: dict[str, str] = {
    "learning_rate": "optimizer", "beta1_power": "optimizer", "beta2_power": "optimizer", "mu_schedule": "optimizer",
    "accumulation_step": "optimizer", "momentum": "optimizer",
    "global_step": "step", "epoch_num": "step", "step_num": "step",
    "scale_sense": "loss scale", "current_iterator_step": "loss scale", "last_overflow_iterator_step": "loss scale",
    "updates": "EMA",
}
KINDS = ("weights", "optimizer", "step", "loss scale", "EMA")
# MindSpore's gradient accumulation cell (MindCV's gradient_accumulation_steps > 1) holds the optimizer, and every
# parameter the optimizer reaches is saved under this prefix: `optimizer.network.*`, `optimizer.adam_m.network.*`.
ACCUMULATION_PREFIX = "optimizer."


def _unwrapped(name: str) -> str:
    return name.removeprefix(ACCUMULATION_PREFIX)


def kind_of(name: str) -> str | None:
    """'weights', 'optimizer', 'step', 'loss scale' or 'EMA' for an entry of a MindSpore checkpoint; None for
    an entry of no kind MindSpore's training cells write."""
    name = _unwrapped(name)
    if name.startswith(keymap.MS_PREFIX):
        return "weights"
    if name in SCALARS:
        return SCALARS[name]
    prefix, _, rest = name.partition(".")
    if _unwrapped(rest).startswith(keymap.MS_PREFIX):
        if prefix + "." == EMA_PREFIX:
            return "EMA"
        if prefix in OPTIMIZER_SLOTS:
            return "optimizer"
    return None


def is_mindspore_layout(names: Iterable[str]) -> bool:
    """Whether a file's tensor names are MindSpore's (MindCV's `network.*`, or its EMA copy)."""
    return any(n.startswith((keymap.MS_PREFIX, EMA_PREFIX + keymap.MS_PREFIX)) for n in names)


@dataclass
class MSWeights:
    """The network's weights of a MindSpore checkpoint (MindCV's names), and what was dropped beside them."""

    network: dict[str, object]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # kind -> entry names, in file order
    training_state: bool = False  # saved from a training cell: it holds more than the network's weights

    def dropped_line(self) -> str:
        """One line saying what was dropped, with counts per kind; empty when nothing was."""
        if not self.dropped:
            return ""
        parts = []
        for kind, names in self.dropped.items():
            what = "non-EMA weights" if kind == "weights" else kind
            slots = sorted({n.partition(".")[0] + (".*" if "." in n else "") for n in names})
            parts.append(f"{len(names)} {what} ({', '.join(slots[:4])}{', ...' if len(slots) > 4 else ''})")
        total = sum(len(v) for v in self.dropped.values())
        return f"dropped {total} entries of MindSpore training state: {'; '.join(parts)}"


def split_training_state(entries: Mapping[str, V], use_ema: bool = False) -> MSWeights:
    """The network's weights (the EMA copy with `use_ema`, renamed to the network's names) and the rest by kind;
    an entry of no known kind is an error that names it."""
    kinds = {name: kind_of(name) for name in entries}
    unknown = [name for name, kind in kinds.items() if kind is None]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise CheckpointError(f"entry {brief(unknown[0])}{more} is neither a ConvMixer weight (network.*) nor "
                              "MindSpore training state (optimizer, step, loss scale, EMA)")
    taken = "EMA" if use_ema else "weights"
    if use_ema and not any(n.startswith(EMA_PREFIX) for n in entries):
        raise CheckpointError("EMA weights were asked for, but it has none (no ema.network.* entries)")
    network: dict[str, object] = {}
    dropped: dict[str, list[str]] = {}
    for name, value in entries.items():
        kind = kinds[name]
        if kind == taken and (kind == "weights" or name.startswith(EMA_PREFIX)):
            key = name.removeprefix(EMA_PREFIX) if use_ema else _unwrapped(name)
            if isinstance(value, str):
                raise CheckpointError(f"entry {brief(name)} is a string, not a tensor")
            network[key] = value
        else:
            dropped.setdefault(kind, []).append(name)
    if not network:
        found = ", ".join(list(entries)[:8]) or "nothing"
        raise CheckpointError(f"holds no network.* weights (found {found})")
    order = {kind: i for i, kind in enumerate(KINDS)}
    return MSWeights(network, dict(sorted(dropped.items(), key=lambda kv: order[kv[0]])),
                     training_state=any(kind != "weights" for kind in kinds.values()))


def check_safetensors_crc(tensors: Mapping[str, object], metadata: Mapping[str, str]) -> None:
    """Verify the `crc_num` MindSpore writes into a safetensors file's metadata, where the file has one
    (MindSpore itself verifies it only when loading with `crc_check=True`)."""
    if "crc_num" in metadata and str(ms_safetensors_crc(tensors)) != metadata["crc_num"]:
        raise CheckpointError("its CRC32 (crc_num) does not match its content; the file is corrupt")
