"""Fused kernels: Weight Standardization of all weights of a model in one launch (forward) and one (backward).

Triton is optional: this package imports it only when a kernel is used. Check :func:`is_available` first.
On CPU the Triton kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (slow; meant for tests). The CPU's
own multi-tensor kernels (numba, optional too) are :mod:`torchws.kernels.cpu_ws`; CUDA-graph replay of the torch
pass is :mod:`torchws.kernels.cuda_graph`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from torchws.kernels.packing import PackingPlan, build_plan, clear_plan_cache, get_plan

__all__ = ["is_available", "multi_standardize", "PackingPlan", "build_plan", "get_plan", "clear_plan_cache"]


def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. missing compiler pieces) counts as unavailable
        return False
    return True


def _interpreter_ready() -> bool:
    """Whether triton was imported with ``TRITON_INTERPRET=1``.

    Triton decides at import whether its own library functions (``tl.zeros``, ``tl.sum``, ...) are compiled or
    interpreted; imported without the variable they cannot run in the interpreter, whatever is set later.
    """
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    return not any(isinstance(v, JITFunction) for v in vars(standard).values())


def is_available(device: torch.device | str | None = None) -> bool:
    """Whether :func:`multi_standardize` can run on ``device`` (default: current CUDA device).

    True for CUDA devices when triton imports, and for CPU when ``TRITON_INTERPRET=1`` was set before triton was
    first imported in this process.
    """
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda":
        return torch.cuda.is_available() and _triton_importable()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable() and _interpreter_ready()
    return False


def multi_standardize(
    weights: Sequence[Tensor], *, mode: str, eps: float, gains: Sequence[Tensor | None] | None = None,
    variance: str | None = None, block: int | None = None,
) -> list[Tensor]:  # fmt: skip
    """Standardize every row of every weight in one Triton launch (forward) and one (backward).

    Arguments and returns: see :func:`torchws.kernels.triton_ws.multi_standardize`.

    Raises:
        RuntimeError: the kernels cannot run on the weights' device (see :func:`is_available`).
    """
    if len(weights) and not is_available(weights[0].device):
        raise RuntimeError(
            f"multi_standardize: no Triton kernel for device {weights[0].device}; needs CUDA with triton installed "
            "(pip install 'torchws[triton]'), or CPU with TRITON_INTERPRET=1 set before triton is imported; "
            "use torchws.functional otherwise"
        )
    from torchws.kernels.triton_ws import multi_standardize as _impl

    return _impl(weights, mode=mode, eps=eps, gains=gains, variance=variance, block=block)
