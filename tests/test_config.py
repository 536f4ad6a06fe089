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


# Out-of-domain values, each refused when the config is resolved with one line naming the key and the value.
OUT_OF_DOMAIN = [
    ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
    ("lr", 0.0, "lr must be a finite number > 0, got 0.0"),
    ("clip_grad", -1.0, "clip_grad must be a finite number > 0, got -1.0"),
    ("opt_eps", float("inf"), "opt_eps must be a finite number > 0, got inf"),
    ("weight_decay", -1e-5, "weight_decay must be a finite number >= 0"),
    ("workers", -1, "workers must be a whole number from 0 to 1,024, got -1"),
    ("batch_size", 0, "batch_size must be a positive whole number, got 0"),
    ("epochs", 0, "epochs must be a positive whole number, got 0"),
    ("input_size", -224, "input_size must be a positive whole number"),
    ("hflip", 1.5, "hflip must be a probability in [0, 1], got 1.5"),
    ("re_prob", -0.1, "re_prob must be a probability in [0, 1]"),
    ("smoothing", 1.0, "smoothing must be a number in [0, 1), got 1.0"),
    ("crop_pct", 0.0, "crop_pct must be a number in (0, 1], got 0.0"),
    ("ema_decay", 2.0, "ema_decay must be a probability in [0, 1]"),
    ("mean", [0.5, 0.5], "mean must be three finite numbers (R, G, B), got [0.5, 0.5]"),
    ("std", [0.5, 0.0, 0.5], "std must be three finite numbers > 0 (R, G, B)"),
    ("scale", [0.9, 0.1], "scale must be two numbers 0 < min <= max <= 1, got [0.9, 0.1]"),
    ("ratio", [0.0, 1.0], "ratio must be two finite numbers 0 < min <= max"),
    ("opt_betas", [0.9, 1.0], "opt_betas must be two numbers in [0, 1)"),
    ("seed", -3, "seed must be a whole number in [0, 2^32), got -3"),
    ("seed", 2**64, "seed must be a whole number in [0, 2^32), got 18446744073709551616"),
    ("model_args", {"dim": 100_000}, "dim 100000 is above the largest this package builds, 16,384"),
    ("model_args", {"kernel_size": 10_001}, "kernel_size 10001 is above the largest this package builds, 255"),
    ("model_args", {"depth": 1_000_000}, "depth 1000000 is above the largest this package builds, 1,024"),
    ("model_args", {"dim": 16_384, "depth": 1_024}, "a ConvMixer with dim=16384, depth=1024, kernel_size=9, "),
    ("input_size", 1_000_000, "image size 1000000 is above the largest this package takes, 8,192 pixels"),
    ("num_classes", 10**9, "num_classes 1000000000 is above the largest this package builds, 1,000,000"),
    ("synthetic_train_size", 10**12, "synthetic_train_size must be a whole number from 1 to 100,000,000, got "),
    ("workers", 10**6, "workers must be a whole number from 0 to 1,024, got 1000000"),
    ("output", " ", "output must be a non-empty path, got ' '"),
    ("model", "convmixer_9", "model must be one of convmixer_1024_20, "),
    ("model_args", {"kernel_size": 0}, "model_args kernel_size must be a positive whole number, got 0"),
    ("model_args", {"dim": 2.5}, "model_args dim must be a positive whole number, got 2.5"),
    ("model_args", {"act": "tanh"}, "model_args act must be one of gelu, gelu_tanh, relu, silu, got 'tanh'"),
    ("model_args", {"drop_rate": 1.0}, "model_args drop_rate must be a number in [0, 1), got 1.0"),
    ("model_args", {"depth": True}, "model_args depth must be a whole number >= 0, got True"),
]


@pytest.mark.parametrize(("key", "value", "message"), OUT_OF_DOMAIN, ids=[f"{k}={v}" for k, v, _ in OUT_OF_DOMAIN])
def test_out_of_domain_values_are_refused_when_resolved(key, value, message) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.resolve(None, {key: value})
    assert str(info.value) == f"command line: {message}" or str(info.value).startswith(f"command line: {message}")
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize(("values", "message"), [
    (dict(stop_epoch=5, epochs=3), "stop_epoch must be between 1 and epochs (3), got 5"),
    (dict(mixup=0.5, batch_size=3), "mixup/cutmix need an even batch_size, got 3"),
    (dict(resume="auto", overwrite=True), "resume and overwrite contradict each other"),
    (dict(input_size=4), "input_size 4 is smaller than one 7-pixel patch of convmixer_1536_20"),
])
def test_keys_that_contradict_each_other(values, message) -> None:
    with pytest.raises(config.ConfigError, match=f"^command line: {message}".replace("(", r"\(").replace(")", r"\)")):
        config.resolve(None, values)


def test_flags_reach_the_domain_checks() -> None:
    """What argparse's types let through (nan, inf, negative numbers) stops at the domain check."""
    for argv, message in [(["--lr", "nan"], "lr must be a finite number > 0, got nan"),
                          (["--workers", "-1"], "workers must be a whole number from 0 to 1,024, got -1"),
                          (["--model-args", "kernel_size=0"], "model_args kernel_size must be a positive whole")]:
        path, overrides = parse(argv)
        with pytest.raises(config.ConfigError, match=message):
            config.resolve(path, overrides)


def test_a_yaml_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: convmixer_768_32  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(config.ConfigError, match=f"^{path}: not UTF-8 text \\(byte 30\\)$"):
        config.resolve(path, {})


def run_train(*argv: str, timeout: float = 120):
    """convmixer-train in a child process bounded in memory and time."""
    from helpers import run_bounded

    return run_bounded("convmixer_pt.cli.train", *argv, memory_mb=4096, timeout=timeout)


def alias_bomb(levels: int) -> str:
    """YAML of `levels` anchors, each a list of ten aliases of the one before: 10^levels leaves in a few lines."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    # 10^9 leaves: the error message's repr of the unknown key's value ran out of memory (10^8: a 358 MB line).
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(9))
    proc = run_train("--config", str(path), timeout=60)
    line = proc.stderr.strip()
    assert proc.returncode == 1 and len(line.splitlines()) == 1 and len(line) < 300, line[:1000]
    assert line.startswith(f"error: {path}: not valid YAML (it expands to more than 100,000 values"), line
    # A value under the bound (10^4 leaves) still gets a short message: a prefix of the value, not all of it.
    path.write_text(alias_bomb(4).replace("a3: &a3", "mean:"))
    with pytest.raises(config.ConfigError) as info:
        config.resolve(path, {})
    assert "unknown config key 'a0'" in str(info.value)
    path.write_text("std:\n" + "".join(f"  - {line.split(': ', 1)[1]}\n" for line in alias_bomb(4).splitlines()))
    with pytest.raises(config.ConfigError) as info:
        config.resolve(path, {})
    assert str(info.value).startswith(f"{path}: std must be list of float, got [[1, 1, ") and \
        len(str(info.value)) < 300, str(info.value)[:1000]


@pytest.mark.parametrize(("text", "message"), [
    ("epochs: 3\nlr: 0.1\nepochs: 5\n", "key 'epochs' is given twice (line 3)"),
    ("model_args: {dim: 16, dim: 32}\n", "key 'dim' is given twice (line 1)"),
    ("a: &x [*x]\n", "an alias refers to a node that contains it"),
    ("mean: " + "[" * 5000 + "]" * 5000 + "\n", "it nests values too deeply"),
    ("seed: " + "1" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
])
def test_yaml_that_pyyaml_would_take_silently_or_crash_on(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as info:
        config.resolve(path, {})
    assert str(info.value).startswith(f"{path}: not valid YAML (") and message in str(info.value), str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_merge_keys_may_still_override() -> None:
    from convmixer_pt.files import parse_yaml

    assert parse_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")["d"] == {"x": 3, "y": 2}


def test_checkpoint_every_takes_a_yaml_number_as_steps(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint_every: 500\n")
    assert config.resolve(path, {}).checkpoint_every == "500"  # was: "must be str, got 500"
    path.write_text("checkpoint_every: 0\n")
    with pytest.raises(config.ConfigError, match=r"checkpoint_every must be a number of optimizer steps \(500\)"):
        config.resolve(path, {})


@pytest.mark.parametrize("value", ["[1, 2", "'unterminated"])
def test_malformed_model_args_are_a_malformed_command_line(value: str) -> None:
    # Exit 1 with a yaml traceback before; a malformed command line is one line and exit 2.
    proc = run_train("--model-args", f"dim={value}", timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: argument --model-args: {'dim=' + value!r}: the value is not valid YAML (")
