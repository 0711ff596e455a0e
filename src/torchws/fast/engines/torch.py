"""The torch engine: each group of a plan standardized with torch ops, differentiable by autograd.

``concat=True`` (the default on GPUs, where each launch costs host time): one ``cat`` of the group's weights, one
standardization, one gain and shift op and one ``split``; natural groups (see :mod:`torchws.fast.plan`)
concatenate the weights as they are, other groups their rows. ``concat=False`` (the CPU default, where copying the
weights in and the gradients out costs more than the dispatches it saves) runs each layer's own computation, bit for
bit what the layer computes alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchws.fast.plan import Group, Plan
from torchws.functional import (
    rows_to_weight,
    standardize_rows,
    weight_standardize,
    weight_standardize_transposed,
    weight_to_rows,
)

__all__ = ["CONCAT_ON_CPU", "TorchEngine", "standardize_group"]

CONCAT_ON_CPU = False  # the default of ``concat`` for CPU weights (GPU weights: True)


def _one(m, w: Tensor, gain: Tensor | None, shift: Tensor | None) -> Tensor:
    """What ``m.compute_standardized_weight()`` computes, on the tensors given."""
    if m.ws_transposed:
        return weight_standardize_transposed(w, groups=m.ws_groups, preset=m.ws_preset, eps=m.ws_eps, gain=gain,
                                             shift=shift)  # fmt: skip
    return weight_standardize(w, preset=m.ws_preset, eps=m.ws_eps, gain=gain, shift=shift)


def _affine(rows: Tensor, gains: Sequence[Tensor | None], shifts: Sequence[Tensor | None]) -> Tensor:
    if gains[0] is not None:
        rows = rows * torch.cat(list(gains)).unsqueeze(1).to(rows.dtype)
    if shifts[0] is not None:
        rows = rows + torch.cat(list(shifts)).unsqueeze(1).to(rows.dtype)
    return rows


def standardize_group(group: Group, weights: Sequence[Tensor], gains: Sequence[Tensor | None],
                      shifts: Sequence[Tensor | None], concat: bool) -> list[Tensor]:  # fmt: skip
    """Standardized weights of ``group``'s layers, computed from ``weights`` (and ``gains``, ``shifts``: None where a
    layer has none), one per layer, shaped and laid out like each weight."""
    ls = group.layers
    if not concat or len(ls) == 1:
        return [_one(m, w, g, s) for m, w, g, s in zip(ls, weights, gains, shifts)]
    if group.natural:
        full = torch.cat(list(weights))  # (sum O, *trailing) in the weights' common layout
        y = _affine(standardize_rows(weight_to_rows(full), preset=group.preset, eps=group.eps), gains, shifts)
        return list(rows_to_weight(y, full).split(group.sizes))
    rows = torch.cat([weight_to_rows(w, transposed=m.ws_transposed, groups=m.ws_groups) for m, w in zip(ls, weights)])
    y = _affine(standardize_rows(rows, preset=group.preset, eps=group.eps), gains, shifts)
    return [rows_to_weight(c, w, transposed=m.ws_transposed, groups=m.ws_groups)
            for m, w, c in zip(ls, weights, y.split(group.sizes))]  # fmt: skip


class TorchEngine:
    """Standardizes a plan's groups with torch ops (see the module docstring)."""

    name = "torch"

    def __init__(self, plan: Plan, concat: bool | None = None) -> None:
        self.plan = plan
        on_cpu = bool(plan.layers) and plan.layers[0].weight.device.type == "cpu"
        self.concat = (CONCAT_ON_CPU if on_cpu else True) if concat is None else concat

    def __call__(self) -> dict:
        out = {}
        for g in self.plan.groups:
            ws = [m.weight for m in g.layers]
            out.update(zip(g.layers, standardize_group(g, ws, [m.gain for m in g.layers],
                                                       [m.shift for m in g.layers], self.concat)))  # fmt: skip
        return out
