"""Atomic writes: every file this package writes appears under its name complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

STAGING_PREFIX = ".partial-"


class OutputExistsError(UserError):
    """An output that exists already and was not to be overwritten."""


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; it replaces `path` only if the block finishes.

    The temporary name ends like `path`'s (MindSpore reads only `*.ckpt` names), so a staged file can be
    read back, e.g. verified, before it takes its real name.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path}: already exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=STAGING_PREFIX, suffix=f"-{path.name}", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should look like any other written file
    try:
        yield Path(tmp)
        if not overwrite and path.exists():
            raise OutputExistsError(f"{path}: appeared while it was being written; not overwritten (use --force)")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """`text` into `path`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
