"""The compiled kernels of :mod:`torchws.fast.engines.numba` (imported only when they run: importing numba costs).

Both walk a table of tensors given as data pointers (``int64`` arrays of ``Tensor.data_ptr()``), each viewed as
``rows[t] x fan_in[t]`` dense rows. ``proto`` is an empty array of the weights' dtype: it selects the float32 or
float64 specialisation and types the pointers. See :mod:`torchws.fast.engines.numba` for the math.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["forward", "backward"]


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
_jit = numba.njit(cache=True, fastmath=_FASTMATH, nogil=True, boundscheck=False, error_model="numpy")


@_jit
def forward(xs, ys, rows, fan_in, mode, unbiased, eps, r_out, k_out, proto):  # pragma: no cover (compiled)
    """y = (x - mean) * r per row; stores r and k (the backward's coefficient) per row, rows of all tensors in order."""
    cast = np.empty(2, dtype=proto.dtype)  # assigning into it rounds float64 scalars to the weights' dtype
    base = 0
    for t in range(xs.shape[0]):
        m, n = rows[t], fan_in[t]
        x = numba.carray(_ptr_like(xs[t], proto), (m, n))
        y = numba.carray(_ptr_like(ys[t], proto), (m, n))
        d = n - 1 if unbiased else n
        for i in range(m):
            s = 0.0
            for j in range(n):
                s += x[i, j]
            mean = s / n
            q = 0.0
            for j in range(n):
                c = x[i, j] - mean
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
            r_out[base + i] = r
            k_out[base + i] = drdv * 2.0 / d / (r * r)
            cast[0] = mean
            cast[1] = r
            mf, rf = cast[0], cast[1]
            for j in range(n):
                y[i, j] = (x[i, j] - mf) * rf
        base += m


@_jit
def backward(gs, ys, dxs, rows, fan_in, r_in, k_in, proto):  # pragma: no cover (compiled)
    """dx = r (g - mean(g)) + k sum(g y) y per row."""
    cast = np.empty(3, dtype=proto.dtype)
    base = 0
    for t in range(gs.shape[0]):
        m, n = rows[t], fan_in[t]
        g = numba.carray(_ptr_like(gs[t], proto), (m, n))
        y = numba.carray(_ptr_like(ys[t], proto), (m, n))
        dx = numba.carray(_ptr_like(dxs[t], proto), (m, n))
        for i in range(m):
            sg = 0.0
            sgy = 0.0
            for j in range(n):
                sg += g[i, j]
                sgy += g[i, j] * y[i, j]
            r = r_in[base + i]
            cast[0] = r
            cast[1] = r * sg / n
            cast[2] = k_in[base + i] * sgy
            a, b, c = cast[0], cast[1], cast[2]
            for j in range(n):
                dx[i, j] = a * g[i, j] - b + c * y[i, j]
        base += m
