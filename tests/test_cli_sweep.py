"""Every flag of every CLI, given values out of its domain: one line on stderr and a non-zero exit (or a
normal run where the value happens to be valid), never a traceback."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
import torch
from images import make_image_folder

from convmixer_pt import create_model
from convmixer_pt.cli import (
    benchmark,
    check_fast_training,
    convert,
    export_mindir,
    export_onnx,
    make_shards,
    parity,
    prepare_imagenet_val,
    train,
    validate,
)
from convmixer_pt.train.config import FIELDS, HINTS, _expected

VALUES = ["-1", "0", "nan", "inf", "1e400", "", "abc", "{folder}/no/such/file", "{folder}"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    torch.save(create_model("convmixer_128_4", num_classes=3, dim=8, depth=1).state_dict(), tmp / "m.pth")
    make_image_folder(tmp / "val", classes=3, images=3)
    (tmp / "labels.csv").write_text("ImageId,PredictionString\nimg,n01440764 1 2 3 4\n")
    return dict(folder=tmp, ckpt=tmp / "m.pth", val=tmp / "val", labels=tmp / "labels.csv")


def bases(f: dict[str, Path], out: Path) -> dict[str, tuple[object, list[str]]]:
    """Per CLI: its module and arguments with which it runs briefly (or stops at a missing folder)."""
    return {
        "train": (train, ["--device", "cpu", "--data-dir", str(out / "no-data"), "--output", str(out / "run"),
                          "--no-progress"]),
        "convert": (convert, [str(f["ckpt"]), str(out / "converted.pth"), "--force"]),
        "validate": (validate, ["--checkpoint", str(f["ckpt"]), "--data-dir", str(out / "no-data"), "--workers", "0",
                                "--device", "cpu", "--no-progress"]),
        # --no-fast: after the kernel tests this process may run the kernels interpreted, far too slowly to sweep
        "benchmark": (benchmark, ["--device", "cpu", "--model", "convmixer_128_4", "--img-size", "8", "--batch-size",
                                  "2", "--infer-batch-size", "2", "--steps", "1", "--repeats", "1", "--warmup", "0",
                                  "--no-fast", "--num-shards", "2", "--num-images", "4"]),
        # On a CPU, "cuda" ends every run that gets past the arguments' checks (the fast path's kernels may run
        # interpreted in this process after the kernel tests, far too slowly for a sweep).
        "check_fast_training": (check_fast_training, ["--device", "cuda", "--model", "convmixer_128_4", "--img-size",
                                                      "8", "--steps", "1", "--batch-size", "2", "--num-batches", "1"]),
        "prepare_imagenet_val": (prepare_imagenet_val, ["--images", str(out / "no-images"), "--labels",
                                                        str(f["labels"]), "--out", str(out / "prepared")]),
        "export_onnx": (export_onnx, [str(f["ckpt"]), str(out / "m.onnx"), "--force", "--img-size", "8"]),
        "make_shards": (make_shards, ["--src", str(f["folder"]), "--out", str(out / "shards"), "--splits", "val"]),
    }


def run_cli(module, argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = module.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def sweep(module, base: list[str], folder: Path, capsys) -> list[tuple[list[str], int, str]]:
    results = []
    for action in module.parser()._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else action.option_strings[0]
        if action.nargs == 0:
            trials = [[flag]]
        else:
            count = action.nargs if isinstance(action.nargs, int) else 1
            trials = [[flag, *[v.format(folder=folder)] * count] for v in VALUES]
        for extra in trials:
            argv = base + extra
            rc, err = run_cli(module, argv, capsys)
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert "Traceback" not in err, (argv, err)
            if rc != 0:  # progress lines may come first; the failure is one line, the last
                assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], (argv, err)
            results.append((extra, rc, err))
    return results


def measure_each_config_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark CLI's trials of flags that leave the measured configurations as the base's (--json,
    --data-dir, --workdir without --loader or --convert, --force, ...) each ran the whole CPU benchmark again:
    the first run of each distinct set of configurations is real; a later run of the same set replays its
    progress lines and returns a copy of its rows, and the CLI goes on (table, --json) as after a real run."""
    measured: dict[tuple, tuple[list[str], list[dict]]] = {}
    real = benchmark.bench

    def bench(configs, log=None, compiled=False, peer_layouts=None):
        key = (tuple(configs), compiled, None if peer_layouts is None else tuple(peer_layouts))
        if key not in measured:
            lines: list[str] = []

            def record(line: str) -> None:
                lines.append(line)
                if log is not None:
                    log(line)

            measured[key] = lines, real(configs, log=record, compiled=compiled, peer_layouts=peer_layouts)
        elif log is not None:
            for line in measured[key][0]:
                log(line)
        return copy.deepcopy(measured[key][1])

    monkeypatch.setattr(benchmark, "bench", bench)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "convert", "validate", "benchmark", "check_fast_training",
                                  "prepare_imagenet_val", "export_onnx", "make_shards"])
def test_every_flag_with_bad_values_is_one_line(name, files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # values such as "abc" are valid output names: write them here
    module, base = bases(files, tmp_path)[name]
    if module is benchmark:
        measure_each_config_once(monkeypatch)
    assert sweep(module, base, files["folder"], capsys)


def test_every_numeric_training_key_has_a_domain(files, tmp_path, capsys) -> None:
    """A negative, infinite or NaN value of any numeric key stops at that key's own check."""
    module, base = bases(files, tmp_path)["train"]
    for key in FIELDS:
        kind, _, item = _expected(HINTS[key])
        if kind not in (int, float, list) or (kind is list and item is str):
            continue
        flag = "--" + key.replace("_", "-")
        messages = [run_cli(module, base + [flag, value], capsys)[1] for value in ("-1", "nan", "inf")]
        assert any(f"{key} must be" in m for m in messages), (key, messages)


@pytest.mark.mindspore
@pytest.mark.slow
def test_parity_flags_with_bad_values_are_one_line(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert convert.main([str(files["ckpt"]), str(tmp_path / "m.ckpt")]) == 0
    capsys.readouterr()
    assert sweep(parity, [str(files["ckpt"]), str(tmp_path / "m.ckpt")], files["folder"], capsys)


@pytest.mark.mindspore
@pytest.mark.slow
def test_export_mindir_flags_with_bad_values_are_one_line(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sweep(export_mindir, [str(files["ckpt"]), str(tmp_path / "m.mindir"), "--force"], files["folder"], capsys)
