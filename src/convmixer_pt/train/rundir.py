"""A run's folder belongs to one run: a lock held by the first process while a trainer writes it, the files that
make a folder hold a run, and what starting over (`overwrite`) removes: those files only.

The lock is `OUTPUT/.lock`, an advisory `flock` held for the run's whole life and released by the kernel when the
process ends, however it ends; the file stays (with the pid of the trainer that last held it), since removing a
lock file races with a trainer that has just opened it. A second trainer in the same folder refuses at once,
before it reads or writes anything there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import ReportedElsewhere, UserError
from ..runtime import DistEnv, all_gather_objects
from .config import ConfigError, TrainConfig

LOCK = ".lock"
RUN_FILES = ("last.pth", "best.pth", "summary.csv", "summary.png")  # what makes a folder hold a run
TENSORBOARD = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."  # the files TensorBoard's SummaryWriter writes into its folder


class RunFolderBusy(ConfigError):
    """Another trainer holds the run folder."""


class RunLock:
    """The lock of one run folder, taken by the first process. A folder it had to create and that stays empty
    but for the lock (the run failed before writing anything) is removed again on release."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.created: Path | None = None  # the outermost folder this lock created
        self.fd: int | None = None

    def acquire(self) -> None:
        out = self.folder
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output {out} is a file, not a folder")
        missing = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        self.created = missing[-1] if missing else None
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(f"{out}: another trainer ({holder}) is writing this run folder; wait for it to end, "
                                "or give another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        if self.created is not None and [p.name for p in self.folder.iterdir()] == [LOCK]:
            (self.folder / LOCK).unlink()
            for folder in (self.folder, *self.folder.parents):
                folder.rmdir()
                if folder == self.created:
                    break
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def claimed(cfg: TrainConfig, env: DistEnv) -> Iterator[None]:
    """Hold `cfg.output` for the block. The first process takes the lock; if it cannot, it raises the one-line
    refusal and every other process ends quietly (`ReportedElsewhere`), so a torchrun log says it once."""
    lock = RunLock(Path(cfg.output)) if env.is_main else None
    refusal: Exception | None = None
    if lock is not None:
        try:
            check_resume_folder(cfg)
            lock.acquire()
        except (UserError, OSError) as e:  # OSError: a folder that cannot be made
            refusal = e
    if all_gather_objects(refusal is not None, env)[0]:
        if refusal is not None:
            raise refusal
        raise ReportedElsewhere(1)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def check_resume_folder(cfg: TrainConfig) -> None:
    """A run continues in its own folder: `--resume FILE` must be a file in `--output`."""
    if cfg.resume in (None, "auto"):
        return
    resume, out = Path(cfg.resume), Path(cfg.output)
    if resume.parent.resolve() != out.resolve():
        raise ConfigError(f"--resume {resume}: that run's folder is {resume.parent}, not --output {out}; a run "
                          f"continues in its own folder (--output {resume.parent}), or start a new run from its "
                          f"weights with --finetune {resume}")


def run_files(out: Path) -> list[Path]:
    """The files of a run in `out`: checkpoints, summary, TensorBoard events."""
    files = [out / name for name in RUN_FILES if (out / name).exists()]
    board = out / TENSORBOARD
    if board.is_dir():
        files += sorted(p for p in board.iterdir() if p.name.startswith(EVENTS_PREFIX) and p.is_file())
    return files


def start_over(out: Path) -> None:
    """Remove a previous run's own files (`run_files`), nothing else; its TensorBoard folder if that empties it."""
    for path in run_files(out):
        path.unlink()
    with contextlib.suppress(OSError):  # not empty: it holds something of the user's
        (out / TENSORBOARD).rmdir()
