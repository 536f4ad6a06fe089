"""When a run writes `last.pth` within an epoch: every N steps or minutes (`checkpoint_every`), and when a
scheduler asks it to stop (SIGTERM; SIGUSR1, which SLURM sends ahead of a time limit).

Every process votes each step; the votes travel with the step's loss in the one reduction the step already
makes, so all processes checkpoint, and stop, at the same step. Minutes are measured on the first process's
clock, the one whose vote counts for them.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

import torch

from .config import TrainConfig, checkpoint_interval

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupts:
    """The checkpoint interval and the stop signals of one run; a context manager that installs the signal
    handlers (main thread) and puts the previous ones back."""

    def __init__(self, cfg: TrainConfig, is_main: bool) -> None:
        self.steps, self.minutes = checkpoint_interval(cfg.checkpoint_every) if cfg.checkpoint_every else (None, None)
        self.is_main = is_main
        self.signal: int | None = None  # the stop signal this process received, if any
        self.stopping: int | None = None  # the signal all processes agreed to stop for
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._request_stop)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum  # acted on at the end of the step under way

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
