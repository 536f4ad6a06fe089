"""Config precedence (defaults < YAML < command line), strictness about keys and types, args.yaml round trip."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from convmixer_pt.train import config


def parse(argv: list[str]) -> tuple[str | None, dict]:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    return args.config, config.overrides_from_args(args)


def test_defaults_are_the_paper_recipe() -> None:
    cfg = config.TrainConfig()
    assert (cfg.lr, cfg.opt_eps, cfg.weight_decay, cfg.clip_grad) == (0.01, 1e-3, 2e-5, 1.0)
    assert (cfg.mixup, cfg.cutmix, cfg.smoothing, cfg.re_prob, cfg.re_mode) == (0.5, 0.5, 0.1, 0.25, "pixel")
    assert cfg.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.interpolation == "random"


def test_precedence_defaults_yaml_cli(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nbatch_size: 8\nmodel_args: {dim: 16, depth: 2}\nhflip: 0\n")
    cfg_path, overrides = parse(["--config", str(path), "--batch-size", "4", "--model-args", "depth=1",
                                 "--no-bn-average", "--stop-epoch", "3", "--scale", "0.5", "1"])
    cfg = config.resolve(cfg_path, overrides)
    assert cfg.epochs == 7  # YAML over default
    assert cfg.batch_size == 4  # command line over YAML
    assert cfg.lr == 0.01  # default kept
    assert cfg.model_args == {"dim": 16, "depth": 1}  # merged key by key
    assert cfg.hflip == 0.0 and isinstance(cfg.hflip, float)
    assert cfg.bn_average is False and cfg.stop_epoch == 3 and cfg.scale == [0.5, 1.0]


def test_none_from_command_line() -> None:
    _, overrides = parse(["--clip-grad", "none", "--auto-augment", "null"])
    cfg = config.resolve(None, overrides)
    assert cfg.clip_grad is None and cfg.auto_augment is None


@pytest.mark.parametrize("text, message", [
    ("epocs: 3\n", "unknown config key 'epocs'"),
    ("model_args: {width: 3}\n", "unknown model_args key 'width'"),
    ("epochs: three\n", "epochs must be int, got 'three'"),
    ("device: tpu\n", "device must be one of auto, cpu, cuda, got 'tpu'"),
    ("batch_size:\n", "batch_size may not be empty"),
    ("- 1\n", "expected a mapping of config keys"),
])
def test_bad_yaml_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")) as info:
        config.resolve(path, {})
    assert str(path) in str(info.value)


def test_unknown_flag_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse(["--epocs", "3"])


def test_args_yaml_round_trip(tmp_path: Path) -> None:
    cfg = config.apply(config.TrainConfig(), dict(epochs=5, model_args={"dim": 8}, resume="auto",
                                                  ratio=[0.75, 4 / 3]))
    config.save_yaml(cfg, tmp_path / "args.yaml")
    assert config.resolve(tmp_path / "args.yaml", {}) == cfg


@pytest.mark.parametrize("name", ["digits", "convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20"])
def test_shipped_configs_load(name: str) -> None:
    cfg = config.resolve(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml", {})
    if name != "digits":
        assert cfg.batch_size * 10 == 640 and cfg.model == name and cfg.lr == 0.01
