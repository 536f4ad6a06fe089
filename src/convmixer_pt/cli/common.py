"""What every command line shares: a user's error is one line on stderr and a non-zero exit, never a
traceback; argparse's own errors too."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from ..errors import Stopped, UserError, error_line


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups (staging files) run before the process ends."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line, `error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def run(body: Callable[[], int], hint: str = "") -> int:
    """Run a CLI's body; a UserError or an operating-system error (a full disk, a path of the wrong kind) is
    printed as `error: ...` with exit status 1, Ctrl-C as `error: interrupted<hint>` with 130, SIGTERM as
    `error: terminated<hint>` with 143."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return body()
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except (UserError, OSError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"error: terminated{hint}", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_now(status: int) -> NoReturn:
    """End the process with `status` once stdout and stderr are flushed, skipping the interpreter's teardown.

    For a command whose whole run is short: tearing down torch's modules takes 0.5-1 s (a third of a whole
    conversion, docs/performance.md), and such a command has nothing left to finalise, its files being written
    and renamed before `main` returns.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
