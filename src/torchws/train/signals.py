"""SIGTERM (a scheduler, a preemption) and SIGINT (Ctrl-C) as a request to stop at the next optimizer-step boundary.

``StopSignals`` records the request while the loop runs and reports it when polled (under DDP the ranks agree on
it); ``stop_exception`` builds what ``Trainer.run`` raises once ``last.pt`` is written: ``RunTerminated`` (a
SystemExit with status 143) or ``RunInterrupted`` (a KeyboardInterrupt; the CLI exits with 130).
``ignore_stop_signals`` is the DataLoader workers' ``worker_init_fn``: a signal sent to the whole process group must
stop the trainer cleanly, not kill the workers under it.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch

from .distributed import DistInfo, all_reduce_max

__all__ = ["RunInterrupted", "RunTerminated", "StopSignals", "ignore_stop_signals", "stop_exception"]


class RunTerminated(SystemExit):
    """SIGTERM stopped the run at a step boundary, after ``checkpoint`` (None: --no-save-checkpoints) was written.

    A SystemExit with code 143 (128 + SIGTERM, what a shell reports for a process SIGTERM killed): uncaught, it ends
    the process as the signal would have, but with the run saved. ``message`` says where it stopped and how to go on.
    """

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(128 + signal.SIGTERM)
        self.message, self.checkpoint = message, checkpoint


class RunInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) stopped the run at a step boundary, after ``checkpoint`` (None: --no-save-checkpoints) was
    written. A KeyboardInterrupt, so code that handled Ctrl-C before goes on working; the CLI exits with 130."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.message, self.checkpoint = message, checkpoint


def stop_exception(signum: int, step: int, total_steps: int,
                   checkpoint: Path | None) -> RunTerminated | RunInterrupted:  # fmt: skip
    """What a run that ``signum`` stopped after ``step`` of ``total_steps`` raises: RunInterrupted for SIGINT,
    RunTerminated otherwise; its ``message`` says where it stopped and how to continue (from ``checkpoint``)."""
    where = (f"saved {checkpoint}; to continue, run the same command with --resume auto" if checkpoint is not None
             else "no checkpoint (--no-save-checkpoints), so the run cannot be continued")  # fmt: skip
    message = f"{signal.Signals(signum).name}: stopped after step {step} of {total_steps}; {where}"
    if signum == signal.SIGINT:
        return RunInterrupted(message, checkpoint)
    return RunTerminated(message, checkpoint)


class StopSignals:
    """While entered, SIGTERM and SIGINT only record a request to stop, which ``poll`` reports at a step boundary.

    Installed from the main thread only (Python runs handlers there; elsewhere ``signal.signal`` raises) and only over
    Python-level handlers that are not SIG_IGN (a job started with SIGINT ignored keeps ignoring it); the previous
    handlers come back on exit. A Ctrl-C after the first signal raises KeyboardInterrupt at once (the way out of a long
    save; under DDP the other ranks then fail instead of stopping cleanly). Later SIGTERMs are ignored: under torchrun
    a worker can get one from the scheduler and another forwarded by torchrun.
    """

    def __init__(self, info: DistInfo, device: torch.device) -> None:
        self.info, self.device = info, device
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(signum) not in (None, signal.SIG_IGN):  # None: set from C, cannot be restored
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def poll(self) -> int | None:
        """The signal to stop for, or None. Under DDP a collective (every rank calls it at the same points): the
        ranks stop together when any of them got a signal."""
        if not self.info.enabled:
            return self.received
        return all_reduce_max(self.received or 0, self.info, self.device) or None


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the trainer's DataLoaders: the worker ignores SIGTERM and SIGINT.

    A scheduler, torchrun or a terminal's Ctrl-C signals the whole process group, workers included. A worker that died
    of it made PyTorch raise "DataLoader worker ... killed by signal" in the trainer at any point, instead of the stop
    at a step boundary; the trainer ends its workers itself when it stops. Runs after PyTorch's own worker setup (its C
    SIGTERM handler, which would kill the worker) and changes no RNG state, so the loader's seeding is untouched.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
