"""When a run writes `last.pth` within an epoch: every N steps or minutes (`checkpoint_every`), and when a
scheduler asks it to stop (SIGTERM; SIGUSR1, which SLURM sends ahead of a time limit); and Ctrl-C.

The handlers are installed when the command starts, before data and model set-up (which can take minutes). A
stop signal during set-up ends the command at once with a `stopped:` line: there is nothing to save yet. Once the
steps begin, it is acted on at the end of the step under way: every process votes each step, and the votes travel
with the step's loss in the one reduction the step already makes, so all processes checkpoint, and stop, at the
same step. Minutes are measured on the first process's clock, the one whose vote counts for them.

Ctrl-C raises KeyboardInterrupt, and is remembered: where Python swallows that exception (it lands in a finalizer,
"Exception ignored ..."), the next step raises it again. Loader workers forked before they leave the process
group inherit these handlers and ignore the signals there: the training process ends them.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import torch

from ..errors import ReportedElsewhere, Stopped
from .config import TrainConfig, checkpoint_interval

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupts:
    """The checkpoint interval, the stop signals and Ctrl-C of one run; a context manager that installs the
    signal handlers (main thread) and puts the previous ones back."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.steps, self.minutes = checkpoint_interval(cfg.checkpoint_every) if cfg.checkpoint_every else (None, None)
        self.is_main = True  # set from the process group once it is joined
        self.training = False  # the steps have begun: a stop signal waits for the end of the step under way
        self.signal: int | None = None  # the stop signal this process received, if any
        self.stopping: int | None = None  # the signal all processes agreed to stop for
        self.interrupted = False  # Ctrl-C was pressed
        self.last_save = time.monotonic()
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request_stop)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return  # a loader worker that has not left the process group yet
        if not self.training:
            if not self.is_main:  # every process of the run got it: the first one says so
                raise ReportedElsewhere(128 + signum)
            raise Stopped(f"{signal.Signals(signum).name} before the first step, with nothing to save; the same "
                          "command starts it again", 128 + signum)
        self.signal = signum  # acted on at the end of the step under way

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:
            return
        self.interrupted = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt again where Ctrl-C was pressed and the run went on."""
        if self.interrupted:
            raise KeyboardInterrupt

    def votes(self, global_step: int, device: torch.device) -> torch.Tensor:
        """This process's votes for the step that completes global step `global_step`: checkpoint, stop for
        SIGTERM, stop for SIGUSR1."""
        due = self.steps is not None and global_step % self.steps == 0
        if self.minutes is not None and self.is_main:
            due = due or time.monotonic() - self.last_save >= 60 * self.minutes
        return torch.tensor([float(due), float(self.signal == signal.SIGTERM), float(self.signal == signal.SIGUSR1)],
                            device=device)

    def saved(self) -> None:
        self.last_save = time.monotonic()
