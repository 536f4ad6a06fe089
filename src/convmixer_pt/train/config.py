"""Training configuration as plain data: defaults here, then a YAML file, then command-line flags.

Every key has a default in `TrainConfig`; a YAML file or a flag may only set keys that exist there, so a
typo is an error instead of a silently ignored setting. The defaults are the paper's ImageNet recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, about
from ..files import write_text
from ..variants import EVAL_CROP_PCT, EVAL_INPUT_SIZE, EVAL_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD

# Constructor arguments of `ConvMixer` that a config may override on top of a registered variant.
MODEL_ARG_KEYS = ("dim", "depth", "kernel_size", "patch_size", "act", "in_chans", "drop_rate")
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("imagefolder", "digits", "synthetic"),
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "none"),
    "mixup_mode": ("batch", "pair", "elem"),
    "re_mode": ("const", "rand", "pixel"),
    "interpolation": ("random", "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"),
    "eval_interpolation": ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming"),
}


class ConfigError(UserError):
    """A configuration key or value that cannot be used."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "imagefolder"  # imagefolder (data_dir/train, data_dir/val), digits, synthetic
    data_dir: str | None = None  # for digits: where the PNG tree is cached (default ~/.cache/convmixer_pt/digits)
    train_split: str = "train"
    val_split: str = "val"
    num_classes: int | None = None  # None: the number of class folders
    synthetic_train_size: int = 1280  # images per epoch of the synthetic dataset
    synthetic_val_size: int = 256
    input_size: int = EVAL_INPUT_SIZE
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
    workers: int = 4
    cpu_threads: int | None = None  # intra-op threads on CPU (None: PyTorch's default, one per core)
    seed: int = 0
    output: str = "runs/train"
    resume: str | None = None  # a last.pth, or "auto" for OUTPUT/last.pth if it exists
    progress: bool = True


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
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
    base, optional, item = _expected(HINTS[key])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be empty")

    def bad() -> ConfigError:
        return ConfigError(f"{key} must be {base.__name__}"
                           f"{' of ' + item.__name__ if item else ''}, got {value!r}")

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
            raise ConfigError(f"{key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
        return value
    if base is list:
        if not isinstance(value, list | tuple) or not all(isinstance(v, int | float) for v in value):
            raise bad()
        return [item(v) for v in value]
    if base is dict:
        if not isinstance(value, dict):
            raise bad()
        unknown = [k for k in value if k not in MODEL_ARG_KEYS]
        if unknown:
            raise ConfigError(f"unknown model_args key {unknown[0]!r}; known keys: "
                              f"{', '.join(MODEL_ARG_KEYS)}")
        return dict(value)
    raise bad()


def apply(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """A copy of `cfg` with `values` set; unknown keys and ill-typed values raise ConfigError."""
    for key in values:
        if key not in FIELDS:
            raise ConfigError(f"unknown config key {key!r}")
    updates = {k: _coerce(k, v) for k, v in values.items()}
    if "model_args" in updates:  # merged, so a flag can change one size without restating the others
        updates["model_args"] = {**cfg.model_args, **updates["model_args"]}
    return dataclasses.replace(cfg, **updates)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
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
        return apply(cfg, overrides)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check(cfg: TrainConfig) -> None:
    """Relations between keys that no single key's type can state."""
    if cfg.epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.stop_epoch is not None and not 1 <= cfg.stop_epoch <= cfg.epochs:
        raise ConfigError(f"stop_epoch must be between 1 and epochs ({cfg.epochs}), got {cfg.stop_epoch}")
    if cfg.batch_size < 1 or cfg.grad_accum < 1:
        raise ConfigError(f"batch_size and grad_accum must be positive, got {cfg.batch_size} and {cfg.grad_accum}")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"mixup/cutmix need an even batch_size, got {cfg.batch_size}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


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
                          help=f"override the variant's {', '.join(MODEL_ARG_KEYS)}")
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
