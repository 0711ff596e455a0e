"""The engines of the model-level WS pass, and :func:`select_engine`, the one place that chooses among them.

An engine is built from a :class:`~torchws.fast.plan.Plan` and called once per forward; it returns every planned
layer's standardized weight (gain and shift applied), differentiable in the layer's parameters::

    class Engine(Protocol):
        name: str
        def __init__(self, plan: Plan) -> None: ...
        def __call__(self) -> dict[WSMixin, Tensor]: ...

=============  =====================================================================================================
``torch``      grouped torch ops (:mod:`.torch`); any device; concatenates groups on GPUs
``numba``      compiled multi-tensor kernels, one call forward and one backward (:mod:`.numba`); CPU; needs numba
``cuda_graph`` the torch engine replayed from two CUDA graphs (:mod:`.cuda_graph`); CUDA
``auto``       see :func:`auto_engine`
=============  =====================================================================================================

Asking by name for an engine that cannot run on the plan raises ``ValueError`` (or ``RuntimeError`` for a missing or
broken numba) here, when the pass is enabled or re-planned; nothing runs another engine in its place.
"""

from __future__ import annotations

import warnings

from torchws.fast.engines.cuda_graph import CudaGraphEngine
from torchws.fast.engines.numba import NumbaEngine, numba_status
from torchws.fast.engines.torch import TorchEngine
from torchws.fast.plan import Plan

__all__ = ["ENGINES", "AUTO_NUMBA_MAX_ELEMENTS", "auto_engine", "select_engine"]

ENGINES = ("auto", "torch", "numba", "cuda_graph")

# auto runs the numba engine on CPU models of at most this many WS weight elements; above it, torch's own ops
# measured as fast when the kernels ran on one thread (benchmarks/RESULTS.md, CPU; not measured again since the
# kernels split their rows over numba's threads)
AUTO_NUMBA_MAX_ELEMENTS = 1 << 21


def auto_engine(plan: Plan) -> str:
    """What ``"auto"`` runs (the table in README, section Speed):

    * every WS weight on the CPU, at most :data:`AUTO_NUMBA_MAX_ELEMENTS` elements, numba importable: ``numba``;
    * every WS weight on one CUDA device, requiring grad, one dtype: ``cuda_graph``;
    * otherwise (mixed devices, frozen weights on CUDA, large CPU models, no numba): ``torch``.

    A numba that is installed but fails to import is reported with a warning, and ``torch`` runs."""
    tensors = plan.tensors()
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return "torch"
    device = next(iter(devices))
    if device.type == "cpu":
        if sum(m.weight.numel() for m in plan.layers) > AUTO_NUMBA_MAX_ELEMENTS:
            return "torch"
        status = numba_status()
        if status is not None and "broken" in status:
            warnings.warn(f"torchws: numba is {status}; the WS pass runs the torch engine", stacklevel=3)
        return "numba" if status is None else "torch"
    if device.type == "cuda" and all(t.requires_grad for t in tensors) and len({t.dtype for t in tensors}) == 1:
        return "cuda_graph"
    return "torch"


def select_engine(name: str, plan: Plan):
    """The engine called ``name`` (one of :data:`ENGINES`) built for ``plan``; raises where it cannot run."""
    if name not in ENGINES:
        raise ValueError(f"WS pass: backend must be one of {ENGINES}, got {name!r}")
    if not plan.layers:
        return TorchEngine(plan)
    chosen = auto_engine(plan) if name == "auto" else name
    if chosen == "numba":
        status = numba_status()
        if status is not None:
            raise RuntimeError(f"WS pass: backend='numba' needs numba, which is {status}; use backend='torch'")
        gpu = [type(m).__name__ for m in plan.layers if m.weight.device.type != "cpu"]
        if gpu:
            raise ValueError(f"WS pass: backend='numba' runs on the CPU, but {len(gpu)} WS weight(s) are not on "
                             f"the CPU (first: {gpu[0]}); use backend='torch' or 'cuda_graph'")  # fmt: skip
        return NumbaEngine(plan)
    if chosen == "cuda_graph":
        tensors = plan.tensors()
        bad = next((t for t in tensors if not (t.is_cuda and t.requires_grad)), None)
        if bad is not None or len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
            what = "on one CUDA device, requiring grad, of one dtype"
            found = f"found one on {bad.device} with requires_grad={bad.requires_grad}" if bad is not None else ""
            raise ValueError(f"WS pass: backend='cuda_graph' needs every WS weight, gain and shift {what}; "
                             f"{found or 'found several devices or dtypes'}; use backend='torch'")  # fmt: skip
        return CudaGraphEngine(plan)
    return TorchEngine(plan)
