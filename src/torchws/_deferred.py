"""Deferred WS backward: standardized weights as persistent leaf tensors, pushed through WS when backward ends.

Part of :mod:`torchws.batched` (``enable_batched_ws(model, deferred=True)``). Every pass that hands its layers fresh
weight tensors through autograd pays for that on every step, before any math: one autograd node with an edge per
weight, the outputs' allocation, the gradients routed back through that node (``pass_floor`` in
``benchmarks/RESULTS.md``: 2-4% of a CIFAR ResNet-20 micro-batch step on a CPU). Here the layers read persistent leaf
tensors that the kernels overwrite in place; their gradients accumulate like any parameter's, and the first one to
arrive queues a callback on the autograd engine that runs when the backward ends and computes every weight
gradient in one call, ``dL/dW = J^T dL/dW_hat``, from the statistics of the forward those gradients belong to.

Engines (:func:`build_deferred`): the numba kernels on a CPU; on CUDA the batched torch pass captured once as a
forward and a backward CUDA graph (``"auto"``, ``backend="cuda_graph"``: bit-identical to per layer in our GPU
checks, ResNet-50 fp32 and bf16), or the Triton multi-tensor kernels captured the same way (``backend="triton"``:
the fastest WS alone, 2.4-2.8x the memory floor on ResNet-50; they sum each row in another order, ~1e-7 relative).
Layers an engine cannot take (gain, shift, transposed convs, frozen weights) stay on the autograd pass. Memory: the
leaves are one more copy of the WS weights (numba); the CUDA engines keep about four (the leaves, the incoming
gradients, the outgoing ones, and the graph engine's saved tensors or the Triton engine's packed weights).

What changes for the user (why it is opt-in):
    * the WS parameters are not in the autograd graph: their gradients reach ``.grad`` when ``backward()`` returns
      (added to what is there, like any backward; their post-accumulate-grad hooks then run, as AccumulateGrad
      would run them), and ``torch.autograd.grad(loss, params)`` w.r.t. them raises "One of the differentiated
      Tensors appears to not have been used in the graph" (``torch.func.functional_call`` with plain tensors swapped
      in falls back to the autograd pass, so ``autograd.grad`` w.r.t. those works);
    * ``backward(inputs=[...])`` listing the WS parameters does not reach them: they get no gradient;
    * ``backward(create_graph=True)`` reaching a deferred layer raises (the push is not differentiable);
    * not under DistributedDataParallel: its reducer waits for the parameters' own gradient hooks (the trainer
      uses it in single-process runs only). ``enable_batched_ws`` refuses a DDP-wrapped model; wrapping after
      enabling is not detected (DDP then fails with "Expected to have finished reduction");
    * a tensor hook on a WS parameter (``weight.register_hook``) does not fire;
    * a model whose WS weights live on several devices runs the autograd pass.

When the leaves are recomputed: at every forward of the root model, except while a grad-enabled forward's leaves
still wait for their backward and nothing changed since (two forwards, one backward: both must see the same
leaves). "Changed" is a weight's version counter or storage (``.data =``), or a ``step()`` of an optimizer that holds
one of the weights (a global optimizer hook: fused optimizers do not bump version counters). If the weights did
change while a backward is pending, the pending graph's leaves are retired and the forward gets new ones; a backward
through a retired leaf raises, as autograd does for a weight modified in place between its forward and backward.
Without a forward in between, a backward after an optimizer step gives the gradient at the weights its forward used
(per layer, autograd would raise for a non-fused optimizer). In-place edits through ``.data`` between two forwards
that share one backward are not seen. A backward that raises never runs its push (autograd drops its callbacks): the
next forward drops the leaves' partial gradients, as ``zero_grad`` after the failure does for the other parameters
(a backward of another pending forward before that forward would push them too).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from torchws._plan import _Group
from torchws.layers.ws import WSMixin

__all__ = ["DeferredWS", "build_deferred"]


_ENGINES: weakref.WeakSet[DeferredWS] = weakref.WeakSet()  # live engines: the optimizer hook counts their steps
_optimizer_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer post-step hook: an engine counts the steps of optimizers that hold one of its inputs (fused
    optimizers update in place without bumping version counters, so the count is how such an update is seen)."""
    for engine in list(_ENGINES):
        if engine._moved_by(optimizer):
            engine._steps += 1


def _watch_optimizers() -> None:
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_count_optimizer_step)


def _bump_versions(tensors: Sequence[Tensor]) -> None:
    """Mark ``tensors`` modified in place (written through pointers or by a graph replay, which autograd cannot see)."""
    try:
        torch.autograd.graph.increment_version(tensors)  # one C++ call for the whole list (PyTorch >= 2.6)
    except TypeError:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


class _Generation:
    """The post-accumulate-grad hook of one set of leaves; retired when the leaves are replaced during a pending
    backward (weights changed between a forward and its backward). Holds its engine weakly: a hook on a tensor is
    invisible to the garbage collector, so a strong reference would keep every engine alive forever."""

    __slots__ = ("engine", "retired")

    def __init__(self, engine: DeferredWS) -> None:
        self.engine, self.retired = weakref.ref(engine), False

    def __call__(self, leaf: Tensor) -> None:
        engine = self.engine()
        if self.retired or engine is None:
            leaf.grad = None
            raise RuntimeError(
                "deferred WS: a WS weight was changed (optimizer step, in-place edit, new storage) or the model's WS "
                "plan rebuilt between a forward and its backward; run that backward before changing the weights"
            )
        task = torch._C._current_graph_task_id()  # one push per backward (a nested one gets its own)
        if engine._queued_task != task:
            engine._queued_task = task
            torch.autograd.Variable._execution_engine.queue_callback(engine._push)


def _leaf_over(buffer: Tensor) -> Tensor:
    """A leaf that needs a gradient over ``buffer``'s memory, with a version counter of its own (a later set of
    leaves over the same memory does not bump it: autograd's check then leaves the clear error to the retired
    hook), and a view (autocast caches the low-precision cast of non-view leaves for the whole autocast region,
    which would hand later steps the first step's weights)."""
    base = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
    base.set_(buffer.untyped_storage(), buffer.storage_offset(), buffer.shape, buffer.stride())
    return base.as_strided(buffer.shape, buffer.stride()).requires_grad_()  # (a view; view() could restride)


class DeferredWS:
    """Persistent standardized-weight leaves of ``layers`` computed from ``inputs`` (see the module docstring).

    Subclasses fill ``self._buffers`` (one tensor per layer, what the kernels write) and implement ``_compute`` and
    ``_backward``; ``rest`` are the groups left to the autograd pass.
    """

    def __init__(self, layers: Sequence[WSMixin], inputs: Sequence[Tensor], buffers: Sequence[Tensor],
                 rest: Sequence[_Group] = ()) -> None:  # fmt: skip
        self.layers = tuple(layers)
        self.inputs = tuple(inputs)
        self.rest = list(rest)
        self.rest_layers = tuple(m for g in self.rest for m in g.layers)
        self._dicts = [m.__dict__ for m in self.layers]  # the layers' supply attributes, written every step
        self._buffers = tuple(buffers)
        self._input_ids = {id(t) for t in self.inputs}
        self._optimizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> (groups, holds ours)
        self._versions: list[int] | None = None
        self._pointers: list[int] | None = None
        self._steps = 0  # steps of optimizers holding an input (_count_optimizer_step)
        self._seen_steps = -1
        self._in_flight = False
        self._queued_task: int | None = None  # the backward whose end runs a queued push
        self._generation = _Generation(self)
        self.leaves = self._make_leaves()
        _ENGINES.add(self)
        _watch_optimizers()

    def _make_leaves(self) -> tuple[Tensor, ...]:
        leaves = tuple(_leaf_over(b) for b in self._buffers)
        for leaf in leaves:
            leaf.register_post_accumulate_grad_hook(self._generation)
        return leaves

    def _moved_by(self, optimizer) -> bool:
        """Whether ``optimizer`` holds one of the inputs (cached per optimizer and number of parameter groups)."""
        groups = optimizer.param_groups
        cached = self._optimizers.get(optimizer)
        if cached is None or cached[0] != len(groups):
            cached = (len(groups), any(id(p) in self._input_ids for g in groups for p in g["params"]))
            self._optimizers[optimizer] = cached
        return cached[1]

    def usable(self) -> bool:
        """Whether the inputs still need gradients (else the plan is rebuilt)."""
        return all(t.requires_grad for t in self.inputs)

    def supply(self, hand_out: bool = True) -> None:
        """Recompute the leaves unless a pending backward still needs them unchanged, and (``hand_out``) hand them
        to the layers for this forward (the root's forward hook takes them back).

        "Changed": an input's version counter or storage, or a step of an optimizer holding one. Without a pending
        backward the leaves are recomputed anyway (edits through ``.data`` are seen then), but their version is
        bumped only on a change: a graph kept by ``retain_graph`` stays usable across a forward that changed nothing.
        """
        inputs = self.inputs
        if self._queued_task is not None and torch._C._current_graph_task_id() == -1:
            self._drop_failed_backward()
        versions = [t._version for t in inputs]
        pointers = [t.data_ptr() for t in inputs]
        changed = versions != self._versions or pointers != self._pointers or self._steps != self._seen_steps
        if changed or not self._in_flight:
            if changed and self._in_flight:  # that pending graph keeps (and must not use) the old leaves
                self._generation.retired = True
                self._generation = _Generation(self)
                self.leaves = self._make_leaves()
                self._queued_task = None
            with torch.no_grad():  # (the kernels' inputs are copied in: no autograd history on the engine's buffers)
                self._compute()
            if changed:
                _bump_versions(self.leaves)  # a graph still holding them (retain_graph) sees the change
                self._versions, self._pointers, self._seen_steps = versions, pointers, self._steps
                for d, leaf, w, v in zip(self._dicts, self.leaves, inputs, versions):
                    # the weight a non-reentrant checkpoint's recomputation during backward uses (_valid_supply)
                    d["_ws_supplied_version"], d["_ws_last"], d["_ws_last_version"] = None, leaf, (w, v)
        if hand_out:
            for d, leaf in zip(self._dicts, self.leaves):
                d["_ws_supplied"] = leaf  # no version: persistent
        if torch.is_grad_enabled():
            self._in_flight = True

    def _drop_failed_backward(self) -> None:
        """A backward queued a push and never ran it: it raised (autograd drops a failed backward's callbacks). The
        leaves' partial gradients go, as a ``zero_grad`` after the failure would take the parameters' own."""
        for leaf in self.leaves:
            leaf.grad = None
        self._queued_task = None
        self._in_flight = False

    def _push(self) -> None:
        """Engine callback at the end of a backward: the leaves' gradients through WS into the inputs' ``.grad``."""
        self._queued_task = None
        self._in_flight = False
        leaves = self.leaves
        grads = [leaf.grad for leaf in leaves]
        if all(g is None for g in grads):  # (not grads.count(None): that calls Tensor.__eq__ on each)
            return
        for leaf in leaves:
            leaf.grad = None
        # grad mode is on in the callback exactly when the backward runs with create_graph=True
        if torch.is_grad_enabled() and any(g is not None and g.requires_grad for g in grads):
            raise RuntimeError(
                "deferred WS: backward(create_graph=True) through a deferred WS layer is not supported; use "
                "enable_batched_ws(model, deferred=False) for higher-order gradients"
            )
        with torch.no_grad():
            for p, d in zip(self.inputs, self._backward(grads)):
                if d is None or not p.requires_grad:  # (frozen since the forward: autograd would skip it too)
                    continue
                if p.grad is None:
                    p.grad = d
                else:
                    p.grad.add_(d)
                hooks = p._post_accumulate_grad_hooks  # what AccumulateGrad would run (optimizer-in-backward)
                if hooks:
                    for hook in tuple(hooks.values()):
                        hook(p)

    def _compute(self) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _backward(self, grads: list[Tensor | None]) -> list[Tensor | None]:  # pragma: no cover (abstract)
        raise NotImplementedError


ENGINES = ("auto", "numba", "triton", "graph")


def build_deferred(layers: Sequence[WSMixin], groups: Sequence[_Group], engine: str = "auto") -> DeferredWS | None:
    """The engine :func:`torchws._deferred_engines.build` picks for ``layers`` (or None), built outside
    ``torch.inference_mode``: its buffers and leaves must be normal tensors even when the first forward runs under it
    (inference tensors could never serve a training forward)."""
    from torchws._deferred_engines import build

    with torch.inference_mode(False):
        return build(layers, groups, engine)
