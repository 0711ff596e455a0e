"""Reference WS conv layers written for the benchmark, in the style of the peers (the authors' pytorch-classification
``models/layers.py`` and timm's ``timm/layers/std_conv.py``).

- :class:`AuthorsWSConv2d`: the authors' released layer: mean over (1, 2, 3), unbiased ``std`` of ``w.view(O, -1)``,
  eps 1e-5 added to the std. ``.view`` raises on a channels_last weight, as in the original.
- :class:`TimmStdConv2d`: timm's ``StdConv2d``: one ``F.batch_norm`` over ``w.reshape(1, O, -1)``, eps 1e-6.

:func:`swap_convs` turns every ``nn.Conv2d`` of a model into another conv class with the same arguments and weights,
so every benchmark variant starts from the same network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


class AuthorsWSConv2d(nn.Conv2d):
    """Conv2d with the authors' WS: ``(w - mean) / (std_unbiased + 1e-5)`` computed with ``.view``."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        mean = w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        w = w - mean
        std = w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return self._conv_forward(x, w / std.expand_as(w), self.bias)


class TimmStdConv2d(nn.Conv2d):
    """Conv2d with timm-style WS: population variance, eps 1e-6 inside the root, one fused batch_norm."""

    eps = 1e-6

    def forward(self, x: Tensor) -> Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return self._conv_forward(x, w, self.bias)


def _twin(conv: nn.Conv2d, cls: Callable[..., nn.Conv2d]) -> nn.Conv2d:
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )  # fmt: skip
    new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    new.load_state_dict(conv.state_dict(), strict=False)  # WS layers may add a gain; the rest matches
    return new


def swap_convs(model: nn.Module, cls: Callable[..., nn.Conv2d]) -> nn.Module:
    """Replace every exact ``nn.Conv2d`` in ``model`` (in place) by ``cls`` with the same arguments and weights."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Conv2d:
            setattr(model, name, _twin(child, cls))
        else:
            swap_convs(child, cls)
    return model
