"""The one base class of every error meant for a user, and how a command line prints one.

An error is a `UserError` when what the user gave causes it (a file, a flag, a value, a setting); its message is
one sentence that names the file, key or value at fault. Every CLI catches this one class (and the operating
system's errors) and prints one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import re
import reprlib
from collections.abc import Iterator

# How much of a value a message quotes: a few items of a container, a few levels deep, a prefix of a string.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


class UserError(ValueError):
    """A problem with something the user gave, with a one-line message meant for them."""


class SettingError(UserError):
    """An environment variable holding a value that cannot be used: the environment's fault, never that of
    the file or config being read when it was found, so `about` leaves it unattributed."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be read, or whose tensors do not fit the model."""


class DataError(UserError):
    """Images or a data folder that cannot be used."""


class Stopped(Exception):
    """A run that stopped when asked to (a signal from a scheduler) after saving what it needs to continue: not
    a failure of its input. The CLI prints the message and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def brief(value: object, limit: int = 80) -> str:
    """A short repr of `value` for a message: a prefix of a long string, a few items of a container, a few
    levels of a nested one (an alias bomb or a deeply nested value costs no more than a small one)."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int of more digits than Python prints
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


class ReportedElsewhere(Exception):
    """A failure that another process of the same run reports (the first process, or the one that failed):
    this process ends with `exit_code` and prints nothing, so that a torchrun log holds the message once."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(f"reported by another process (exit status {exit_code})")
        self.exit_code = exit_code


@contextlib.contextmanager
def about(subject: object) -> Iterator[None]:
    """Name `subject` (a file, where a config came from) at the front of a UserError raised in the block, so
    that functions below need no parameter only to build their messages."""
    try:
        yield
    except SettingError:
        raise
    except UserError as e:
        e.args = (f"{subject}: {e}", *e.args[1:])
        raise


_OBJECT_REPR = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")


def error_line(error: BaseException) -> str:
    """The user-facing sentence of an error, also when a DataLoader worker re-raised it inside its traceback;
    object reprs a library put in its message (`<_io.BytesIO object at 0x7f...>`) are left out."""
    text = _OBJECT_REPR.sub("", str(error)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in text:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(f"{type(error).__module__}.") else last
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return lines[0] if lines else type(error).__name__
