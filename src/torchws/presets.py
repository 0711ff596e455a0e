"""Numerics presets: which variance estimator, which eps and where it goes, for each peer implementation.

Each preset reproduces one published implementation exactly. With ``mean``/``var`` taken over a filter's fan-in
``n`` (every weight element feeding one output channel):

============  ==========  =======  =======================================  ===================================
preset        variance    eps      formula                                  whose
============  ==========  =======  =======================================  ===================================
``paper``     population  1e-5     (W - mean) / sqrt(var + eps)             the paper's definition (default)
``official``  unbiased    1e-5     (W - mean) / (std + eps)                 the authors' released code, mmcv
                                                                            ``ConvWS2d``
``bcn``       unbiased    1e-5     (W - mean) / sqrt(var + eps)             the Batch-Channel-Normalization
                                                                            repo's ImageNet conv
``timm``      population  1e-6     (W - mean) / sqrt(var + eps)             timm ``StdConv2d`` (its default eps)
``bit``       population  1e-10    (W - mean) / sqrt(var + eps)             BiT (big_transfer)
``nf``        population  1e-4     g * (W - mean) / sqrt(max(n*var, eps))   NFNets scaled WS, learnable gain
============  ==========  =======  =======================================  ===================================

timm builds some families with another eps than ``StdConv2d``'s default 1e-6: its BiT ResNetV2 and ViT-hybrid
models pass ``eps=1e-8``. Match those with ``preset="timm", eps=1e-8`` (see README, Numerics presets).

Every preset gives finite outputs and gradients for a constant filter (variance 0). For ``official`` the gradient
follows ``torch.std``'s backward, which is 0 at std 0, as in the authors' ``.std()`` and mmcv: at a constant
filter ``dL/dW = (g - mean(g)) / eps`` per filter, the gradient of ``(W - mean) / eps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Variance = Literal["population", "unbiased"]
EpsPlacement = Literal["inside_sqrt", "added_to_std", "clamp_fan_in_var"]


@dataclass(frozen=True)
class Preset:
    """One WS numerics recipe.

    Attributes:
        name: registry name.
        variance: ``"population"`` (divide by n) or ``"unbiased"`` (divide by n - 1).
        eps: the stabiliser.
        eps_placement: ``"inside_sqrt"``: rstd = 1 / sqrt(var + eps); ``"added_to_std"``: rstd = 1 / (sqrt(var) + eps);
            ``"clamp_fan_in_var"``: rstd = 1 / sqrt(max(n * var, eps)) (unit *sum* of squares, NFNets).
        learnable_gain: whether layers built with this preset get a per-output-channel gain by default.
    """

    name: str
    variance: Variance
    eps: float
    eps_placement: EpsPlacement
    learnable_gain: bool = False

    @property
    def unbiased(self) -> bool:
        return self.variance == "unbiased"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("paper", "population", 1e-5, "inside_sqrt"),
        Preset("official", "unbiased", 1e-5, "added_to_std"),
        Preset("bcn", "unbiased", 1e-5, "inside_sqrt"),
        Preset("timm", "population", 1e-6, "inside_sqrt"),
        Preset("bit", "population", 1e-10, "inside_sqrt"),
        Preset("nf", "population", 1e-4, "clamp_fan_in_var", learnable_gain=True),
    )
}

DEFAULT_PRESET = "paper"


def get_preset(preset: str | Preset) -> Preset:
    """Return the :class:`Preset` named ``preset`` (a Preset passes through).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise ValueError(f"unknown WS preset {preset!r}; valid presets: {', '.join(PRESETS)}") from None
