"""What every CLI guarantees on bad input and bad luck: one line on stderr, a non-zero exit, no traceback,
nothing half-written under an output's name and no staging file left behind (full disks, signals, kills)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from images import make_image_folder, make_train_val
from trainutil import ROOT, TINY, cli_args

from convmixer_pt import create_model
from convmixer_pt.cli import convert as convert_cli
from convmixer_pt.cli import train as train_cli
from convmixer_pt.cli import validate as validate_cli
from convmixer_pt.files import atomic_path, remove_stale_staging

# Runs a CLI with the size of any file it writes limited to LIMIT bytes (RLIMIT_FSIZE): writes beyond fail
# with EFBIG as they would on a full disk (torch.save and safetensors then raise their own errors).
WITH_FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
import importlib
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
"""


def small_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(create_model("convmixer_128_4", num_classes=5, dim=32, depth=2).state_dict(), path)
    return path


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def staged(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".partial-*"))


@pytest.mark.slow
@pytest.mark.parametrize("output", ["out.pth", "out.safetensors"])
def test_converter_on_a_full_disk(tmp_path, output) -> None:
    src = small_checkpoint(tmp_path / "in.pth")
    proc = subprocess.run([sys.executable, "-c", WITH_FILE_SIZE_LIMIT, "20000", "convmixer_pt.cli.convert", str(src),
                           str(tmp_path / output)], capture_output=True, text=True, timeout=300)
    assert one_line(proc).startswith(f"error: {tmp_path / output}: cannot write it (")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


@pytest.mark.slow
def test_trainer_on_a_full_disk(tmp_path) -> None:
    data = make_train_val(tmp_path / "data")
    argv = ["--device", "cpu", *cli_args(dict(TINY, data_dir=str(data), output=str(tmp_path / "run")))]
    proc = subprocess.run([sys.executable, "-c", WITH_FILE_SIZE_LIMIT, "3000", "convmixer_pt.cli.train", *argv],
                          capture_output=True, text=True, timeout=300)
    assert one_line(proc).startswith(f"error: {tmp_path / 'run' / 'last.pth'}: cannot write it (")
    assert not (tmp_path / "run" / "last.pth").exists() and staged(tmp_path) == []


# A converter that receives SIGTERM (or SIGINT) while it is writing its output.
SIGNAL_WHILE_WRITING = """
import os, signal, sys, torch
from convmixer_pt.cli import convert
real = torch.save
def save(obj, path, *a, **k):
    real(obj, path, *a, **k)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
torch.save = save
sys.exit(convert.main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "message"), [("SIGTERM", 143, "error: terminated; no output written"),
                                                       ("SIGINT", 130, "error: interrupted; no output written")])
def test_a_signal_while_writing_leaves_nothing(tmp_path, sig, code, message) -> None:
    src = small_checkpoint(tmp_path / "in.pth")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_WRITING, sig, str(src), str(tmp_path / "out.pth")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code and proc.stderr.strip() == message, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


def test_staging_files_of_dead_processes_are_removed_by_the_next_write(tmp_path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname().replace("-", "_")
    stale = tmp_path / f".partial-{host}-{dead.stdout.strip()}-abc123-out.pth"
    alive = tmp_path / f".partial-{host}-{os.getpid()}-def456-out.pth"  # this process: still writing it
    elsewhere = tmp_path / f".partial-otherhost-{dead.stdout.strip()}-ghi789-out.pth"
    other_name = tmp_path / f".partial-{host}-{dead.stdout.strip()}-jkl012-other.pth"
    for path in (stale, alive, elsewhere, other_name):
        path.write_bytes(b"half a checkpoint")
    with atomic_path(tmp_path / "out.pth") as tmp:
        tmp.write_bytes(b"whole")
    assert not stale.exists() and alive.exists() and elsewhere.exists() and other_name.exists()
    assert remove_stale_staging(tmp_path / "other.pth") == [other_name]


@pytest.mark.mindspore
def test_every_output_gets_the_permissions_of_the_umask(tmp_path) -> None:
    src = small_checkpoint(tmp_path / "in.pth")
    previous = os.umask(0o027)
    try:
        for name in ("out.pth", "out.safetensors", "out.ckpt"):
            assert convert_cli.main([str(src), str(tmp_path / name)]) == 0
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    finally:
        os.umask(previous)


def huge_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A 100-byte PNG that declares 900 million pixels: PIL's decompression-bomb limit refuses it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_trainer_names_a_decompression_bomb(tmp_path, capsys) -> None:
    data = make_train_val(tmp_path / "data")
    bomb = huge_png(data / "train" / "c0" / "zz_bomb.png")
    rc = train_cli.main(["--device", "cpu", *cli_args(dict(TINY, data_dir=str(data), output=str(tmp_path / "o")))])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {bomb}: cannot read the image (Image size (900000000 pixels) exceeds")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--batch-size", "0"], "batch size must be at least 1 and workers at least 0, got 0 and 0"),
    (["--img-size", "0"], "image size must be a positive number of pixels, got 0"),
    (["--crop-pct", "0"], "crop_pct must be in (0, 1], got 0.0"),
    (["--crop-pct", "nan"], "crop_pct must be in (0, 1], got nan"),
    (["--std", "1", "0", "1"], "mean and std must be three finite numbers each (std > 0)"),
])
def test_validate_refuses_bad_settings_before_any_work(tmp_path, capsys, flags, message) -> None:
    folder = tmp_path / "val"
    make_image_folder(folder, classes=5, images=5)
    ckpt = small_checkpoint(tmp_path / "m.pth")
    rc = validate_cli.main(["--checkpoint", str(ckpt), "--data-dir", str(folder), "--workers", "0", "--device", "cpu",
                            "--no-progress", *flags])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err.startswith(f"error: {message}") and len(err.splitlines()) == 1


def test_validate_refuses_a_report_path_that_is_a_folder_before_evaluating(tmp_path, capsys) -> None:
    folder = tmp_path / "val"
    make_image_folder(folder, classes=5, images=5)
    ckpt = small_checkpoint(tmp_path / "m.pth")
    rc = validate_cli.main(["--checkpoint", str(ckpt), "--data-dir", str(folder), "--workers", "0", "--device", "cpu",
                            "--json", str(tmp_path), "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err == f"error: {tmp_path}: is a folder, not a file\n"


def test_validate_evaluates_the_trainers_own_digits_model(tmp_path, capsys) -> None:
    """No --model and no preprocessing flags: the architecture from the checkpoint, the normalisation,
    crop and filter from its training config; the score is the one the trainer reported for that epoch."""
    data = tmp_path / "digits"
    run_dir = tmp_path / "run"
    values = dict(dataset="digits", data_dir=str(data), model="convmixer_128_4", epochs=1, workers=0,
                  model_args=dict(dim=16, depth=2, kernel_size=5, patch_size=4), input_size=32, crop_pct=1.0,
                  eval_interpolation="bilinear", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], auto_augment=None,
                  mixup=0.0, cutmix=0.0, re_prob=0.0, hflip=0.0, output=str(run_dir), progress=False)
    assert train_cli.main(["--device", "cpu", *cli_args(values)]) == 0
    capsys.readouterr()
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert validate_cli.main(["--checkpoint", str(run_dir / "best.pth"), "--data-dir", str(data / "val"),
                              "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "convmixer_16_2 (kernel 5, patch 4)" and report["count"] == 360
    assert (report["img_size"], report["crop_pct"], report["interpolation"]) == (32, 1.0, "bilinear")
    assert report["mean"] == [0.5, 0.5, 0.5] and report["preprocessing_from"].endswith("(its training config)")
    assert report["top1"] == pytest.approx(best["metric"], abs=1e-4)
    # The same from a state dict saved next to the run's args.yaml, which then supplies the settings.
    torch.save(best["model"], run_dir / "weights.pth")
    assert validate_cli.main(["--checkpoint", str(run_dir / "weights.pth"), "--data-dir", str(data / "val"),
                              "--workers", "0", "--device", "cpu", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["preprocessing_from"] == str(run_dir / "args.yaml")
    assert report["top1"] == pytest.approx(best["metric"], abs=1e-4)


def test_a_sigterm_handler_is_installed_only_while_a_cli_runs() -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert convert_cli.main(["/nonexistent/in.pth", "/nonexistent/out.pth"]) == 1
    assert signal.getsignal(signal.SIGTERM) == before
    assert ROOT.is_dir()


def test_output_names_are_matched_case_insensitively(tmp_path, capfd) -> None:
    """An output named .CKPT was written by MindSpore's saver under another name and then refused on reading;
    now it is a .ckpt like any other, both ways, with a note that MindSpore itself wants the lowercase name."""
    src = small_checkpoint(tmp_path / "in.pth")
    assert convert_cli.main([str(src), str(tmp_path / "OUT.CKPT")]) == 0
    assert "MindSpore's own load_checkpoint reads only names ending in .ckpt" in capfd.readouterr().err
    assert convert_cli.main([str(tmp_path / "OUT.CKPT"), str(tmp_path / "back.PTH")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT.CKPT", "back.PTH", "in.pth"]
    original, back = torch.load(src, weights_only=True), torch.load(tmp_path / "back.PTH", weights_only=True)
    assert all(torch.equal(original[k], back[k]) for k in original if not k.endswith("num_batches_tracked"))


def test_validate_replaces_an_existing_report_only_with_force_and_never_a_special_file(tmp_path, capsys) -> None:
    """--json / --save-predictions: an existing file is kept without --force; a FIFO, a symbolic link or a
    device is never replaced, even with --force (as root, `--json /dev/null` once replaced /dev/null)."""
    folder = tmp_path / "val"
    make_image_folder(folder, classes=5, images=5)
    ckpt = small_checkpoint(tmp_path / "m.pth")
    common = ["--checkpoint", str(ckpt), "--data-dir", str(folder), "--workers", "0", "--device", "cpu",
              "--no-progress"]
    report, preds = tmp_path / "report.json", tmp_path / "preds.csv"
    report.write_text("my thesis\n")
    for flag, out in (("--json", report), ("--save-predictions", report)):
        assert validate_cli.main([*common, flag, str(out)]) == 1
        assert capsys.readouterr().err == f"error: {out}: already exists (use --force to overwrite)\n"
    assert report.read_text() == "my thesis\n"
    fifo, link, target = tmp_path / "fifo", tmp_path / "link.json", tmp_path / "target.json"
    os.mkfifo(fifo)
    target.write_text("kept\n")
    link.symlink_to(target)
    specials = [(fifo, "a FIFO"), (link, "a symbolic link")]
    if os.geteuid() == 0:  # a character device of our own, never the system's /dev/null
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        specials.append((tmp_path / "null", "a character device"))
    for out, kind in specials:
        for flag in ("--json", "--save-predictions"):
            assert validate_cli.main([*common, flag, str(out), "--force"]) == 1
            assert capsys.readouterr().err == f"error: {out}: is {kind}, not a regular file; not replaced\n"
    assert fifo.is_fifo() and link.is_symlink() and target.read_text() == "kept\n"
    assert validate_cli.main([*common, "--json", str(report), "--save-predictions", str(preds), "--force"]) == 0
    capsys.readouterr()
    assert json.loads(report.read_text())["count"] == 5 and len(preds.read_text().splitlines()) == 6
    assert staged(tmp_path) == []


def test_atomic_path_keeps_what_it_may_not_replace(tmp_path) -> None:
    """The one rule every output goes through: without overwrite an existing file stays, also one that
    appears while the output is written; with it, only a regular file is replaced."""
    from convmixer_pt.files import OutputExistsError, WriteError

    out = tmp_path / "out.txt"
    with pytest.raises(OutputExistsError, match="appeared while it was being written"):
        with atomic_path(out) as tmp:
            tmp.write_text("new")
            out.write_text("theirs")
    assert out.read_text() == "theirs" and staged(tmp_path) == []
    with atomic_path(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(WriteError, match=r"fifo: is a FIFO, not a regular file; not replaced"):
            with atomic_path(fifo, overwrite=overwrite):
                pass
    link = tmp_path / "late"
    with pytest.raises(WriteError, match="became a symbolic link while it was being written"):
        with atomic_path(link, overwrite=True) as tmp:
            tmp.write_text("new")
            link.symlink_to(out)
    assert fifo.is_fifo() and link.is_symlink() and out.read_text() == "new" and staged(tmp_path) == []


@pytest.mark.parametrize("length", [150, 151, 230, 255])
def test_outputs_with_names_up_to_the_file_systems_limit_are_written(tmp_path, length) -> None:
    """The staging name adds ~40 bytes to the output's; a legal name of 230-255 bytes failed with 'File name too
    long'. Its end (the extension, which writers choose a format by) is kept."""
    out = tmp_path / ("é" * ((length - 4) // 2) + "x" * ((length - 4) % 2) + ".pth")
    assert len(out.name.encode()) == length
    with atomic_path(out) as tmp:
        assert tmp.name.endswith(".pth") and len(tmp.name.encode()) <= 255
        torch.save({"a": torch.ones(1)}, tmp)
    assert torch.load(out)["a"].item() == 1 and staged(tmp_path) == []
    remove_stale_staging(out)  # globs its own staging names: no error on a long one


@pytest.mark.parametrize("kind", ["folder", "fifo", "chardev"])
def test_an_input_that_is_not_a_regular_file_is_named_for_what_it_is(tmp_path, kind) -> None:
    """Not 'no such file': a folder, a FIFO (which would block the reader) and /dev/zero (endless)."""
    src = {"folder": tmp_path, "fifo": tmp_path / "fifo", "chardev": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(src)
    proc = subprocess.run([sys.executable, "-m", "convmixer_pt.cli.convert", str(src), str(tmp_path / "o.ckpt")],
                          capture_output=True, text=True, timeout=120)
    words = {"folder": "a folder", "fifo": "a FIFO", "chardev": "a character device"}[kind]
    assert one_line(proc) == f"error: {src}: is {words}, not a regular file"


def test_converter_never_replaces_a_link_or_a_fifo_even_with_force(tmp_path) -> None:
    src = small_checkpoint(tmp_path / "in.pth")
    target = tmp_path / "precious.ckpt"
    target.write_bytes(b"precious")
    (tmp_path / "link.ckpt").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.ckpt")
    for name, kind in (("link.ckpt", "a symbolic link"), ("fifo.ckpt", "a FIFO")):
        proc = subprocess.run([sys.executable, "-m", "convmixer_pt.cli.convert", str(src), str(tmp_path / name),
                               "--force"], capture_output=True, text=True, timeout=120)
        assert one_line(proc) == f"error: {tmp_path / name}: is {kind}, not a regular file; not replaced"
    assert target.read_bytes() == b"precious" and (tmp_path / "link.ckpt").is_symlink()


def test_an_output_that_is_an_input_or_another_output_is_refused_even_with_force(tmp_path, capsys) -> None:
    """`validate --json m.pth --force` replaced the checkpoint it read; `--json x --save-predictions x` wrote x
    twice; `convert a.pth a.pth --force` (also through a link) the file it converts."""
    folder = tmp_path / "val"
    make_image_folder(folder, classes=5, images=5)
    ckpt = small_checkpoint(tmp_path / "m.pth")
    before = ckpt.read_bytes()
    (tmp_path / "alias.pth").symlink_to(ckpt)
    common = ["--checkpoint", str(ckpt), "--data-dir", str(folder), "--workers", "0", "--device", "cpu",
              "--no-progress", "--force"]
    assert validate_cli.main([*common, "--save-predictions", str(ckpt)]) == 1
    assert capsys.readouterr().err == f"error: {ckpt}: is also {ckpt}, which the command reads or writes; write " \
                                      "it elsewhere\n"
    out = tmp_path / "same.json"
    assert validate_cli.main([*common, "--json", str(out), "--save-predictions", str(out)]) == 1
    assert capsys.readouterr().err == f"error: {out}: given as both --json and --save-predictions; give two files\n"
    assert convert_cli.main([str(tmp_path / "alias.pth"), str(ckpt), "--force"]) == 1
    assert capsys.readouterr().err == f"error: {ckpt}: is also {tmp_path / 'alias.pth'}, which the command reads " \
                                      "or writes; write it elsewhere\n"
    assert ckpt.read_bytes() == before and not out.exists() and staged(tmp_path) == []


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "error: RANK='x' is not a whole number (torchrun sets it; unset it to run one "
                                       "process)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "error: WORLD_SIZE=0 is below 1 (torchrun sets it; unset it to run one "
                                       "process)"),
    ({"LOCAL_RANK": "-1"}, "error: LOCAL_RANK=-1 is below 0 (torchrun sets it; unset it to run one process)"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "error: RANK=3 is not below WORLD_SIZE=2 (torchrun sets both; unset them to "
                                       "run one process)"),
])
def test_launcher_variables_set_by_hand_are_one_line(tmp_path, env, message, monkeypatch, capsys) -> None:
    # int() of them raised ValueError tracebacks; WORLD_SIZE=0 and LOCAL_RANK=-1 failed deep inside torch.
    # The first case in a fresh process (nothing printed before the line); all four in this one, where the
    # variables are read as the trainer starts, as in a fresh one (a subprocess each spent seconds importing).
    argv = cli_args({**TINY, "output": str(tmp_path / "run"), "device": "cpu"})
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if message.startswith("error: RANK='x'"):
        clean = {k: v for k, v in os.environ.items() if k not in names}
        proc = subprocess.run([sys.executable, "-m", "convmixer_pt.cli.train", *argv], capture_output=True,
                              text=True, timeout=120, env={**clean, **env})
        assert one_line(proc) == message
    for name in names:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        rc = train_cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert one_line(subprocess.CompletedProcess(argv, rc, out, err)) == message
