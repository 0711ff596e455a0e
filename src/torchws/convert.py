"""Model surgery: :func:`convert` plain models to WS (+ GN / BCN) and :func:`fold` WS models back to plain layers.

Rules (see docs/bcn.md, "convert and fold"):

* Only modules whose type is *exactly* a key of ``torchws.layers.WS_LAYER_FOR`` are converted (``nn.Linear`` only
  with ``linear=True``); subclasses of ``nn.Conv2d`` etc. may override ``forward`` and are left alone (reported).
* Skipped with a reason in the report: fan-in < 2 (nothing to standardize: depthwise 1x1, ``Linear(1, n)``),
  non-floating weights, weights that are not a plain ``nn.Parameter`` (parametrizations, ``weight_norm``).
* Modules that are already torchws modules, and everything inside them, are left alone: converting twice is a no-op.
* Forward/backward hooks move to the replacement (the same hook dicts, so existing handles still remove them);
  ``state_dict`` / ``load_state_dict`` hooks are not carried (the replacement's keys may differ).
* A module reachable under several paths (shared) is replaced once, at every path.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from torchws.fast import auto_enable, disable_batched_ws, find_handle
from torchws.functional import fan_in
from torchws.layers.bcn import BatchChannelNorm2d
from torchws.layers.ws import WS_LAYER_FOR, WSMixin
from torchws.presets import DEFAULT_PRESET, Preset, get_preset

__all__ = ["ConversionReport", "convert", "fold", "function_preserving_gain_shift"]

NormKind = Literal["gn", "bcn"]
GroupFallback = Literal["error", "largest_divisor"]
GroupsArg = int | Callable[[int], int]

_PLAIN_LAYER_FOR: dict[type[nn.Module], type[nn.Module]] = {ws: plain for plain, ws in WS_LAYER_FOR.items()}
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``converted``: (path, old type, new type); ``skipped``: (path, reason)."""

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} modules, skipped {len(self.skipped)}"]
        lines += [f"  {p or '<root>'}: {a} -> {b}" for p, a, b in self.converted]
        lines += [f"  skipped {p or '<root>'}: {why}" for p, why in self.skipped]
        return "\n".join(lines)


# --- function-preserving initialisation ---------------------------------------------------------------------------
def function_preserving_gain_shift(
    rows: Tensor, *, preset: str | Preset = DEFAULT_PRESET, eps: float | None = None
) -> tuple[Tensor, Tensor]:
    """``(gain, shift)``, each ``(O,)``, such that ``gain * standardize_rows(rows) + shift == rows`` per row.

    ``gain`` is the preset's denominator (``sqrt(var + eps)`` for eps inside the root, ``std + eps`` for
    ``official``, ``sqrt(max(n * var, eps))`` for ``nf``) and ``shift`` the row mean; computed in float64 and
    returned in ``rows.dtype``.
    """
    p = get_preset(preset)
    eps = p.eps if eps is None else float(eps)
    x = rows.detach().double()
    var, mean = torch.var_mean(x, dim=1, correction=1 if p.unbiased else 0)
    if p.eps_placement == "inside_sqrt":
        denom = torch.sqrt(var + eps)
    elif p.eps_placement == "added_to_std":
        denom = var.sqrt() + eps
    elif p.eps_placement == "clamp_fan_in_var":
        denom = torch.sqrt(torch.clamp(var * x.shape[1], min=eps))
    else:
        raise ValueError(f"function_preserving_gain_shift: unknown eps_placement {p.eps_placement!r} in {p.name}")
    return denom.to(rows.dtype), mean.to(rows.dtype)


# --- replacing modules: hooks, modes, shared modules ---------------------------------------------------------------
def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    # the same dict objects, so RemovableHandles returned for `old` still remove the hook from `new`
    for name in _HOOK_DICTS:
        if hasattr(old, name):
            setattr(new, name, getattr(old, name))


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, new)


def _excluded(path: str, patterns: tuple[str, ...]) -> bool:
    """A path is excluded when it or one of its ancestors matches a name or fnmatch pattern."""
    parts = path.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(pre, pat) for pre in prefixes for pat in patterns)


def _resolve_groups(path: str, channels: int, num_groups: GroupsArg, fallback: GroupFallback) -> int:
    groups = num_groups(channels) if callable(num_groups) else int(num_groups)
    if groups > 0 and channels % groups == 0:
        return groups
    if fallback == "largest_divisor" and groups > 0:
        return max(g for g in range(1, min(groups, channels) + 1) if channels % g == 0)
    raise ValueError(
        f"{path or '<root>'}: {channels} channels are not divisible by num_groups={groups}; "
        "pass group_fallback='largest_divisor', a num_groups that divides it, or exclude this module"
    )


def _why_not_standardizable(m: nn.Module) -> str | None:
    w = getattr(m, "weight", None)
    if parametrize.is_parametrized(m):
        return "weight is parametrized (torch.nn.utils.parametrize); left as is"
    if not isinstance(w, nn.Parameter):
        return "weight is not an nn.Parameter (weight_norm or similar); left as is"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype} is not floating point"
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    n = fan_in(w, transposed=transposed, groups=getattr(m, "groups", 1))
    if n < 2:
        return f"fan-in per output channel is {n}; a single weight cannot be standardized"
    return None


def _ws_twin(m: nn.Module, preset: Preset, eps: float | None, gain: bool | None, preserve: bool) -> nn.Module:
    w = m.weight
    ws_cls = WS_LAYER_FOR[type(m)]
    ws_kw = {"preset": preset, "eps": eps, "gain": True if preserve else gain, "shift": preserve}
    # built on the meta device (no init cost), then handed the original Parameters
    factory = {"device": "meta", "dtype": w.dtype}
    if isinstance(m, nn.Linear):
        new = ws_cls(m.in_features, m.out_features, m.bias is not None, **factory, **ws_kw)
    else:
        args = (m.in_channels, m.out_channels, m.kernel_size)
        kw = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        kw.update(bias=m.bias is not None, padding_mode=m.padding_mode)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            kw["output_padding"] = m.output_padding
        new = ws_cls(*args, **kw, **factory, **ws_kw)
    new.weight = w
    new.bias = m.bias
    rows = new.ws_rows()
    if new.gain is not None:
        new.gain = nn.Parameter(torch.ones(rows.shape[0], device=w.device, dtype=w.dtype))
    if new.shift is not None:
        new.shift = nn.Parameter(torch.zeros(rows.shape[0], device=w.device, dtype=w.dtype))
    if preserve:
        g, s = function_preserving_gain_shift(rows, preset=new.ws_preset, eps=new.ws_eps)
        with torch.no_grad():
            new.gain.copy_(g)
            new.shift.copy_(s)
    return new


def _norm_twin(bn: _BatchNorm, path: str, norm: NormKind, num_groups: GroupsArg, fallback: GroupFallback) -> nn.Module:
    c = bn.num_features
    groups = _resolve_groups(path, c, num_groups, fallback)
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {"device": ref.device if ref is not None else None, "dtype": ref.dtype if ref is not None else None}
    if norm == "gn":
        new: nn.Module = nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine, **factory)
        src, dst = bn, new
    else:
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise ValueError(
                f"{path or '<root>'}: norm='bcn' replaces BatchNorm2d/SyncBatchNorm only, got {type(bn).__name__}; "
                "use norm='gn' or exclude this module"
            )
        new = BatchChannelNorm2d(c, groups, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, **factory)
        src, dst = bn, new.bn
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                dst.running_mean.copy_(bn.running_mean)
                dst.running_var.copy_(bn.running_var)
                dst.num_batches_tracked.copy_(bn.num_batches_tracked)
    if bn.affine:
        dst.weight, dst.bias = src.weight, src.bias  # the same Parameters (requires_grad kept)
    return new


def _is_torchws_module(m: nn.Module) -> bool:
    return isinstance(m, (WSMixin, BatchChannelNorm2d))


def _check_convert_args(norm: str | None, group_fallback: str, preserve_function: bool, gain: bool | None) -> None:
    if norm not in (None, "gn", "bcn"):
        raise ValueError(f"convert: norm must be None, 'gn' or 'bcn', got {norm!r}")
    if group_fallback not in ("error", "largest_divisor"):
        raise ValueError(f"convert: group_fallback must be 'error' or 'largest_divisor', got {group_fallback!r}")
    if preserve_function and gain is False:
        raise ValueError("convert: preserve_function=True needs a gain (it holds each filter's scale); drop gain=False")


def convert(
    model: nn.Module,
    *,
    norm: NormKind | None = None,
    num_groups: GroupsArg = 32,
    preset: str | Preset = DEFAULT_PRESET,
    eps: float | None = None,
    linear: bool = False,
    exclude: Iterable[str] = (),
    preserve_function: bool = False,
    gain: bool | None = None,
    group_fallback: GroupFallback = "error",
    inplace: bool = False,
    report: bool = False,
    batched_ws: bool | None = None,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace every Conv1-3d / ConvTranspose1-3d (and Linear with ``linear=True``) by its WS twin.

    Args:
        model: any module (a deep copy is converted unless ``inplace``).
        norm: also replace every BatchNorm (``_BatchNorm``: BatchNorm1-3d, SyncBatchNorm) by ``nn.GroupNorm``
            (``"gn"``, affine Parameters reused) or :class:`BatchChannelNorm2d` (``"bcn"``, BatchNorm2d/SyncBatchNorm
            only; affine Parameters and running statistics go to its ``bn`` part; its batch part is a plain
            per-process BatchNorm2d, so a SyncBatchNorm's cross-rank statistics are not kept, and it always tracks
            running statistics). ``None``: norms untouched.
        num_groups: groups of the new norms: an int or a rule ``channels -> groups``.
        preset, eps, gain: passed to each WS layer.
        linear: convert ``nn.Linear`` too (the paper keeps the classifier plain).
        exclude: module paths or fnmatch patterns (``"fc"``, ``"head.*"``); a matching module and everything
            below it is left untouched.
        preserve_function: give each WS layer ``gain`` and ``shift`` set so that ``gain * W_hat + shift`` equals the
            original weight: the converted model computes what the original did (with ``norm=None``; swapping
            BatchNorm for GroupNorm changes the function).
        group_fallback: ``"error"`` (default): a channel count that ``num_groups`` does not divide raises a
            ValueError naming the module; ``"largest_divisor"``: use the largest divisor of the channel count that
            is <= num_groups.
        inplace: modify ``model`` itself.
        report: also return a :class:`ConversionReport`.
        batched_ws: standardize all WS weights in one model-level pass per forward of the returned model
            (:mod:`torchws.fast`); None follows the environment variable TORCHWS_BATCHED (on unless "0").

    Returns:
        The converted model, or ``(model, report)`` with ``report=True``. Replacements keep the original's
        device, dtype, train/eval mode, Parameters (same objects, ``requires_grad`` kept) and forward/backward hooks.
    """
    _check_convert_args(norm, group_fallback, preserve_function, gain)
    opts = _Options(get_preset(preset), eps, gain, preserve_function, norm, num_groups, linear, group_fallback)
    patterns = tuple(exclude)
    if not inplace:
        model = copy.deepcopy(model)
    rep = ConversionReport()
    done: dict[int, nn.Module | None] = {}  # id(old) -> replacement (None: leave it)
    inside_torchws: list[str] = []
    for path, m in list(model.named_modules(remove_duplicate=False)):
        if any(pre == "" or path.startswith(pre + ".") for pre in inside_torchws) or _is_torchws_module(m):
            if _is_torchws_module(m):
                inside_torchws.append(path)
            continue
        if patterns and _excluded(path, patterns):
            continue
        if id(m) not in done:
            done[id(m)] = _replacement(m, path, rep, opts)
        new = done[id(m)]
        if new is None:
            continue
        if path == "":
            model = new
        else:
            _set_module(model, path, new)
    _refresh_batched(model, batched_ws)
    return (model, rep) if report else model


def _refresh_batched(model: nn.Module, enabled: bool | None) -> None:
    handle = find_handle(model)
    if handle is None:
        auto_enable(model, enabled=enabled)
    elif enabled is False:
        handle.remove()
    else:
        handle.refresh()  # a deep-copied handle still lists the replaced layers; its backend is kept


@dataclass(frozen=True)
class _Options:
    preset: Preset
    eps: float | None
    gain: bool | None
    preserve: bool
    norm: NormKind | None
    num_groups: GroupsArg
    linear: bool
    fallback: GroupFallback


def _replacement(m: nn.Module, path: str, rep: ConversionReport, o: _Options) -> nn.Module | None:
    """The module that replaces ``m`` (or None), recorded in ``rep``."""
    kind = type(m)
    if kind in WS_LAYER_FOR and (kind is not nn.Linear or o.linear):
        why = _why_not_standardizable(m)
        if why is not None:
            rep.skipped.append((path, why))
            return None
        new = _ws_twin(m, o.preset, o.eps, o.gain, o.preserve)
    elif isinstance(m, _BatchNorm) and o.norm is not None:
        new = _norm_twin(m, path, o.norm, o.num_groups, o.fallback)
    else:
        if isinstance(m, tuple(WS_LAYER_FOR)) and kind not in WS_LAYER_FOR:
            rep.skipped.append((path, f"{kind.__name__} subclasses a convertible layer; only exact types convert"))
        return None
    new.train(m.training)
    _move_hooks(m, new)
    rep.converted.append((path, kind.__name__, _describe(new)))
    return new


def _describe(m: nn.Module) -> str:
    if isinstance(m, (nn.GroupNorm, BatchChannelNorm2d)):
        return f"{type(m).__name__}({m.num_groups})"
    return type(m).__name__


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every WS layer by its plain ``torch.nn`` layer holding ``m.standardized_weight()`` (gain/shift in).

    The folded model computes what the WS model computes (within float rounding), has no torchws WS layers left
    and runs through ``torch.export`` / ``torch.jit.script``. :class:`BatchChannelNorm2d` modules are left as they
    are (its group part depends on each sample, so it cannot become a plain affine); a model whose norms are
    GroupNorm/BatchNorm folds to pure ``torch.nn``. The new weight is a fresh Parameter (``requires_grad`` copied);
    bias, train/eval mode and forward/backward hooks are kept.
    """
    if not inplace:
        model = copy.deepcopy(model)
    done: dict[int, nn.Module] = {}
    for path, m in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(m, WSMixin):
            continue
        if id(m) not in done:
            done[id(m)] = _plain_twin(m)
        if path == "":
            model = done[id(m)]
        else:
            _set_module(model, path, done[id(m)])
    disable_batched_ws(model)  # the copied pass would keep standardizing the replaced layers
    return model


def _plain_twin(m: WSMixin) -> nn.Module:
    base = next(plain for ws, plain in _PLAIN_LAYER_FOR.items() if isinstance(m, ws))
    w = m.weight
    factory = {"device": "meta", "dtype": w.dtype}
    if isinstance(m, nn.Linear):
        new = base(m.in_features, m.out_features, m.bias is not None, **factory)
    else:
        kw = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        kw.update(bias=m.bias is not None, padding_mode=m.padding_mode)
        if m.ws_transposed:
            kw["output_padding"] = m.output_padding
        new = base(m.in_channels, m.out_channels, m.kernel_size, **kw, **factory)
    with torch.no_grad():
        folded = m.standardized_weight().detach().clone()
    new.weight = nn.Parameter(folded, requires_grad=w.requires_grad)
    new.bias = m.bias
    new.train(m.training)
    _move_hooks(m, new)
    return new
