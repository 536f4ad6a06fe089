"""Bad input gets one clear line on stderr and a non-zero exit, not a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from images import make_train_val
from trainutil import TINY, cli_args

from convmixer_pt.cli import train as train_cli


def run_cli(capsys: pytest.CaptureFixture, values: dict, extra: list[str] = ()) -> tuple[int, str]:
    rc = train_cli.main(["--device", "cpu", *cli_args(values), *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(tmp_path / "nowhere"), output=str(tmp_path / "o")))
    assert_one_line(rc, err, f"{tmp_path / 'nowhere'}: data folder not found")


def test_no_data_dir_given(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err = run_cli(capsys, dict(TINY, output=str(tmp_path / "o")))
    assert_one_line(rc, err, "no data folder given: pass --data-dir")


def test_empty_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(tmp_path / "data"), output=str(tmp_path / "o")))
    assert_one_line(rc, err, f"{tmp_path / 'data' / 'train'}: no images found")


@pytest.mark.parametrize("switch", ["CONVMIXER_FAST", "CONVMIXER_FAST_CHANNELS_LAST", "CONVMIXER_FAST_BATCHNORM"])
def test_unknown_fast_path_setting(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch, switch: str) -> None:
    """Every switch's typo is an error even on a CPU, where the kernels (which read the last two) never run."""
    monkeypatch.setenv(switch, "maybe")
    data = make_train_val(tmp_path / "data")
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(data), output=str(tmp_path / "o")))
    assert_one_line(rc, err, f"{switch}='maybe' is not one of 1/true/on or 0/false/off")
    assert not (tmp_path / "o" / "last.pth").exists()


def test_class_count_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_train_val(tmp_path / "data")
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(data), num_classes=1000, output=str(tmp_path / "o")))
    assert_one_line(rc, err, "has 3 classes but the model is configured for num_classes=1000")


def test_split_class_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_train_val(tmp_path / "data")
    shutil.rmtree(data / "val" / "c2")
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(data), output=str(tmp_path / "o")))
    assert_one_line(rc, err, "the classes of train (3) and val (2) differ")


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, workers: int) -> None:
    data = make_train_val(tmp_path / "data")
    bad = sorted((data / "train" / "c1").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:40])  # a truncated PNG
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(data), workers=workers, output=str(tmp_path / "o")))
    assert_one_line(rc, err, f"{bad}: cannot read the image")


def test_unknown_config_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    rc, err = run_cli(capsys, {}, ["--config", str(path)])
    assert_one_line(rc, err, f"{path}: unknown config key 'learning_rate'")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_train_val(tmp_path / "data")
    values = dict(TINY, data_dir=str(data), output=str(tmp_path / "o"))
    assert run_cli(capsys, dict(values, stop_epoch=1))[0] == 0
    last = tmp_path / "o" / "last.pth"
    # Weights blown up to the edge of float32 (a resume may not change the learning rate that would do it): the
    # first step's logits, and so its loss, are no longer finite.
    state = torch.load(last, weights_only=True)
    state["model"]["head.weight"].fill_(3e38)
    torch.save(state, last)
    good = last.read_bytes()
    rc, err = run_cli(capsys, dict(values, resume="auto"))
    assert_one_line(rc, err, "the training loss became", "at epoch 2, step 1 of 6",
                    f"{last} (at the end of epoch 1) is the last good checkpoint")
    assert last.read_bytes() == good


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("auto_augment", "rand-q9", "auto_augment 'rand-q9': timm cannot build it"),
    ("interpolation", "bicubc", "interpolation must be one of random, bilinear, bicubic"),
    ("eval_interpolation", "random", "eval_interpolation must be one of bilinear, bicubic"),
])
def test_transform_typos_are_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: str,
                                           fragment: str) -> None:
    data = make_train_val(tmp_path / "data")
    path = tmp_path / "c.yaml"
    path.write_text(f"{key}: {value}\n")  # in a YAML file: on the command line argparse checks the choices
    rc, err = run_cli(capsys, dict(TINY, data_dir=str(data), output=str(tmp_path / "o")), ["--config", str(path)])
    assert_one_line(rc, err, fragment)
