"""Norm- and conv-layer factories: one name -> one callable, so blocks take `norm_layer` / `conv_layer` injected.

Calling conventions (timm style): `norm_layer(num_channels) -> nn.Module` and `conv_layer(in_ch, out_ch, kernel_size,
stride=..., padding=..., groups=..., bias=...) -> nn.Conv2d` (a WS conv is an nn.Conv2d subclass).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

__all__ = ["NORM_KINDS", "make_conv_layer", "make_group_norm", "make_norm_layer", "small_image_groups"]

NORM_KINDS = ("bn", "gn", "ln", "bcn", "bcn_est", "none", "identity")

GroupsArg = int | Callable[[int], int]


def small_image_groups(num_channels: int, *, max_groups: int = 32, min_group_size: int = 2) -> int:
    """GroupNorm group count for the small-image families (CIFAR ResNets, where layers have 16/32 channels).

    Rule: the largest divisor g of `num_channels` with g <= `max_groups` and num_channels // g >= `min_group_size`.
    With the defaults this is 32 groups from 64 channels up (as in the ImageNet models, whose 64-channel layers
    have 2 channels per group) and num_channels // 2 below: 16 -> 8, 32 -> 16, 64 -> 32, 512 -> 32.
    """
    if num_channels < min_group_size:
        raise ValueError(f"small_image_groups: num_channels={num_channels} is below min_group_size={min_group_size}")
    upper = min(max_groups, num_channels // min_group_size)
    return next(g for g in range(upper, 0, -1) if num_channels % g == 0)


def _resolve_groups(num_groups: GroupsArg, num_channels: int) -> int:
    return num_groups(num_channels) if callable(num_groups) else int(num_groups)


def make_group_norm(num_channels: int, *, num_groups: GroupsArg = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """nn.GroupNorm(num_groups, num_channels) with a one-line error when the group count does not divide channels."""
    groups = _resolve_groups(num_groups, num_channels)
    if groups <= 0 or num_channels % groups != 0:
        raise ValueError(
            f"GroupNorm: num_groups={groups} does not divide num_channels={num_channels}; "
            f"pick a divisor of {num_channels} (or num_groups=small_image_groups for a per-layer rule)"
        )
    return nn.GroupNorm(groups, num_channels, eps=eps)


def _make_batch_channel_norm(
    num_channels: int, *, num_groups: GroupsArg = 32, eps: float = 1e-5, estimate: bool = False
) -> nn.Module:
    # Imported lazily: bcn is an independent module and not every user needs it.
    from torchws.layers.bcn import BatchChannelNorm2d

    groups = _resolve_groups(num_groups, num_channels)
    if groups <= 0 or num_channels % groups != 0:
        raise ValueError(
            f"BatchChannelNorm2d: num_groups={groups} does not divide num_channels={num_channels}; "
            f"pick a divisor of {num_channels}"
        )
    return BatchChannelNorm2d(num_channels, num_groups=groups, eps=eps, estimate=estimate)


def _make_identity(num_channels: int) -> nn.Module:
    return nn.Identity()


def make_norm_layer(kind: str, *, num_groups: GroupsArg = 32, eps: float = 1e-5) -> Callable[[int], nn.Module]:
    """Return `norm_layer(num_channels) -> nn.Module` for `kind` in NORM_KINDS.

    `num_groups` (gn, bcn, bcn_est) is an int or a rule `channels -> groups` such as `small_image_groups`. "bn" is
    nn.BatchNorm2d, "gn" nn.GroupNorm, "ln" nn.GroupNorm with one group (layer norm over (C, H, W) per sample with a
    per-channel affine, the paper's LN for conv layers; `num_groups` is ignored), "bcn" BatchChannelNorm2d with batch
    statistics, "bcn_est" BatchChannelNorm2d(estimate=True) (estimated statistics, the micro-batch mode), "none"
    nn.Identity.
    """
    key = kind.lower()
    if key == "bn":
        return functools.partial(nn.BatchNorm2d, eps=eps)
    if key == "gn":
        return functools.partial(make_group_norm, num_groups=num_groups, eps=eps)
    if key == "ln":
        return functools.partial(make_group_norm, num_groups=1, eps=eps)
    if key in ("bcn", "bcn_est"):
        return functools.partial(_make_batch_channel_norm, num_groups=num_groups, eps=eps, estimate=key == "bcn_est")
    if key in ("none", "identity"):
        return _make_identity
    raise ValueError(f"make_norm_layer: unknown kind {kind!r}; expected one of {', '.join(NORM_KINDS)}")


def make_conv_layer(ws: bool, *, preset: object = "paper") -> Callable[..., nn.Conv2d]:
    """Return nn.Conv2d (ws=False) or `functools.partial(torchws.layers.WSConv2d, preset=preset)` (ws=True).

    `preset` is a preset name ("paper", "official", "bcn", "timm", "bit", "nf") or a torchws.presets.Preset.
    """
    if not ws:
        return nn.Conv2d
    from torchws.layers import WSConv2d
    from torchws.presets import get_preset

    get_preset(preset)  # raise now on an unknown name, not at the first conv the builder makes
    return functools.partial(WSConv2d, preset=preset)
