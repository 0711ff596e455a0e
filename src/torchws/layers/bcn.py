"""Batch-Channel Normalization (Qiao et al., arXiv 1911.09738).

BCN = per-channel batch normalization (affine, running statistics) -> group normalization without affine ->
per-group affine. The group affine has shape ``(1, G, 1)`` and is applied on the ``(N, G, C/G * H * W)`` view, as in
the authors' ``BCNorm``.

Two modes for the batch part:

* standard (``estimate=False``): ``self.bn`` is an ``nn.BatchNorm2d`` and runs as one (batch statistics in train,
  running statistics in eval, running stats updated with ``momentum`` and the unbiased batch variance).
* estimated (``estimate=True``, the authors' ``EstBN`` for micro-batches): the batch part *always* normalizes with
  the running (estimated) statistics. In train mode, before normalizing, they are updated under ``no_grad``::

      mean_b  = mean over (N, H, W) of x
      msq_b   = mean over (N, H, W) of (x - running_mean_old) ** 2     # second moment about the *old* estimate
      running_mean = (1 - r) * running_mean + r * mean_b
      running_var  = (1 - r) * running_var  + r * msq_b

  with ``r = estimate_rate``; the output then uses the updated statistics (no gradient flows through them). In eval
  mode nothing is updated. See docs/bcn.md for the table of modes and the deviations from the authors' code.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BatchChannelNorm2d"]


class BatchChannelNorm2d(nn.Module):
    """Batch-Channel Normalization for ``(N, C, H, W)`` inputs.

    Args:
        num_channels: C.
        num_groups: G, must divide C.
        eps: used by the batch part and the group part.
        momentum: running-statistics momentum of the standard batch part (``None``: cumulative average), as in
            ``nn.BatchNorm2d``.
        estimate: use estimated statistics in the batch part (micro-batch mode). A plain attribute: it may be
            switched after construction (e.g. on a model made by ``torchws.convert(..., norm="bcn")``).
        estimate_rate: rate ``r`` at which the estimated statistics move towards each training batch's
            statistics (the authors' ``estbn_moving_speed``); only used when ``estimate`` is true.
        affine: learnable affine in both parts (``bn.weight/bias`` of shape ``(C,)``, ``weight/bias`` of shape
            ``(1, G, 1)``).
        device, dtype: factory arguments.

    Parameters and buffers: ``bn.weight``, ``bn.bias``, ``bn.running_mean``, ``bn.running_var``,
    ``bn.num_batches_tracked`` (an inner ``nn.BatchNorm2d``, so a BatchNorm2d ``state_dict`` loads into ``bn``),
    ``weight``, ``bias``. The batch part follows ``self.bn.training``, so code that freezes every ``nn.BatchNorm2d``
    with ``.eval()`` freezes this one too.
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        *,
        estimate: bool = False,
        estimate_rate: float = 0.01,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_groups <= 0 or num_channels <= 0 or num_channels % num_groups:
            raise ValueError(
                f"BatchChannelNorm2d: num_channels={num_channels} is not divisible by num_groups={num_groups}; "
                f"pick num_groups among the divisors of {num_channels}"
            )
        if not 0.0 <= estimate_rate <= 1.0:
            raise ValueError(f"BatchChannelNorm2d: estimate_rate must be in [0, 1], got {estimate_rate!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = float(eps)
        self.estimate = bool(estimate)
        self.estimate_rate = float(estimate_rate)
        self.bn = nn.BatchNorm2d(num_channels, eps=eps, momentum=momentum, affine=affine, **factory)
        if affine:
            self.weight = nn.Parameter(torch.ones(1, num_groups, 1, **factory))
            self.bias = nn.Parameter(torch.zeros(1, num_groups, 1, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        self.bn.reset_parameters()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _estimated_batch_norm(self, input: Tensor) -> Tensor:
        bn = self.bn
        running_mean, running_var = bn.running_mean, bn.running_var
        assert running_mean is not None and running_var is not None
        if bn.training:
            r = self.estimate_rate
            with torch.no_grad():
                x = input.detach().to(running_mean.dtype)  # (N, C, H, W); stats in the buffers' dtype
                batch_mean = x.mean(dim=[0, 2, 3])
                # second moment about the estimate *before* this update, as the authors' EstBN does
                second_moment = (x - running_mean.view(1, -1, 1, 1)).square().mean(dim=[0, 2, 3])
                running_mean.mul_(1.0 - r).add_(batch_mean, alpha=r)
                running_var.mul_(1.0 - r).add_(second_moment, alpha=r)
                if bn.num_batches_tracked is not None:
                    bn.num_batches_tracked.add_(1)
        # clones: batch_norm saves the statistics for backward, and the next training forward updates them in place
        mean, var = running_mean.clone(), running_var.clone()
        return F.batch_norm(input, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 4:
            raise ValueError(
                "BatchChannelNorm2d: expected a 4-D input (N, C, H, W), got shape " + str(list(input.shape))
            )
        out = self._estimated_batch_norm(input) if self.estimate else self.bn(input)
        out = F.group_norm(out, self.num_groups, None, None, self.eps)
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None:
            n = input.shape[0]
            # (N, G, C/G * H * W) view, per-group affine of shape (1, G, 1)
            out = (out.reshape(n, self.num_groups, -1) * weight + bias).reshape(input.shape)
        return out

    def extra_repr(self) -> str:
        s = f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps:g}, affine={self.weight is not None}"
        if self.estimate:
            s += f", estimate=True, estimate_rate={self.estimate_rate:g}"
        return s
