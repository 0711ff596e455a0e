"""Loss-landscape probes along the gradient, after Santurkar et al. 2018 ("How does batch normalization help
optimization?", arXiv 1805.11604, sec. 3), the measurements the WS paper's smoothness argument builds on.

At parameters ``theta`` with gradient ``grad(theta)`` of a fixed batch's loss, move to ``theta + eta * d`` (``d``
defaults to ``-grad(theta)``, a plain gradient step of size ``eta``) for each ``eta`` in ``steps`` and record:

* the loss there; its spread over the steps is the *loss landscape variation* (``loss_range``);
* ``||grad(theta) - grad(theta + eta * d)||``; its maximum is the *gradient predictiveness* (lower is better);
* ``||grad(theta) - grad(theta + eta * d)|| / ||eta * d||``; its maximum is the *effective beta-smoothness*.

For ``L = 0.5 x^T A x`` and ``d = -A x`` the last ratio is ``||A g|| / ||g||`` for every eta, the square root of the
Rayleigh quotient of ``A^2`` at ``g`` (the tests use this).

Parameters *and buffers* (BatchNorm running statistics) are restored bit-exactly afterwards and ``.grad`` is never
touched (gradients come from ``torch.autograd.grad``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

__all__ = ["LandscapeProbe", "batch_loss_and_grad", "loss_landscape_along_gradient", "restored_state"]

LossFn = Callable[[Tensor, Tensor], Tensor]
DEFAULT_STEPS = (0.025, 0.05, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class LandscapeProbe:
    """What one probe measured. Sequences are per step size, in the order of ``steps``.

    Attributes:
        steps: the step sizes eta.
        loss: loss at theta. grad_norm: ``||grad(theta)||``.
        losses: loss at ``theta + eta * d``.
        grad_change_norms: ``||grad(theta) - grad(theta + eta * d)||``.
        move_norms: ``||eta * d||``.
    """

    steps: tuple[float, ...]
    loss: float
    grad_norm: float
    losses: tuple[float, ...]
    grad_change_norms: tuple[float, ...]
    move_norms: tuple[float, ...]

    @property
    def loss_range(self) -> float:
        """max - min of the losses over the step sizes (NaN/inf if a step diverged)."""
        return max(self.losses) - min(self.losses)

    @property
    def gradient_predictiveness(self) -> float:
        """max over steps of ``||grad(theta) - grad(theta + eta * d)||``."""
        return max(self.grad_change_norms)

    @property
    def effective_beta(self) -> float:
        """max over steps of ``||delta grad|| / ||delta theta||`` (0.0 when the move is zero: nothing measured)."""
        ratios = [c / m for c, m in zip(self.grad_change_norms, self.move_norms) if m > 0]
        return max(ratios, default=0.0)

    def to_dict(self) -> dict:
        """Plain dict with the raw fields and the three summaries (JSON-ready)."""
        summary = {k: getattr(self, k) for k in ("loss_range", "gradient_predictiveness", "effective_beta")}
        return {**asdict(self), **summary}


def _split(batch: tuple[Tensor, Tensor], micro_batch_size: int | None) -> list[tuple[Tensor, Tensor]]:
    inputs, targets = batch
    if micro_batch_size is None or micro_batch_size >= inputs.shape[0]:
        return [(inputs, targets)]
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
    return list(zip(inputs.split(micro_batch_size), targets.split(micro_batch_size)))


def batch_loss_and_grad(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    params: Sequence[Tensor],
    *,
    micro_batch_size: int | None = None,
) -> tuple[float, list[Tensor]]:
    """Loss of ``batch`` and its gradient w.r.t. ``params``, without touching ``.grad``.

    With ``micro_batch_size`` the batch is cut into chunks whose losses are averaged weighted by chunk size, i.e.
    the objective of gradient accumulation (with BatchNorm each chunk uses its own statistics, as in training).
    ``loss_fn(outputs, targets)`` must return the chunk's *mean* loss.

    Returns:
        (loss as float, one gradient per param; zeros for params the loss does not reach).
    """
    total = batch[0].shape[0]
    loss_sum = 0.0
    grads = [torch.zeros_like(p) for p in params]
    for inputs, targets in _split(batch, micro_batch_size):
        weight = inputs.shape[0] / total
        loss = loss_fn(model(inputs), targets) * weight
        parts = torch.autograd.grad(loss, list(params), allow_unused=True)
        for acc, part in zip(grads, parts):
            if part is not None:
                acc.add_(part)
        loss_sum += float(loss.detach())
    return loss_sum, grads


def _norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


@contextmanager
def restored_state(model: nn.Module, params: Sequence[Tensor]) -> Iterator[None]:
    """Snapshot ``params`` and all of ``model``'s buffers; copy them back bit-exactly on exit (even on error)."""
    tensors = list(params) + [b for b in model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


def loss_landscape_along_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    batch: tuple[Tensor, Tensor],
    steps: Sequence[float] = DEFAULT_STEPS,
    *,
    params: Sequence[Tensor] | None = None,
    direction: Sequence[Tensor] | None = None,
    micro_batch_size: int | None = None,
) -> LandscapeProbe:
    """Probe loss and gradient at ``theta + eta * d`` for each ``eta`` in ``steps`` (Santurkar et al. 2018).

    Args:
        model: evaluated in its current mode (train mode for BatchNorm means batch statistics, as in training).
        loss_fn: ``loss_fn(model(inputs), targets) -> mean loss`` (e.g. ``F.cross_entropy``).
        batch: ``(inputs, targets)`` held fixed across the probe.
        steps: step sizes eta (non-empty, finite).
        params: the parameters to move; default all with ``requires_grad``.
        direction: one tensor per param; default ``-grad(theta)`` (a gradient-descent step of size eta).
        micro_batch_size: see :func:`batch_loss_and_grad`.

    Returns:
        :class:`LandscapeProbe`. Parameters and buffers are restored exactly; ``.grad`` is left as it was.
    """
    steps = tuple(float(s) for s in steps)
    if not steps or not all(math.isfinite(s) for s in steps):
        raise ValueError(f"loss_landscape_along_gradient: steps must be a non-empty list of finite floats, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("loss_landscape_along_gradient: no parameters to move (none requires grad)")
    with restored_state(model, params):
        loss0, grad0 = batch_loss_and_grad(model, loss_fn, batch, params, micro_batch_size=micro_batch_size)
        d = [-g for g in grad0] if direction is None else [t.detach() for t in direction]
        if len(d) != len(params) or any(a.shape != p.shape for a, p in zip(d, params)):
            raise ValueError("loss_landscape_along_gradient: direction needs one tensor per param, shaped like it")
        origin = [p.detach().clone() for p in params]
        d_norm = _norm(d)
        losses, changes, moves = [], [], []
        for eta in steps:
            with torch.no_grad():
                for p, p0, di in zip(params, origin, d):
                    p.copy_(p0 + eta * di)  # from the origin each time, so errors do not accumulate
            loss, grad = batch_loss_and_grad(model, loss_fn, batch, params, micro_batch_size=micro_batch_size)
            losses.append(loss)
            changes.append(_norm([g1 - g0 for g1, g0 in zip(grad, grad0)]))
            moves.append(abs(eta) * d_norm)
    return LandscapeProbe(steps, loss0, _norm(grad0), tuple(losses), tuple(changes), tuple(moves))
