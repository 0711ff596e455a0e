"""The compiled kernels of :mod:`torchws.fast.engines.numba` (imported only when they run: importing numba costs).

They walk the rows of a table of tensors given as data pointers (``int64`` arrays of ``Tensor.data_ptr()``), tensor
``t`` viewed as ``rows[t] x fan_in[t]`` dense rows. A launch's rows are numbered in tensor order; ``row_t`` and
``row_i`` give each numbered row's tensor and row within it, ``bounds`` splits the numbering into chunks:
``forward`` and ``backward`` run all rows on the calling thread, ``forward_parallel`` and ``backward_parallel``
(numba's ``prange``, on numba's threads) one chunk per thread. Every row is computed by the same code in both.
``proto`` is an empty array of the weights' dtype: it selects the float32 or float64 specialisation and types the
pointers. See :mod:`torchws.fast.engines.numba` for the math.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["forward", "backward", "forward_parallel", "backward_parallel"]


@intrinsic
def _ptr_like(typingctx, addr, proto):
    """The integer ``addr`` as a pointer to ``proto``'s dtype."""
    sig = types.CPointer(proto.dtype)(addr, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


# error_model="numpy": a division by zero gives inf/NaN as in torch; the default (Python) raises ZeroDivisionError
# (non-finite weights, where it tests NaN == 0 under fastmath)
# LLVM fast-math flags, all but "nnan"/"ninf": reassociation lets the row sums vectorize, while NaN and inf keep their
# IEEE meaning (a non-finite weight gives a NaN row, as per layer, whatever the LLVM version does with no-NaN math)
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
_OPTIONS = {"fastmath": _FASTMATH, "nogil": True, "boundscheck": False, "error_model": "numpy", "cache": True}
_jit = numba.njit(**_OPTIONS)
# compiled in each process, not cached: a parallel kernel loaded from numba's cache gave other float64 bits than the
# one compiled (which gives the serial kernel's bits)
_jit_parallel = numba.njit(parallel=True, **{**_OPTIONS, "cache": False})
_inline = numba.njit(inline="always", **_OPTIONS)


@_inline
def _row(ptrs, t, i, fan_in, proto):  # pragma: no cover (compiled)
    """Row ``i`` of tensor ``t`` as a 1-d array."""
    n = fan_in[t]
    return numba.carray(_ptr_like(ptrs[t] + i * n * proto.itemsize, proto), (n,))


@_inline
def _forward_rows(xs, ys, lo, hi, row_t, row_i, fan_in, mode, unbiased, eps, r_out, k_out, proto):  # pragma: no cover
    """y = (x - mean) * r for rows lo..hi-1; stores r and k (the backward's coefficient) per row."""
    for gr in range(lo, hi):
        t, i = row_t[gr], row_i[gr]
        n = fan_in[t]
        x = _row(xs, t, i, fan_in, proto)
        y = _row(ys, t, i, fan_in, proto)
        d = n - 1 if unbiased else n
        s = 0.0
        for j in range(n):
            s += x[j]
        mean = s / n
        q = 0.0
        for j in range(n):
            c = x[j] - mean
            q += c * c
        v = q / d
        if mode == 0:  # inside_sqrt: 1 / sqrt(v + eps); dr/dv = -r^3 / 2
            r = 1.0 / np.sqrt(v + eps)
            drdv = -0.5 * r * r * r
        elif mode == 1:  # added_to_std: 1 / (sqrt(v) + eps); dr/dv = -r^2 / (2 sqrt(v)), taken as 0 at v = 0
            sd = np.sqrt(v)  # (torch's std backward is 0 where std is 0: the authors' layer is finite there)
            r = 1.0 / (sd + eps)
            drdv = -0.5 * r * r / sd if sd > 0.0 else 0.0
        else:  # clamp_fan_in_var: 1 / sqrt(max(n v, eps)); dr/dv = -n r^3 / 2 where n v >= eps, else 0
            nv = n * v
            r = 1.0 / np.sqrt(max(nv, eps))
            drdv = -0.5 * n * r * r * r if nv >= eps else 0.0
        r_out[gr] = r
        k_out[gr] = drdv * 2.0 / d / (r * r)
        # mean and r rounded to the weights' dtype by a store into the row's first element (overwritten below; no
        # scratch array: numba would hoist its allocation out of the parallel loop, one array for all threads)
        y[0] = mean
        mf = y[0]
        y[0] = r
        rf = y[0]
        for j in range(n):
            y[j] = (x[j] - mf) * rf


@_inline
def _backward_rows(gs, ys, dxs, lo, hi, row_t, row_i, fan_in, r_in, k_in, proto):  # pragma: no cover (compiled)
    """dx = r (g - mean(g)) + k sum(g y) y for rows lo..hi-1."""
    for gr in range(lo, hi):
        t, i = row_t[gr], row_i[gr]
        n = fan_in[t]
        g = _row(gs, t, i, fan_in, proto)
        y = _row(ys, t, i, fan_in, proto)
        dx = _row(dxs, t, i, fan_in, proto)
        sg = 0.0
        sgy = 0.0
        for j in range(n):
            sg += g[j]
            sgy += g[j] * y[j]
        r = r_in[gr]
        dx[0] = r  # rounded to the weights' dtype by a store, as in the forward
        a = dx[0]
        dx[0] = r * sg / n
        b = dx[0]
        dx[0] = k_in[gr] * sgy
        c = dx[0]
        for j in range(n):
            dx[j] = a * g[j] - b + c * y[j]


@_jit
def forward(xs, ys, bounds, row_t, row_i, fan_in, mode, unbiased, eps, r_out, k_out, proto):  # pragma: no cover
    """Rows ``bounds[0]`` to ``bounds[-1] - 1``."""
    _forward_rows(xs, ys, bounds[0], bounds[-1], row_t, row_i, fan_in, mode, unbiased, eps, r_out, k_out, proto)


@_jit
def backward(gs, ys, dxs, bounds, row_t, row_i, fan_in, r_in, k_in, proto):  # pragma: no cover (compiled)
    """Rows ``bounds[0]`` to ``bounds[-1] - 1``."""
    _backward_rows(gs, ys, dxs, bounds[0], bounds[-1], row_t, row_i, fan_in, r_in, k_in, proto)


@_jit_parallel
def forward_parallel(  # pragma: no cover (compiled)
    xs, ys, bounds, row_t, row_i, fan_in, mode, unbiased, eps, r_out, k_out, proto
):
    """One run of rows ``bounds[c]`` to ``bounds[c + 1] - 1`` per numba thread."""
    for c in numba.prange(bounds.shape[0] - 1):
        _forward_rows(xs, ys, bounds[c], bounds[c + 1], row_t, row_i, fan_in, mode, unbiased, eps, r_out, k_out, proto)


@_jit_parallel
def backward_parallel(gs, ys, dxs, bounds, row_t, row_i, fan_in, r_in, k_in, proto):  # pragma: no cover (compiled)
    """One run of rows ``bounds[c]`` to ``bounds[c + 1] - 1`` per numba thread."""
    for c in numba.prange(bounds.shape[0] - 1):
        _backward_rows(gs, ys, dxs, bounds[c], bounds[c + 1], row_t, row_i, fan_in, r_in, k_in, proto)
