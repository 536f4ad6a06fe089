"""What every command line shares: a user's error is one line on stderr and a non-zero exit, never a
traceback; argparse's own errors too."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from ..errors import ReportedElsewhere, Stopped, UserError, error_line


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups (staging files) run before the process ends."""


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line, `error: ...`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _raising(owner: int, error: type[BaseException]) -> Callable[[int, object], None]:
    """A signal's handler for process `owner`, raising `error` there; a DataLoader worker forked from it ignores
    the signal until the worker sets its own handlers (`data.shelter_loader_worker`): the main process ends its
    workers, and a worker that died of the signal first would only add a second error."""
    def handler(signum: int, frame: object) -> None:
        if os.getpid() == owner:
            raise error
    return handler


def run(body: Callable[[], int], hint: str = "") -> int:
    """Run a CLI's body; a UserError or an operating-system error (a full disk, a path of the wrong kind) is
    printed as `error: ...` with exit status 1, Ctrl-C as `error: interrupted<hint>` with 130, SIGTERM as
    `error: terminated<hint>` with 143. A data loader worker that died (killed for memory, say) is one line
    too, and an error that another process of the run reports (`ReportedElsewhere`) none.

    Once a run is stopping, what the stop left half-built (a loader interrupted while it started its workers)
    may fail again in its finalizer or in the loader's SIGCHLD handler as its workers end: that is the stop's
    doing, not another error, so neither is reported."""
    previous = {sig: signal.signal(sig, _raising(os.getpid(), error))
                for sig, error in ((signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt))}
    unraisable, chld = sys.unraisablehook, signal.getsignal(signal.SIGCHLD)
    try:
        return body()
    except Stopped as e:
        _quiet_teardown()
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except ReportedElsewhere as e:
        return e.exit_code
    except (UserError, OSError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _quiet_teardown()
        print(f"error: interrupted{hint}", file=sys.stderr)
        return 130
    except Terminated:
        _quiet_teardown()
        print(f"error: terminated{hint}", file=sys.stderr)
        return 143
    except RuntimeError as e:
        if not str(e).startswith(LOADER_WORKER_DIED):
            raise
        _quiet_teardown()
        print(f"error: a data loader worker ended before its work was done ({str(e).splitlines()[0]}); with "
              f"--workers 0 an error in the data shows itself, and less memory is used{hint}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if chld is not None:
            signal.signal(signal.SIGCHLD, chld)
        sys.unraisablehook = unraisable


LOADER_WORKER_DIED = "DataLoader worker (pid"  # how PyTorch's loader begins the RuntimeError for a dead worker


def _quiet_teardown() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sys.unraisablehook = lambda unraisable: None


def exit_now(status: int) -> NoReturn:
    """End the process with `status` once stdout and stderr are flushed, skipping the interpreter's teardown.

    For a command whose whole run is short: tearing down torch's modules takes 0.5-1 s (a third of a whole
    conversion, docs/performance.md), and such a command has nothing left to finalise, its files being written
    and renamed before `main` returns.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
