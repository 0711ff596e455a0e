"""The batched pass's plan: which WS layers it may compute, how they are grouped, and the torch path per group.

Part of :mod:`torchws.batched` (see its docstring for the semantics); split out to keep modules small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchws.functional import rows_to_weight, standardize_rows, weight_to_rows
from torchws.layers.ws import WSMixin
from torchws.presets import Preset


# --- layouts (groups concatenate only weights of one layout) ---------------------------------------------------------
def _layout(w: Tensor) -> str:
    """'contiguous', 'channels_last' (4-D), or 'other' (rows are then copies, not views)."""
    if w.is_contiguous():
        return "contiguous"
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "other"


# --- the plan: which layers are batched, and how they are grouped -------------------------------------------------
@dataclass(eq=False)
class _Group:
    preset: Preset
    eps: float
    layers: tuple[WSMixin, ...]
    layouts: tuple[str, ...]
    sizes: tuple[int, ...]  # output channels (rows) per layer
    natural: bool  # same trailing shape and layout, not transposed: concatenate the weights themselves
    gain: bool
    shift: bool
    numel: int = 0  # weight elements of the group


def batchable(layer: nn.Module) -> bool:
    """Whether the model-level pass may compute ``layer``'s standardized weight (see the module docstring)."""
    if not isinstance(layer, WSMixin):
        return False
    cls = type(layer)
    if (
        cls.standardized_weight is not WSMixin.standardized_weight
        or cls.compute_standardized_weight is not WSMixin.compute_standardized_weight
    ):
        return False
    if layer._forward_pre_hooks or "weight" in getattr(layer, "parametrizations", {}):  # type: ignore[attr-defined]
        return False
    w = layer.weight
    return isinstance(w, Tensor) and w.is_floating_point()


def _layer_signature(layer: WSMixin) -> tuple:
    # id() of the weight is safe: the plan holds a reference to every weight it was built from
    p = layer._parameters  # type: ignore[attr-defined]  # direct dict reads: this runs every forward
    w = p.get("weight")
    if w is None:
        w = layer.weight
    return (id(w), w.dtype, w.device, w.shape, w.stride(), p.get("gain") is None, p.get("shift") is None,
            len(layer._forward_pre_hooks), layer.ws_preset, layer.ws_eps)  # type: ignore[attr-defined]


def _make_groups(layers: Sequence[WSMixin]) -> list[_Group]:
    buckets: dict[tuple, list[tuple[WSMixin, str]]] = {}
    for layer in layers:
        w = layer.weight
        key = (layer.ws_preset, layer.ws_eps, w.dtype, w.device, layer.ws_fan_in, layer.gain is not None,
               layer.shift is not None)
        buckets.setdefault(key, []).append((layer, _layout(w)))
    groups = []
    for (preset, eps, _, _, _, gain, shift), members in buckets.items():
        ls = tuple(m[0] for m in members)
        layouts = tuple(m[1] for m in members)
        natural = (
            not any(layer.ws_transposed for layer in ls)
            and len({layer.weight.shape[1:] for layer in ls}) == 1
            and len(set(layouts)) == 1
            and layouts[0] != "other"
        )
        sizes = tuple(layer.ws_out_channels for layer in ls)
        numel = sum(layer.weight.numel() for layer in ls)
        groups.append(_Group(preset, eps, ls, layouts, sizes, natural, gain, shift, numel))
    return groups


def _affine(rows: Tensor, layers: Sequence[WSMixin], gain: bool, shift: bool) -> Tensor:
    """rows * gain + shift for the rows of ``layers`` stacked in order: one cat per parameter kind and one op."""
    if gain:
        g = layers[0].gain if len(layers) == 1 else torch.cat([layer.gain for layer in layers])
        rows = rows * g.unsqueeze(1).to(rows.dtype)
    if shift:
        s = layers[0].shift if len(layers) == 1 else torch.cat([layer.shift for layer in layers])
        rows = rows + s.unsqueeze(1).to(rows.dtype)
    return rows


def _standardize_group_torch(group: _Group, concat: bool) -> list[Tensor]:
    """Weight-shaped standardized tensors of the group's layers.

    ``concat``: one cat, one standardize, one affine, one split for the whole group (few launches: GPU). Without
    it, each layer's rows are standardized where they lie (CPU: copying the weights into one buffer and the
    gradients back out costs more than the saved per-op dispatch).
    """
    ls = group.layers
    if not concat or len(ls) == 1:
        return [layer.compute_standardized_weight() for layer in ls]
    if group.natural:
        full = torch.cat([layer.weight for layer in ls])  # (sum O, *trailing), the weights' common layout
        y = standardize_rows(weight_to_rows(full), preset=group.preset, eps=group.eps)
        return list(rows_to_weight(_affine(y, ls, group.gain, group.shift), full).split(group.sizes))
    rows = torch.cat([layer.ws_rows() for layer in ls])  # (sum O, n)
    y = _affine(standardize_rows(rows, preset=group.preset, eps=group.eps), ls, group.gain, group.shift)
    return [layer.ws_from_rows(c) for layer, c in zip(ls, y.split(group.sizes))]
