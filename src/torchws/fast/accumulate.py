"""Gradient accumulation at the cost of one Weight Standardization per optimizer step.

Between two optimizer steps the weights do not change, so neither do the standardized weights ``W_hat = ws(W)``
nor the Jacobian ``dW_hat/dW``. The gradient over k micro-batches is therefore
``sum_k J^T g_k = J^T (sum_k g_k)``: standardize once, let the micro-batches accumulate ``g = dL/dW_hat`` into
detached leaf copies of ``W_hat``, and push the sum through WS once.

Usage (single process)::

    with ws_accumulation(model):
        for x, y in micro_batches:
            (loss_fn(model(x), y) / len(micro_batches)).backward()
    optimizer.step()            # param.grad is what k ordinary backwards would have produced

Usage with DistributedDataParallel (the usual ``no_sync`` pattern plus ``steps``): on the ``steps``-th
grad-enabled forward the layers get the real ``W_hat`` with a gradient hook that adds the accumulated leaf
gradients, so that last backward carries every WS parameter's gradient and DDP all-reduces it as usual::

    with ws_accumulation(ddp_model, steps=k):
        for i, (x, y) in enumerate(micro_batches):
            with ddp_model.no_sync() if i < k - 1 else contextlib.nullcontext():
                (loss_fn(ddp_model(x), y) / k).backward()
    optimizer.step()

Without ``steps`` the accumulated gradients go through WS on exit (or at :meth:`WSAccumulation.backward_weights`),
outside any DDP-synchronised backward: fine in one process, wrong under DDP (the WS parameters would miss the
all-reduce), so a DDP-wrapped model without ``steps`` raises. Layers a pass cannot take
(:func:`torchws.fast.plan.batchable`) keep standardizing per micro-batch; their gradients are exact too, just not
cheaper. Run each micro-batch's backward inside the block.

Each layer's ``W_hat`` is computed on its own (one autograd node per layer, the torch engine without
concatenation): once per optimizer step the speed of a shared kernel hardly matters, and a nested backward through
some of them (reentrant activation checkpointing in the last micro-batch) must not consume a node that the other
layers still need. The layers read the leaves (and, in the last micro-batch with ``steps``, ``W_hat``) from a weight
cache active for the whole block (:mod:`torchws.layers.weight_cache`), so checkpoint recomputations inside the
block find them too; a model-level pass on the model is paused meanwhile.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

import torch
from torch import Tensor, nn

from torchws.fast.batched import find_handle
from torchws.fast.engines.torch import TorchEngine
from torchws.fast.plan import Plan
from torchws.layers import weight_cache
from torchws.layers.ws import WSMixin

__all__ = ["WSAccumulation", "ws_accumulation"]


def _unwrap_chain(model: nn.Module) -> list[nn.Module]:
    """``[model, ..., inner]``: strips DDP/DataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    chain = [model]
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile wrapper
            model = model._orig_mod
        else:
            return chain
        chain.append(model)


class WSAccumulation:
    """Context manager computing every batchable WS weight once per optimizer step (see the module docstring).

    Args:
        model: the model (a DDP / DataParallel / torch.compile wrapper is unwrapped).
        steps: number of grad-enabled forwards (micro-batches) in the block; required under DDP (ValueError
            without it). None: the accumulated gradients are pushed through WS on exit.
    """

    def __init__(self, model: nn.Module, *, steps: int | None = None) -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"ws_accumulation: steps must be a positive number of micro-batches, got {steps}")
        self._chain = _unwrap_chain(model)
        if steps is None and any(isinstance(m, nn.parallel.DistributedDataParallel) for m in self._chain):
            raise ValueError(
                "ws_accumulation: the model is wrapped in DistributedDataParallel; pass steps=<micro-batches> (and "
                "use no_sync() for all but the last), otherwise the WS parameters' gradients miss the all-reduce"
            )
        self.root = self._chain[-1]
        self.steps = steps
        self.forwards = 0
        self._real: dict[WSMixin, Tensor] = {}
        self._leaves: dict[WSMixin, Tensor] = {}
        self._cache: dict[WSMixin, Tensor] = {}  # what the layers read: the leaves, then (last micro-batch) W_hat
        self._stack = contextlib.ExitStack()
        self._fired: set[int] = set()
        self._final_in_graph = False
        self._done = False

    def __enter__(self) -> WSAccumulation:
        # per-block state: the same object may be entered once per optimizer step
        self.forwards, self._fired, self._final_in_graph, self._done = 0, set(), False, False
        try:
            for m in self._chain:
                handle = find_handle(m)
                if handle is not None:
                    self._stack.enter_context(handle.paused())
            with torch.enable_grad():
                self._real = TorchEngine(Plan(self.root), concat=False)()
            self._leaves = {m: w.detach().requires_grad_(w.requires_grad) for m, w in self._real.items()}
            self._cache = dict(self._leaves)
            self._stack.enter_context(weight_cache.cached(self._cache))
            if self.steps is not None:
                self._stack.callback(self.root.register_forward_pre_hook(self._count_forward).remove)
        except BaseException:  # __exit__ does not run when __enter__ raises
            self._stack.close()
            raise
        return self

    def _count_forward(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled():
            return
        self.forwards += 1
        if self.steps is None or self.forwards < self.steps:
            return
        if self.forwards > self.steps:
            raise RuntimeError(
                f"ws_accumulation(steps={self.steps}): forward number {self.forwards} with grad enabled; "
                "the standardized weights' graph was handed to the last micro-batch already; raise steps"
            )
        # last micro-batch: the layers read the real W_hat; its gradient hook adds what the leaves accumulated
        for layer, w in self._real.items():
            if w.requires_grad:
                w.register_hook(self._make_hook(layer))
        self._cache.update(self._real)
        self._final_in_graph = True

    def _make_hook(self, layer: WSMixin):
        leaf = self._leaves[layer]

        def add_accumulated(grad: Tensor) -> Tensor:
            self._fired.add(id(layer))
            return grad if leaf.grad is None else grad + leaf.grad

        return add_accumulated

    def backward_weights(self) -> None:
        """Push the accumulated ``dL/dW_hat`` through WS into the parameters' ``.grad`` (once; exit calls it)."""
        if self._done:
            return
        self._done = True
        if self._final_in_graph:
            missed = [layer for layer, leaf in self._leaves.items() if leaf.grad is not None
                      and id(layer) not in self._fired]  # fmt: skip
            if missed:
                raise RuntimeError(
                    f"ws_accumulation: {len(missed)} WS layer(s) (first: {type(missed[0]).__name__}) were not used "
                    "in the last micro-batch's backward, so their accumulated gradients could not ride on it; "
                    "use steps=None or make every micro-batch use every layer"
                )
            return
        pairs = [(self._real[layer], leaf.grad) for layer, leaf in self._leaves.items()
                 if leaf.grad is not None and self._real[layer].requires_grad]  # fmt: skip
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.backward_weights()
        finally:
            self._stack.close()
            self._real, self._leaves, self._cache = {}, {}, {}


def ws_accumulation(model: nn.Module, *, steps: int | None = None) -> WSAccumulation:
    """``with ws_accumulation(model): ...``: one WS forward and one WS backward for all micro-batches inside.

    See :class:`WSAccumulation` and the module docstring (DDP: pass ``steps`` and use ``no_sync`` for all but the
    last micro-batch).
    """
    return WSAccumulation(model, steps=steps)
