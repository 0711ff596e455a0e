"""One optimizer step over ``accum_steps`` micro-batches, spelled out: forward, loss / accum_steps, backward, with
DDP's gradient all-reduce only on the last micro-batch (``no_sync`` on the others); and the evaluation pass.

With ``ws_accumulate_once`` and a model that has WS layers, the micro-batches run inside
:func:`torchws.fast.ws_accumulation` (``steps=accum_steps``): every WS weight is standardized once for the
whole step, and the gradient accumulated w.r.t. the standardized weights rides on the last micro-batch's backward,
so DDP all-reduces it as usual.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchws.fast import ws_accumulation
from torchws.layers import WSMixin

from .distributed import DistInfo, all_reduce_sum

__all__ = ["StepStats", "evaluate", "train_step"]

Batch = tuple[torch.Tensor, torch.Tensor]


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

    def merge(self, other: StepStats) -> None:
        """Add ``other``'s sums (a step's, once it is applied)."""
        self.loss_sum += other.loss_sum
        self.correct += other.correct
        self.images += other.images


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
    once = ws_accumulate_once and n > 1 and any(isinstance(m, WSMixin) for m in model.modules())
    with ws_accumulation(wrapped, steps=n) if once else contextlib.nullcontext():
        for i, batch in enumerate(micro_batches):
            images, labels = _prepare(batch, device, channels_last)
            with wrapped.no_sync() if info.enabled and i < n - 1 else contextlib.nullcontext():  # type: ignore[operator]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = wrapped(images)
                loss = nn.functional.cross_entropy(logits.float(), labels)
                (loss / n).backward()
            stats.add(logits, labels, loss)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Any, device: torch.device, info: DistInfo, channels_last: bool = False,
             bf16: bool = False) -> tuple[float, float]:  # fmt: skip
    """(mean cross-entropy, top-1 accuracy in %) over all ranks' shards of the test set."""
    if info.enabled:  # BN running stats drift per rank in training: evaluate rank 0's (the saved) model everywhere
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(images).float()
        loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        count += labels.shape[0]
    model.train(was_training)
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], info, device)
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)
