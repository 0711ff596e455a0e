"""One optimizer step over ``accum_steps`` micro-batches, spelled out: forward, loss / accum_steps, backward,
with DDP's gradient all-reduce only on the last micro-batch (``no_sync`` on the others).

With ``ws_accumulate_once`` and a model that has WS layers, the micro-batches run inside torchws's accumulation
context, which standardizes every WS weight once for the whole step and sends the accumulated gradient through the
standardization once on exit. Under DDP that last backward happens outside DDP's reducer, so every micro-batch runs
under ``no_sync`` and the gradients are averaged over ranks by hand afterwards (same result, one flat all-reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from torchws.layers import WSMixin

from .distributed import DistInfo, all_reduce_grads

__all__ = ["StepStats", "accumulation_context", "train_step"]

Batch = tuple[torch.Tensor, torch.Tensor]


def accumulation_context() -> Callable[[nn.Module], Any] | None:
    """torchws's 'standardize once per optimizer step' context manager factory, or None if this build lacks it."""
    try:
        from torchws.accumulate import ws_accumulation  # type: ignore[import-not-found]

        return ws_accumulation
    except ImportError:
        pass
    try:
        from torchws.batched import accumulation  # type: ignore[attr-defined]

        return accumulation
    except ImportError:
        return None


class StepStats:
    """Running sums of one epoch on this rank: loss * images, correct predictions, images."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.images = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        n = labels.shape[0]
        self.loss_sum += float(loss.detach()) * n
        self.correct += int((logits.detach().argmax(1) == labels).sum())
        self.images += n


def _prepare(batch: Batch, device: torch.device, channels_last: bool) -> Batch:
    images, labels = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_step(
    model: nn.Module,
    wrapped: nn.Module,
    micro_batches: Sequence[Batch],
    stats: StepStats,
    *,
    info: DistInfo,
    device: torch.device,
    bf16: bool = False,
    channels_last: bool = False,
    ws_accumulate_once: bool = True,
) -> None:
    """Accumulate the gradient of the mean loss over ``micro_batches`` into ``model``'s ``.grad`` (all ranks equal).

    model: the plain module; wrapped: the same model in DDP (or ``model`` itself when not distributed).
    The caller zeroes the gradients before and steps the optimizer after.
    """
    n = len(micro_batches)
    factory = accumulation_context() if ws_accumulate_once and n > 1 else None
    once = factory is not None and any(isinstance(m, WSMixin) for m in model.modules())
    by_hand = once and info.enabled
    outer = factory(model) if once else contextlib.nullcontext()
    with outer:
        for i, batch in enumerate(micro_batches):
            images, labels = _prepare(batch, device, channels_last)
            skip_sync = info.enabled and (by_hand or i < n - 1)
            with wrapped.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = wrapped(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
                (loss / n).backward()
            stats.add(logits, labels, loss)
    if by_hand:
        all_reduce_grads(model, info)
