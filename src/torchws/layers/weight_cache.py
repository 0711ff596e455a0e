"""Standardized weights computed ahead of a forward, read by the WS layers.

A WS layer computes its own weight (:meth:`~torchws.layers.ws.WSMixin.compute_standardized_weight`) unless an
active cache holds one for it: :func:`lookup` is a layer's only contact with whatever filled the cache. A model-level
pass (:mod:`torchws.fast`) computes every layer's weight at once before the model's forward, activates the mapping
for that forward and deactivates it after, the pattern of ``torch.nn.utils.parametrize.cached()``::

    with weight_cache.cached({conv: w_hat}):
        y = model(x)            # conv convolves with w_hat; every other WS layer computes its own

Caches nest; the innermost holding a layer wins.

Activation checkpointing. Non-reentrant ``torch.utils.checkpoint`` recomputes a region during backward, after the
forward's cache was deactivated, and requires the recomputation to save the same tensors as the forward. So the
owner of a cache may :func:`keep` it after a grad-enabled forward; during a recomputation
(:func:`checkpoint_recomputing`) :func:`lookup` serves the kept weight, provided the layer still holds the weight
tensor it was computed from (a replaced weight is not served: the recomputation then computes its own and
checkpoint raises its CheckpointError). Reentrant checkpointing builds a new graph during backward and the layers
compute their weights themselves there. Recognising a recomputation reads two private torch functions, here only.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = ["activate", "deactivate", "cached", "keep", "forget", "lookup", "checkpoint_phase", "checkpoint_recomputing"]

_active: list[Mapping[nn.Module, Tensor]] = []  # innermost last
# owner -> (its last grad-enabled forward's weights, the weight tensor each was computed from)
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# layer -> (its weight computed in a checkpointed region's first forward, the weight tensor it was computed from)
_computed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def activate(weights: Mapping[nn.Module, Tensor]) -> None:
    """Make ``weights`` (layer -> standardized weight) what those layers use until :func:`deactivate`."""
    _active.append(weights)


def deactivate(weights: Mapping[nn.Module, Tensor]) -> None:
    """End :func:`activate` of this very mapping (wherever it sits in the stack; no-op if not active)."""
    for i in range(len(_active) - 1, -1, -1):
        if _active[i] is weights:
            del _active[i]
            return


@contextlib.contextmanager
def cached(weights: Mapping[nn.Module, Tensor]) -> Iterator[None]:
    """``with cached({layer: w}): ...``: the layers use ``w`` inside the block."""
    activate(weights)
    try:
        yield
    finally:
        deactivate(weights)


def keep(owner: object, weights: Mapping[nn.Module, Tensor], sources: Mapping[nn.Module, Tensor]) -> None:
    """Keep ``weights`` for checkpoint recomputations until ``owner`` keeps others or is forgotten/collected.

    ``sources`` maps each layer to the weight tensor its entry was computed from (served only while the layer
    still holds that tensor)."""
    _kept[owner] = (weights, sources)


def forget(owner: object) -> None:
    """Drop what ``owner`` kept."""
    _kept.pop(owner, None)


def lookup(layer: nn.Module) -> Tensor | None:
    """The cached standardized weight of ``layer``, or None (then the layer computes its own)."""
    for weights in reversed(_active):
        w = weights.get(layer)
        if w is not None:
            return w
    if not _kept:
        return None
    phase = checkpoint_phase()
    if not phase:
        return None
    source = layer._parameters.get("weight")
    if phase == "forward":
        return _computed_outside_checkpoint(layer, source)
    computed = _computed.get(layer)
    if computed is not None and computed[1] is source:
        return computed[0]
    for weights, sources in list(_kept.values()):
        w = weights.get(layer)
        if w is not None and sources.get(layer) is source:
            return w
    return None


def _computed_outside_checkpoint(layer: nn.Module, source: Tensor | None) -> Tensor | None:
    """In a checkpointed region's first forward, for a layer a pass computes elsewhere (an owner's ``sources`` list
    it): its weight computed now, saved normally rather than by checkpoint, and kept. Its recomputation then saves
    the same tensors (the layer op's) whether it takes this weight or a pass's kept one (equal values), whichever of
    the two forwards ran last (else CheckpointError)."""
    if not torch.is_grad_enabled() or not any(sources.get(layer) is source for _, sources in list(_kept.values())):
        return None
    with torch.autograd.graph.saved_tensors_hooks(Tensor.detach, _unpack):  # (detach: no reference cycle)
        w = layer.compute_standardized_weight()  # type: ignore[operator]
    _computed[layer] = (w, source)
    return w


def _unpack(t: Tensor) -> Tensor:
    return t


def checkpoint_phase() -> str:
    """Under the saved-tensor hooks of non-reentrant ``torch.utils.checkpoint``: "forward" outside a backward pass
    (a checkpointed region's first forward), "recompute" inside one (its recomputation); else "". Other saved-tensor
    hooks (save_on_cpu around a backward) do not count. Private torch functions: a test pins them."""
    if torch.compiler.is_compiling():
        return ""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)  # (pack, unpack) innermost, or None
    if hooks is None or getattr(hooks[0], "__module__", None) != "torch.utils.checkpoint":
        return ""
    return "forward" if torch._C._current_graph_task_id() == -1 else "recompute"  # -1: not inside a backward


def checkpoint_recomputing() -> bool:
    """Whether non-reentrant activation checkpointing is recomputing a region now (see :func:`checkpoint_phase`)."""
    return checkpoint_phase() == "recompute"
