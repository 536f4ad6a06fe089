"""A run's outputs as one consistent set, whatever moment it is killed at, and a folder that holds a run is
never overwritten by accident."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from images import make_train_val
from trainutil import ROOT, TINY, cli_args

from convmixer_pt.cli import train as train_cli
from convmixer_pt.runtime import init_distributed
from convmixer_pt.train import config
from convmixer_pt.train.loop import run

pytestmark = pytest.mark.usefixtures("one_thread")

# One intra-op thread everywhere: the killed runs are subprocesses, the clean run and the resumes are not, and
# a different thread count sums in a different order.
RECIPE = dict(TINY, ema=True, ema_decay=0.9, device="cpu", epochs=2, cpu_threads=1)

# For each (k, side, argv): runs the trainer's CLI in a process of its own and kills it (os._exit: no cleanup
# runs, as with SIGKILL) just before or just after its k-th rename of a finished file onto its name, the moments
# at which outputs change; prints each process's exit status. The processes are forked from one that has
# imported the trainer once (one intra-op thread, so forking is safe), not started afresh.
KILL_AT_RENAME = """
import os, sys, json
from convmixer_pt.cli.train import main
for k, side, argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        real, count = os.replace, [0]
        def replace(src, dst):
            count[0] += 1
            if count[0] == k and side == "before":
                os._exit(137)
            real(src, dst)
            if count[0] == k and side == "after":
                os._exit(137)
        os.replace = replace
        os._exit(main(argv))
    print("@@", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_outputs_agree(out: Path) -> dict:
    """last.pth is the record; best.pth holds its best epoch and summary.csv its history; nothing staged."""
    last, best = load(out / "last.pth"), load(out / "best.pth")
    assert (best["epoch"], best["metric"]) == (last["best_epoch"], last["best_score"])
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in last["history"]]
    assert [float(r["val_top1"]) for r in rows] == [h["val_top1"] for h in last["history"]]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".partial-")]
    return last


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, one_thread) -> tuple[Path, dict, list[str]]:
    """An uninterrupted run and the names its renames land on, in order."""
    tmp = tmp_path_factory.mktemp("clean")
    data = make_train_val(tmp / "data")
    names: list[str] = []
    real = os.replace

    def recording(src, dst):
        names.append(Path(dst).name)
        real(src, dst)

    values = dict(RECIPE, data_dir=str(data), output=str(tmp / "run"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", recording)
        run(config.apply(config.TrainConfig(), values), init_distributed("cpu"))
    return tmp, values, names


@pytest.mark.slow
def test_a_kill_at_any_rename_leaves_outputs_that_agree_after_resume(clean_run, tmp_path) -> None:
    clean_dir, values, names = clean_run
    reference = load(clean_dir / "run" / "last.pth")
    assert names.count("last.pth") == 2 and names[0] == "args.yaml"
    moments = [(k, side) for k in range(2, len(names) + 1) for side in ("before", "after")]
    killed = [(k, side, ["--device", "cpu", *cli_args(dict(values, output=str(tmp_path / f"run-{k}-{side}")))])
              for k, side in moments]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, json.dumps(killed)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    statuses = [line for line in proc.stdout.splitlines() if line.startswith("@@ ")]
    assert proc.returncode == 0 and statuses == ["@@ 137"] * len(moments), proc.stderr[-2000:]
    for k, side in moments:
        out = tmp_path / f"run-{k}-{side}"
        if (out / "last.pth").exists():
            assert load(out / "last.pth")["epoch"] in (1, 2)  # a whole checkpoint, never half of one
        assert train_cli.main(["--device", "cpu", *cli_args(dict(values, output=str(out), resume="auto"))]) == 0
        last = assert_outputs_agree(out)
        assert last["epoch"] == 2
        for name, tensor in reference["model"].items():
            assert torch.equal(last["model"][name], tensor), (k, side, name)


def test_a_folder_that_holds_a_run_is_not_started_over_unless_asked(clean_run, tmp_path, capsys) -> None:
    clean_dir, values, _ = clean_run
    out = tmp_path / "run"
    assert train_cli.main(["--device", "cpu", *cli_args(dict(values, output=str(out), stop_epoch=1))]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc = train_cli.main(["--device", "cpu", *cli_args(dict(values, output=str(out)))])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (f"error: {out} already holds a run (last.pth, best.pth, summary.csv, summary.png): "
                               "continue it with --resume auto, or start it over with --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert train_cli.main(["--device", "cpu", *cli_args(dict(values, output=str(out), overwrite=True))]) == 0
    assert load(out / "last.pth")["epoch"] == 2 and len(load(out / "last.pth")["history"]) == 2
    assert_outputs_agree(out)


def test_an_output_that_is_a_file_is_one_line(clean_run, tmp_path, capsys) -> None:
    _, values, _ = clean_run
    (tmp_path / "taken").write_text("not a folder")
    rc = train_cli.main(["--device", "cpu", *cli_args(dict(values, output=str(tmp_path / "taken")))])
    assert rc == 1 and capsys.readouterr().err == f"error: output {tmp_path / 'taken'} is a file, not a folder\n"


def test_resume_brings_best_and_summary_in_line_with_last(clean_run, tmp_path) -> None:
    """The moment the fault test reaches by killing: an epoch that improved has written last.pth but not yet
    best.pth or the summary. Resuming rewrites both from last.pth, which holds the best weights."""
    _, values, _ = clean_run
    out = tmp_path / "run"
    assert train_cli.main(["--device", "cpu", *cli_args(dict(values, output=str(out), stop_epoch=1))]) == 0
    last = load(out / "last.pth")
    assert last["best_epoch"] == last["epoch"] == 1
    torch.save(dict(load(out / "best.pth"), epoch=0, metric=-5.0), out / "best.pth")  # as an earlier epoch left it
    (out / "summary.csv").unlink()
    state = dict(values, output=str(out), resume="auto", stop_epoch=1)  # resume, repair, train no further
    assert train_cli.main(["--device", "cpu", *cli_args(state)]) == 0
    assert_outputs_agree(out)
    best = load(out / "best.pth")
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
