"""WS layers, Batch-Channel Normalization and norm factories."""

from torchws.layers.bcn import BatchChannelNorm2d
from torchws.layers.norms import make_conv_layer, make_norm_layer, small_image_groups
from torchws.layers.ws import (
    WS_LAYER_FOR,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSConvTranspose1d,
    WSConvTranspose2d,
    WSConvTranspose3d,
    WSLinear,
    WSMixin,
)

__all__ = [
    "BatchChannelNorm2d",
    "WSMixin",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "WSConvTranspose1d",
    "WSConvTranspose2d",
    "WSConvTranspose3d",
    "WSLinear",
    "WS_LAYER_FOR",
    "make_conv_layer",
    "make_norm_layer",
    "small_image_groups",
]
