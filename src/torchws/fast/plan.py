"""The plan of a model-level WS pass: which layers it computes and how they are grouped.

A layer is *batchable* when the pass may compute its standardized weight instead of the layer: a WS layer whose
class keeps the standard formula, whose weight is a floating tensor, and which has no forward pre-hooks or
parametrized weight (pruning and similar reparametrisations recompute ``weight`` in a pre-hook, after the pass
would have read it). Other layers compute their own weight, as without a pass.

Layers are grouped by everything one standardization call needs to share: preset, eps, dtype, device, fan-in and
whether a gain or shift follows. A group is *natural* when its weights also share trailing shape and layout (not
transposed): they concatenate as they are, and the split chunks are already weight-shaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchws.layers.ws import WSMixin
from torchws.presets import Preset

__all__ = ["Group", "Plan", "batchable"]


def batchable(layer: nn.Module) -> bool:
    """Whether a model-level pass may compute ``layer``'s standardized weight (see the module docstring)."""
    if not isinstance(layer, WSMixin):
        return False
    cls = type(layer)
    if (
        cls.standardized_weight is not WSMixin.standardized_weight
        or cls.compute_standardized_weight is not WSMixin.compute_standardized_weight
    ):
        return False
    if layer._forward_pre_hooks or "weight" in getattr(layer, "parametrizations", {}):
        return False
    w = layer.weight
    return isinstance(w, Tensor) and w.is_floating_point()


def dense_rows(t: Tensor) -> bool:
    """Each index of dim 0 owns ``numel / size(0)`` consecutive elements (contiguous or channels_last)."""
    if t.is_contiguous():
        return True
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d)
    return False


@dataclass(eq=False)
class Group:
    """Layers standardized by one call: same preset, eps, dtype, device, fan-in, gain and shift presence."""

    preset: Preset
    eps: float
    layers: tuple[WSMixin, ...]
    natural: bool
    gain: bool
    shift: bool

    @property
    def sizes(self) -> tuple[int, ...]:
        """Output channels (rows) per layer."""
        return tuple(m.ws_out_channels for m in self.layers)


def _signature(layer: WSMixin) -> tuple:
    # id(): the plan holds every weight it was built from (sources), so no other tensor can take its id
    p = layer._parameters  # the dict: this runs every forward
    w = p["weight"]
    return (id(w), w.dtype, w.device, w.shape, w.stride(), w.requires_grad, p["gain"] is None, p["shift"] is None,
            len(layer._forward_pre_hooks), layer.ws_preset, layer.ws_eps)  # fmt: skip


def _make_groups(layers: Sequence[WSMixin]) -> list[Group]:
    buckets: dict[tuple, list[WSMixin]] = {}
    for m in layers:
        w = m.weight
        key = (m.ws_preset, m.ws_eps, w.dtype, w.device, m.ws_fan_in, m.gain is not None, m.shift is not None)
        buckets.setdefault(key, []).append(m)
    groups = []
    for (preset, eps, *_, gain, shift), ls in buckets.items():
        natural = (
            not any(m.ws_transposed for m in ls)
            and len({m.weight.shape[1:] for m in ls}) == 1
            and all(dense_rows(m.weight) for m in ls)
            and len({m.weight.is_contiguous() for m in ls}) == 1
        )
        groups.append(Group(preset, eps, tuple(ls), natural, gain, shift))
    return groups


class Plan:
    """The batchable layers of ``model``, grouped; :meth:`stale` tells when the model changed under it.

    Attributes:
        layers: the layers the pass computes, in ``model.modules()`` order.
        groups: their :class:`Group`\\ s.
        sources: layer -> the weight tensor the plan was built from.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: tuple[WSMixin, ...] = tuple(m for m in model.modules() if batchable(m))  # type: ignore[misc]
        self.groups = _make_groups(self.layers)
        self.sources: dict[WSMixin, Tensor] = {m: m.weight for m in self.layers}
        self._signature = [_signature(m) for m in self.layers]

    def stale(self) -> bool:
        """Whether a weight was replaced or changed dtype, device, shape, layout or requires_grad, a gain, shift,
        pre-hook, preset or eps changed since the plan was built (then build a new one). Layers added to or removed
        from the model are not seen: build a new plan after such surgery."""
        return any(_signature(m) != s for m, s in zip(self.layers, self._signature))

    def tensors(self) -> list[Tensor]:
        """Every input of the pass: the weights in layer order, then each layer's gain and shift where present."""
        extra = [t for m in self.layers for t in (m.gain, m.shift) if t is not None]
        return [*(m.weight for m in self.layers), *extra]
