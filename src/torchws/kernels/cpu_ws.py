"""CPU multi-tensor WS kernels (numba): every weight of a model standardized in one call forward and one backward.

On a CPU, PyTorch's ``layer_norm`` runs at ~1 ns per weight element over a model's conv weights (CIFAR ResNet-20:
0.26 ms forward, 0.31 ms backward for 270k weights, 2 threads), 7% of a batch-1 training step. These kernels are
compiled by numba (LLVM, vectorized, float64 accumulators) and read each weight where it lies, through a table of
data pointers, the same multi-tensor design as the Triton kernel: one call standardizes all rows of all weights.

Math, per row ``x`` of ``n`` elements (the filter's fan-in), ``c = x - mean(x)``, ``v = sum(c^2) / d`` with
``d = n`` (population) or ``n - 1`` (unbiased), and ``r = r(v)`` the preset's reciprocal scale:

* ``inside_sqrt``: ``r = 1 / sqrt(v + eps)``
* ``added_to_std``: ``r = 1 / (sqrt(v) + eps)``
* ``clamp_fan_in_var``: ``r = 1 / sqrt(max(n v, eps))``

forward ``y = c * r``; backward, with ``g = dL/dy``::

    dL/dx = r (g - mean(g)) + k (sum_j g_j y_j) y,     k = r'(v) * (2 / d) / r^2

(``c`` drops out of the ``mean`` term because ``sum c = 0``; ``k = -r / n`` for ``inside_sqrt`` with population
variance, the familiar layer-norm backward). The forward stores ``r`` and ``k`` per row; the backward needs only
``g``, the saved output ``y`` and those two numbers. ``r'(v)`` at the clamp is taken as the one-sided derivative
torch's ``clamp`` uses (passes the gradient where ``n v >= eps``). For ``added_to_std`` a constant row has ``v = 0``
and ``r'(0)`` infinite: its gradient is NaN, as in the per-layer path (the ``official`` preset is not *safe*).

Statistics are accumulated in float64 and the output is written in the weight's dtype (float32 or float64). Rows
are read as dense blocks: a weight qualifies when each output channel's fan-in occupies ``n`` consecutive elements
(contiguous and channels_last conv/linear weights; transposed convs do not).

numba is optional (``pip install 'torchws[cpu]'``): :func:`is_available` says whether it imports. The kernels are
compiled on first use (about a second; cached on disk by numba afterwards).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "is_available",
    "qualifies",
    "multi_standardize",
    "make_spec",
    "apply_spec",
    "standardize_into",
    "weight_grads",
    "pointers",
    "MODES",
]

MODES = {"inside_sqrt": 0, "added_to_std": 1, "clamp_fan_in_var": 2}
_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """Whether numba imports (the kernels themselves compile lazily, on first use)."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401
    except Exception:  # a broken install (e.g. numba built against another numpy) counts as unavailable
        return False
    return True


def _dense_rows(t: Tensor) -> bool:
    """Each index of dim 0 owns ``numel / size(0)`` consecutive elements (contiguous or channels_last)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def qualifies(weight: Tensor) -> bool:
    """Whether the kernels can standardize ``weight`` (as rows ``(size(0), numel / size(0))``) in place."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _DTYPES
        and weight.dim() >= 2
        and weight.numel() > weight.shape[0]  # fan-in >= 2
        and _dense_rows(weight)
    )


@functools.lru_cache(maxsize=1)
def _kernels():
    """The forward and backward kernels, compiled on first use (numba caches the machine code on disk)."""
    from torchws.kernels import _numba_ws

    return _numba_ws.forward, _numba_ws.backward


def _proto(dtype: torch.dtype) -> np.ndarray:
    return np.empty(0, dtype=np.float32 if dtype == torch.float32 else np.float64)


def _pointers(tensors: Sequence[Tensor]) -> np.ndarray:
    return np.array([t.data_ptr() for t in tensors], dtype=np.int64)


# Launches of at least this many elements are split by rows over torch.get_num_threads() threads (the kernels
# release the GIL). Off by default: alone, ResNet-50's weights went from 30.8 to 26.6 ms (2 threads), but inside a
# training step the extra thread fights torch's own OpenMP threads, still spinning after the last parallel op
# (CIFAR ResNet-18 step, 2 cores: 1.70x GN split, in a run with other work on the machine, vs 1.30x serial in an
# earlier run; torch's layer_norm 1.27x and 1.30x in the same two runs). Small launches lose anyway: handing work to a
# thread costs ~20-50 us, a ResNet-20's weights (270k elements) take ~65 us forward. (batched's "auto" leaves large
# models to torch's layer_norm instead: torchws._backends.AUTO_NUMBA_MAX_ELEMENTS.)
PARALLEL_MIN_ELEMENTS = 1 << 62
_pool: tuple[int, object] | None = None  # (pid, executor): a forked child (DataLoader worker) makes its own


def _thread_pool():
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor

        workers = max(1, (os.cpu_count() or 2) - 1)
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchws-ws"))
    return _pool[1]


class _Part:
    """A run of rows for one thread: ``(tensor index, first row)`` per segment, its rows and fan-ins, and which
    slice of the per-row statistics it fills."""

    __slots__ = ("tensor", "offset", "rows", "fan_in", "stats")

    def __init__(self, tensor, offset, rows, fan_in, stats) -> None:
        self.tensor, self.offset, self.rows, self.fan_in, self.stats = tensor, offset, rows, fan_in, stats


class Spec:
    """What a launch needs besides the weights, computed once per plan (:func:`make_spec`), not per call."""

    __slots__ = ("mode", "unbiased", "eps", "rows", "fan_in", "num_rows", "numel", "proto", "_parts")

    def __init__(self, weights: Sequence[Tensor], mode: str, eps: float, variance: str) -> None:
        self.mode, self.unbiased, self.eps = MODES[mode], variance == "unbiased", float(eps)
        self.rows = np.array([w.shape[0] for w in weights], dtype=np.int64)
        self.fan_in = np.array([w.numel() // w.shape[0] for w in weights], dtype=np.int64)
        self.num_rows = int(self.rows.sum())
        self.numel = int((self.rows * self.fan_in).sum())
        self.proto = _proto(weights[0].dtype)  # an empty array of the weights' dtype: the kernels' specialisation
        self._parts: dict[int, list[_Part]] = {}

    def threads(self) -> int:
        return torch.get_num_threads() if self.numel >= PARALLEL_MIN_ELEMENTS else 1

    def parts(self, n: int) -> list[_Part]:
        """The rows split into ``n`` runs of about equal element count, cutting tensors between rows."""
        if n not in self._parts:
            row_tensor = np.repeat(np.arange(len(self.rows)), self.rows)  # per global row: its tensor
            row_index = np.arange(self.num_rows) - np.repeat(np.cumsum(self.rows) - self.rows, self.rows)
            ends = np.cumsum(self.fan_in[row_tensor])
            cuts = [0, *np.searchsorted(ends, [self.numel * i / n for i in range(1, n)]).tolist(), self.num_rows]
            parts = []
            for a, b in zip(cuts[:-1], cuts[1:]):
                if b <= a:
                    continue
                t, i = row_tensor[a:b], row_index[a:b]
                first = np.flatnonzero(np.r_[True, t[1:] != t[:-1]])  # segment starts: a new tensor begins
                seg_t = t[first]
                seg_rows = np.diff(np.r_[first, b - a])
                parts.append(_Part(seg_t, i[first], seg_rows.astype(np.int64), self.fan_in[seg_t], slice(a, b)))
            self._parts[n] = parts
        return self._parts[n]


def _launch(kernel, spec: Spec, pointers: Sequence[np.ndarray], stats: tuple[np.ndarray, ...], *args) -> None:
    """Run ``kernel(ptrs..., rows, fan_in, *args, *stats, proto)`` over all rows, on several threads if large."""
    n = spec.threads()
    if n == 1:
        kernel(*pointers, spec.rows, spec.fan_in, *args, *stats, spec.proto)
        return
    itemsize = spec.proto.itemsize
    jobs = []
    for part in spec.parts(n):
        shift = part.offset * part.fan_in * itemsize  # bytes from a tensor's start to the segment's first row
        ptrs = [p[part.tensor] + shift for p in pointers]
        jobs.append((*ptrs, part.rows, part.fan_in, *args, *(s[part.stats] for s in stats), spec.proto))
    futures = [_thread_pool().submit(kernel, *job) for job in jobs[1:]]
    kernel(*jobs[0])
    for f in futures:
        f.result()


class _MultiWS(torch.autograd.Function):
    """All weights in, all standardized weights out; one kernel call each way."""

    @staticmethod
    def forward(ctx, spec: Spec, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ys = [torch.empty_like(w) for w in weights]  # same layout as each weight: rows stay dense
        r, k = np.empty(spec.num_rows), np.empty(spec.num_rows)
        _launch(_kernels()[0], spec, (_pointers(weights), _pointers(ys)), (r, k), spec.mode, spec.unbiased, spec.eps)
        ctx.spec, ctx.r, ctx.k = spec, r, k
        # read only by a backward with create_graph=True (with their versions: autograd would refuse weights
        # modified in place since the forward, and so does that backward)
        ctx.weights, ctx.versions = weights, [w._version for w in weights]
        ctx.set_materialize_grads(False)  # an unused output's weight gets no gradient (None), as per layer
        ctx.save_for_backward(*ys)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:  # type: ignore[override]
        # create_graph=True (double backward): the kernel's gradient has no graph; vmapped grads (autograd.grad's
        # is_grads_batched) have no storage to point at
        if torch.is_grad_enabled() or any(g is not None and not torch._C._has_storage(g) for g in grads):
            return _backward_with_graph(ctx, grads)
        # autograd hands each grad in the output's dtype, None for an unused output (the kernel reads zeros there)
        ys = ctx.saved_tensors  # not the forward's ys: saved-tensor hooks (checkpointing) may hand back others
        return (None, *weight_grads(ctx.spec, grads, ys, ctx.r, ctx.k))


def _backward_with_graph(ctx, grads: Sequence[Tensor]) -> tuple:
    """The per-layer torch formula on the saved inputs, differentiated by autograd (with a graph if grad mode is on)."""
    from torchws.functional import rows_to_weight, standardize_rows, weight_to_rows
    from torchws.presets import Preset

    spec = ctx.spec
    for i, (w, version) in enumerate(zip(ctx.weights, ctx.versions)):
        if w._version != version:
            raise RuntimeError(
                f"multi_standardize backward: weight {i} (shape {tuple(w.shape)}) was modified in place after the "
                f"forward (version {version} -> {w._version}); its gradient would use the new values"
            )
    needs = [need and g is not None for need, g in zip(ctx.needs_input_grad[1:], grads)]
    placement = next(name for name, mode in MODES.items() if mode == spec.mode)
    preset = Preset("multi_standardize", "unbiased" if spec.unbiased else "population", spec.eps, placement)
    pairs = [(w, g) for w, g, need in zip(ctx.weights, grads, needs) if need]
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        ys = [rows_to_weight(standardize_rows(weight_to_rows(w), preset=preset), w) for w, _ in pairs]
    inputs, grads_used = [w for w, _ in pairs], [g for _, g in pairs]
    dxs = iter(torch.autograd.grad(ys, inputs, grads_used, create_graph=create_graph) if pairs else ())
    return (None, *(next(dxs) if need else None for need in needs))


def make_spec(weights: Sequence[Tensor], mode: str, eps: float, variance: str) -> Spec:
    """What :func:`apply_spec` needs besides the weights: computed once per plan (shapes, preset), not per call."""
    return Spec(weights, mode, eps, variance)


def apply_spec(spec: Spec, weights: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """:func:`multi_standardize` without its checks, for callers that validated ``weights`` (and built ``spec`` with
    :func:`make_spec`) once: the batched pass does so per plan, not per step."""
    return _MultiWS.apply(spec, *weights)


def standardize_into(spec: Spec, weights: np.ndarray, out: np.ndarray, r: np.ndarray, k: np.ndarray) -> None:
    """The forward kernel without autograd: standardize the tensors at ``weights`` (a :func:`pointers` table) into
    the tensors at ``out`` (same shapes and layouts), and fill the per-row ``r`` and ``k`` (float64,
    ``spec.num_rows``) that :func:`weight_grads` needs. The caller keeps every tensor alive and dense-rowed."""
    _launch(_kernels()[0], spec, (weights, out), (r, k), spec.mode, spec.unbiased, spec.eps)


def weight_grads(spec: Spec, grads: Sequence[Tensor | None], ys: Sequence[Tensor], r: np.ndarray, k: np.ndarray,
                 y_pointers: np.ndarray | None = None) -> list[Tensor | None]:  # fmt: skip
    """The backward kernel: weight gradients (fresh tensors; None where ``grads`` has None) from the gradients w.r.t.
    the standardized tensors ``ys`` that the forward wrote with its ``r`` and ``k`` (``y_pointers``: their
    :func:`pointers`, if the caller keeps them)."""
    gs = [  # None: the kernel reads zeros; a gradient laid out unlike its y is copied (rows walked in y's order)
        torch.zeros_like(y) if g is None else g if g.stride() == y.stride() else torch.empty_like(y).copy_(g)
        for g, y in zip(grads, ys)
    ]
    dxs = [torch.empty_like(y) for y in ys]
    _launch(_kernels()[1], spec, (_pointers(gs), _pointers(ys) if y_pointers is None else y_pointers,
                                  _pointers(dxs)), (r, k))  # fmt: skip
    return [None if g is None else dx for g, dx in zip(grads, dxs)]


def pointers(tensors: Sequence[Tensor]) -> np.ndarray:
    """The table of data pointers :func:`standardize_into` and :func:`weight_grads` read."""
    return _pointers(tensors)


def multi_standardize(
    weights: Sequence[Tensor], *, mode: str, eps: float, variance: str = "population"
) -> list[Tensor]:
    """Standardize every row of every weight, one kernel call forward and one backward (autograd-aware).

    Args:
        weights: CPU tensors of one dtype (float32 or float64), each passing :func:`qualifies`; rows are dim 0.
        mode: the preset's ``eps_placement`` (``inside_sqrt``, ``added_to_std``, ``clamp_fan_in_var``).
        eps: the stabiliser.
        variance: ``population`` or ``unbiased``.

    Returns:
        Standardized tensors shaped and laid out like ``weights``. A backward with ``create_graph=True``
        runs the torch formula instead of the kernel (differentiable again).

    Raises:
        RuntimeError: numba is not installed. ValueError: a weight does not qualify, dtypes differ, or an unknown
        mode/variance.
    """
    if not is_available():
        raise RuntimeError("torchws CPU kernels need numba: pip install 'torchws[cpu]' (or use backend='torch')")
    if mode not in MODES:
        raise ValueError(f"multi_standardize: mode must be one of {tuple(MODES)}, got {mode!r}")
    if variance not in ("population", "unbiased"):
        raise ValueError(f"multi_standardize: variance must be 'population' or 'unbiased', got {variance!r}")
    if not weights:
        return []
    for i, w in enumerate(weights):
        if not qualifies(w):
            raise ValueError(
                f"multi_standardize: weight {i} (shape {tuple(w.shape)}, {w.dtype}, {w.device}) is not a dense-row "
                "float32/float64 CPU tensor with fan-in >= 2"
            )
        if w.dtype != weights[0].dtype:
            raise ValueError(f"multi_standardize: weight {i} is {w.dtype}, weight 0 is {weights[0].dtype}")
    return list(apply_spec(make_spec(weights, mode, eps, variance), weights))
