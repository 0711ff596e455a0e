"""The batched pass's kernel backends and how ``"auto"`` chooses: the Triton multi-tensor kernel (GPUs) and the
numba multi-tensor kernels (CPUs).

Part of :mod:`torchws.batched` (see its docstring); split out to keep modules small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from torchws._plan import _Group, _make_groups, _standardize_group_torch
from torchws.layers.ws import WSMixin


# --- triton backend ---------------------------------------------------------------------------------------------
def _triton_module():
    try:
        import torchws.kernels as kernels  # light: imports triton only when a kernel runs
    except ImportError:
        return None
    return kernels


def _standardize_groups_triton(groups: Sequence[_Group], kernel) -> dict[WSMixin, Tensor]:
    """All groups sharing (preset, eps, dtype, device) go to one multi-tensor launch."""
    out: dict[WSMixin, Tensor] = {}
    launches: dict[tuple, list[tuple[WSMixin, bool]]] = {}
    for g in groups:
        w = g.layers[0].weight
        for layer in g.layers:
            launches.setdefault((g.preset, g.eps, w.dtype, w.device), []).append((layer, g.shift))
    for (preset, eps, _, _), members in launches.items():
        rows = [layer.ws_rows() for layer, _ in members]  # (O_i, n_i) views where the layout allows
        gains = [layer.gain for layer, _ in members]
        ys = kernel.multi_standardize(
            rows, mode=preset.eps_placement, eps=eps, variance=preset.variance,
            gains=None if all(g is None for g in gains) else gains,
        )  # fmt: skip
        for (layer, shift), y in zip(members, ys):
            if shift:
                y = y + layer.shift.unsqueeze(1).to(y.dtype)
            out[layer] = layer.ws_from_rows(y)
    return out


# --- numba backend (CPU) ----------------------------------------------------------------------------------------
def _cpu_kernels():
    """torchws.kernels.cpu_ws if numba is installed, else None."""
    from torchws.kernels import cpu_ws

    return cpu_ws if cpu_ws.is_available() else None


def _numba_kernels():
    kernel = _cpu_kernels()
    if kernel is None:
        raise RuntimeError("batched WS: backend='numba' needs numba: pip install 'torchws[cpu]', or use 'auto'")
    return kernel


@dataclass(eq=False)
class _NumbaPlan:
    """What the CPU kernels compute: one launch (layers, their weights, the kernel's spec) per (preset, eps, dtype),
    and the groups left to the torch path (gains, shifts, transposed convs, layouts without dense rows)."""

    launches: list[tuple[tuple[WSMixin, ...], tuple[Tensor, ...], tuple]]
    rest: list[_Group]


def _numba_plan(groups: Sequence[_Group], kernel) -> _NumbaPlan:
    buckets: dict[tuple, list[WSMixin]] = {}
    rest = []
    for g in groups:
        for m in g.layers:
            if g.gain or g.shift or m.ws_transposed or not kernel.qualifies(m.weight):
                rest.append(m)
            else:
                buckets.setdefault((g.preset, g.eps, m.weight.dtype), []).append(m)
    launches = []
    for (preset, eps, _), layers in buckets.items():
        weights = tuple(m.weight for m in layers)
        launches.append((tuple(layers), weights, kernel.make_spec(weights, preset.eps_placement, eps, preset.variance)))
    return _NumbaPlan(launches, _make_groups(rest))


def _run_numba_plan(plan: _NumbaPlan, kernel, concat: bool | None) -> dict[WSMixin, Tensor]:
    out: dict[WSMixin, Tensor] = {}
    for layers, weights, spec in plan.launches:
        out.update(zip(layers, kernel.apply_spec(spec, weights)))
    for g in plan.rest:
        cat = g.layers[0].weight.device.type != "cpu" if concat is None else concat
        out.update(zip(g.layers, _standardize_group_torch(g, cat)))
    return out


# "auto" runs the numba kernels on a CPU up to this many weight elements; above it torch's layer_norm, which uses
# torch's own threads. Measured on 2 cores: CIFAR ResNet-20 (270k elements) steps 1.05-1.09x GN with the kernels vs
# 1.07-1.11x with torch; CIFAR ResNet-18 (11.2M) 1.30x / 1.22x / 1.05x (batch 1 / 2 / 32) vs 1.29x / 1.19x / 1.005x.
# Where between the two the crossover lies was not measured.
AUTO_NUMBA_MAX_ELEMENTS = 1 << 21


def _kernel_function_unusable() -> bool:
    """Where the numba kernels' autograd Function cannot go and torch ops can: torch.func transforms and forward-mode
    AD (it has no vmap rule and no jvp), torch.jit.trace (a Python Function in a trace can be neither saved nor
    exported)."""
    return (
        torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0
        or torch.jit.is_tracing()
    )


def _resolve_backend(backend: str, groups: Sequence[_Group] = ()) -> str:
    """What runs: "triton" and "numba" as asked (torch while torch.compile traces: the compiler fuses torch ops);
    "auto" is "numba" for a CPU model of at most :data:`AUTO_NUMBA_MAX_ELEMENTS` WS weight elements when numba is
    installed (CIFAR ResNet-20, 2 threads: WS forward + backward ~0.45 ms against ~0.75 ms for torch's layer_norm,
    benchmarks/RESULTS.md), else "torch": on an H200 the torch pass beat the Triton multi-tensor kernel in every
    measured configuration (host cost of launch and packing)."""
    if torch.compiler.is_compiling():
        return "torch"
    if backend in ("auto", "numba") and _kernel_function_unusable():
        return "torch"
    if backend == "auto":
        on_cpu = bool(groups) and groups[0].layers[0].weight.device.type == "cpu"
        small = sum(g.numel for g in groups) <= AUTO_NUMBA_MAX_ELEMENTS
        return "numba" if on_cpu and small and _cpu_kernels() is not None else "torch"
    return backend if backend in ("triton", "numba") else "torch"
