"""Progress of an epoch on rank 0: a tqdm bar on a terminal; where stderr is not a terminal (a scheduler's log
file) a plain line every ``every_steps`` steps or ``every_seconds`` seconds instead, since a bar's carriage-return
updates at every step would grow the log by megabytes of one line."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """``update`` after each optimizer step, ``close`` at the end of the epoch. ``stream``: where the bar (stderr by
    default) or the plain lines (stdout by default) go; ``terminal`` forces the choice (None: ``isatty`` of
    stderr)."""

    def __init__(self, total: int, initial: int, desc: str, every_steps: int, every_seconds: float, *,
                 terminal: bool | None = None, stream: TextIO | None = None) -> None:  # fmt: skip
        self.total, self.desc, self.done = total, desc, initial
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.stream = stream
        self.bar: Any = None
        if terminal if terminal is not None else sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                                file=stream or sys.stderr)  # fmt: skip
            except ImportError:
                self.bar = None
        self.last_step, self.last_time = initial, time.monotonic()

    def update(self, loss: float, images_per_s: float, lr: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", lr=f"{lr:.3g}")
            self.bar.update(1)
            return
        now = time.monotonic()
        if self.done - self.last_step >= self.every_steps or now - self.last_time >= self.every_seconds:
            print(f"{self.desc} step {self.done}/{self.total}: loss {loss:.4f}, {images_per_s:.0f} img/s, lr {lr:.3g}",
                  file=self.stream or sys.stdout, flush=True)  # fmt: skip
            self.last_step, self.last_time = self.done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
