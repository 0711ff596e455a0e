"""Packing plans for the multi-tensor WS kernel: many weights as rows of one flat buffer.

Every weight ``w_i`` of shape ``(O_i, ...)`` is viewed as ``O_i`` rows of ``n_i = numel / O_i`` elements (its
fan-in) and the weights are concatenated, in order, into one flat contiguous buffer. A kernel program handles one
row and finds it through two device tables:

* ``row_offset`` ``(R,)`` int64: index of the row's first element in the flat buffer,
* ``row_fan_in`` ``(R,)`` int32: the row's length ``n``,

where ``R = sum(O_i)`` and row ``r`` of weight ``i`` is table entry ``sum(O_j for j < i) + r``. The same tables
address the flat output, the flat gradient buffers and, per row, the packed gains and statistics.

Plans depend only on ``(shapes, dtype, device)`` and are cached, so the steady-state host cost of a step is one
dictionary lookup; the tables are built on the device once.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PackingPlan", "build_plan", "get_plan", "clear_plan_cache", "pack", "unpack", "pack_gains", "split_rows"]

_CACHE_SIZE = 64
_plan_cache: OrderedDict[tuple, PackingPlan] = OrderedDict()


@dataclass(frozen=True, eq=False)
class PackingPlan:
    """Where each row of each weight lives in the flat buffer (see the module docstring).

    Attributes:
        shapes: the weights' shapes, in order.
        dtype, device: of the weights (all equal).
        numels: elements per weight.
        rows: ``O_i`` per weight.
        fan_ins: ``n_i`` per weight.
        total: elements in the flat buffer (``sum(numels)``).
        num_rows: ``R = sum(rows)``.
        max_fan_in: the longest row.
        row_offset: ``(R,)`` int64 on ``device``.
        row_fan_in: ``(R,)`` int32 on ``device``.
        shape_likes: one storage-less ``meta`` tensor per weight; carries the shapes into torch's C++ unflatten.
    """

    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device
    numels: tuple[int, ...]
    rows: tuple[int, ...]
    fan_ins: tuple[int, ...]
    total: int
    num_rows: int
    max_fan_in: int
    row_offset: Tensor
    row_fan_in: Tensor
    shape_likes: tuple[Tensor, ...]


def build_plan(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device | str) -> PackingPlan:
    """Build the row tables for weights of ``shapes`` (each ``(O, ...)``, fan-in ``n = prod(shape[1:]) >= 2``)."""
    if len(shapes) == 0:
        raise ValueError("build_plan: got no weights; pass at least one (O, n) weight")
    sizes = tuple(torch.Size(s) for s in shapes)
    rows, fan_ins = [], []
    for i, s in enumerate(sizes):
        if len(s) < 2:
            raise ValueError(f"build_plan: weight {i} has shape {tuple(s)}; expected rank >= 2 (out, fan-in...)")
        n = math.prod(s[1:])
        if s[0] < 1 or n < 2:
            raise ValueError(f"build_plan: weight {i} has shape {tuple(s)}; need >= 1 row and fan-in >= 2")
        rows.append(int(s[0]))
        fan_ins.append(int(n))
    numels = tuple(o * n for o, n in zip(rows, fan_ins))
    # (R,) per-row length and start; built on the host once, then moved to the device once
    row_fan_in = torch.repeat_interleave(torch.tensor(fan_ins, dtype=torch.int64), torch.tensor(rows))
    row_offset = torch.cumsum(row_fan_in, 0) - row_fan_in
    device = torch.device(device)
    return PackingPlan(
        shapes=sizes,
        dtype=dtype,
        device=device,
        numels=numels,
        rows=tuple(rows),
        fan_ins=tuple(fan_ins),
        total=sum(numels),
        num_rows=sum(rows),
        max_fan_in=max(fan_ins),
        row_offset=row_offset.to(device),
        row_fan_in=row_fan_in.to(torch.int32).to(device),
        shape_likes=tuple(torch.empty(s, device="meta") for s in sizes),
    )


def get_plan(weights: Sequence[Tensor]) -> PackingPlan:
    """Cached :func:`build_plan` for ``weights``: the same object for the same ``(shapes, dtype, device)``."""
    if len(weights) == 0:
        raise ValueError("get_plan: got no weights; pass at least one (O, n) weight")
    first = weights[0]
    for i, w in enumerate(weights):
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise TypeError(f"get_plan: weight {i} must be a floating tensor, got {getattr(w, 'dtype', type(w))}")
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(
                f"get_plan: weight {i} is {w.dtype} on {w.device} but weight 0 is {first.dtype} on {first.device}; "
                "all weights of one call must share dtype and device"
            )
    key = (tuple(w.shape for w in weights), first.dtype, first.device)
    plan = _plan_cache.get(key)
    if plan is None:
        plan = build_plan(key[0], first.dtype, first.device)
        _plan_cache[key] = plan
        if len(_plan_cache) > _CACHE_SIZE:
            _plan_cache.popitem(last=False)
    else:
        _plan_cache.move_to_end(key)
    return plan


def clear_plan_cache() -> None:
    """Forget all cached plans (frees their device tables)."""
    _plan_cache.clear()


def pack(tensors: Sequence[Tensor | None], plan: PackingPlan, dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate ``tensors`` (shaped like the plan's weights; ``None`` means zeros) into one flat ``(total,)``."""
    dtype = plan.dtype if dtype is None else dtype
    if all(t is not None and t.dtype == dtype for t in tensors):
        # one C++ call (contiguous + view(-1) + cat) instead of two Python-level ops per tensor: host time matters
        return torch._utils._flatten_dense_tensors(tensors)
    parts = []
    for t, numel in zip(tensors, plan.numels):
        if t is None:
            parts.append(torch.zeros(numel, dtype=dtype, device=plan.device))
        else:
            parts.append(t.reshape(-1).to(dtype))
    return torch.cat(parts)


def unpack(flat: Tensor, plan: PackingPlan) -> list[Tensor]:
    """Views of the flat ``(total,)`` buffer shaped like each weight of the plan."""
    return list(torch._utils._unflatten_dense_tensors(flat, plan.shape_likes))


def pack_gains(gains: Sequence[Tensor | None], plan: PackingPlan) -> Tensor:
    """One float32 ``(R,)`` gain per row; a weight without gain gets ones."""
    if all(g is not None and g.numel() == o for g, o in zip(gains, plan.rows)):
        return torch._utils._flatten_dense_tensors(gains).to(torch.float32)
    parts = []
    for i, (g, o) in enumerate(zip(gains, plan.rows)):
        if g is None:
            parts.append(torch.ones(o, dtype=torch.float32, device=plan.device))
        elif g.numel() != o:
            raise ValueError(f"pack_gains: gain {i} has {g.numel()} elements; its weight has {o} rows (one gain each)")
        else:
            parts.append(g.reshape(-1).to(torch.float32))
    return torch.cat(parts)


def split_rows(per_row: Tensor, plan: PackingPlan) -> list[Tensor]:
    """Split an ``(R,)`` per-row tensor into one ``(O_i,)`` view per weight."""
    return list(per_row.split(plan.rows))
