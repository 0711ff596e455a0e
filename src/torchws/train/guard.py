"""Non-finite losses and gradients never reach the weights: the trainer checks each step's loss and gradients
before the optimizer step, and ``--nonfinite`` decides what happens to a step that has a NaN or an Inf:

* ``stop``: the step is not applied; ``last.pt`` is written with the weights of the step before, and the run stops
  with :class:`NonFiniteError` naming the step and the first parameter (in ``named_parameters`` order) whose gradient
  is not finite;
* ``skip``: the step is not applied (weights and optimizer state stay as they were), it counts as done, and it is
  counted (``skipped_steps`` in the epoch records); ``--max-skipped-steps`` skipped steps in a row stop the run as
  ``stop`` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["NonFiniteGuard", "first_nonfinite_grad", "grads_are_finite"]


def grads_are_finite(model: nn.Module) -> bool:
    """True when every gradient of ``model`` is finite (one reduction per parameter, one device sync)."""
    peaks = [p.grad.detach().abs().amax().float() for p in model.parameters() if p.grad is not None]
    return not peaks or bool(torch.stack(peaks).isfinite().all())


def first_nonfinite_grad(model: nn.Module) -> str | None:
    """The name of the first parameter whose gradient holds a NaN or an Inf, or None."""
    for name, p in model.named_parameters():
        if p.grad is not None and not bool(p.grad.isfinite().all()):
            return name
    return None


class NonFiniteGuard:
    """Counts skipped steps and says when the run must stop. ``check`` is called after each backward."""

    def __init__(self, policy: str, max_in_row: int, skipped: int = 0, in_row: int = 0) -> None:
        self.policy, self.max_in_row = policy, max_in_row
        self.skipped, self.in_row = skipped, in_row  # totals of the run, restored on resume

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_row": self.in_row}

    @staticmethod
    def is_finite(loss_sum: float, model: nn.Module) -> bool:
        return math.isfinite(loss_sum) and grads_are_finite(model)

    def passed(self) -> None:
        """The step was finite (and applied)."""
        self.in_row = 0

    def failed(self) -> bool:
        """The step was not finite (and not applied); returns True when the run must stop."""
        if self.policy == "stop":
            return True
        self.skipped, self.in_row = self.skipped + 1, self.in_row + 1
        return self.in_row >= self.max_in_row

    def message(self, step: int, epoch: int, batch: int, loss: float, layer: str | None) -> str:
        where = f"step {step} (epoch {epoch + 1}, batch {batch})"
        grad = f"first parameter with a non-finite gradient: {layer}" if layer else "every gradient was finite"
        reason = (f"{self.in_row} steps in a row had a non-finite loss or gradient (--max-skipped-steps "
                  f"{self.max_in_row}), the last one at {where}" if self.policy == "skip"
                  else f"non-finite loss or gradient at {where}")  # fmt: skip
        return (
            f"{reason}: loss {loss:.4g}, {grad}; the step was not applied and last.pt holds the weights before "
            "it (lower --lr, check the data, or pass --nonfinite skip)"
        )
