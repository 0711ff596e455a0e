"""torchws: Weight Standardization for PyTorch.

Weight Standardization (Qiao et al., arXiv 1903.10520) standardizes each output filter of a conv or linear layer
to zero mean and unit variance over its fan-in before it is used.
"""

# note: `torchws.convert` is the function; the module stays importable as `from torchws.convert import ...`
from torchws.convert import ConversionReport, convert, fold
from torchws.functional import standardize_rows, weight_standardize, weight_standardize_transposed
from torchws.layers import (
    BatchChannelNorm2d,
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
    "convert",
    "fold",
    "ConversionReport",
    "BatchChannelNorm2d",
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
