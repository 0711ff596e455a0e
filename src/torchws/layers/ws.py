"""Weight-standardized Conv, ConvTranspose and Linear layers.

Each layer subclasses the ``torch.nn`` layer it replaces, takes the same constructor arguments (plus keyword-only
``preset``, ``eps``, ``gain``) and keeps the same parameter names, so ``isinstance`` checks, ``state_dict`` keys and
init loops written for plain layers keep working. A layer with ``gain`` enabled has one extra parameter ``gain``
of shape ``(out_channels,)`` initialised to 1.

The standardized weight is produced by one method, :meth:`WSMixin.standardized_weight`: computed by the layer, or
looked up in a cache that a model-level pass (:mod:`torchws.fast`) fills for the length of one forward
(:mod:`torchws.layers.weight_cache`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchws.functional import rows_to_weight, weight_standardize, weight_standardize_transposed, weight_to_rows
from torchws.layers import weight_cache
from torchws.presets import DEFAULT_PRESET, Preset, get_preset

__all__ = [
    "WSMixin",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "WSConvTranspose1d",
    "WSConvTranspose2d",
    "WSConvTranspose3d",
    "WSLinear",
    "WS_LAYER_FOR",
]


def _check_factory_dtype(cls_name: str, kwargs: dict) -> None:
    dtype = kwargs.get("dtype")
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"{cls_name}: weight standardization needs a floating dtype, got dtype={dtype}")


class WSMixin:
    """Shared machinery of all WS layers. ``isinstance(m, WSMixin)`` finds them."""

    ws_transposed: bool = False
    weight: Tensor

    def _ws_setup(self, preset: str | Preset, eps: float | None, gain: bool | None, shift: bool = False) -> None:
        name = type(self).__name__
        p = get_preset(preset)
        if eps is not None and not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"{name}: eps must be a positive finite number, got {eps!r}")
        if not self.weight.is_floating_point():
            raise TypeError(f"{name}: weight standardization needs a floating weight, got dtype {self.weight.dtype}")
        if self.ws_fan_in < 2:
            raise ValueError(
                f"{name}: fan-in per output channel is {self.ws_fan_in} (weight shape {tuple(self.weight.shape)}); "
                "there is nothing to standardize, use the plain torch.nn layer"
            )
        self.ws_preset: Preset = p
        self.ws_eps: float = p.eps if eps is None else float(eps)
        use_gain = p.learnable_gain if gain is None else bool(gain)
        if use_gain:
            w = self.weight
            self.gain = nn.Parameter(torch.ones(self.ws_out_channels, device=w.device, dtype=w.dtype))
        else:
            self.register_parameter("gain", None)
        if shift:
            w = self.weight
            self.shift = nn.Parameter(torch.zeros(self.ws_out_channels, device=w.device, dtype=w.dtype))
        else:
            self.register_parameter("shift", None)

    # --- geometry -------------------------------------------------------------------------------------------------
    @property
    def ws_groups(self) -> int:
        return getattr(self, "groups", 1)

    @property
    def ws_out_channels(self) -> int:
        if self.ws_transposed:
            return self.weight.shape[1] * self.ws_groups
        return self.weight.shape[0]

    @property
    def ws_fan_in(self) -> int:
        w = self.weight
        if self.ws_transposed:
            return w.shape[0] // self.ws_groups * math.prod(w.shape[2:])
        return math.prod(w.shape[1:])

    def ws_rows(self) -> Tensor:
        """The raw weight as rows ``(out_channels, fan_in)``."""
        return weight_to_rows(self.weight, transposed=self.ws_transposed, groups=self.ws_groups)

    def ws_from_rows(self, rows: Tensor) -> Tensor:
        """Rows ``(out_channels, fan_in)`` back to the weight's shape and layout (applies nothing else)."""
        return rows_to_weight(rows, self.weight, transposed=self.ws_transposed, groups=self.ws_groups)

    # --- the standardized weight ----------------------------------------------------------------------------------
    def compute_standardized_weight(self) -> Tensor:
        """Standardize the current weight (per-layer path), gain included."""
        if self.ws_transposed:
            return weight_standardize_transposed(
                self.weight,
                groups=self.ws_groups,
                preset=self.ws_preset,
                eps=self.ws_eps,
                gain=self.gain,
                shift=self.shift,
            )
        return weight_standardize(self.weight, preset=self.ws_preset, eps=self.ws_eps, gain=self.gain, shift=self.shift)

    def standardized_weight(self) -> Tensor:
        """The weight this layer's forward uses: one an active cache holds for it (a model-level pass, gradient
        accumulation; :mod:`torchws.layers.weight_cache`), else computed now."""
        w = weight_cache.lookup(self)
        return self.compute_standardized_weight() if w is None else w

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        if getattr(self, "gain", None) is not None:
            nn.init.ones_(self.gain)
        if getattr(self, "shift", None) is not None:
            nn.init.zeros_(self.shift)

    def extra_repr(self) -> str:
        s = super().extra_repr()  # type: ignore[misc]
        s += f", preset={self.ws_preset.name}"
        if self.ws_eps != self.ws_preset.eps:
            s += f", eps={self.ws_eps:g}"
        if self.gain is not None:
            s += ", gain=True"
        if self.shift is not None:
            s += ", shift=True"
        return s


class _WSConvNd(WSMixin):
    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)  # type: ignore[attr-defined]


class _WSConvTransposeNd(WSMixin):
    ws_transposed = True
    _num_spatial_dims: int
    _functional = None

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            input, output_size, self.stride, self.padding, self.kernel_size, self._num_spatial_dims, self.dilation
        )
        return type(self)._functional(
            input,
            self.standardized_weight(),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )


_CONV_DOC = """Weight-standardized ``nn.{0}``: same arguments, plus keyword-only ``preset`` (numerics, see
:mod:`torchws.presets`), ``eps`` (overrides the preset's), ``gain`` (learnable per-output-channel gain;
default: the preset's) and ``shift`` (learnable per-output-channel weight offset, zero-initialised; the weight used is
``gain * W_hat + shift``)."""

_TRANSPOSED_DOC = (
    "\n\nThe weight layout is ``(in, out/groups, *k)``; each *output* channel is standardized over its own fan-in"
    " (``in/groups * prod(k)`` elements), groups respected."
)


def _make_layer(mixin: type[WSMixin], base: type[nn.Module], doc: str, **class_attrs) -> type[nn.Module]:
    """``class WS<base>(mixin, base)`` taking base's arguments plus keyword-only preset/eps/gain/shift."""

    def __init__(
        self,
        *args,
        preset: str | Preset = DEFAULT_PRESET,
        eps: float | None = None,
        gain: bool | None = None,
        shift: bool = False,
        **kwargs,
    ) -> None:
        _check_factory_dtype(f"WS{base.__name__}", kwargs)
        base.__init__(self, *args, **kwargs)
        self._ws_setup(preset, eps, gain, shift)

    name = f"WS{base.__name__}"
    attrs = {"__init__": __init__, "__doc__": doc, "__module__": __name__, "__qualname__": name, **class_attrs}
    return type(name, (mixin, base), attrs)


WSConv1d = _make_layer(_WSConvNd, nn.Conv1d, _CONV_DOC.format("Conv1d"))
WSConv2d = _make_layer(_WSConvNd, nn.Conv2d, _CONV_DOC.format("Conv2d"))
WSConv3d = _make_layer(_WSConvNd, nn.Conv3d, _CONV_DOC.format("Conv3d"))
WSConvTranspose1d = _make_layer(
    _WSConvTransposeNd,
    nn.ConvTranspose1d,
    _CONV_DOC.format("ConvTranspose1d") + _TRANSPOSED_DOC,
    _num_spatial_dims=1,
    _functional=staticmethod(F.conv_transpose1d),
)
WSConvTranspose2d = _make_layer(
    _WSConvTransposeNd,
    nn.ConvTranspose2d,
    _CONV_DOC.format("ConvTranspose2d") + _TRANSPOSED_DOC,
    _num_spatial_dims=2,
    _functional=staticmethod(F.conv_transpose2d),
)
WSConvTranspose3d = _make_layer(
    _WSConvTransposeNd,
    nn.ConvTranspose3d,
    _CONV_DOC.format("ConvTranspose3d") + _TRANSPOSED_DOC,
    _num_spatial_dims=3,
    _functional=staticmethod(F.conv_transpose3d),
)


class WSLinear(WSMixin, nn.Linear):
    """Weight-standardized ``nn.Linear``: each output unit's weights standardized over ``in_features``.

    Note: the paper keeps the classifier a plain Linear; WS on a classifier with few inputs can hurt.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        preset: str | Preset = DEFAULT_PRESET,
        eps: float | None = None,
        gain: bool | None = None,
        shift: bool = False,
        **kwargs,
    ) -> None:
        _check_factory_dtype("WSLinear", kwargs)
        super().__init__(in_features, out_features, bias, **kwargs)
        self._ws_setup(preset, eps, gain, shift)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.standardized_weight(), self.bias)


WS_LAYER_FOR: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: WSConv1d,
    nn.Conv2d: WSConv2d,
    nn.Conv3d: WSConv3d,
    nn.ConvTranspose1d: WSConvTranspose1d,
    nn.ConvTranspose2d: WSConvTranspose2d,
    nn.ConvTranspose3d: WSConvTranspose3d,
    nn.Linear: WSLinear,
}
