"""Pieces the ResNet families share: conv/norm resolution from a model's suffix, init, feature metadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from torchws.layers.norms import GroupsArg, make_conv_layer, make_norm_layer

__all__ = [
    "NORM_SUFFIXES",
    "FeatureInfo",
    "check_out_indices",
    "init_resnet_weights",
    "resolve_in_chans",
    "resolve_layers",
]

# model-name suffix -> (norm kind of torchws.layers.norms.make_norm_layer, WS convs). "ln_ws": GroupNorm with one
# group; "bcn_est_ws": BCN with estimated batch statistics, the paper's micro-batch (1-2 images) setting.
NORM_SUFFIXES: dict[str, tuple[str, bool]] = {
    "bn": ("bn", False),
    "gn": ("gn", False),
    "gn_ws": ("gn", True),
    "bcn_ws": ("bcn", True),
    "bn_ws": ("bn", True),
    "ln_ws": ("ln", True),
    "bcn_est_ws": ("bcn_est", True),
}


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a `features_only` model returns: stage index, module name, channels, stride vs. input."""

    index: int
    module: str
    channels: int
    reduction: int


def resolve_layers(
    model_name: str, norm: str, ws: bool, *, ws_preset: object = None, num_groups: GroupsArg = 32
) -> tuple[Callable[..., nn.Conv2d], Callable[[int], nn.Module]]:
    """(conv_layer, norm_layer) for a registered variant; `ws_preset` only makes sense for WS variants."""
    if ws_preset is not None and not ws:
        raise ValueError(f"{model_name} has no WS convs, so ws_preset={ws_preset!r} does not apply; use a *_ws model")
    conv_layer = make_conv_layer(ws, preset="paper" if ws_preset is None else ws_preset)
    return conv_layer, make_norm_layer(norm, num_groups=num_groups)


def resolve_in_chans(model_name: str, in_chans: int | None, channels: int | None, *, default: int) -> int:
    """Input channels from `in_chans` or its alias `channels` (both given and different: ValueError)."""
    if in_chans is not None and channels is not None and in_chans != channels:
        raise ValueError(f"{model_name}: in_chans={in_chans} and channels={channels} disagree; pass one of them")
    value = in_chans if in_chans is not None else channels if channels is not None else default
    if value < 1:
        raise ValueError(f"{model_name}: in_chans must be >= 1, got {value}")
    return int(value)


def check_out_indices(out_indices: Sequence[int], num_stages: int, where: str) -> tuple[int, ...]:
    """Validate feature indices (0 = stem, 1..num_stages-1 = residual stages); returns them sorted, unique."""
    indices = tuple(sorted(set(int(i) for i in out_indices)))
    if not indices or indices[0] < 0 or indices[-1] >= num_stages:
        raise ValueError(f"{where}: out_indices={tuple(out_indices)} must be non-empty and within 0..{num_stages - 1}")
    return indices


def _zero_last_norm_scale(norm: nn.Module, where: str) -> None:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"zero_init_residual: {where} ({type(norm).__name__}) has no `weight` parameter to zero")
    nn.init.zeros_(weight)


def init_resnet_weights(model: nn.Module, *, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet init: kaiming_normal (fan_out, relu) for convs, norm weight 1 / bias 0.

    Norm layers other than BatchNorm/GroupNorm (BCN) keep their own init. With `zero_init_residual`, the last norm
    of each residual block (`block.last_norm_name`) starts with scale 0, so every block starts as the identity.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):  # WS convs subclass nn.Conv2d
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and module.affine:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for name, module in model.named_modules():
            last = getattr(module, "last_norm_name", None)
            if last is not None:
                _zero_last_norm_scale(getattr(module, last), f"{name}.{last}")
