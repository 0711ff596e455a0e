"""torchws: Weight Standardization for PyTorch.

Weight Standardization (Qiao et al., arXiv 1903.10520) standardizes each output filter of a conv or linear layer
to zero mean and unit variance over its fan-in before it is used.
"""

from torchws.functional import standardize_rows, weight_standardize, weight_standardize_transposed
from torchws.layers import (
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSConvTranspose1d,
    WSConvTranspose2d,
    WSConvTranspose3d,
    WSLinear,
    WSMixin,
)
from torchws.presets import PRESETS, Preset, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "Preset",
    "get_preset",
    "standardize_rows",
    "weight_standardize",
    "weight_standardize_transposed",
    "WSMixin",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "WSConvTranspose1d",
    "WSConvTranspose2d",
    "WSConvTranspose3d",
    "WSLinear",
]
