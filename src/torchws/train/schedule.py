"""Learning rate: linear scaling by the total batch, linear warm-up, then a step, cosine or constant schedule.

Steps count optimizer steps from 0; ``lr_at(s)`` is the lr used by step ``s``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["LRSchedule", "scaled_lr"]


def scaled_lr(base_lr: float, batch_size: int, accum_steps: int, world_size: int, base_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al.): ``base_lr * batch_size * accum_steps * world_size / base_batch``."""
    return base_lr * batch_size * accum_steps * world_size / base_batch


@dataclass
class LRSchedule:
    """Per-step lr: warm-up from ``peak_lr / warmup_steps`` to ``peak_lr`` over ``warmup_steps`` steps, then

    * ``step``: ``peak_lr * gamma ** (number of milestones <= s)``, milestones in steps;
    * ``cosine``: ``peak_lr * (1 + cos(pi * t)) / 2`` with ``t = (s - warmup_steps) / (total_steps - warmup_steps)``;
    * ``constant``: ``peak_lr``.

    ``step`` (the state saved in checkpoints) is the next step to run.
    """

    peak_lr: float
    total_steps: int
    schedule: str = "step"
    warmup_steps: int = 0
    milestones: Sequence[int] = ()
    gamma: float = 0.1
    step: int = 0

    def lr_at(self, s: int) -> float:
        """The lr of optimizer step ``s`` (0-based)."""
        if s < self.warmup_steps:
            return self.peak_lr * (s + 1) / self.warmup_steps
        if self.schedule == "step":
            return self.peak_lr * self.gamma ** sum(1 for m in self.milestones if m <= s)
        if self.schedule == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (s - self.warmup_steps) / span)
            return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.schedule == "constant":
            return self.peak_lr
        raise ValueError(f"LRSchedule: unknown schedule {self.schedule!r}; use step, cosine or constant")

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the lr of the next step on every param group and advance; returns that lr."""
        lr = self.lr_at(self.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.step += 1
        return lr

    def state_dict(self) -> dict[str, object]:
        return {"step": self.step, "peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "schedule": self.schedule, "warmup_steps": self.warmup_steps, "milestones": list(self.milestones),
                "gamma": self.gamma}  # fmt: skip

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the position; the shape of the schedule comes from the current config."""
        self.step = int(state["step"])  # type: ignore[arg-type]
