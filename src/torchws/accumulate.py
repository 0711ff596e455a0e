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
all-reduce), so a DDP-wrapped model without ``steps`` raises. Layers the batched pass cannot handle
(:func:`torchws.batched.batchable`) keep standardizing per micro-batch; their gradients are exact too, just not
cheaper. Run each micro-batch's backward inside the block.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import Tensor, nn

from torchws.batched import BACKENDS, BatchedWS, _make_groups, batchable, batched_standardize, find_handle
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
        backend: as in :func:`torchws.batched.enable_batched_ws`.
    """

    def __init__(self, model: nn.Module, *, steps: int | None = None, backend: str = "auto") -> None:
        if steps is not None and steps < 1:
            raise ValueError(f"ws_accumulation: steps must be a positive number of micro-batches, got {steps}")
        if backend not in BACKENDS:
            raise ValueError(f"ws_accumulation: backend must be one of {BACKENDS}, got {backend!r}")
        self._chain = _unwrap_chain(model)
        if steps is None and any(isinstance(m, nn.parallel.DistributedDataParallel) for m in self._chain):
            raise ValueError(
                "ws_accumulation: the model is wrapped in DistributedDataParallel; pass steps=<micro-batches> (and "
                "use no_sync() for all but the last), otherwise the WS parameters' gradients miss the all-reduce"
            )
        self.root = self._chain[-1]
        self.steps = steps
        self.backend = backend
        self.forwards = 0
        self._handles: list[BatchedWS] = []
        self._real: dict[WSMixin, Tensor] = {}
        self._leaves: dict[WSMixin, Tensor] = {}
        self._fired: set[int] = set()
        self._final_in_graph = False
        self._done = False
        self._counter = None

    def __enter__(self) -> WSAccumulation:
        # per-block state: the same object may be entered once per optimizer step
        self.forwards, self._fired, self._final_in_graph, self._done, self._counter = 0, set(), False, False, None
        for m in self._chain:
            handle = find_handle(m)
            if handle is not None and not handle.paused:
                handle.paused = True  # the layers get leaves from us, not a fresh pass per forward
                self._handles.append(handle)
        try:
            layers = tuple(m for m in self.root.modules() if batchable(m))
            with torch.enable_grad():
                self._real = self._standardize(layers)
            for layer, w in self._real.items():
                leaf = w.detach().requires_grad_(w.requires_grad)
                self._leaves[layer] = leaf
                layer.set_standardized_weight(leaf)
            if self.steps is not None:
                self._counter = self.root.register_forward_pre_hook(self._count_forward)
        except BaseException as e:  # __exit__ does not run when __enter__ raises: unpause the pass here
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _standardize(self, layers: tuple[WSMixin, ...]) -> dict[WSMixin, Tensor]:
        """The real standardized weights, once per block. ``"auto"`` computes each layer's on its own (one autograd
        node per layer): once per optimizer step the speed of a shared kernel hardly matters, and a nested backward
        through some of them (reentrant activation checkpointing in the last micro-batch) must not consume a node
        the other layers still need ("backward through the graph a second time")."""
        groups = _make_groups(layers)
        if self.backend == "auto":
            return batched_standardize(groups, "torch", concat=False)
        return batched_standardize(groups, self.backend)  # type: ignore[arg-type]

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
        # last micro-batch: use the real W_hat; its gradient hook adds what the leaves accumulated
        for layer, w in self._real.items():
            if w.requires_grad:
                w.register_hook(self._make_hook(layer))
            layer.set_standardized_weight(w)
        self._final_in_graph = True

    def _make_hook(self, layer: WSMixin):
        leaf = self._leaves[layer]

        def add_accumulated(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # unused output of a multi-output node (the numba pass) that ran for other layers
                return None
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
                      and id(layer) not in self._fired]
            if missed:
                raise RuntimeError(
                    f"ws_accumulation: {len(missed)} WS layer(s) (first: {type(missed[0]).__name__}) were not used "
                    "in the last micro-batch's backward, so their accumulated gradients could not ride on it; "
                    "use steps=None or make every micro-batch use every layer"
                )
            return
        pairs = [(self._real[layer], leaf.grad) for layer, leaf in self._leaves.items()
                 if leaf.grad is not None and self._real[layer].requires_grad]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self.backward_weights()
        finally:
            for layer in self._leaves:
                layer.set_standardized_weight(None)
            if self._counter is not None:
                self._counter.remove()
            for handle in self._handles:
                handle.paused = False
            self._real, self._leaves, self._handles = {}, {}, []


def ws_accumulation(model: nn.Module, *, steps: int | None = None, backend: str = "auto") -> WSAccumulation:
    """``with ws_accumulation(model): ...``: one WS forward and one WS backward for all micro-batches inside.

    See :class:`WSAccumulation` and the module docstring (DDP: pass ``steps`` and use ``no_sync`` for all but the
    last micro-batch).
    """
    return WSAccumulation(model, steps=steps, backend=backend)
