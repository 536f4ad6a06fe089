"""Training configuration as plain data: defaults here, then a YAML file, then command-line flags.

Every key has a default in `TrainConfig`; a YAML file or a flag may only set keys that exist there, so a
typo is an error instead of a silently ignored setting. The defaults are the paper's ImageNet recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, about, brief
from ..evaluation.protocols import INTERPOLATIONS
from ..files import input_problem, parse_yaml, write_text
from ..variants import (
    ACTIVATIONS,
    EVAL_CROP_PCT,
    EVAL_INPUT_SIZE,
    EVAL_INTERPOLATION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_sizes,
    list_models,
    variant_arch,
)

# Constructor arguments of `ConvMixer` that a config may override on top of a registered variant.
CHOICES: dict[str, tuple[str, ...]] = {
    "model": tuple(list_models()),
    "dataset": ("imagefolder", "shards", "digits", "generated", "synthetic"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "mixup_mode": ("batch", "pair", "elem"),
    "re_mode": ("const", "rand", "pixel"),
    "interpolation": ("random", *INTERPOLATIONS),
    "eval_interpolation": INTERPOLATIONS,
}


class ConfigError(UserError):
    """A configuration key or value that cannot be used."""


def checkpoint_interval(value: str) -> tuple[int | None, float | None] | None:
    """`checkpoint_every` as (steps, None) or (None, minutes); None where it is neither."""
    text = value.strip().lower()
    try:
        if text.endswith(("min", "m")):
            minutes = float(text.removesuffix("min").removesuffix("m"))
            return (None, minutes) if math.isfinite(minutes) and minutes > 0 else None
        steps = int(text)
    except ValueError:
        return None
    return (steps, None) if steps > 0 else None


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _finite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


def _pair(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """Two numbers, each `ok`, the first not above the second."""
    return lambda v: len(v) == 2 and all(ok(x) for x in v) and v[0] <= v[1]


_POSITIVE_INT = (lambda v: v >= 1, "a positive whole number")
_COUNT = (lambda v: v >= 0, "a whole number >= 0")
_POSITIVE = (_between(0, math.inf, lo_open=True, hi_open=True), "a finite number > 0")
_NON_NEGATIVE = (_between(0, math.inf, hi_open=True), "a finite number >= 0")
_PROBABILITY = (_between(0, 1), "a probability in [0, 1]")

# The values each key may take beyond its type (None, where the type allows it, always passes).
DOMAINS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys(("input_size", "batch_size", "grad_accum", "epochs", "num_classes", "stop_epoch",
                     "cpu_threads", "log_every"), _POSITIVE_INT),
    # an epoch's sample order is a permutation of this many indices, made before the first step
    **dict.fromkeys(("synthetic_train_size", "synthetic_val_size"),
                    (lambda v: 1 <= v <= 10**8, "a whole number from 1 to 100,000,000")),
    "checkpoint_every": (lambda v: checkpoint_interval(v) is not None,
                         "a number of optimizer steps (500) or of minutes (30m), above 0"),
    "workers": (lambda v: 0 <= v <= 1024, "a whole number from 0 to 1,024"),
    "re_count": _COUNT,
    # torch.manual_seed takes 64 bits and every seed derived from this one adds to it
    "seed": (lambda v: 0 <= v < 2**32, "a whole number in [0, 2^32)"),
    **dict.fromkeys(("lr", "opt_eps", "clip_grad"), _POSITIVE),
    **dict.fromkeys(("weight_decay", "mixup", "cutmix", "color_jitter"), _NON_NEGATIVE),
    **dict.fromkeys(("hflip", "re_prob", "mixup_prob", "mixup_switch_prob", "ema_decay"), _PROBABILITY),
    "smoothing": (_between(0, 1, hi_open=True), "a number in [0, 1)"),
    "crop_pct": (_between(0, 1, lo_open=True), "a number in (0, 1]"),
    "mean": (lambda v: len(v) == 3 and all(_finite(x) for x in v), "three finite numbers (R, G, B)"),
    "std": (lambda v: len(v) == 3 and all(_POSITIVE[0](x) for x in v), "three finite numbers > 0 (R, G, B)"),
    "scale": (_pair(_between(0, 1, lo_open=True)), "two numbers 0 < min <= max <= 1"),
    "ratio": (_pair(_POSITIVE[0]), "two finite numbers 0 < min <= max"),
    "opt_betas": (lambda v: len(v) == 2 and all(_between(0, 1, hi_open=True)(x) for x in v),
                  "two numbers in [0, 1)"),
    **dict.fromkeys(("output", "train_split", "val_split", "data_dir", "finetune", "resume"),
                    (lambda v: v.strip() != "", "a non-empty path")),
}
MODEL_ARG_DOMAINS: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "dim": (int, _POSITIVE_INT[0], _POSITIVE_INT[1]),
    "depth": (int, _COUNT[0], _COUNT[1]),
    "kernel_size": (int, _POSITIVE_INT[0], _POSITIVE_INT[1]),
    "patch_size": (int, _POSITIVE_INT[0], _POSITIVE_INT[1]),
    "in_chans": (int, _POSITIVE_INT[0], _POSITIVE_INT[1]),
    "act": (str, lambda v: v in ACTIVATIONS, f"one of {', '.join(sorted(ACTIVATIONS))}"),
    "drop_rate": (float, _between(0, 1, hi_open=True), "a number in [0, 1)"),
}


@dataclass
class TrainConfig:
    # data
    # imagefolder (data_dir/train, data_dir/val); shards (tar shards with their indexes data_dir/train.json and
    # data_dir/val.json, from convmixer-make-shards); digits (scikit-learn's, as PNGs); generated (JPEGs made up
    # on first use, decoded and augmented as ImageNet is); synthetic (random tensors: no decoding, no augmentation)
    dataset: str = "imagefolder"
    data_dir: str | None = None  # digits/generated: where the tree is written (default ~/.cache/convmixer_pt/...)
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # None: the number of class folders
    synthetic_train_size: int = 1280  # images per epoch of the generated and synthetic datasets
    synthetic_val_size: int = 256
    input_size: int = EVAL_INPUT_SIZE
    # decode each training JPEG at 1/2, 1/4 or 1/8 size where its random crop still has input_size pixels a side
    # there (PIL's draft mode: faster, pixels close to but not those of a full decode; docs/performance.md)
    reduced_decoding: bool = False
    # the loader's workers decode and cut out the crop's region; the resize, flip and RandAugment are drawn there
    # but done on the training device, to the bit as Pillow does them (a worker's CPU time per image about
    # halves; the device's cost is not measured on a GPU yet; docs/performance.md)
    augment_on_device: bool = False
    crop_pct: float = EVAL_CROP_PCT  # eval: resize the shorter side to floor(input_size / crop_pct), center crop
    eval_interpolation: str = EVAL_INTERPOLATION
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # augmentation (timm's create_transform and Mixup)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    interpolation: str = "random"
    hflip: float = 0.5
    color_jitter: float = 0.4  # timm disables it while RandAugment is on
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.5
    cutmix: float = 0.5
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    # model
    model: str = "convmixer_1536_20"
    model_args: dict[str, Any] = field(default_factory=dict)  # overrides of the variant: dim, depth, ...
    finetune: str | None = None  # initial weights (any checkpoint convmixer_pt reads), loaded strictly
    sync_bn: bool = False
    channels_last: bool = False
    compile: bool = False
    # optimisation
    epochs: int = 150  # length of the schedule
    stop_epoch: int | None = None  # end after this many epochs (same schedule); resume later
    batch_size: int = 64  # per process and per accumulation step
    grad_accum: int = 1
    lr: float = 0.01
    opt_eps: float = 1e-3
    opt_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 2e-5
    clip_grad: float | None = 1.0
    ema: bool = False
    ema_decay: float = 0.9998
    bn_average: bool = True  # average BatchNorm running statistics across processes at each epoch end
    # run
    device: str = "auto"
    amp: str = "auto"  # bf16 on CUDA, none on CPU
    workers: int | None = None  # loader workers per process (None: from the cores and the device)
    cpu_threads: int | None = None  # intra-op threads on CPU (None: PyTorch's default, one per core)
    seed: int = 0
    output: str = "runs/train"
    resume: str | None = None  # a last.pth, or "auto" for OUTPUT/last.pth if it exists
    checkpoint_every: str | None = None  # also within epochs: every N optimizer steps ("500") or minutes ("30m")
    tensorboard: bool = False  # TensorBoard scalars in OUTPUT/tensorboard beside summary.csv
    log_every: int = 50  # optimizer steps between TensorBoard's training-loss points
    overwrite: bool = False  # start over in an output folder that already holds a run (replacing it)
    progress: bool = True


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# The keys a resumed run may change: where and how it runs, not what it computes. Any other change is refused
# (state.check_same_run). batch_size and grad_accum may change only as long as the global batch (batch_size x
# grad_accum x processes) stays what it was, so that the epoch's remaining samples are the same.
RESUME_MAY_CHANGE = frozenset({"data_dir", "output", "resume", "overwrite", "stop_epoch", "device", "workers",
                               "cpu_threads", "progress", "checkpoint_every", "tensorboard", "log_every",
                               "batch_size", "grad_accum", "channels_last", "compile"})
HINTS = typing.get_type_hints(TrainConfig)


def _expected(hint: Any) -> tuple[type, bool, type | None]:
    """(base type, optional, list item type) of a field's annotation."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        return list, optional, typing.get_args(hint)[0]
    if origin is dict:
        return dict, optional, None
    return hint, optional, None


def _coerce(key: str, value: Any) -> Any:
    """`value` as `key`'s type, checked against the key's domain."""
    if key == "checkpoint_every" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # YAML reads `checkpoint_every: 500` as a number: that many steps
    value = _typed(key, value)
    if value is not None and key in DOMAINS and not DOMAINS[key][0](value):
        raise ConfigError(f"{key} must be {DOMAINS[key][1]}, got {brief(value)}")
    return value


def _model_args(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if key not in MODEL_ARG_DOMAINS:
            raise ConfigError(f"unknown model_args key {brief(key)}; known keys: {', '.join(MODEL_ARG_DOMAINS)}")
        kind, ok, text = MODEL_ARG_DOMAINS[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
            raise ConfigError(f"model_args {key} must be {text}, got {brief(value)}")
        out[key] = value
    return out


def _typed(key: str, value: Any) -> Any:
    base, optional, item = _expected(HINTS[key])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be empty")

    def bad() -> ConfigError:
        return ConfigError(f"{key} must be {base.__name__}"
                           f"{' of ' + item.__name__ if item else ''}, got {brief(value)}")

    if base is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if base is str:
        if not isinstance(value, str):
            raise bad()
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {brief(value)}")
        return value
    if base is list:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                            for v in value):
            raise bad()
        return [item(v) for v in value]
    if base is dict:
        if not isinstance(value, dict):
            raise bad()
        return _model_args(value)
    raise bad()


def apply(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of `cfg` with `values` set; unknown keys and ill-typed values raise ConfigError."""
    for key in values:
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {brief(key)}")
    updates = {k: _coerce(k, v) for k, v in values.items()}
    if "model_args" in updates:  # merged, so a flag can change one size without restating the others
        updates["model_args"] = {**cfg.model_args, **updates["model_args"]}
    return dataclasses.replace(cfg, **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    problem = input_problem(path)
    if problem:
        raise ConfigError(f"{path}: {'config file not found' if problem == 'no such file' else problem}")
    try:
        data = parse_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def resolve(config_path: str | Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < overrides (the command line)."""
    cfg = TrainConfig()
    if config_path is not None:
        values = load_yaml(config_path)
        with about(config_path):
            cfg = apply(cfg, values)
    with about("command line"):
        cfg = apply(cfg, overrides)
    with about(config_path or "command line"):
        check(cfg)
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False), overwrite=True)  # the run's own


def check(cfg: TrainConfig) -> None:
    """Relations between keys that no single key's domain can state, and that the model builds."""
    if cfg.stop_epoch is not None and cfg.stop_epoch > cfg.epochs:
        raise ConfigError(f"stop_epoch must be between 1 and epochs ({cfg.epochs}), got {cfg.stop_epoch}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")
    if cfg.resume is not None and cfg.overwrite:
        raise ConfigError("resume and overwrite contradict each other: continue the run or start it over")
    arch = {**variant_arch(cfg.model), **cfg.model_args}
    try:  # before data or a model is built
        check_sizes({**arch, "num_classes": cfg.num_classes}, cfg.input_size)
    except UserError as e:
        raise ConfigError(str(e)) from None
    if cfg.input_size < arch["patch_size"]:
        raise ConfigError(f"input_size {cfg.input_size} is smaller than one {arch['patch_size']}-pixel patch "
                          f"of {cfg.model}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {brief(text)}")
    try:
        return key, parse_yaml(value)
    except yaml.YAMLError as e:  # argparse reports this one line with exit status 2
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise argparse.ArgumentTypeError(f"{brief(text)}: the value is not valid YAML ({reason})") from None


def _none_or(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (`batch_size` -> `--batch-size`); flags left out do not override."""
    parser.add_argument("--config", help="YAML file with config keys (flags override it)")
    for name in FIELDS:
        base, optional, item = _expected(HINTS[name])
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kwargs.update(nargs="+", type=item, metavar=name.upper())
        elif base is dict:
            kwargs.update(nargs="+", type=_parse_model_arg, metavar="KEY=VALUE",
                          help=f"override the variant's {', '.join(MODEL_ARG_DOMAINS)}")
        else:
            kwargs["type"] = _none_or(base) if optional else base
            if name in CHOICES:
                kwargs["choices"] = CHOICES[name]
        default = getattr(TrainConfig(), name)
        kwargs["help"] = f"{kwargs.get('help', '')}{'; ' if 'help' in kwargs else ''}default {default!r}"
        parser.add_argument(_flag(name), **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k in FIELDS}
    if "model_args" in values:
        values["model_args"] = dict(values["model_args"])
    return values
