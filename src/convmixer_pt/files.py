"""Atomic writes: every file this package writes appears under its name complete, or not at all.

A file is written to one hidden staging file beside it, `.partial-<host>-<pid>-<random>-<name>`, and renamed
onto its name when complete. The staging file is removed on every exit Python sees (an exception, Ctrl-C, and
SIGTERM, which the CLIs turn into an exception); one left by a killed process is removed by the next write of
the same name on the same host, once that process is gone. Outputs get the permissions the umask gives, as
`open` would, whatever the writing library did to its file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError, error_line

STAGING_PREFIX = ".partial-"


class OutputExistsError(UserError):
    """An output that exists already and was not to be overwritten."""


class WriteError(UserError):
    """An output that could not be written: a full disk, a file size limit, a read-only folder."""


def _host_prefix() -> str:
    return f"{STAGING_PREFIX}{socket.gethostname().replace('-', '_')}-"


def remove_stale_staging(path: Path) -> list[Path]:
    """Staging files of `path` left beside it by processes of this host that no longer run."""
    removed = []
    host_prefix = _host_prefix()
    for candidate in path.parent.glob(f"{STAGING_PREFIX}*-{path.name}"):
        if not candidate.name.startswith(host_prefix):
            continue  # another host's, or another naming: not ours to judge
        pid = candidate.name[len(host_prefix):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a hidden staging path beside `path`; it replaces `path` only if the block finishes.

    The staging name ends like `path`'s, so a staged file can be read back, e.g. verified, before it takes
    its real name.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path}: already exists (use --force to overwrite)")
    if path.is_dir():
        raise WriteError(f"{path}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(path)
        fd, tmp = tempfile.mkstemp(prefix=f"{_host_prefix()}{os.getpid()}-", suffix=f"-{path.name}", dir=path.parent)
    except OSError as e:
        raise cannot_write(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        if not overwrite and path.exists():
            raise OutputExistsError(f"{path}: appeared while it was being written; not overwritten (use --force)")
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600, and some writers replace the file with their own
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_output(path: str | Path) -> None:
    """Refuse, before any work is done, an output path that cannot become a file: a folder, or one below a
    file."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"{path}: is a folder, not a file")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WriteError(f"{path}: {parent} is a file, not a folder")
            return


def cannot_write(path: str | Path, error: BaseException) -> WriteError:
    """One line for a failed write. PyTorch and safetensors report a full disk in their own words (a
    RuntimeError from torch.save), so a nearly full disk is named as the likely cause."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:
        reason = error_line(error)
        with contextlib.suppress(OSError):
            if shutil.disk_usage(Path(path).parent).free < 2**20:
                reason = f"no space left on the device; {reason}"
    return WriteError(f"{path}: cannot write it ({reason})")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a writer's failure (OSError, or what PyTorch and safetensors raise) into a WriteError naming the
    file; wrap only the write itself, so that no other failure is taken for one."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # OSError, torch.save's RuntimeError, safetensors' SafetensorError: no common base
        raise cannot_write(path, e) from None


def write_text(path: str | Path, text: str) -> None:
    """`text` into `path`, atomically."""
    with atomic_path(path) as tmp, writing(path):
        tmp.write_text(text)
