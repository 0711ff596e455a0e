"""Load the authors' released GN+WS ImageNet checkpoints (R-50/R-101/X-50/X-101-GN-WS.pth.tar).

File format (joe-siyuan-qiao/pytorch-classification): a dict with `state_dict` (plus epoch, arch, best_prec1,
optimizer) whose keys carry DataParallel's `module.` prefix and torchvision's names; the GroupNorm parameters are
named bn*. The authors' WS numerics are the "official" preset (unbiased std, 1e-5 added to the std): build the
model with `create_model("resnet50_gn_ws", ws_preset="official")` to reproduce their outputs exactly. Loading
into WS layers with another preset, or into a model without WS layers, warns.
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
    """File name of the authors' weights for `model_name`, e.g. resnet50_gn_ws -> "R-50-GN-WS.pth.tar"."""
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
    return {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): v for k, v in state.items()}


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {label}: {shown}{more}"


def _check_ws_preset(model: nn.Module) -> None:
    from torchws.layers import WSMixin
    from torchws.presets import get_preset

    official = get_preset("official")
    ws_layers = [m for m in model.modules() if isinstance(m, WSMixin)]
    if not ws_layers:
        warnings.warn(
            "load_official_checkpoint: the model has no WS layers, but the official checkpoints are GN+WS; "
            "outputs will not match the authors' (use a *_gn_ws model)",
            stacklevel=3,
        )
        return
    other = sorted({f"{m.ws_preset.name} (eps {m.ws_eps:g})" for m in ws_layers
                    if m.ws_preset != official or m.ws_eps != official.eps})
    if other:
        warnings.warn(
            f"load_official_checkpoint: WS layers use preset {', '.join(other)}, the authors trained with 'official' "
            "(unbiased std + 1e-5); build with create_model(name, ws_preset='official') to match their outputs",
            stacklevel=3,
        )


def load_official_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, map_location: object = "cpu"
) -> LoadResult:
    """Load an authors'-format checkpoint into `model` (a torchvision-named ResNet/ResNeXt).

    strict=True: any missing or unexpected key raises CheckpointMismatchError listing them; strict=False loads the
    keys both sides have and returns the rest. Shape mismatches always raise. For a `features_only` model,
    checkpoint keys of modules it did not build (fc, later stages) are ignored. Unreadable files raise
    CheckpointFormatError naming the file. Warns when the model's WS numerics differ from the authors'.
    """
    state = read_official_state_dict(path, map_location=map_location)
    if getattr(model, "features_only", False):
        built = {name for name, _ in model.named_children()}
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] in built}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = ([_listing("missing keys", missing)] if strict and missing else []) + (
        [_listing("unexpected keys", unexpected)] if strict and unexpected else []
    ) + ([_listing("shape mismatches", shapes)] if shapes else [])
    if problems:
        raise CheckpointMismatchError(
            f"{os.fspath(path)} does not fit {type(model).__name__}: {'; '.join(problems)} "
            "(wrong architecture? official_checkpoint_name() gives the file for each model)"
        )
    _check_ws_preset(model)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadResult(missing, unexpected)
