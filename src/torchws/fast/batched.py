"""The model-level WS pass: every WS weight of a model standardized in one pass per forward of the model.

:func:`enable_batched_ws` registers a forward pre-hook on the root model. Before each forward it asks its engine
(:mod:`torchws.fast.engines`) for every planned layer's standardized weight and activates them as a cache for that
forward (:mod:`torchws.layers.weight_cache`); a forward hook (``always_call``: also when the forward raises)
deactivates it. A layer called outside the root's forward, or any layer once the pass is removed, computes its own
weight as before. Numerics are the layers' own: the torch engine without concatenation runs each layer's
computation bit for bit; concatenated groups and the numba kernels match it to rounding.

The pass steps aside, and the layers compute their own weights, under ``torch.compile`` (the compiler fuses the
per-layer ops itself), torch.func transforms, forward-mode AD and ``torch.jit.trace``.

Plan: built when the pass is enabled and again when :meth:`~torchws.fast.plan.Plan.stale` says a weight was
replaced or changed dtype, device, layout or requires_grad (the engine is selected again then). After adding or
removing WS layers, call :meth:`BatchedWS.refresh`.

Activation checkpointing (``torch.utils.checkpoint``, reentrant or not) inside the model works: the weights of the
last grad-enabled forward are kept for non-reentrant recomputation (one extra reference to each standardized weight
until the next forward).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from torchws.fast.engines import ENGINES, select_engine
from torchws.fast.plan import Plan, batchable
from torchws.layers import weight_cache
from torchws.layers.ws import WSMixin

__all__ = ["BatchedWS", "auto_enable", "disable_batched_ws", "enable_batched_ws", "find_handle", "pass_applies"]

ENV_DISABLE = "TORCHWS_BATCHED"  # "0" turns auto_enable off


def pass_applies() -> bool:
    """Whether a model-level pass may run now: not while torch.compile traces, under torch.func transforms,
    forward-mode AD or torch.jit.trace (the numba engine's autograd Function has no vmap or jvp rule and cannot be
    traced; the per-layer ops can)."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
        or torch.jit.is_tracing()
    )


class _ForwardWeights(dict):
    """One forward's standardized weights (layer -> tensor), served to a layer only while they are still its own:
    computed from the parameters the layer holds now, at their current versions, and with a graph when grad mode
    asks for one. A forward interrupted by a BaseException (KeyboardInterrupt: torch runs ``always_call`` hooks for
    Exception only) leaves them active, and a no-grad forward may enable grad inside."""

    def __init__(self, weights: dict) -> None:
        super().__init__(weights)
        self.grad = torch.is_grad_enabled()
        self.sources = {m: (m._parameters["weight"], _versions(m)) for m in weights}

    def get(self, layer, default=None):  # what weight_cache.lookup calls
        w = dict.get(self, layer)
        if w is None:
            return default
        source, versions = self.sources[layer]
        if layer._parameters["weight"] is not source or _versions(layer) != versions:
            return default
        if not self.grad and torch.is_grad_enabled():  # computed without a graph: the layer computes its own
            return default
        return w


def _versions(layer: WSMixin) -> tuple[int, int, int]:
    p = layer._parameters
    w, g, s = p["weight"], p["gain"], p["shift"]
    return (w._version, -1 if g is None else g._version, -1 if s is None else s._version)


class BatchedWS:
    """Handle of a model's WS pass (returned by :func:`enable_batched_ws`).

    Attributes:
        model: the root module whose forward triggers the pass.
        backend: the engine asked for ("auto", "torch", "numba", "cuda_graph").
        engine: the engine that runs (``engine.name``: what "auto" chose).
        plan: the layers and groups (:class:`~torchws.fast.plan.Plan`).
    """

    def __init__(self, model: nn.Module, backend: str = "auto") -> None:
        self.model = model
        self.backend = backend
        self._paused = 0
        self._open: list[dict | None] = []  # caches of forwards in progress
        self.refresh()
        self._pre = model.register_forward_pre_hook(self._pre_hook)
        self._post = model.register_forward_hook(self._post_hook, always_call=True)

    def refresh(self) -> None:
        """Rescan the model for WS layers, regroup them and select the engine again (after model surgery)."""
        plan = Plan(self.model)
        self.plan, self.engine = plan, select_engine(self.backend, plan)  # (select_engine raises: nothing changes)
        weight_cache.keep(self, {}, plan.sources)  # nothing kept yet, but these layers are the pass's

    @property
    def layers(self) -> tuple[WSMixin, ...]:
        """The layers the pass computes (others compute their own weight)."""
        if self.plan is None:
            self.refresh()
        return self.plan.layers

    def standardize(self) -> dict[WSMixin, Tensor]:
        """Every planned layer's standardized weight, computed now by the engine (with graph when grad is on)."""
        if self.plan is None or self.plan.stale():
            self.refresh()
        return self.engine()

    def warm_up(self) -> None:
        """Run the pass once forward and backward, on zero gradients, so that the engine's one-time set-up (numba's
        import and kernel load, about 0.6 s, plus 1.6 s compiling the kernels that run on numba's threads when torch
        runs 2+ threads (measured on a 2-core x86_64 host); the CUDA graphs' capture) happens now rather than in the
        first training step. Nothing else changes: no ``.grad`` is written and nothing is kept for a later forward."""
        with torch.enable_grad():
            out = self.standardize()
            pairs = [(m.weight, w) for m, w in out.items() if w.requires_grad and m.weight.requires_grad]
            if pairs:
                weights, ys = zip(*pairs)
                torch.autograd.grad(ys, weights, [torch.zeros_like(y) for y in ys], allow_unused=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Inside the block the hooks do nothing (the layers take their weights from elsewhere, or compute them)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        for left in self._open:  # forwards interrupted by a BaseException (their post-hooks never ran)
            if left is not None:
                weight_cache.deactivate(left)
        self._open = []
        weights = None if self._paused or not pass_applies() else _ForwardWeights(self.standardize())
        self._open.append(weights)  # one entry per forward in progress, popped by its post-hook
        if weights is not None:
            weight_cache.activate(weights)

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        weights = self._open.pop() if self._open else None
        if weights is None:
            return
        weight_cache.deactivate(weights)
        if torch.is_grad_enabled():
            weight_cache.keep(self, weights, self.plan.sources)

    def remove(self) -> None:
        """Unregister the hooks; every layer computes its own weight again."""
        self._pre.remove()
        self._post.remove()
        for weights in self._open:
            if weights is not None:
                weight_cache.deactivate(weights)
        self._open = []
        weight_cache.forget(self)

    def __getstate__(self) -> dict:
        # deepcopy/pickle of the model: a copy plans for its own layers, on first use
        state = self.__dict__.copy()
        state["_open"], state["plan"], state["engine"] = [], None, None
        return state

    def __repr__(self) -> str:
        layers = self.layers
        return f"BatchedWS(layers={len(layers)}, groups={len(self.plan.groups)}, engine={self.engine.name!r})"


def find_handle(model: nn.Module) -> BatchedWS | None:
    """The :class:`BatchedWS` registered on ``model``, if any (found through its hooks, so it survives deepcopy)."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, BatchedWS):
            return owner
    return None


def enable_batched_ws(model: nn.Module, *, backend: str = "auto") -> BatchedWS:
    """Standardize all WS weights of ``model`` in one pass per forward of ``model``.

    Args:
        model: the root module (call it as before; its submodules called on their own compute per layer).
        backend: the engine, one of :data:`~torchws.fast.engines.ENGINES`: "auto" (see
            :func:`~torchws.fast.engines.auto_engine`), "torch", "numba" (CPU) or "cuda_graph" (CUDA). A named
            engine that cannot run on the model raises here.

    Returns:
        The :class:`BatchedWS` handle; ``handle.remove()`` or :func:`disable_batched_ws` undoes it. Enabling twice
        returns the existing handle, with the new backend.
    """
    if backend not in ENGINES:
        raise ValueError(f"enable_batched_ws: backend must be one of {ENGINES}, got {backend!r}")
    handle = find_handle(model)
    if handle is not None:
        handle.backend, previous = backend, handle.backend
        try:
            handle.refresh()
        except BaseException:  # the engine asked for cannot run: the pass keeps the one it had
            handle.backend = previous
            raise
        return handle
    return BatchedWS(model, backend)


def disable_batched_ws(model: nn.Module) -> bool:
    """Remove the pass from ``model``; returns whether one was registered."""
    handle = find_handle(model)
    if handle is None:
        return False
    handle.remove()
    return True


def auto_enable(model: nn.Module, *, enabled: bool | None = None, backend: str = "auto") -> BatchedWS | None:
    """What model builders and ``torchws.convert`` call: enable the pass if ``model`` has batchable WS layers.

    ``enabled=None`` reads the environment variable ``TORCHWS_BATCHED`` ("0", "false", "off", "no" disable it);
    ``enabled=False`` does nothing. Returns the handle, or None when nothing was enabled.
    """
    if enabled is None:
        enabled = os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "off", "no")
    if not enabled or not any(batchable(m) for m in model.modules()):
        return None
    return enable_batched_ws(model, backend=backend)
