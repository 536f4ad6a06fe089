"""Training that survives a cluster: checkpoints within epochs, preemption signals, elastic restarts, tar shards
and TensorBoard. Every interrupted run is resumed and compared with an uninterrupted one, bit for bit."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from images import make_train_val
from trainutil import ROOT, TINY, child_env, cli_args, torchrun

from convmixer_pt.cli import make_shards
from convmixer_pt.cli import train as train_cli
from convmixer_pt.cli import validate as validate_cli
from convmixer_pt.data import write_digits_imagefolder

pytestmark = pytest.mark.usefixtures("one_thread")

# The whole recipe's randomness on (RandAugment, crops, flips, erasing, mixup) and EMA, one intra-op thread in
# every process (in-process runs and subprocesses must sum in the same order), 6 steps per epoch.
RECIPE = dict(TINY, ema=True, ema_decay=0.9, device="cpu", epochs=2, cpu_threads=1, auto_augment="rand-m9-mstd0.5-inc1",
              mixup=0.5, cutmix=0.5)

# Runs a training command and disturbs it right after its k-th optimizer step: `kill` ends this process at once
# (os._exit: nothing is saved), `sigterm` sends SIGTERM to the parent (torchrun, which passes it on to every
# worker). `rank` picks the process; `first` acts on the first attempt only (torchrun's restarts count attempts).
DISTURB = """
import os, signal, sys, json, torch
mode, k, rank, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
mine = int(os.environ.get("RANK", "0")) == rank and first_attempt
real, count = torch.optim.AdamW.step, [0]
def step(self, *a, **kw):
    out = real(self, *a, **kw)
    count[0] += 1
    if mine and count[0] == k:
        if mode == "kill":
            os._exit(1)
        os.kill(os.getppid(), signal.SIGTERM)
    return out
torch.optim.AdamW.step = step
from convmixer_pt.cli.train import main
sys.exit(main(argv))
"""


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_end(a: dict, b: dict) -> None:
    assert (a["epoch"], a["step"], a["batch"]) == (b["epoch"], b["step"], b["batch"])
    for key in ("model", "model_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for idx, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][idx][name]), f"optimizer {idx}.{name} differs"
    cols = ("train_loss", "val_loss", "val_top1", "ema_val_top1", "lr")
    assert [[r[c] for c in cols] for r in a["history"]] == [[r[c] for c in cols] for r in b["history"]]


def disturbed(mode: str, k: int, rank: int, values: dict, tmp: Path, nproc: int = 0,
              restarts: int = 0) -> subprocess.CompletedProcess:
    """The trainer disturbed at step k, alone (nproc 0) or under torchrun with `nproc` processes."""
    script = tmp / "disturb.py"
    script.write_text(DISTURB)
    argv = json.dumps(["--device", "cpu", *cli_args(values)])
    prefix = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={nproc}", f"--max-restarts={restarts}"]
    return subprocess.run([*prefix, str(script), mode, str(k), str(rank), argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=child_env())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_train_val(tmp_path_factory.mktemp("cluster") / "data")


@pytest.fixture(scope="module")
def clean_one(data, tmp_path_factory, one_thread) -> dict:
    out = tmp_path_factory.mktemp("clean1") / "run"
    assert train_cli.main(["--device", "cpu", *cli_args(dict(RECIPE, data_dir=str(data), output=str(out)))]) == 0
    return load(out / "last.pth")


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "k"), [(0, 3), (1, 8)])
def test_a_kill_within_an_epoch_resumes_bit_exactly(data, clean_one, tmp_path, workers, k) -> None:
    """Killed after step k (3: inside epoch 1; 8: inside epoch 2) with a checkpoint every step: the resumed run
    starts at step k - 1 and ends where the uninterrupted one does."""
    values = dict(RECIPE, data_dir=str(data), output=str(tmp_path / "run"), workers=workers, checkpoint_every="1")
    proc = disturbed("kill", k, 0, values, tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    mid = load(tmp_path / "run" / "last.pth")
    assert (mid["step"], mid["batch"]) == (k - 1, (k - 1) % 6)  # written within the epoch, at the step before
    assert train_cli.main(["--device", "cpu", *cli_args(dict(values, resume="auto"))]) == 0
    assert_same_end(load(tmp_path / "run" / "last.pth"), clean_one)


def test_checkpoint_every_minutes_and_steps(data, tmp_path) -> None:
    values = dict(RECIPE, data_dir=str(data), output=str(tmp_path / "run"), epochs=1, checkpoint_every="4")
    real, saved = torch.save, []

    def recording(obj, path, *a, **k):
        if isinstance(obj, dict) and "batch" in obj:
            saved.append((obj["step"], obj["batch"]))
        return real(obj, path, *a, **k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", recording)
        assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 0
        assert saved == [(4, 4), (6, 0)]  # step 4 within the epoch, then the epoch's end
        saved.clear()
        assert train_cli.main(["--device", "cpu", *cli_args(dict(values, checkpoint_every="0.0000001m",
                                                                   overwrite=True))]) == 0
        assert saved == [(s, s) for s in range(1, 6)] + [(6, 0)]  # 6 µs, shorter than any step: every step


@pytest.fixture(scope="module")
def two_process_runs() -> dict[str, dict]:
    """The uninterrupted torchrun runs, by name, made by the first test that needs one (in its temp folder)."""
    return {}


def clean_two(data: Path, tmp_path: Path, runs: dict[str, dict]) -> dict:
    """The last checkpoint of an uninterrupted two-process run of RECIPE in batches of 2, made once: the
    SIGTERM and elastic-restart tests each ran the same run (the latter with a checkpoint every step, which
    must not change a bit of the run's end; its resumed run still checkpoints every step)."""
    if "clean" not in runs:
        out = tmp_path / "clean"
        proc = torchrun(dict(RECIPE, data_dir=str(data), batch_size=2, output=str(out)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs["clean"] = load(out / "last.pth")
    return runs["clean"]


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_both_processes_and_resumes_bit_exactly(data, tmp_path,
                                                                             two_process_runs) -> None:
    values = dict(RECIPE, data_dir=str(data), batch_size=2)
    clean = clean_two(data, tmp_path, two_process_runs)
    run = dict(values, output=str(tmp_path / "run"))
    proc = disturbed("sigterm", 2, 0, run, tmp_path, nproc=2)
    assert proc.returncode != 0
    assert proc.stderr.count("stopped: SIGTERM at epoch 1, step ") == 1 and "continue with --resume auto" in proc.stderr
    mid = load(tmp_path / "run" / "last.pth")
    assert mid["batch"] > 0 and len(mid["rng"]) == 2  # within the epoch, both processes' generators
    resumed = torchrun(dict(run, resume="auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(load(tmp_path / "run" / "last.pth"), clean)


def test_sigusr1_stops_at_the_end_of_the_step_with_its_exit_status(data, tmp_path, capsys) -> None:
    values = dict(RECIPE, data_dir=str(data), output=str(tmp_path / "run"))
    real, count = torch.optim.AdamW.zero_grad, [0]

    def zero_grad(self, *a, **k):  # the start of an optimizer step: the signal arrives while step 2 is under way
        count[0] += 1
        if count[0] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, *a, **k)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "zero_grad", zero_grad)
        rc = train_cli.main(["--device", "cpu", *cli_args(values)])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGUSR1
    assert err.strip().splitlines()[-1] == (f"stopped: SIGUSR1 at epoch 1, step 2 of 6; "
                                            f"{tmp_path / 'run' / 'last.pth'} holds it: continue with --resume auto")
    assert load(tmp_path / "run" / "last.pth")["batch"] == 2
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handlers are the training's only


@pytest.mark.slow
def test_an_elastic_restart_after_a_dead_worker_ends_like_a_clean_run(data, tmp_path, two_process_runs) -> None:
    """torchrun --max-restarts 1: rank 1 dies after step 4 of the first attempt; torchrun restarts both, which
    resume from the checkpoint of step 3 (every step is checkpointed) and end as the clean run does."""
    clean = clean_two(data, tmp_path, two_process_runs)
    values = dict(RECIPE, data_dir=str(data), batch_size=2, checkpoint_every="1")
    run = dict(values, output=str(tmp_path / "run"), resume="auto")
    proc = disturbed("kill", 4, 1, run, tmp_path, nproc=2, restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_end(load(tmp_path / "run" / "last.pth"), clean)


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    assert make_shards.main(["--src", str(data), "--out", str(out), "--shard-size", "5"]) == 0
    return out


def test_shards_hold_the_folders_samples(data, shards) -> None:
    """Every file's bytes once, the training split in a seeded random order, val in the folder's."""
    import webdataset

    index = json.loads((shards / "train.json").read_text())
    assert index["classes"] == ["c0", "c1", "c2"] and [s["nsamples"] for s in index["shardlist"]] == [5] * 4 + [4]
    assert sorted(p.name for p in shards.glob("train-*.tar")) == [s["url"] for s in index["shardlist"]]
    assert [s["filesize"] for s in index["shardlist"]] == [(shards / s["url"]).stat().st_size
                                                           for s in index["shardlist"]]
    files = sorted(p for p in (data / "train").rglob("*") if p.is_file())
    for split, shuffled in (("train", True), ("val", False)):
        tars = sorted(str(p) for p in shards.glob(f"{split}-*.tar"))
        samples = list(webdataset.WebDataset(tars, shardshuffle=False))
        keys = [int(s["__key__"]) for s in samples]
        assert sorted(keys) == list(range(len(keys))) and (keys != sorted(keys)) == shuffled
    samples = {int(s["__key__"]): s for s in webdataset.WebDataset(sorted(str(p) for p in shards.glob("train-*.tar")),
                                                                   shardshuffle=False)}
    for key, path in enumerate(files):
        assert samples[key][path.suffix.lstrip(".")] == path.read_bytes()
        assert int(samples[key]["cls"]) == int(path.parent.name[1:])


@pytest.fixture(scope="module")
def clean_shards(shards, tmp_path_factory, one_thread) -> dict:
    out = tmp_path_factory.mktemp("clean_shards") / "run"
    values = dict(RECIPE, dataset="shards", data_dir=str(shards), output=str(out))
    assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 0
    return load(out / "last.pth")


@pytest.mark.slow
def test_a_kill_within_an_epoch_resumes_bit_exactly_from_shards(shards, clean_shards, tmp_path) -> None:
    values = dict(RECIPE, dataset="shards", data_dir=str(shards), output=str(tmp_path / "run"), workers=1,
                  checkpoint_every="2")
    assert disturbed("kill", 9, 0, values, tmp_path).returncode == 1
    assert load(tmp_path / "run" / "last.pth")["step"] == 8
    assert train_cli.main(["--device", "cpu", *cli_args(dict(values, resume="auto"))]) == 0
    assert_same_end(load(tmp_path / "run" / "last.pth"), clean_shards)


def test_validate_reads_shards_as_it_reads_the_folder(data, shards, clean_one, tmp_path, capsys) -> None:
    """The same predictions for the same images, in the same order (val keeps the folder's)."""
    torch.save(clean_one["model"], tmp_path / "m.pth")
    reports = []
    for source in (data / "val", shards / "val.json"):
        assert validate_cli.main(["--checkpoint", str(tmp_path / "m.pth"), "--data-dir", str(source), "--workers",
                                  "0", "--device", "cpu", "--img-size", "16", "--crop-pct", "1", "--no-progress",
                                  "--save-predictions", str(tmp_path / "p.csv"), "--force"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
        with open(tmp_path / "p.csv") as f:
            reports[-1]["rows"] = [(r["label"], r["pred"], r["top5"]) for r in csv.DictReader(f)]
    assert reports[0]["count"] == reports[1]["count"] == 9
    assert reports[0]["rows"] == reports[1]["rows"] and reports[0]["top1"] == reports[1]["top1"]


def test_broken_shards_are_one_line(shards, tmp_path, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "val.json").write_text((shards / "val.json").read_text())
    values = dict(TINY, dataset="shards", data_dir=str(broken), output=str(tmp_path / "o"))
    assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 1
    assert capsys.readouterr().err == f"error: {broken / 'train.json'}: no shard index here (write one with " \
                                      "convmixer-make-shards)\n"
    (broken / "train.json").write_text("{not json")
    assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {broken / 'train.json'}: not a shard index (")
    (broken / "train.json").write_text((shards / "train.json").read_text())
    assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 1
    first = json.loads((shards / "train.json").read_text())["shardlist"][0]["url"]
    assert capsys.readouterr().err == f"error: {broken / 'train.json'}: its shard {first}: is missing\n"


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_make_shards_touches_only_its_own_files_in_out(data, tmp_path, capsys) -> None:
    """It deleted every `<split>-*.tar` in --out (`val-backup-2023.tar`), had no --force, and `--splits ../x`
    wrote and deleted outside --out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "val-backup-2023.tar").write_bytes(b"last year's")
    (out / "val-000000.tar").write_bytes(b"a shard of someone else's")
    src = ["--src", str(data), "--out", str(out), "--splits", "val", "--shard-size", "4"]
    assert make_shards.main(src) == 0
    first = files_in(out)
    assert {"val-backup-2023.tar", "val-000000.tar", "val.json"} < set(first) and len(first) == 6
    assert make_shards.main(src) == 1
    assert capsys.readouterr().err == f"error: {out / 'val.json'}: already exists (use --force to overwrite)\n"
    assert files_in(out) == first
    (tmp_path / "x-000000.tar").write_bytes(b"outside")
    for split in ("../x", "/tmp", "..", "a/b"):
        assert make_shards.main([*src[:4], "--splits", "val", split]) == 1
        assert capsys.readouterr().err.startswith(f"error: --splits {split!r}: not a plain name")
    assert files_in(tmp_path) == {"x-000000.tar": b"outside", **{f"out/{k}": v for k, v in first.items()}}
    # --force replaces the split: its earlier shards go, nobody else's files do.
    assert make_shards.main([*src, "--force"]) == 0
    second = files_in(out)
    assert {k: second[k] for k in ("val-backup-2023.tar", "val-000000.tar")} == \
        {k: first[k] for k in ("val-backup-2023.tar", "val-000000.tar")}
    urls = [s["url"] for s in json.loads(second["val.json"])["shardlist"]]
    assert sorted(second) == sorted(["val-backup-2023.tar", "val-000000.tar", "val.json", *urls])
    assert not set(urls) & set(first)


def test_an_interrupted_rewrite_of_shards_leaves_the_previous_set_whole(data, tmp_path, monkeypatch, capsys) -> None:
    """Re-running make-shards and stopping it left the old index pointing at the new, partial shards:
    validate scored the wrong images and exited 0. Now the old index and its shards are as they were."""
    from convmixer_pt.data import ShardDataset

    out = tmp_path / "out"
    assert make_shards.main(["--src", str(data), "--out", str(out), "--splits", "val", "--shard-size", "4"]) == 0
    before = files_in(out)
    samples = [(name, label) for name, label in ShardDataset(out / "val.json", lambda e: (e.name, e.data))]
    real_read_bytes, calls = Path.read_bytes, []

    def interrupted(self: Path) -> bytes:
        calls.append(self)
        if len(calls) == 6:  # a shard and a half written
            raise KeyboardInterrupt
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", interrupted)
    rc = make_shards.main(["--src", str(data), "--out", str(out), "--splits", "val", "--shard-size", "4", "--shuffle",
                           "val", "--seed", "3", "--force"])
    monkeypatch.undo()
    assert rc == 130 and capsys.readouterr().err.endswith("error: interrupted; the index of an unfinished split is "
                                                          "not written\n")
    assert files_in(out) == before
    assert [(n, lab) for n, lab in ShardDataset(out / "val.json", lambda e: (e.name, e.data))] == samples


def small_model_file(path: Path, classes: int = 3) -> Path:
    from convmixer_pt import create_model

    torch.manual_seed(0)
    torch.save(create_model("convmixer_128_4", num_classes=classes, dim=16, depth=1, kernel_size=3,
                            patch_size=4).state_dict(), path)
    return path


def lying_index(shards: Path, folder: Path, change) -> Path:
    """A copy of the val split in `folder` with its index changed by `change(index, first shard entry)`."""
    import shutil

    folder.mkdir()
    index = json.loads((shards / "val.json").read_text())
    for entry in index["shardlist"]:
        shutil.copyfile(shards / entry["url"], folder / entry["url"])
    change(index, index["shardlist"][0])
    (folder / "val.json").write_text(json.dumps(index))
    return folder / "val.json"


@pytest.mark.parametrize("case, change, message", [
    ("parent url", lambda i, s: s.update(url="../" + s["url"]), "shard url '../{url}' is not a file name inside "
     "the index's folder"),
    ("absolute url", lambda i, s: s.update(url="/etc/passwd"), "shard url '/etc/passwd' is not a file name inside "
     "the index's folder"),
    ("negative count", lambda i, s: s.update(nsamples=-2), "shard {url}: nsamples -2 is not a whole number of at "
     "least 1"),
    ("float count", lambda i, s: s.update(nsamples=1e12), "shard {url}: nsamples 1000000000000.0 is not a whole "
     "number of at least 1"),
    ("absurd count", lambda i, s: s.update(nsamples=10**12), "its shard {url} claims 1000000000000 samples, more "
     "than its {size} bytes hold"),
    ("changed shard", lambda i, s: s.update(filesize=s["filesize"] + 512), "its shard {url} has {size} bytes, "
     "the index says {size512} (changed since the index was written; write the split again with "
     "convmixer-make-shards)"),
    ("missing shard", lambda i, s: s.update(url="val-gone.tar"), "its shard val-gone.tar: is missing"),
    ("no classes", lambda i, s: i.update(classes="c0"), "not a shard index (shardlist and classes must be lists, "
     "classes of names)"),
])
def test_a_lying_shard_index_is_one_line_before_any_work(shards, tmp_path, capsys, case, change, message) -> None:
    """Read by validate.py (and the trainer, through the same class): an index whose counts, names or sizes
    disagree with its shards, or that points outside its folder; a negative count made validate score 210 of
    360 images with exit 0, and 1e12 asked for terabytes."""
    index = lying_index(shards, tmp_path / "lying", change)
    entry = json.loads((shards / "val.json").read_text())["shardlist"][0]
    rc = validate_cli.main(["--checkpoint", str(small_model_file(tmp_path / "m.pth")), "--data-dir", str(index),
                            "--workers", "0", "--device", "cpu", "--img-size", "16", "--crop-pct", "1",
                            "--no-progress"])
    size = entry["filesize"]
    expected = message.format(url=entry["url"], size=size, size512=size + 512)
    assert (rc, capsys.readouterr()) == (1, ("", f"error: {index}: {expected}\n"))


@pytest.mark.parametrize("case", ["count", "broken tar"])
def test_a_shard_that_disagrees_with_its_index_when_read_is_one_line(shards, tmp_path, capsys, case) -> None:
    """What only reading a tar shows: fewer or more samples than the index says, or no tar at all."""
    def change(index, entry):
        if case == "count":
            entry.update(nsamples=entry["nsamples"] - 1)
            del entry["filesize"]  # an index written by another tool, without sizes

    index = lying_index(shards, tmp_path / "lying", change)
    entry = json.loads(index.read_text())["shardlist"][0]
    if case == "broken tar":
        tar = index.parent / entry["url"]
        tar.write_bytes(b"\x07" * tar.stat().st_size)
    rc = validate_cli.main(["--checkpoint", str(small_model_file(tmp_path / "m.pth")), "--data-dir", str(index),
                            "--workers", "0", "--device", "cpu", "--img-size", "16", "--crop-pct", "1",
                            "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    if case == "count":
        assert err == f"error: {index}: its shard {entry['url']} holds {entry['nsamples'] + 1} samples, the index " \
                      f"says {entry['nsamples']} (write the split again with convmixer-make-shards)\n"
    else:
        assert err.startswith(f"error: {entry['url']}: cannot read the shard (")


def test_tensorboard_scalars_are_the_summarys(data, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    values = dict(RECIPE, data_dir=str(data), output=str(out), tensorboard=True, log_every=2)
    assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    top1 = [(e.step, e.value) for e in events.Scalars("epoch/val_top1")]
    assert [s for s, _ in top1] == [6, 12] and [v for _, v in top1] == pytest.approx([float(r["val_top1"])
                                                                                       for r in rows])
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    assert {"epoch/img_per_s", "epoch/lr", "epoch/ema_val_top1", "train/lr"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_the_digits_main_job_from_shards_learns_as_from_the_folders(tmp_path) -> None:
    """scikit-learn's digits decoded from PNGs in tar shards, read a few shards at a time: the accuracy the
    main job reaches from the folders, after the same 3 epochs."""
    folder = tmp_path / "digits"
    write_digits_imagefolder(folder)
    assert make_shards.main(["--src", str(folder), "--out", str(tmp_path / "shards"), "--shard-size", "100"]) == 0
    common = ["--config", str(ROOT / "configs" / "digits.yaml"), "--device", "cpu", "--epochs", "3", "--no-progress"]
    assert train_cli.main([*common, "--data-dir", str(folder), "--output", str(tmp_path / "a")]) == 0
    assert train_cli.main([*common, "--dataset", "shards", "--data-dir", str(tmp_path / "shards"), "--output",
                           str(tmp_path / "b")]) == 0
    top1 = [load(tmp_path / run / "last.pth")["history"][-1]["val_top1"] for run in ("a", "b")]
    assert min(top1) > 90 and abs(top1[0] - top1[1]) < 3, top1
