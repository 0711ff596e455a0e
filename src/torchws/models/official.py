"""Load the authors' released ImageNet checkpoints: the WS repo's GN+WS files and the BCN repo's BCN+WS files.

Both repos train with `imagenet.py`, which wraps the model in DataParallel and saves
`{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`: the state dict's keys carry the `module.` prefix and
torchvision's module names, and every norm is named bn*. A file holding the bare state dict (with or without the
prefix) loads too.

* WS repo (joe-siyuan-qiao/pytorch-classification): `R-50-GN-WS.pth.tar`, `R-101-GN-WS.pth.tar`,
  `X-50-GN-WS.pth.tar`, `X-101-GN-WS.pth.tar`. Norms are `nn.GroupNorm(32, C)` (`bn1.weight`, `bn1.bias`). Their
  conv is the "official" preset: `create_model("resnet50_gn_ws", ws_preset="official")`.
* BCN repo (joe-siyuan-qiao/Batch-Channel-Normalization, `imagenet/`): `rn50_bcn_ws.pth`, `rn101_bcn_ws.pth`,
  `rx50_bcn_ws.pth`. Each norm holds its per-channel BatchNorm as `pbn` (`bn1.pbn.weight`, `bn1.pbn.bias`,
  `bn1.pbn.running_mean`, `bn1.pbn.running_var`, `bn1.pbn.num_batches_tracked`) and the per-group affine as
  `bn1.weight`, `bn1.bias` of shape (1, 32, 1); group part eps 1e-5; the BatchNorm uses batch statistics. Their
  conv is the "bcn" preset: `create_model("resnet50_bcn_ws", ws_preset="bcn")`. The `pbn` keys load into
  `BatchChannelNorm2d.bn`. A norm saved in the estimated mode (the repo README's `BCNorm(estimate=True)`, names
  `bn1.bn.*`) adds its rate as `bn1.bn.estbn_moving_speed`.

Loading into WS layers with another preset, or into a model without WS layers, warns.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from torchws.models.registry import get_model_info, list_models

__all__ = [
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "LoadResult",
    "load_official_checkpoint",
    "official_checkpoint_name",
    "read_official_state_dict",
]

_PREFIX = "module."
_BCN_REPO_BATCH_NORM = ".pbn."  # the BCN repo's name for BatchChannelNorm2d.bn
_ESTIMATE_RATE = "estbn_moving_speed"  # the BCN repo's EstBN: rate of its estimated statistics, a (1,) buffer
_SHOW = 8  # keys listed per category in an error message before "(+N more)"


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model's."""


class CheckpointFormatError(ValueError):
    """The file is not a readable checkpoint (truncated, corrupt) or has no state dict in it."""


class LoadResult(NamedTuple):
    """Keys `load_official_checkpoint` could not use (both empty with strict=True)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def official_checkpoint_name(model_name: str) -> str:
    """File name of the authors' weights for `model_name`: resnet50_gn_ws -> "R-50-GN-WS.pth.tar" (WS repo),
    resnet50_bcn_ws -> "rn50_bcn_ws.pth" (BCN repo)."""
    name = get_model_info(model_name).official_checkpoint
    if name is None:
        have = [n for n in list_models() if get_model_info(n).official_checkpoint]
        raise ValueError(f"{model_name} has no official checkpoint; models that have one: {', '.join(have)}")
    return name


def _read(path: str | os.PathLike, map_location: object) -> object:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint {os.fspath(path)!r} does not exist")
    try:
        # weights_only: the released files hold only tensors, numbers, strings and dicts
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... depending on the damage
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointFormatError(
            f"{os.fspath(path)}: unreadable torch checkpoint (truncated or corrupt?); {type(err).__name__}: {reason}"
        ) from err


def read_official_state_dict(path: str | os.PathLike, *, map_location: object = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of an authors'-format file: its `state_dict` entry (or the dict itself), `module.` stripped."""
    obj = _read(path, map_location)
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{os.fspath(path)}: expected a dict, found {type(obj).__name__}")
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointFormatError(
            f"{os.fspath(path)}: no state dict of tensors found (top-level keys: {', '.join(map(str, list(obj)[:10]))})"
        )
    return {(k[len(_PREFIX) :] if k.startswith(_PREFIX) else k): v for k, v in state.items()}


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {label}: {shown}{more}"


def _rename_bcn_repo_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`<norm>.pbn.<name>` -> `<norm>.bn.<name>` where `<norm>` is a BatchChannelNorm2d of `model`."""
    from torchws.layers.bcn import BatchChannelNorm2d

    bcn = {name for name, m in model.named_modules() if isinstance(m, BatchChannelNorm2d)}
    renamed = {}
    for key, value in state.items():
        head, sep, tail = key.partition(_BCN_REPO_BATCH_NORM)
        renamed[f"{head}.bn.{tail}" if sep and head in bcn else key] = value
    return renamed


def _take_estimate_rates(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """Remove `<norm>.bn.estbn_moving_speed` keys from `state`: {norm path: rate} for BatchChannelNorm2d norms."""
    from torchws.layers.bcn import BatchChannelNorm2d

    modules = dict(model.named_modules())
    rates = {}
    for key in [k for k in state if k.endswith(f".bn.{_ESTIMATE_RATE}")]:
        norm = key[: -len(f".bn.{_ESTIMATE_RATE}")]
        if isinstance(modules.get(norm), BatchChannelNorm2d):
            rates[norm] = float(state.pop(key).reshape(-1)[0])
    return rates


def _check_ws_preset(model: nn.Module) -> None:
    from torchws.layers import WSMixin
    from torchws.layers.bcn import BatchChannelNorm2d
    from torchws.presets import get_preset

    bcn_model = any(isinstance(m, BatchChannelNorm2d) for m in model.modules())
    expected = get_preset("bcn" if bcn_model else "official")
    formula = "unbiased variance, 1e-5 inside the root" if bcn_model else "unbiased std + 1e-5"
    ws_layers = [m for m in model.modules() if isinstance(m, WSMixin)]
    if not ws_layers:
        warnings.warn(
            "load_official_checkpoint: the model has no WS layers, but the official checkpoints are GN+WS or "
            "BCN+WS; outputs will not match the authors' (use a *_gn_ws or *_bcn_ws model)",
            stacklevel=3,
        )
        return
    other = sorted(
        {
            f"{m.ws_preset.name} (eps {m.ws_eps:g})"
            for m in ws_layers
            if m.ws_preset != expected or m.ws_eps != expected.eps
        }
    )
    if other:
        warnings.warn(
            f"load_official_checkpoint: WS layers use preset {', '.join(other)}, the authors trained with "
            f"{expected.name!r} ({formula}); build with create_model(name, ws_preset={expected.name!r}) to match "
            "their outputs",
            stacklevel=3,
        )


def load_official_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, map_location: object = "cpu"
) -> LoadResult:
    """Load an authors'-format checkpoint (either repo, see the module docstring) into `model`.

    `model` is a torchvision-named ResNet/ResNeXt: a `*_gn_ws` model for the WS repo's files, a `*_bcn_ws` model
    for the BCN repo's (their `pbn` keys are read as `BatchChannelNorm2d.bn`). A norm saved from the BCN repo's
    estimated mode (`BCNorm(estimate=True)`, whose `EstBN` keeps its rate in the buffer `bn.estbn_moving_speed`)
    loads its statistics into `bn` and switches that BatchChannelNorm2d to `estimate=True` at the saved rate.

    strict=True: any missing or unexpected key raises CheckpointMismatchError listing them; strict=False loads the
    keys both sides have and returns the rest. Shape mismatches always raise. For a `features_only` model,
    checkpoint keys of modules it did not build (fc, later stages) are ignored. Unreadable files raise
    CheckpointFormatError naming the file. Warns when the model's WS numerics differ from the authors'.
    """
    state = _rename_bcn_repo_keys(read_official_state_dict(path, map_location=map_location), model)
    estimate_rates = _take_estimate_rates(state, model)
    if getattr(model, "features_only", False):
        built = {name for name, _ in model.named_children()}
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] in built}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = (
        ([_listing("missing keys", missing)] if strict and missing else [])
        + ([_listing("unexpected keys", unexpected)] if strict and unexpected else [])
        + ([_listing("shape mismatches", shapes)] if shapes else [])
    )
    if problems:
        raise CheckpointMismatchError(
            f"{os.fspath(path)} does not fit {type(model).__name__}: {'; '.join(problems)} "
            "(wrong architecture? official_checkpoint_name() gives the file for each model)"
        )
    _check_ws_preset(model)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    for norm, rate in estimate_rates.items():  # the file's norms ran the estimated mode (EstBN) at this rate
        module = model.get_submodule(norm)
        module.estimate, module.estimate_rate = True, rate
    return LoadResult(missing, unexpected)
