"""Model registry: builders registered by name with small metadata; `create_model` / `list_models` look them up."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from torchws.fast import auto_enable

__all__ = ["ModelInfo", "create_model", "get_model_info", "list_models", "register_model", "unregister_model"]

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name.

    family: "resnet", "resnext", "cifar_resnet" or "cifar_resnet18". norm: "bn", "gn", "ln" (GroupNorm, one group),
    "bcn" or "bcn_est" (BCN with estimated statistics); ws: WS convs or not.
    input_size: default (C, H, W). num_classes: default classifier width when create_model gets none.
    reference_params: parameter count at the default num_classes and in_chans for BN/GN variants (torchvision's
    numbers for the ImageNet families); None where no reference exists (BCN adds per-group affine parameters).
    official_checkpoint: file name of the authors' released weights for this model, or None: the WS repo's
    `R-50-GN-WS.pth.tar`... for `*_gn_ws`, the Batch-Channel-Normalization repo's `rn50_bcn_ws.pth`... for
    `*_bcn_ws` (see torchws.models.official).
    """

    name: str
    builder: Builder
    family: str
    norm: str
    ws: bool
    input_size: tuple[int, int, int]
    num_classes: int
    reference_params: int | None = None
    official_checkpoint: str | None = None
    description: str = ""


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str | None = None, **metadata: object) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(*, num_classes, **overrides)` under `name` (default: the function's name).

    `metadata` fills the ModelInfo fields (family, norm, ws, input_size, num_classes, ...). A name registered twice
    raises ValueError.
    """

    def decorate(builder: Builder) -> Builder:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"register_model: {key!r} is already registered (by {_REGISTRY[key].builder!r})")
        _REGISTRY[key] = ModelInfo(name=key, builder=builder, **metadata)  # type: ignore[arg-type]
        return builder

    return decorate


def unregister_model(name: str) -> ModelInfo:
    """Remove ``name`` from the registry (a model registered for one run or test) and return its ModelInfo; unknown
    names raise ValueError as in :func:`get_model_info`."""
    info = get_model_info(name)
    del _REGISTRY[name]
    return info


def list_models(pattern: str = "*") -> list[str]:
    """Sorted registered names matching the fnmatch `pattern` (e.g. "resnet50_*", "*_gn_ws")."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_model_info(name: str) -> ModelInfo:
    """The ModelInfo of `name`; unknown names raise ValueError listing close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else f"valid names: {', '.join(list_models())}"
        raise ValueError(f"unknown model {name!r}; {hint} (list_models() shows all)") from None


def create_model(
    name: str, *, num_classes: int | None = None, batched_ws: bool | None = None, **overrides: object
) -> nn.Module:
    """Build registered model `name`.

    num_classes: classifier width; None takes the model's default (1000 ImageNet families, 10 small-image ones).
    overrides (each builder checks its own): in_chans (alias channels), zero_init_residual, ws_preset (WS models
    only: "official" reproduces the WS repo's `*_gn_ws` checkpoints, "bcn" the BCN repo's `*_bcn_ws` ones),
    num_groups (GN/BCN), features_only, out_indices.
    batched_ws: WS models standardize all their weights in one model-level pass per forward
    (:mod:`torchws.fast`); None follows the environment variable TORCHWS_BATCHED (on unless "0"), False keeps
    the per-layer path.
    """
    info = get_model_info(name)
    accepted = [p for p in inspect.signature(info.builder).parameters if p != "num_classes"]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise TypeError(f"create_model({name!r}): unknown override {', '.join(unknown)}; valid: {', '.join(accepted)}")
    model = info.builder(num_classes=info.num_classes if num_classes is None else num_classes, **overrides)
    if info.ws:
        auto_enable(model, enabled=batched_ws)
    return model
