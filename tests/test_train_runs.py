"""A run folder belongs to one run: one trainer at a time, a resume continues the run in its own folder with the
run's own settings and global batch, a last.pth is checked field by field, and signals from the first moment
of the command end it with one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_bad_image_named_once
from images import make_train_val
from trainutil import ROOT, TINY, child_env, cli_args, torchrun

from convmixer_pt.cli import train as train_cli

pytestmark = pytest.mark.usefixtures("one_thread")

VALUES = dict(TINY, device="cpu", cpu_threads=1)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (which holds the pid of the trainer that last took it)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def train(capsys: pytest.CaptureFixture, values: dict) -> tuple[int, str]:
    rc = train_cli.main(cli_args(values))
    return rc, capsys.readouterr().err.strip()


def one_line(rc: int, err: str, expected_rc: int = 1, prefix: str = "error: ") -> str:
    assert rc == expected_rc, err
    assert len(err.splitlines()) == 1 and err.startswith(prefix), err
    return err


# Runs the trainer's CLI with one disturbance: `usr1-at-step K` sends SIGUSR1 as step K starts; `signal-in-setup
# NAME` sends signal NAME while the model is being built; `sigint-at-worker K` sends SIGINT to the whole process
# group right after the K-th loader worker started; `sigint-in-finalizer K` presses Ctrl-C inside a finalizer
# (where Python swallows the KeyboardInterrupt) as step K starts; `kill-worker K` has the K-th sample read by a
# loader worker kill that worker; `pause-at-step K FILE` waits at step K until FILE exists.
DISTURB = """
import json, os, signal, sys, time
import multiprocessing.process as mp
import torch
mode, arg, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
count = [0]
if mode in ("usr1-at-step", "sigint-in-finalizer", "pause-at-step"):
    k, real = int(arg.split()[0]), torch.optim.AdamW.zero_grad
    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    def zero_grad(self, *a, **kw):
        count[0] += 1
        if count[0] == k:
            if mode == "usr1-at-step":
                os.kill(os.getpid(), signal.SIGUSR1)
            elif mode == "sigint-in-finalizer":
                Finalized()
            else:
                print("paused", flush=True)
                while not os.path.exists(arg.split()[1]):
                    time.sleep(0.05)
        return real(self, *a, **kw)
    torch.optim.AdamW.zero_grad = zero_grad
elif mode == "signal-in-setup":
    import convmixer_pt.train.loop as loop
    real_parts = loop.build_parts
    def build_parts(*a, **kw):
        os.kill(os.getpid(), getattr(signal, arg))
        return real_parts(*a, **kw)
    loop.build_parts = build_parts
elif mode == "sigint-at-worker":
    real_start = mp.BaseProcess.start
    def start(self):
        real_start(self)
        count[0] += 1
        if count[0] == int(arg):
            os.killpg(os.getpgrp(), signal.SIGINT)
    mp.BaseProcess.start = start
elif mode == "kill-worker":
    from convmixer_pt import data
    real_item = data.ImageFolder.__getitem__
    def getitem(self, key):
        count[0] += 1
        if torch.utils.data.get_worker_info() is not None and count[0] == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_item(self, key)
    data.ImageFolder.__getitem__ = getitem
from convmixer_pt.cli.train import main
sys.exit(main(argv))
"""


def disturbed(tmp: Path, mode: str, arg: object, values: dict, wait: bool = True):
    """The trainer's CLI in a subprocess of its own process group (a signal to the group reaches no test)."""
    script = tmp / "disturb.py"
    script.write_text(DISTURB)
    cmd = [sys.executable, str(script), mode, str(arg), json.dumps(cli_args(values))]
    env = child_env()
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
                          start_new_session=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_train_val(tmp_path_factory.mktemp("runs") / "data")


@pytest.fixture(scope="module")
def after_epoch_1(data, tmp_path_factory, one_thread) -> Path:
    """A run of 3 epochs stopped after the first: a folder to copy and resume."""
    out = tmp_path_factory.mktemp("epoch1") / "run"
    assert train_cli.main(cli_args(dict(VALUES, data_dir=str(data), output=str(out), stop_epoch=1))) == 0
    return out


@pytest.fixture(scope="module")
def mid_epoch(data, tmp_path_factory) -> tuple[Path, str]:
    """A run stopped by SIGUSR1 at epoch 1, step 3 of 6, and the stop line it printed."""
    tmp = tmp_path_factory.mktemp("mid")
    out = tmp / "run"
    proc = disturbed(tmp, "usr1-at-step", 3, dict(VALUES, data_dir=str(data), output=str(out)))
    assert proc.returncode == 128 + signal.SIGUSR1, proc.stderr[-2000:]
    return out, proc.stderr.strip().splitlines()[-1]


def copy_run(run: Path, tmp: Path) -> Path:
    out = tmp / "run"
    shutil.copytree(run, out)
    return out


# Item 4: --resume A/last.pth --output B, where B holds another run.
def test_resume_continues_the_run_in_its_own_folder(data, after_epoch_1, tmp_path, capsys) -> None:
    other = tmp_path / "other"
    assert train_cli.main(cli_args(dict(VALUES, data_dir=str(data), output=str(other), stop_epoch=1, seed=5))) == 0
    before = snapshot(other)
    resume = after_epoch_1 / "last.pth"
    err = one_line(*train(capsys, dict(VALUES, data_dir=str(data), output=str(other), resume=str(resume))))
    assert err == (f"error: --resume {resume}: that run's folder is {after_epoch_1}, not --output {other}; a run "
                   f"continues in its own folder (--output {after_epoch_1}), or start a new run from its weights "
                   f"with --finetune {resume}")
    assert snapshot(other) == before
    fresh = tmp_path / "fresh"
    one_line(*train(capsys, dict(VALUES, data_dir=str(data), output=str(fresh), resume=str(resume))))
    assert not fresh.exists()


# Item 5: two trainers in one output folder.
def test_a_second_trainer_in_the_same_folder_refuses(data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    values = dict(VALUES, data_dir=str(data), output=str(out), epochs=1)
    first = disturbed(tmp_path, "pause-at-step", f"2 {tmp_path / 'go'}", values, wait=False)
    try:
        assert first.stdout.readline().strip().startswith("convmixer_128_4")  # the run line, then "paused"
        assert first.stdout.readline().strip() == "paused"
        for second in (values, dict(values, overwrite=True), dict(values, resume="auto")):
            err = one_line(*train(capsys, second))
            assert err == (f"error: {out}: another trainer (pid {first.pid} on {os.uname().nodename}) is writing "
                           "this run folder; wait for it to end, or give another --output")
    finally:
        (tmp_path / "go").touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert load(out / "last.pth")["epoch"] == 1 and load(out / "last.pth")["config"]["overwrite"] is False
    assert train_cli.main(cli_args(dict(values, overwrite=True))) == 0  # the folder is free again


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, capsys) -> None:
    out = tmp_path / "new" / "run"
    one_line(*train(capsys, dict(VALUES, data_dir=str(tmp_path / "nowhere"), output=str(out))))
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_under_torchrun_a_refusal_is_printed_once(data, after_epoch_1, tmp_path) -> None:
    other = tmp_path / "other"
    proc = torchrun(dict(TINY, data_dir=str(data), output=str(other), resume=str(after_epoch_1 / "last.pth"),
                         batch_size=2))
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and proc.stderr.count("that run's folder is") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("error: ")[0], proc.stderr[-3000:]


# Item 8: a mid-epoch last.pth resumed with another global batch.
def test_a_changed_global_batch_is_refused(data, mid_epoch, tmp_path, capsys) -> None:
    out = copy_run(mid_epoch[0], tmp_path)
    before = snapshot(out)
    err = one_line(*train(capsys, dict(VALUES, data_dir=str(data), output=str(out), resume="auto", batch_size=2)))
    assert err == (f"error: {out / 'last.pth'}: the run's global batch is 4 (4 x 1 accum x 1 process(es)), this "
                   "command's 2 (2 x 1 accum x 1); resume with a global batch of 4, so that no sample is skipped or "
                   "seen twice")
    assert snapshot(out) == before


def test_the_stop_and_the_resume_name_the_same_place(data, mid_epoch, tmp_path, capsys) -> None:
    """Item 19: one vocabulary, and what may change on resume (workers, checkpoint interval) does."""
    out = copy_run(mid_epoch[0], tmp_path)
    assert mid_epoch[1] == (f"stopped: SIGUSR1 at epoch 1, step 3 of 6; {mid_epoch[0] / 'last.pth'} holds it: "
                            "continue with --resume auto")
    values = dict(VALUES, data_dir=str(data), output=str(out), resume="auto", workers=1, checkpoint_every="50")
    assert train_cli.main(cli_args(values)) == 0
    assert f"resumed from {out / 'last.pth'} at epoch 1, step 3 of 6" in capsys.readouterr().out
    rows = load(out / "last.pth")["history"]
    assert len(rows) == 3 and all(row["img_per_s"] > 0 for row in rows)


# Item 18: settings that change the run, and a last.pth that lies.
@pytest.mark.parametrize(("key", "value", "old", "shown"), [
    ("seed", 1, "0", "1"), ("lr", 0.5, "0.01", "0.5"), ("epochs", 5, "3", "5"), ("mixup", 0.2, "0.5", "0.2"),
    ("model_args", dict(dim=32), "{'dim': 16, 'depth': 1, 'kernel_size': 3, 'patch_size': 4}",
     "{'dim': 32}"),
])
def test_a_resume_that_changes_the_run_is_refused(data, after_epoch_1, tmp_path, capsys, key, value, old,
                                                  shown) -> None:
    out = copy_run(after_epoch_1, tmp_path)
    before = snapshot(out)
    err = one_line(*train(capsys, dict(VALUES, data_dir=str(data), output=str(out), resume="auto", **{key: value})))
    assert err == (f"error: {out / 'last.pth'}: the run was started with {key} {old}, and this command gives "
                   f"{shown}; a resumed run keeps its settings ({out / 'args.yaml'}): drop the change, or start a "
                   "new run in another --output")
    assert snapshot(out) == before


def _set(path: tuple, value: object):
    def change(state: dict) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _other_optimizer(state: dict) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state["optimizer"] = opt.state_dict()


def _reshaped_optimizer(state: dict) -> None:
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"].reshape(-1)


CORRUPTIONS = {
    "epoch 99 of 3": (_set(("epoch",), 99), "epoch is 99, not a count of completed epochs of the run's 3"),
    "epoch a string": (_set(("epoch",), "1"), "epoch is '1'"),
    "negative batch": (_set(("batch",), -3), "batch is -3"),
    "batch beyond the epoch": (lambda state: state.update(batch=40, step=46),
                               "was written at epoch 2, step 40 of 6, but an epoch of this training set has 6 steps"),
    "step below batch": (_set(("step",), -1), "step is -1"),
    "history too short": (_set(("history",), []), "history is not a list of 1 epoch rows"),
    "history row": (_set(("history", 0, "val_top1"), "high"), "history row 1 is not a summary row of epoch 1"),
    "best_score NaN": (_set(("best_score",), float("nan")), "best_score is nan, not a finite number"),
    "best_score text": (_set(("best_score",), "good"), "best_score is 'good'"),
    "best_epoch": (_set(("best_epoch",), 7), "best_epoch is 7"),
    "epoch_loss": (_set(("epoch_loss",), None), "epoch_loss is None"),
    "rng not a list": (_set(("rng",), 5), "rng is not a list"),
    "rng of a process": (_set(("rng", 0, "python"), [3, [1, 2], None]), "rng of process 0 is not a generator state"),
    "torch rng": (_set(("rng", 0, "torch"), torch.zeros(3, dtype=torch.uint8)),
                  "rng of process 0 is not a generator state"),
    "numpy rng": (_set(("rng", 0, "numpy"), ["MT19937", torch.zeros(5, dtype=torch.int64), 0, 0, 0.0]),
                  "rng of process 0 numpy is not 624 words"),
    "processes": (_set(("processes",), [{}, {}]), "processes is not a list of 1 process states"),
    "buffers renamed": (_set(("processes", 0, "buffers"), {"x": torch.zeros(1)}), "processes[0] buffers does not "
                                                                                 "have this model's buffers"),
    "buffer reshaped": (_set(("processes", 0, "buffers", "stem.2.running_mean"), torch.zeros(3)),
                        "processes[0] buffers stem.2.running_mean is not a (16,) float32 tensor"),
    "optimizer of another model": (_other_optimizer, "its optimizer state does not fit this model"),
    "optimizer moments reshaped": (_reshaped_optimizer, "its optimizer state does not fit this model (exp_avg"),
    "optimizer not a state": (_set(("optimizer",), [1, 2]), "optimizer is not an optimizer state"),
    "config": (_set(("config",), "yes"), "config is 'yes', not the run's settings"),
    "version": (_set(("version",), 9), "version is 9, this trainer writes 1"),
    "model": (_set(("model",), [1]), "model is not a dict of named tensors"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_malformed_last_pth_is_one_line_naming_the_field(data, after_epoch_1, tmp_path, capsys, name) -> None:
    corrupt, fragment = CORRUPTIONS[name]
    out = copy_run(after_epoch_1, tmp_path)
    state = load(out / "last.pth")
    corrupt(state)
    torch.save(state, out / "last.pth")
    before = snapshot(out)
    err = one_line(*train(capsys, dict(VALUES, data_dir=str(data), output=str(out), resume="auto")))
    assert err.startswith(f"error: {out / 'last.pth'}: ") and fragment in err, err
    assert snapshot(out) == before


def test_overwrite_removes_the_old_runs_tensorboard_events_only(data, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    values = dict(VALUES, data_dir=str(data), output=str(out), epochs=1, tensorboard=True, log_every=1)
    assert train_cli.main(cli_args(values)) == 0
    old_events = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert old_events and all(name.startswith("events.out.tfevents.") for name in old_events)
    (out / "tensorboard" / "notes.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    capsys.readouterr()
    err = one_line(*train(capsys, dict(values, tensorboard=False)))
    assert err.startswith(f"error: {out} already holds a run (last.pth, best.pth, summary.csv, summary.png, "
                          "TensorBoard events)")
    assert train_cli.main(cli_args(dict(values, tensorboard=False, overwrite=True))) == 0
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine too"


# Item 16: a stop signal during set-up.
@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_during_set_up_is_one_stopped_line(data, tmp_path, name) -> None:
    out = tmp_path / "run"
    proc = disturbed(tmp_path, "signal-in-setup", name, dict(VALUES, data_dir=str(data), output=str(out)))
    sig = getattr(signal, name)
    assert proc.returncode == 128 + sig, proc.stderr[-2000:]
    assert proc.stderr == f"stopped: {name} before the first step, with nothing to save; the same command starts it " \
                          "again\n"
    assert not out.exists()


# Item 15: Ctrl-C while loader workers start, Ctrl-C that Python swallows, a loader worker that dies.
@pytest.mark.parametrize("k", [1, 2, 3])
def test_ctrl_c_while_loader_workers_start_ends_the_run(data, tmp_path, k) -> None:
    proc = disturbed(tmp_path, "sigint-at-worker", k, dict(VALUES, data_dir=str(data), output=str(tmp_path / "o"),
                                                           workers=2))
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr == "error: interrupted; resume with --resume auto\n"


def test_ctrl_c_that_python_swallows_still_ends_the_run(data, tmp_path) -> None:
    proc = disturbed(tmp_path, "sigint-in-finalizer", 2, dict(VALUES, data_dir=str(data),
                                                              output=str(tmp_path / "o")))
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "error: interrupted; resume with --resume auto"


def test_a_loader_worker_that_dies_is_one_error_line(data, tmp_path) -> None:
    proc = disturbed(tmp_path, "kill-worker", 3, dict(VALUES, data_dir=str(data), output=str(tmp_path / "o"),
                                                      workers=1))
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = one_line(proc.returncode, proc.stderr.strip())
    assert line.startswith("error: a data loader worker ended before its work was done (DataLoader worker (pid")
    assert line.endswith("with --workers 0 an error in the data shows itself, and less memory is used; resume with "
                         "--resume auto")


def test_the_lock_is_released_when_a_run_ends_in_the_same_process(data, tmp_path) -> None:
    values = dict(VALUES, data_dir=str(data), output=str(tmp_path / "run"), epochs=1)
    assert train_cli.main(cli_args(values)) == 0
    assert train_cli.main(cli_args(dict(values, overwrite=True))) == 0


@pytest.mark.slow
def test_under_torchrun_a_bad_image_on_one_process_is_one_error_line(tmp_path) -> None:
    """Item 19: the process that meets the image names it; the other one, whose collective finds its peer gone,
    says that in one line instead of gloo's traceback."""
    data = make_train_val(tmp_path / "data")
    bad = sorted((data / "train" / "c1").iterdir())[3]
    bad.write_bytes(bad.read_bytes()[:40])
    proc = torchrun(dict(TINY, data_dir=str(data), output=str(tmp_path / "o"), batch_size=2))
    assert_bad_image_named_once(proc, bad, "error: terminated; resume with --resume auto")
