"""Multi-tensor Weight Standardization in Triton: one launch forward, one launch backward for all weights.

All weights are packed into one flat buffer (see :mod:`torchws.kernels.packing`); one program standardizes one
row, looping over it in ``BLOCK``-wide chunks: pass 1 sums for the mean, pass 2 sums centered squares, pass 3
writes ``y = (x - mean) * rstd * gain``. Statistics are float32 whatever the input dtype.

Backward, with ``g' = gain * dL/dout``, ``y`` the pre-gain output and ``dof`` = n (population) or n - 1 (unbiased)::

    dx = rstd * (g' - mean(g')) - y * K * sum(g' * y)      dgain = sum(dL/dout * y)

where only ``K`` depends on the eps placement (derived from the chain rule through the variance):

* ``inside_sqrt``   rstd = 1/sqrt(var + eps):        K = rstd / dof
* ``added_to_std``  rstd = 1/(sqrt(var) + eps):      K = 1 / (std * dof), 0 for a constant row (std = 0)
* ``clamp_fan_in_var`` rstd = 1/sqrt(max(n var, eps)): K = rstd * n / dof while n var > eps, else 0 (rstd is
  constant there)

The forward stores ``(mean, rstd, K)`` per row, so the backward kernel is the same for every mode.
Deviation from autograd: ``added_to_std`` on a constant row gives a finite gradient here, NaN in autograd.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from torchws.kernels.packing import PackingPlan, get_plan, pack, pack_gains, split_rows, unpack

__all__ = [
    "MODES", "multi_standardize", "standardize_packed", "standardize_packed_backward", "standardize_packed_into",
    "standardize_packed_backward_into", "default_block",
]

MODES = {"inside_sqrt": 0, "added_to_std": 1, "clamp_fan_in_var": 2}
_DEFAULT_VARIANCE = {"inside_sqrt": "population", "added_to_std": "unbiased", "clamp_fan_in_var": "population"}


def _ws_forward_kernel(
    x_ptr, y_ptr, gain_ptr, stats_ptr, row_offset_ptr, row_fan_in_ptr, num_rows, eps,
    MODE: tl.constexpr, UNBIASED: tl.constexpr, HAS_GAIN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    start = tl.load(row_offset_ptr + row)
    n = tl.load(row_fan_in_ptr + row)
    cols = tl.arange(0, BLOCK)
    nf = n.to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n, BLOCK):
        idx = k + cols
        acc += tl.load(x_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / nf
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n, BLOCK):
        idx = k + cols
        x = tl.load(x_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
        d = tl.where(idx < n, x - mean, 0.0)
        acc += d * d
    sum_sq = tl.sum(acc, axis=0)
    dof = nf - 1.0 if UNBIASED else nf
    var = sum_sq / dof
    if MODE == 0:
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        coef = rstd / dof
    elif MODE == 1:
        std = tl.sqrt_rn(var)
        rstd = 1.0 / (std + eps)
        coef = tl.where(std > 0.0, 1.0 / tl.maximum(std * dof, 1e-38), 0.0)
    else:
        fan_var = var * nf
        rstd = 1.0 / tl.sqrt_rn(tl.maximum(fan_var, eps))
        coef = tl.where(fan_var > eps, rstd * nf / dof, 0.0)
    scale = rstd
    if HAS_GAIN:
        scale = rstd * tl.load(gain_ptr + row)
    for k in range(0, n, BLOCK):
        idx = k + cols
        x = tl.load(x_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
        tl.store(y_ptr + start + idx, ((x - mean) * scale).to(y_ptr.dtype.element_ty), mask=idx < n)
    tl.store(stats_ptr + row, mean)
    tl.store(stats_ptr + num_rows + row, rstd)
    tl.store(stats_ptr + 2 * num_rows + row, coef)


def _ws_backward_kernel(
    x_ptr, g_ptr, dx_ptr, gain_ptr, dgain_ptr, stats_ptr, row_offset_ptr, row_fan_in_ptr, num_rows,
    HAS_GAIN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    start = tl.load(row_offset_ptr + row)
    n = tl.load(row_fan_in_ptr + row)
    mean = tl.load(stats_ptr + row)
    rstd = tl.load(stats_ptr + num_rows + row)
    coef = tl.load(stats_ptr + 2 * num_rows + row)
    cols = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_gy = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n, BLOCK):
        idx = k + cols
        x = tl.load(x_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
        y = tl.where(idx < n, (x - mean) * rstd, 0.0)
        acc_g += g
        acc_gy += g * y
    sum_g = tl.sum(acc_g, axis=0)
    sum_gy = tl.sum(acc_gy, axis=0)
    gain = 1.0
    if HAS_GAIN:
        tl.store(dgain_ptr + row, sum_gy)
        gain = tl.load(gain_ptr + row)
    # the upstream grad of the pre-gain output is gain * g, so both row sums scale by gain
    mean_g = gain * sum_g / n.to(tl.float32)
    c = coef * gain * sum_gy
    for k in range(0, n, BLOCK):
        idx = k + cols
        x = tl.load(x_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + start + idx, mask=idx < n, other=0.0).to(tl.float32)
        y = (x - mean) * rstd
        dx = rstd * (gain * g - mean_g) - y * c
        tl.store(dx_ptr + start + idx, dx.to(dx_ptr.dtype.element_ty), mask=idx < n)


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool):
    """(forward, backward) kernels: Triton's interpreter for CPU tensors, compiled ones for CUDA.

    Built on first use, not at import: CPU tensors get the interpreter even when ``TRITON_INTERPRET`` is unset
    (``torchws.kernels.is_available`` checks triton was imported in interpreter mode).
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_ws_forward_kernel), InterpretedFunction(_ws_backward_kernel)
    return triton.jit(_ws_forward_kernel), triton.jit(_ws_backward_kernel)


def default_block(plan: PackingPlan) -> int:
    """Chunk width: the next power of two of the longest row, between 128 and 1024."""
    return max(128, min(1024, triton.next_power_of_2(plan.max_fan_in)))


def _num_warps(block: int) -> int:
    return max(1, min(8, block // 256))


def _check_flat(t: Tensor, plan: PackingPlan, what: str) -> None:
    if t.dim() != 1 or t.numel() != plan.total or not t.is_contiguous() or t.device != plan.device:
        raise ValueError(
            f"triton_ws: {what} must be a contiguous ({plan.total},) tensor on {plan.device}, "
            f"got {tuple(t.shape)} on {t.device}"
        )


def standardize_packed(
    x: Tensor, plan: PackingPlan, *, mode: str, eps: float, unbiased: bool, gain: Tensor | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One forward launch over the flat ``(total,)`` buffer ``x``.

    Returns:
        ``(y, stats)``: ``y`` flat like ``x`` (same dtype), ``stats`` float32 ``(3, R)`` = mean, rstd, K.
    """
    if mode not in MODES:
        raise ValueError(f"triton_ws: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    _check_flat(x, plan, "packed input")
    y = torch.empty_like(x)
    stats = torch.empty(3, plan.num_rows, dtype=torch.float32, device=x.device)
    standardize_packed_into(x, y, stats, plan, mode=mode, eps=eps, unbiased=unbiased, gain=gain, block=block)
    return y, stats


def standardize_packed_into(
    x: Tensor, y: Tensor, stats: Tensor, plan: PackingPlan, *, mode: str, eps: float, unbiased: bool,
    gain: Tensor | None = None, block: int | None = None,
) -> None:  # fmt: skip
    """:func:`standardize_packed` into given buffers (``y`` like ``x``, ``stats`` float32 ``(3, R)``), unchecked:
    for callers that allocate once and launch every step (``torchws._deferred``)."""
    block = default_block(plan) if block is None else block
    forward, _ = _kernels(x.device.type == "cpu")
    forward[(plan.num_rows,)](
        x, y, gain if gain is not None else stats, stats, plan.row_offset, plan.row_fan_in, plan.num_rows,
        float(eps), MODE=MODES[mode], UNBIASED=bool(unbiased), HAS_GAIN=gain is not None, BLOCK=block,
        num_warps=_num_warps(block),
    )  # fmt: skip


def standardize_packed_backward(
    x: Tensor, grad: Tensor, stats: Tensor, plan: PackingPlan, *, gain: Tensor | None = None,
    block: int | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """One backward launch: ``(dx, dgain)`` for flat input ``x`` and flat output grad ``grad``.

    ``dx`` is flat in ``x.dtype``; ``dgain`` is float32 ``(R,)`` (``None`` without gain).
    """
    _check_flat(x, plan, "packed input")
    _check_flat(grad, plan, "packed grad")
    dx = torch.empty_like(x)
    dgain = torch.empty(plan.num_rows, dtype=torch.float32, device=x.device) if gain is not None else None
    standardize_packed_backward_into(x, grad, dx, stats, plan, gain=gain, dgain=dgain, block=block)
    return dx, dgain


def standardize_packed_backward_into(
    x: Tensor, grad: Tensor, dx: Tensor, stats: Tensor, plan: PackingPlan, *, gain: Tensor | None = None,
    dgain: Tensor | None = None, block: int | None = None,
) -> None:  # fmt: skip
    """:func:`standardize_packed_backward` into given buffers, unchecked (see :func:`standardize_packed_into`)."""
    block = default_block(plan) if block is None else block
    _, backward = _kernels(x.device.type == "cpu")
    backward[(plan.num_rows,)](
        x, grad, dx, gain if gain is not None else stats, dgain if dgain is not None else stats, stats,
        plan.row_offset, plan.row_fan_in, plan.num_rows, HAS_GAIN=gain is not None, BLOCK=block,
        num_warps=_num_warps(block),
    )  # fmt: skip


class _MultiStandardize(torch.autograd.Function):
    """Inputs: ``config`` then the weights then the present gains; outputs: one view per weight."""

    @staticmethod
    def forward(ctx, config: tuple, *tensors: Tensor) -> tuple[Tensor, ...]:
        plan, mode, eps, unbiased, gain_mask, block = config
        count = len(plan.shapes)
        weights, present = tensors[:count], iter(tensors[count:])
        gains = [next(present) if has else None for has in gain_mask]
        x = pack(weights, plan)
        gain = pack_gains(gains, plan) if any(gain_mask) else None
        y, stats = standardize_packed(x, plan, mode=mode, eps=eps, unbiased=unbiased, gain=gain, block=block)
        ctx.save_for_backward(x, stats, gain)
        ctx.config = config
        ctx.gain_likes = [(g.shape, g.dtype) for g in gains if g is not None]
        ctx.set_materialize_grads(False)
        return tuple(unpack(y, plan))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, stats, gain = ctx.saved_tensors
        plan, _, _, _, gain_mask, block = ctx.config
        if all(g is None for g in grads):
            return (None,) * len(ctx.needs_input_grad)
        g = pack(grads, plan)
        dx, dgain = standardize_packed_backward(x, g, stats, plan, gain=gain, block=block)
        count = len(plan.shapes)
        dweights = [d if need else None for d, need in zip(unpack(dx, plan), ctx.needs_input_grad[1 : 1 + count])]
        dgains = []
        if dgain is not None:
            per_weight = [d for d, has in zip(split_rows(dgain, plan), gain_mask) if has]
            for d, (shape, dtype), need in zip(per_weight, ctx.gain_likes, ctx.needs_input_grad[1 + count :]):
                dgains.append(d.reshape(shape).to(dtype) if need else None)
        return (None, *dweights, *dgains)


def multi_standardize(
    weights: Sequence[Tensor], *, mode: str, eps: float, gains: Sequence[Tensor | None] | None = None,
    variance: str | None = None, block: int | None = None,
) -> list[Tensor]:  # fmt: skip
    """Standardize every row of every weight in one kernel launch (and its backward in one more).

    Args:
        weights: tensors ``(O_i, ...)`` of one dtype (fp32/bf16/fp16) and device; row ``r`` of weight ``i`` is
            ``w_i[r].reshape(-1)`` (fan-in ``n_i >= 2``).
        mode: ``"inside_sqrt"``, ``"added_to_std"`` or ``"clamp_fan_in_var"`` (see module docstring).
        eps: the stabiliser of ``mode``.
        gains: optional, one ``(O_i,)`` tensor or ``None`` per weight; multiplies output row ``r`` by ``gain[r]``.
        variance: ``"population"`` or ``"unbiased"``; default: the peers' choice for ``mode`` (unbiased only for
            ``added_to_std``).
        block: chunk width (power of two); default :func:`default_block`.

    Returns:
        One tensor per weight, shaped like it, in its dtype: views into one flat output buffer.
    """
    if mode not in MODES:
        raise ValueError(f"multi_standardize: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    variance = _DEFAULT_VARIANCE[mode] if variance is None else variance
    if variance not in ("population", "unbiased"):
        raise ValueError(f"multi_standardize: variance must be 'population' or 'unbiased', got {variance!r}")
    weights = list(weights)
    plan = get_plan(weights)
    if gains is None:
        gains = [None] * len(weights)
    elif len(gains) != len(weights):
        raise ValueError(
            f"multi_standardize: got {len(gains)} gains for {len(weights)} weights; pass one (or None) each"
        )
    gain_mask = tuple(g is not None for g in gains)
    config = (plan, mode, float(eps), variance == "unbiased", gain_mask, block)
    outputs = _MultiStandardize.apply(config, *weights, *(g for g in gains if g is not None))
    return list(outputs)
