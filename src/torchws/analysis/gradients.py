"""The paper's gradient identity for a WS layer, checked on a live model.

With population variance and eps -> 0, writing ``W_hat`` for the standardized filter, ``g = dL/dW_hat`` and ``n`` for
the fan-in, Qiao et al. (arXiv 1903.10520, sec. 3) show per output filter

    ||dL/dW||^2 = (||g||^2 - <1, g>^2 / n - <W_hat, g>^2 / n) / var(W).

The two subtracted terms are the parts of ``g`` along ``1`` and along ``W_hat`` that WS projects away; the paper
argues this is what lowers the Lipschitz constants of the loss and its gradient.

Usage::

    with track_standardized_grads(model):   # hooks every WS layer's standardized weight
        loss_fn(model(x), y).backward()
    check = gradient_norm_identity(model.layer1[0].conv1)
    check.lhs, check.rhs                     # (O,) each

With eps > 0 the identity is off by a relative ``O(eps / var)`` (the exact gradient uses ``var + eps``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchws.functional import standardize_rows, weight_to_rows
from torchws.layers import weight_cache
from torchws.layers.ws import WSMixin

__all__ = ["GradientNormIdentity", "gradient_norm_identity", "track_standardized_grads"]

# layer -> dL/d(weight the forward used), summed over the forwards seen while tracking; weak so layers can die
_CAPTURED: weakref.WeakKeyDictionary[nn.Module, Tensor] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class GradientNormIdentity:
    """Both sides of the paper's identity for one WS layer, one entry per output filter.

    Attributes:
        lhs: ``(O,)`` ``||dL/dW_i||^2`` from autograd (the layer's ``weight.grad``).
        rhs: ``(O,)`` ``(||g_i||^2 - <1,g_i>^2/n - <W_hat_i,g_i>^2/n) / var(W_i)``, ``g = dL/dW_hat``.
        kept_fraction: ``(O,)`` ``rhs * var / ||g||^2`` in [0, 1]: the share of ``||g||^2`` that survives WS's
            projection (1 - kept_fraction is what the two subtracted terms remove); NaN where ``g`` is zero.
        w_hat_grad_sq: ``(O,)`` ``||g_i||^2 = ||dL/dW_hat_i||^2``.
    """

    lhs: Tensor
    rhs: Tensor
    kept_fraction: Tensor
    w_hat_grad_sq: Tensor

    def grad_norm_ratio(self) -> float:
        """``||dL/dW|| / ||dL/dW_hat||`` over the whole layer (autograd's ``dL/dW``); NaN where ``g`` is zero."""
        g_sq = float(self.w_hat_grad_sq.sum())
        return float(self.lhs.sum()) ** 0.5 / g_sq**0.5 if g_sq > 0 else float("nan")

    def max_relative_error(self) -> float:
        """``max_i |lhs_i - rhs_i| / max(|lhs_i|, tiny)``."""
        tiny = torch.finfo(self.lhs.dtype).tiny
        return float(((self.lhs - self.rhs).abs() / self.lhs.abs().clamp_min(tiny)).max())


def _check_ws_layer(layer: nn.Module, where: str) -> None:
    if not isinstance(layer, WSMixin):
        raise TypeError(f"{where}: {type(layer).__name__} is not a WS layer (torchws.layers.WSMixin)")


def _capture_hooks(layer: nn.Module) -> list:
    """Forward hooks that route the standardized weight through a tensor hook recording its gradient."""
    active: list[dict[nn.Module, Tensor]] = []

    def before(module: nn.Module, args: tuple) -> None:
        # the weight the forward would use anyway (a pass's cache, or computed), handed to it through a cache of
        # our own so that the hooked tensor is the one the forward reads
        used = module.standardized_weight()  # type: ignore[attr-defined]
        # not in a checkpointed region's recomputation: its weight is the forward's own (hook set then) or one that
        # the backward does not reach
        if used.requires_grad and not weight_cache.checkpoint_recomputing():
            used.register_hook(lambda grad: _accumulate(module, grad))
        active.append({module: used})
        weight_cache.activate(active[-1])

    def after(module: nn.Module, args: tuple, output: object) -> None:
        weight_cache.deactivate(active.pop())

    return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after, always_call=True)]


def _accumulate(layer: nn.Module, grad: Tensor) -> None:
    held = _CAPTURED.get(layer)
    _CAPTURED[layer] = grad.detach().clone() if held is None else held + grad.detach()


@contextmanager
def track_standardized_grads(module: nn.Module) -> Iterator[list[nn.Module]]:
    """Record ``dL/d(standardized weight)`` of every WS layer in ``module`` (itself included) during the block.

    Gradients of earlier tracking are cleared on entry; the hooks are removed on exit, the recorded gradients stay
    readable by :func:`gradient_norm_identity`. Yields the list of tracked layers.

    Raises:
        ValueError: ``module`` holds no WS layer.
    """
    layers = [m for m in module.modules() if isinstance(m, WSMixin)]
    if not layers:
        raise ValueError(f"track_standardized_grads: {type(module).__name__} holds no WS layer (WSMixin)")
    handles = []
    for layer in layers:
        _CAPTURED.pop(layer, None)
        handles += _capture_hooks(layer)
    try:
        yield layers
    finally:
        for handle in handles:
            handle.remove()


def gradient_norm_identity(layer: nn.Module, w_hat_grad: Tensor | None = None) -> GradientNormIdentity:
    """Both sides of the paper's per-filter gradient-norm identity for a WS layer after a backward.

    Args:
        layer: a WS layer with a population-variance, eps-inside-the-root preset (``paper``, ``timm``, ``bit``) whose
            ``weight.grad`` holds ``dL/dW``.
        w_hat_grad: ``dL/d(weight the forward used)``, weight-shaped; None reads the one recorded by
            :func:`track_standardized_grads`. With a gain, ``g = gain * w_hat_grad`` (a shift does not change it).

    Returns:
        :class:`GradientNormIdentity` with ``(O,)`` tensors in the weight's dtype.
    """
    where = "gradient_norm_identity"
    _check_ws_layer(layer, where)
    preset = layer.ws_preset  # type: ignore[attr-defined]
    if preset.unbiased or preset.eps_placement != "inside_sqrt":
        raise ValueError(
            f"{where}: the identity holds for population variance with eps inside the root (paper, timm, bit); "
            f"{type(layer).__name__} uses preset {preset.name!r}"
        )
    if layer.weight.grad is None:  # type: ignore[union-attr]
        raise ValueError(f"{where}: {type(layer).__name__}.weight.grad is None; run a backward first")
    grad_used = _CAPTURED.get(layer) if w_hat_grad is None else w_hat_grad
    if grad_used is None:
        raise ValueError(f"{where}: no dL/dW_hat recorded; run forward and backward inside track_standardized_grads")
    with torch.no_grad():
        w_rows = layer.ws_rows()  # type: ignore[attr-defined]  # (O, n)
        g = _as_rows(layer, grad_used)
        if layer.gain is not None:  # type: ignore[attr-defined]
            g = g * layer.gain.reshape(-1, 1)  # type: ignore[attr-defined]
        w_hat = standardize_rows(w_rows, preset=preset, eps=layer.ws_eps)  # type: ignore[attr-defined]
        n = w_rows.shape[1]
        var = w_rows.var(dim=1, correction=0)
        g_sq = (g * g).sum(1)
        kept = g_sq - g.sum(1) ** 2 / n - (w_hat * g).sum(1) ** 2 / n
        lhs = _as_rows(layer, layer.weight.grad).pow(2).sum(1)  # type: ignore[union-attr]
    return GradientNormIdentity(lhs=lhs, rhs=kept / var, kept_fraction=kept / g_sq, w_hat_grad_sq=g_sq)


def _as_rows(layer: nn.Module, tensor: Tensor) -> Tensor:
    """A weight-shaped tensor of ``layer`` as its ``(O, n)`` rows, element for element aligned with ``ws_rows``.

    A gradient can come in another memory layout than the weight (conv backward often returns a channels_last
    gradient for a contiguous weight); ``weight_to_rows`` reads channels_last rows in memory order, so the tensor is
    first laid out like the weight, or ``<W_hat, g>`` would pair mismatched elements."""
    weight = layer.weight  # type: ignore[attr-defined]
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(weight.ndim)
    if channels_last is not None and weight.is_contiguous(memory_format=channels_last) and not weight.is_contiguous():
        tensor = tensor.contiguous(memory_format=channels_last)
    else:
        tensor = tensor.contiguous()
    return weight_to_rows(tensor, transposed=layer.ws_transposed, groups=layer.ws_groups)  # type: ignore[attr-defined]
