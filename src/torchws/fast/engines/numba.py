"""The numba engine (CPU): every weight of a plan standardized in one compiled call forward and one backward.

The kernels (:mod:`torchws.fast.engines.numba_kernels`, compiled on first use and cached on disk by numba) read
each weight where it lies through a table of data pointers, accumulate statistics in float64 and write the result in
the weight's dtype. With torch set to more than one thread (``torch.get_num_threads()``) they split the rows into
chunks of equal work (each at least :data:`MIN_CHUNK_ELEMENTS` elements), one per thread, on numba's threads
(``prange``) when called from the main thread of the process that first ran them so: numba's OpenMP and workqueue
threading layers are not safe to enter from several threads at once or after a fork. Elsewhere, and with one thread,
they run on the calling thread. Each row is computed by the same code either way, to the same bits. The kernels
for numba's threads are compiled in each process that uses them (about 1.6 s on a 2-core x86_64 host: loaded from
numba's disk cache they gave other float64 bits); :meth:`~torchws.fast.batched.BatchedWS.warm_up` moves that to
start-up.

One autograd node covers all weights of one (preset, eps, dtype); layers the kernels do not take (gain, shift,
transposed convs, weights without dense rows, other devices or dtypes) run the torch engine's per-layer computation in
the same pass.

Math, per row ``x`` of ``n`` elements, ``c = x - mean(x)``, ``v = sum(c^2) / d`` with ``d = n`` (population) or
``n - 1`` (unbiased), and ``r = r(v)`` the preset's reciprocal scale:

* ``inside_sqrt``: ``r = 1 / sqrt(v + eps)``
* ``added_to_std``: ``r = 1 / (sqrt(v) + eps)``; ``r'(0)`` is taken as 0, as torch's ``std`` backward does
* ``clamp_fan_in_var``: ``r = 1 / sqrt(max(n v, eps))``; ``r'`` is 0 where the clamp holds, as torch's ``clamp``

forward ``y = c * r``; backward with ``g = dL/dy``: ``dL/dx = r (g - mean(g)) + k (sum_j g_j y_j) y`` with
``k = r'(v) (2 / d) / r^2``. A backward with ``create_graph=True`` (or batched gradients) differentiates the torch
formula instead, so double backward works.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import threading

import numpy as np
import torch
from torch import Tensor

from torchws.fast.engines.torch import standardize_group
from torchws.fast.plan import Plan, dense_rows
from torchws.functional import rows_to_weight, standardize_rows, weight_to_rows
from torchws.presets import Preset, get_preset

__all__ = ["NumbaEngine", "multi_standardize", "numba_status", "qualifies"]

MODES = {"inside_sqrt": 0, "added_to_std": 1, "clamp_fan_in_var": 2}

# each thread's chunk holds at least this many weight elements (smaller launches run on the calling thread alone)
MIN_CHUNK_ELEMENTS = 1 << 15
_parallel_pid: list[int] = []  # the process that ran the kernels on numba's threads, once one has


@functools.lru_cache(maxsize=1)
def numba_status() -> str | None:
    """None when numba imports; else why not: "not installed", or "broken: <the import error>"."""
    if importlib.util.find_spec("numba") is None:
        return "not installed (pip install 'torchws[cpu]')"
    try:
        importlib.import_module("numba")
    except Exception as e:  # e.g. numba built against another numpy
        return f"installed but broken: {type(e).__name__}: {e}"
    return None


@functools.lru_cache(maxsize=1)
def _kernels():
    from torchws.fast.engines import numba_kernels as k

    return k.forward, k.backward, k.forward_parallel, k.backward_parallel


def _threads(elements: int) -> int:
    """How many of numba's threads a launch of ``elements`` runs on (1: the calling thread alone)."""
    n = min(torch.get_num_threads(), elements // MIN_CHUNK_ELEMENTS)
    if n <= 1 or threading.current_thread() is not threading.main_thread():
        return 1
    if _parallel_pid and _parallel_pid[0] != os.getpid():  # a fork's child: the parent's numba threads
        return 1
    import numba

    return min(n, numba.config.NUMBA_NUM_THREADS)


def _call(which: int, launch: _Launch, pointers: tuple, rest: tuple) -> None:
    """Kernel ``which`` (0 forward, 1 backward) over all rows of ``launch``, on :func:`_threads` threads (numba's
    thread count is restored after)."""
    kernels = _kernels()
    n = _threads(launch.elements)
    if n == 1:
        kernels[which](*pointers, *launch.table(1), *rest)
        return
    import numba

    if not _parallel_pid:
        _parallel_pid.append(os.getpid())
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        kernels[which + 2](*pointers, *launch.table(n), *rest)
    finally:
        numba.set_num_threads(before)


def qualifies(layer) -> bool:
    """Whether the kernels take ``layer``: no gain or shift, not transposed, a dense-row float32/64 CPU weight."""
    w = layer.weight
    return (layer.gain is None and layer.shift is None and not layer.ws_transposed and w.device.type == "cpu"
            and w.dtype in (torch.float32, torch.float64) and dense_rows(w))  # fmt: skip


def _pointers(tensors) -> np.ndarray:
    return np.array([t.data_ptr() for t in tensors], dtype=np.int64)


class _Launch:
    """One kernel call's constants: the preset, and rows and fan-in per weight (built once per plan)."""

    def __init__(self, weights, preset, eps: float, layers=()) -> None:
        self.layers, self.weights = tuple(layers), tuple(weights)  # (the plan re-plans when a weight is replaced)
        self.mode, self.unbiased, self.eps = MODES[preset.eps_placement], preset.unbiased, float(eps)
        self.variance, self.placement = preset.variance, preset.eps_placement
        self.rows = np.array([w.shape[0] for w in weights], dtype=np.int64)
        self.fan_in = np.array([w.numel() // w.shape[0] for w in weights], dtype=np.int64)
        self.num_rows, self.elements = int(self.rows.sum()), int((self.rows * self.fan_in).sum())
        self.proto = np.empty(0, dtype=np.float32 if weights[0].dtype == torch.float32 else np.float64)
        self.row_t = np.repeat(np.arange(len(weights), dtype=np.int64), self.rows)  # each row's tensor
        self.row_i = np.concatenate([np.arange(m, dtype=np.int64) for m in self.rows])  # and row within it
        self._tables: dict[int, tuple] = {}

    def table(self, chunks: int) -> tuple:
        """The kernels' row table split into ``chunks`` runs of consecutive rows of about equal work."""
        if chunks not in self._tables:
            work = np.concatenate([[0], np.cumsum(np.repeat(self.fan_in, self.rows))])
            inner = np.searchsorted(work, work[-1] * np.arange(1, chunks) / chunks)
            bounds = np.concatenate([[0], inner, [self.num_rows]]).astype(np.int64)
            self._tables[chunks] = (bounds, self.row_t, self.row_i, self.fan_in)
        return self._tables[chunks]


class _MultiWS(torch.autograd.Function):
    """All weights of one launch in, their standardized weights out; one kernel call each way."""

    @staticmethod
    def forward(ctx, launch: _Launch, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ys = [torch.empty_like(w) for w in weights]  # laid out like each weight: rows stay dense
        r, k = np.empty(launch.num_rows), np.empty(launch.num_rows)
        rest = (launch.mode, launch.unbiased, launch.eps, r, k, launch.proto)
        _call(0, launch, (_pointers(weights), _pointers(ys)), rest)
        ctx.launch, ctx.r, ctx.k, ctx.n = launch, r, k, len(weights)
        ctx.set_materialize_grads(False)  # an unused output's weight gets no gradient (None), as per layer
        # the weights too: autograd then refuses a backward after they were modified in place, as per layer
        ctx.save_for_backward(*weights, *ys)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple:  # type: ignore[override]
        saved = ctx.saved_tensors
        weights, ys = saved[: ctx.n], saved[ctx.n :]
        if torch.is_grad_enabled() or any(g is not None and not torch._C._has_storage(g) for g in grads):
            return (None, *_grads_with_graph(ctx, weights, grads))
        gs = [  # None: the kernel reads zeros; a gradient laid out unlike its y is copied (rows in y's order)
            torch.zeros_like(y) if g is None else g if g.stride() == y.stride() else torch.empty_like(y).copy_(g)
            for g, y in zip(grads, ys)
        ]
        dxs = [torch.empty_like(y) for y in ys]
        launch = ctx.launch
        _call(1, launch, (_pointers(gs), _pointers(ys), _pointers(dxs)), (ctx.r, ctx.k, launch.proto))
        return (None, *(None if g is None else dx for g, dx in zip(grads, dxs)))


def _grads_with_graph(ctx, weights, grads) -> list[Tensor | None]:
    """The torch formula on the saved weights, differentiated by autograd (with a graph when grad mode is on)."""
    launch = ctx.launch
    preset = Preset("numba-engine", launch.variance, launch.eps, launch.placement)
    needs = [need and g is not None for need, g in zip(ctx.needs_input_grad[1:], grads)]
    pairs = [(w, g) for w, g, need in zip(weights, grads, needs) if need]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        ws = [w.detach().requires_grad_() if not create_graph else w for w, _ in pairs]
        ys = [rows_to_weight(standardize_rows(weight_to_rows(w), preset=preset), w) for w in ws]
    dxs = iter(torch.autograd.grad(ys, ws, [g for _, g in pairs], create_graph=create_graph) if pairs else ())
    return [next(dxs) if need else None for need in needs]


class NumbaEngine:
    """One :class:`_MultiWS` node per (preset, eps, dtype) for the layers :func:`qualifies` takes; the torch
    engine's per-layer computation for the others."""

    name = "numba"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        buckets: dict[tuple, list] = {}
        rest = []
        for g in plan.groups:
            for m in g.layers:
                if qualifies(m):
                    buckets.setdefault((m.ws_preset, m.ws_eps, m.weight.dtype), []).append(m)
                else:
                    rest.append((g, m))
        self.launches = [_Launch([m.weight for m in ls], ls[0].ws_preset, ls[0].ws_eps, ls) for ls in buckets.values()]
        self.rest = rest

    def __call__(self) -> dict:
        out = {}
        for launch in self.launches:
            out.update(zip(launch.layers, _MultiWS.apply(launch, *launch.weights)))
        for g, m in self.rest:
            (w,) = standardize_group(g, [m.weight], [m.gain], [m.shift], concat=False)
            out[m] = w
        return out


def multi_standardize(weights: list[Tensor], *, preset, eps: float | None = None) -> list[Tensor]:
    """Standardize every row (dim 0) of every weight with the numbers of ``preset`` in one kernel call forward and
    one backward (autograd-aware); the weights are CPU float32/float64 tensors of one dtype with dense rows."""
    p = get_preset(preset)
    if not weights:
        return []
    for i, w in enumerate(weights):
        if not (w.device.type == "cpu" and w.dtype in (torch.float32, torch.float64) and dense_rows(w)
                and w.dtype == weights[0].dtype and w.dim() >= 2 and w[0].numel() >= 2):  # fmt: skip
            raise ValueError(
                f"multi_standardize: weight {i} (shape {tuple(w.shape)}, {w.dtype}, {w.device}) is not "
                "a dense-row CPU float32/float64 tensor of the first weight's dtype with fan-in >= 2"
            )
    launch = _Launch(weights, p, p.eps if eps is None else eps)
    return list(_MultiWS.apply(launch, *weights))
