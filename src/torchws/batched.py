"""Model-level Weight Standardization: one pass per forward standardizes every WS weight of a model at once.

Per-layer WS runs a handful of small ops per layer (reshape, batch_norm, reshape; the same again in backward). At
small batch sizes those launches (GPU) or dispatches (CPU) cost as much as the convolutions. :func:`enable_batched_ws`
registers a forward pre-hook on the root model that computes all standardized weights in one pass and hands them to
the layers with ``layer.set_standardized_weight(t)``; a forward hook clears them again, so a layer called on its own
(outside the root's forward), or any layer after ``handle.remove()``, computes its weight per layer as before.

Grouping: layers are grouped by (preset, eps, dtype, device, fan-in n, gain/shift present). On a GPU (torch
backend) each group is one ``torch.cat`` of the weights viewed as rows ``(sum O_i, n)``, ONE standardization, one
gain (and shift) op, and one ``split`` into per-layer views; when all weights of a group share their trailing shape
and layout (the usual case: same in-channels and kernel) the weights are concatenated as they are and the split
chunks already have the weights' shapes. On the CPU the pass does not concatenate (``concat=False``): copying ~1 MB
of weights in and the gradients back out cost more than the dispatches saved (CIFAR ResNet-20, 1 thread: WS fwd+bwd
1.58 ms grouped vs 0.95 ms per layer in one pass, vs 1.80 ms for the layers' own ``F.batch_norm`` path).
``backend="triton"`` sends every layer of one (preset, eps, dtype, device) to one multi-tensor kernel launch
(:mod:`torchws.kernels`). ``backend="numba"`` does the same on the CPU with compiled multi-tensor kernels
(:mod:`torchws.kernels.cpu_ws`: each weight read where it lies through a table of pointers, one call forward and one
backward); ``"auto"`` picks it for CPU weights when numba is installed. Layers it cannot take (gain, shift,
transposed, no dense rows) run the torch path in the same pass.

``enable_batched_ws(model, deferred=True)`` (:mod:`torchws._deferred`) hands the layers persistent standardized
weights instead, overwritten in place each forward, and computes every weight gradient in one call when backward
ends: no autograd node per step for the pass. Fastest measured (CPU: numba kernels; CUDA: the torch pass replayed
from CUDA graphs, or the Triton kernels with ``backend="triton"``), but the WS parameters leave the autograd graph
(no ``torch.autograd.grad`` w.r.t. them, no ``create_graph``, no DDP); the trainer turns it on in single-process
runs.

Numerics: the same formulas as :func:`~torchws.functional.standardize_rows`; population variance with eps inside
the root runs as ``F.layer_norm`` (2-3x faster than ``F.batch_norm`` on the CPU). Without concatenation every layer
runs exactly its per-layer computation; concatenated groups match it to fp32 rounding.

Rows and memory layout: a row's statistics do not depend on the order of its elements, so a channels_last conv
weight ``(O, C, kh, kw)`` is read as rows through ``permute(0, 2, 3, 1)``, a view: no copy in, none out.

Per-layer fallback (the layer keeps computing its own weight; results are identical, only slower):
    * the layer has forward pre-hooks (pruning and similar reparametrisations recompute ``weight`` there, after the
      root's pre-hook would have read it) or a parametrized ``weight`` (``torch.nn.utils.parametrize``);
    * its class overrides ``standardized_weight`` / ``compute_standardized_weight`` (a custom formula);
Global module hooks (``register_module_forward_pre_hook``) are not inspected.

Semantics to know: the pass standardizes every batchable WS layer the model owns, used in this forward or not, so a
registered-but-unused layer gets ``weight.grad`` of zeros instead of ``None`` where groups are concatenated (the
numba kernels and the unconcatenated torch path leave it ``None``). The plan is built once and rebuilt when a
weight's identity, dtype, device, shape, strides, gain/shift or pre-hooks change; after adding or removing WS layers
call :meth:`BatchedWS.refresh`. Each supply carries the weight's version counter: a supply left behind by a forward
that KeyboardInterrupt cut short is ignored once the weight changes. The last forward's weights stay with the layers
until the next forward, for non-reentrant activation checkpointing, whose recomputation during backward must use
them (see :meth:`torchws.layers.ws.WSMixin._valid_supply`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchws._backends import (  # noqa: F401 (_resolve_backend: re-exported)
    _kernel_function_unusable,
    _numba_kernels,
    _numba_plan,
    _NumbaPlan,
    _resolve_backend,
    _run_numba_plan,
    _standardize_groups_triton,
    _triton_module,
)
from torchws._deferred import DeferredWS, build_deferred
from torchws._plan import (  # noqa: F401 (_layout: re-exported)
    _Group,
    _layer_signature,
    _layout,
    _make_groups,
    _standardize_group_torch,
    batchable,
)
from torchws.layers.ws import WSMixin

__all__ = [
    "BatchedWS",
    "auto_enable",
    "batchable",
    "batched_standardize",
    "disable_batched_ws",
    "enable_batched_ws",
    "find_handle",
]

BACKENDS = ("auto", "torch", "numba", "triton", "cuda_graph")
ENV_DISABLE = "TORCHWS_BATCHED"  # "0" turns auto_enable off


def batched_standardize(
    groups: Sequence[_Group], backend: str = "auto", concat: bool | None = None
) -> dict[WSMixin, Tensor]:
    """Standardized weights (gain and shift applied) of every layer in ``groups``, keyed by layer.

    ``concat`` (torch backend): concatenate each group (None: on every device but the CPU). ``"cuda_graph"`` is a
    property of a :class:`BatchedWS` handle (its graphs replay this function's torch path); here it means "torch".
    ``"numba"`` computes what the CPU kernels take and leaves the rest (gains, shifts, transposed convs, other
    devices) to the torch path.
    """
    out: dict[WSMixin, Tensor] = {}
    resolved = _resolve_backend(backend, groups)
    if resolved == "triton":
        kernel = _triton_module()
        if kernel is None:
            raise RuntimeError("batched WS: backend='triton' needs torchws.kernels (and triton); use backend='auto'")
        out.update(_standardize_groups_triton(groups, kernel))
        return out
    if resolved == "numba":
        return _run_numba_plan(_numba_plan(groups, _numba_kernels()), _numba_kernels(), concat)
    for g in groups:
        cat = g.layers[0].weight.device.type != "cpu" if concat is None else concat
        out.update(zip(g.layers, _standardize_group_torch(g, cat)))
    return out


@contextlib.contextmanager
def _parameters_swapped(layers: Sequence[WSMixin], tensors: Sequence[Tensor]):
    """Temporarily let ``layers`` read ``tensors`` (weights in layer order, then gains/shifts) as their parameters."""
    slots = [(m, "weight") for m in layers]
    slots += [(m, name) for m in layers for name in ("gain", "shift") if m._parameters.get(name) is not None]
    saved = [m._parameters[name] for m, name in slots]
    for (m, name), t in zip(slots, tensors):
        m._parameters[name] = t  # the dict directly: a plain tensor (an alias of the parameter) is allowed here
    try:
        yield
    finally:
        for (m, name), t in zip(slots, saved):
            m._parameters[name] = t


_supply = object.__setattr__


# --- the handle ---------------------------------------------------------------------------------------------------
class BatchedWS:
    """Handle of a model's batched WS pass (returned by :func:`enable_batched_ws`).

    Attributes:
        model: the root module whose forward triggers the pass.
        backend: "auto", "torch", "triton" or "cuda_graph".
        concat: torch backend: concatenate each group (None: everywhere but on the CPU).
        paused: while True the hooks do nothing (used by :func:`torchws.accumulate.ws_accumulation`).
        deferred: standardized weights as persistent leaves, WS backward at the end of backward
            (:mod:`torchws._deferred`).
    """

    def __init__(self, model: nn.Module, backend: str = "auto", concat: bool | None = None,
                 deferred: bool = False) -> None:  # fmt: skip
        if backend not in BACKENDS:
            raise ValueError(f"enable_batched_ws: backend must be one of {BACKENDS}, got {backend!r}")
        self.model = model
        self.backend = backend
        self.concat = concat
        self.deferred = deferred
        self.paused = False
        self._layers: tuple[WSMixin, ...] = ()
        self._weights: tuple[Tensor, ...] = ()
        self._signature: tuple = ()
        self._groups: list[_Group] = []
        self._graph = None  # torchws.kernels.cuda_graph.GraphedPass of the cuda_graph backend, captured lazily
        self._engine_now: DeferredWS | None = None  # the deferred engine of the forward in progress
        self.refresh()
        self._pre = model.register_forward_pre_hook(self._pre_hook)
        self._post = model.register_forward_hook(self._post_hook, always_call=True)

    def refresh(self) -> None:
        """Rescan the model for WS layers and regroup them (after model surgery)."""
        self._layers = tuple(m for m in self.model.modules() if batchable(m))  # type: ignore[misc]
        for layer in self._layers:
            _supply(layer, "_ws_in_pass", True)
        self._weights = tuple(m.weight for m in self._layers)
        self._signature = tuple(_layer_signature(m) for m in self._layers)
        self._groups = _make_groups(self._layers)
        self._numba: _NumbaPlan | None = None  # the CPU kernels' launches, built on first use
        # deferred=True: the engine (torchws._deferred), built on first use; False where none applies to this plan
        self._retire_engine()

    def _retire_engine(self) -> None:
        """Drop the deferred engine; one a pending backward still needs is kept (its leaves' hooks hold it only
        weakly) until its push has run: the last two such, as a forward whose graph is never used keeps its engine
        pending for good."""
        old = getattr(self, "_deferred", None)
        kept = [e for e in getattr(self, "_retired", []) if e._in_flight]
        if isinstance(old, DeferredWS) and old._in_flight:
            kept.append(old)
        self._retired: list[DeferredWS] = kept[-2:]
        self._deferred: DeferredWS | bool | None = None
        self._deferred_flags: tuple[bool, ...] = ()  # the weights' requires_grad when the engine was (not) built

    @property
    def layers(self) -> tuple[WSMixin, ...]:
        """The layers the pass computes (layers not listed run per layer)."""
        return self._layers

    @property
    def groups(self) -> list[_Group]:
        return self._groups

    def _check_plan(self) -> None:
        # under torch.compile the compiler's guards take this role (and id() is not traceable)
        if not torch.compiler.is_compiling() and tuple(map(_layer_signature, self._layers)) != self._signature:
            self.refresh()

    def standardize(self) -> dict[WSMixin, Tensor]:
        """Compute every batched layer's standardized weight now (with autograd graph when grad is enabled)."""
        self._check_plan()
        engine = self._deferred_engine() if self.deferred else None
        if engine is not None:
            engine.supply(hand_out=False)  # (the forward hooks hand weights to the layers and take them back)
            return {**dict(zip(engine.layers, engine.leaves)), **self._standardize_rest(engine)}
        return self._standardize_all()

    def _standardize_all(self) -> dict[WSMixin, Tensor]:
        if self.backend == "cuda_graph":
            graphed = self._standardize_graphed()
            if graphed is not None:
                return graphed
            return batched_standardize(self._groups, "torch", self.concat)
        if _resolve_backend(self.backend, self._groups) == "numba":
            kernel = _numba_kernels()
            if self._numba is None:
                self._numba = _numba_plan(self._groups, kernel)
            return _run_numba_plan(self._numba, kernel, self.concat)
        return batched_standardize(self._groups, self.backend, self.concat)

    def _deferred_engine(self) -> DeferredWS | None:
        """The deferred engine for this forward; None where it cannot run (then the autograd pass runs): under
        torch.compile, torch.func, forward-mode AD, jit.trace or a CUDA graph capture, or with no engine."""
        if torch.compiler.is_compiling() or _kernel_function_unusable():
            return None
        engine = self._deferred
        if engine is False and self._deferred_flags != tuple(m.weight.requires_grad for m in self._layers):
            engine = None  # no engine applied with the layers frozen as they were (e.g. all): try again
        if engine is None or (engine is not False and not engine.usable()):
            self._retire_engine()  # (before building: the old engine's buffers go first)
            kind = {"cuda_graph": "graph", "triton": "triton", "numba": "numba"}.get(self.backend, "auto")
            engine = self._deferred = build_deferred(self._layers, self._groups, kind) or False
            self._deferred_flags = tuple(m.weight.requires_grad for m in self._layers)
        if engine is False or (engine.inputs[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            return None
        return engine

    def _standardize_rest(self, engine: DeferredWS) -> dict[WSMixin, Tensor]:
        """The layers the deferred engine leaves to the autograd pass."""
        if not engine.rest:
            return {}
        return batched_standardize(engine.rest, "torch" if self.backend == "cuda_graph" else self.backend, self.concat)

    def _graph_inputs(self) -> list[Tensor]:
        extra = [t for m in self._layers for t in (m.gain, m.shift) if t is not None]
        return [*self._weights, *extra]  # the order _parameters_swapped expects

    def _standardize_graphed(self) -> dict[WSMixin, Tensor] | None:
        """The torch pass replayed from CUDA graphs; None where graphs do not apply (then the torch pass runs)."""
        inputs = self._graph_inputs()
        if (
            not torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or not inputs
            or not all(t.is_cuda and t.requires_grad for t in inputs)
            or len({t.dtype for t in inputs}) != 1
            or torch.cuda.is_current_stream_capturing()
        ):
            return None
        if self._graph is None or not self._graph.matches(inputs):
            from torchws.kernels.cuda_graph import GraphedPass

            layers, groups = self._layers, self._groups

            def run(tensors: list[Tensor]) -> list[Tensor]:
                with _parameters_swapped(layers, tensors):
                    out = batched_standardize(groups, "torch", concat=True)
                return [out[m] for m in layers]

            self._graph = None  # free the old capture's memory before taking the new one
            self._graph = GraphedPass(run, inputs)
        return dict(zip(self._layers, self._graph()))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_graph"] = None  # CUDA graphs are neither copyable nor picklable: a copy captures its own
        state["_numba"] = None  # holds the weights: a copy must plan with its own
        state["_deferred"], state["_retired"] = None, []  # the same, and the leaves' hooks
        state["_engine_now"] = None
        return state

    # the hooks run every step: they set the layers' supplied weight directly (what set_standardized_weight does,
    # without its shape check: these weights were computed from the layers' own)
    def _pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self.paused:
            return
        self._check_plan()
        # deferred: the engine sets its layers' leaves itself (persistent tensors: no version, and the kept weight for
        # checkpointing is set when they are recomputed); the rest as below
        engine = self._engine_now = self._deferred_engine() if self.deferred else None
        if engine is not None:
            engine.supply()
        layers = self._layers if engine is None else engine.rest_layers
        if torch.is_grad_enabled():  # (a no-grad forward's weights could not serve a recomputation: keep the last)
            for layer in layers:  # the last forward's kept weights go first: not alive next to this forward's own
                _supply(layer, "_ws_last", None)
        # with the weight and its version counter, so a supply left behind by an interrupted forward is recognised as
        # stale (WSMixin._valid_supply); not while torch.compile traces: versions are symbolic there (graph breaks)
        track = not torch.compiler.is_compiling()
        supplies = self._standardize_all() if engine is None else self._standardize_rest(engine)
        for layer, w in supplies.items():
            _supply(layer, "_ws_supplied", w)
            if track:
                _supply(layer, "_ws_supplied_version", layer._ws_version())

    def _post_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.paused:
            return
        keep = torch.is_grad_enabled()
        engine, self._engine_now = self._engine_now, None
        layers = self._layers
        if engine is not None:
            for d in engine._dicts:
                d["_ws_supplied"] = None
            layers = engine.rest_layers
        for layer in layers:
            # for activation checkpointing's recomputation during backward (WSMixin._valid_supply); none left: a
            # nested model's pass (the forward of a backbone with its own) took it back after keeping its own
            if keep and layer._ws_supplied is not None:
                _supply(layer, "_ws_last", layer._ws_supplied)
                _supply(layer, "_ws_last_version", layer._ws_supplied_version)
            _supply(layer, "_ws_supplied", None)
            _supply(layer, "_ws_supplied_version", None)

    def remove(self) -> None:
        """Unregister the hooks; every layer computes its weight per layer again."""
        self._pre.remove()
        self._post.remove()
        for layer in self._layers:
            layer.set_standardized_weight(None)
            _supply(layer, "_ws_last", None)
            _supply(layer, "_ws_last_version", None)
            _supply(layer, "_ws_in_pass", False)

    def __repr__(self) -> str:
        deferred = ", deferred=True" if self.deferred else ""
        return f"BatchedWS(layers={len(self._layers)}, groups={len(self._groups)}, backend={self.backend!r}{deferred})"


def find_handle(model: nn.Module) -> BatchedWS | None:
    """The :class:`BatchedWS` registered on ``model``, if any (found through its hooks, so it survives deepcopy)."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, BatchedWS):
            return owner
    return None


def enable_batched_ws(model: nn.Module, *, backend: str = "auto", concat: bool | None = None,
                      deferred: bool = False) -> BatchedWS:  # fmt: skip
    """Standardize all WS weights of ``model`` in one pass per forward of ``model``.

    Args:
        model: the root module (call it as before; its submodules called on their own still work per layer).
        backend: "torch" (grouped torch ops, any device), "cuda_graph" (the torch pass captured once as a forward
            and a backward CUDA graph and replayed each step: removes the host cost that dominates at batch 1-2;
            falls back to "torch" without grad, on CPU, under torch.compile or inside a user's graph capture; see
            :mod:`torchws.kernels.cuda_graph` for its rules), "triton" (one multi-tensor kernel launch per
            (preset, eps, dtype, device); raises if unavailable; torch while ``torch.compile`` traces) or "auto"
            (the torch path, the fastest measured without graphs).
        concat: torch backend only: one cat + standardize + split per group (True) or each layer's rows
            standardized in place within the pass (False). None: True on GPUs (launch-bound), False on the CPU,
            where the copies in and out cost more than the saved dispatches.
        deferred: the standardized weights become persistent leaf tensors that the kernels overwrite in place, and
            every WS weight's gradient is computed in one call when ``backward()`` ends (numba kernels on a CPU,
            the captured graphs on CUDA; elsewhere, and for layers those cannot take, the pass as above). Saves
            the per-step cost of handing fresh weights through autograd. The WS parameters then leave the autograd
            graph: ``torch.autograd.grad`` w.r.t. them, ``create_graph=True`` and DistributedDataParallel are not
            supported (:mod:`torchws._deferred`).

    Returns:
        The :class:`BatchedWS` handle; ``handle.remove()`` or :func:`disable_batched_ws` undoes it. Enabling twice
        returns the existing handle (with the new backend).
    """
    if deferred and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise ValueError(
            "enable_batched_ws: deferred=True cannot work under DistributedDataParallel/DataParallel (the WS "
            "parameters' gradients would bypass its reducer); use deferred=False"
        )
    handle = find_handle(model)
    if handle is not None:
        if backend not in BACKENDS:
            raise ValueError(f"enable_batched_ws: backend must be one of {BACKENDS}, got {backend!r}")
        handle.backend, handle.concat, handle.deferred = backend, concat, deferred
        handle.refresh()
        return handle
    return BatchedWS(model, backend, concat, deferred)


def disable_batched_ws(model: nn.Module) -> bool:
    """Remove the batched pass from ``model``; returns whether one was registered."""
    handle = find_handle(model)
    if handle is None:
        return False
    handle.remove()
    return True


def auto_enable(model: nn.Module, *, enabled: bool | None = None, backend: str = "auto") -> BatchedWS | None:
    """What model builders and ``torchws.convert`` call: enable the batched pass if ``model`` has WS layers.

    ``enabled=None`` reads the environment variable ``TORCHWS_BATCHED`` ("0", "false", "off" disable it);
    ``enabled=False`` does nothing. Returns the handle, or None when nothing was enabled.
    """
    if enabled is None:
        enabled = os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "off", "no")
    if not enabled or not any(batchable(m) for m in model.modules()):
        return None
    return enable_batched_ws(model, backend=backend)
