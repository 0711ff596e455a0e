"""The deferred WS engines (:mod:`torchws._deferred`): numba kernels (CPU), the batched torch pass captured as CUDA
graphs, and the Triton multi-tensor kernels captured the same way. Each fills the leaves' buffers in ``_compute`` and
turns the leaves' gradients into the inputs' in ``_backward``; :func:`build` picks one for a plan.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from torchws._deferred import DeferredWS
from torchws._plan import _Group
from torchws.kernels.cpu_ws import _dense_rows
from torchws.kernels.cuda_graph import _contiguous_likes, copy_grads_into
from torchws.layers.ws import WSMixin

__all__ = ["build"]


class _NumbaDeferred(DeferredWS):
    """CPU: the numba multi-tensor kernels, one call per (preset, eps, dtype) each way."""

    def __init__(self, launches: list, rest: Sequence[_Group], kernel) -> None:
        self._kernel = kernel
        layers = [m for ls, _, _ in launches for m in ls]
        weights = [w for _, ws, _ in launches for w in ws]
        super().__init__(layers, weights, [torch.empty_like(w) for w in weights], rest)
        self._launches = []
        start = 0
        for ls, ws, spec in launches:
            part = slice(start, start + len(ls))
            start = part.stop
            r, k = np.empty(spec.num_rows), np.empty(spec.num_rows)
            self._launches.append((part, tuple(ws), spec, kernel.pointers(self._buffers[part]), r, k))

    def _compute(self) -> None:
        kernel = self._kernel
        for _, ws, spec, ys, r, k in self._launches:
            kernel.standardize_into(spec, kernel.pointers(ws), ys, r, k)  # weights' pointers: `.data = ...` moves them

    def _backward(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for part, _, spec, ys, r, k in self._launches:
            out += self._kernel.weight_grads(spec, grads[part], self._buffers[part], r, k, ys)
        return out


class _GraphDeferred(DeferredWS):
    """CUDA: the torch pass captured as a forward and a backward CUDA graph (one replay each way)."""

    def __init__(self, layers: Sequence[WSMixin], groups: Sequence[_Group], inputs: Sequence[Tensor]) -> None:
        from torchws.batched import _parameters_swapped, batched_standardize
        from torchws.kernels.cuda_graph import GraphedPass

        def run(tensors: list[Tensor]) -> list[Tensor]:
            with _parameters_swapped(layers, tensors):
                out = batched_standardize(groups, "torch", concat=True)
            return [out[m] for m in layers]

        with torch.enable_grad():
            self._graph = GraphedPass(run, inputs)
        super().__init__(layers, inputs, self._graph.static_outputs)
        self._captured_pointers = [t.data_ptr() for t in self.inputs]

    def usable(self) -> bool:
        # identity, shapes, strides and dtypes are the batched pass's plan check; storage moves (``.to()``,
        # ``.data =``) are seen here (the full graph_signature per step costs ~50 us of host time on ResNet-50)
        return super().usable() and [t.data_ptr() for t in self.inputs] == self._captured_pointers

    def _compute(self) -> None:
        self._graph.forward_graph.replay()

    def _backward(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        # per input (weights, then gains and shifts); a layer without a gradient gives zeros, not None, here
        return list(self._graph.replay_backward(grads))


class _TritonDeferred(DeferredWS):
    """GPUs: the Triton multi-tensor kernels over flat buffers allocated once. Forward: one multi-tensor copy of all
    weights into the flat input, one kernel launch per (preset, eps, dtype) writing the leaves' flat buffer.
    Backward: one multi-tensor copy of the leaves' gradients into a flat buffer, one launch per (preset, eps, dtype),
    one copy out (the parameters' ``.grad`` never alias the engine's buffers). On CUDA both halves are captured
    once as CUDA graphs, so a step replays two graphs instead of launching kernels from Python. Every weight keeps
    its memory layout: its rows are read in memory order (a row's statistics do not depend on the order), so a
    channels_last weight's leaf and gradient are channels_last too."""

    def __init__(self, buckets: dict[tuple, list[WSMixin]], rest: Sequence[_Group]) -> None:
        from torchws.kernels import packing, triton_ws

        self._kernel = triton_ws
        layers = [m for members in buckets.values() for m in members]
        weights = [m.weight for m in layers]
        dtype, device = weights[0].dtype, weights[0].device
        total = sum(w.numel() for w in weights)
        self._x, self._y, self._g = (torch.empty(total, dtype=dtype, device=device) for _ in range(3))
        starts = [0, *itertools.accumulate(w.numel() for w in weights)][:-1]
        self._layout = [(w.shape, w.stride(), start) for w, start in zip(weights, starts)]
        self._likes = _contiguous_likes([(shape, stride) for shape, stride, _ in self._layout])
        self._x_views, y_views, self._g_views = (
            [flat.as_strided(*where) for where in self._layout] for flat in (self._x, self._y, self._g)
        )
        self._launches = []  # (slice of the flat buffers, plan, stats, kernel config) per (preset, eps, dtype)
        start = 0
        for (preset, eps, _), members in buckets.items():
            plan = packing.build_plan([m.weight.shape for m in members], dtype, device)
            part = slice(start, start + plan.total)
            start = part.stop
            stats = torch.empty(3, plan.num_rows, dtype=torch.float32, device=device)
            config = dict(mode=preset.eps_placement, eps=float(eps), unbiased=preset.variance == "unbiased")
            self._launches.append((part, plan, stats, config))
        super().__init__(layers, weights, y_views, rest)
        self._graphs: tuple | None = None
        self.capture_error: str | None = None  # why the kernels run uncaptured on CUDA, if they do
        if device.type == "cuda":
            try:
                self._capture()
            except Exception as e:  # (triton's own errors are not RuntimeErrors) the kernels still run, uncaptured
                self._graphs = None
                self.capture_error = _capture_failed(e, "the Triton kernels", "launching them from Python (slower)")
            self._captured_pointers = [t.data_ptr() for t in self.inputs]

    def _forward_work(self) -> None:
        torch._foreach_copy_(self._x_views, self.inputs)
        for part, plan, stats, config in self._launches:
            self._kernel.standardize_packed_into(self._x[part], self._y[part], stats, plan, **config)

    def _backward_work(self, dx: Tensor) -> None:
        for part, plan, stats, _ in self._launches:
            self._kernel.standardize_packed_backward_into(self._x[part], self._g[part], dx[part], stats, plan)

    @torch.no_grad()
    def _capture(self) -> None:
        """Forward and backward as CUDA graphs, warmed up and captured on one side stream (kernels compiled first)."""
        dx = torch.empty_like(self._x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward_work()
                self._backward_work(dx)
        torch.cuda.current_stream().wait_stream(side)
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, stream=side):
            self._forward_work()
        with torch.cuda.graph(backward, stream=side):
            self._backward_work(dx)
        self._graphs = (forward, backward, dx)

    def usable(self) -> bool:
        # captured graphs read the weights where they were: a moved storage (``.to()``, ``.data =``) re-captures
        return super().usable() and (
            self._graphs is None or [t.data_ptr() for t in self.inputs] == self._captured_pointers
        )

    def _compute(self) -> None:
        if self._graphs is not None:
            self._graphs[0].replay()
        else:
            self._forward_work()

    def _backward(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        copy_grads_into(self._g_views, grads)
        if self._graphs is not None:
            self._graphs[1].replay()
            dx = self._graphs[2].clone()  # fresh: its views become the parameters' .grad
        else:
            dx = torch.empty_like(self._x)
            self._backward_work(dx)
        if self._likes is not None:  # (one C++ call instead of a Python as_strided per weight)
            views = torch._utils._unflatten_dense_tensors(dx, self._likes)
            return [None if grad is None else v for grad, v in zip(grads, views)]
        return [None if grad is None else dx.as_strided(*where) for grad, where in zip(grads, self._layout)]


def _capture_failed(error: Exception, what: str, instead: str) -> str:
    """After a failed CUDA-graph capture: let the device settle, warn once in a line, return the reason."""
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    warnings.warn(f"torchws deferred WS: capturing {what} as CUDA graphs failed ({reason}); {instead} instead",
                  RuntimeWarning, stacklevel=3)  # fmt: skip
    return reason


def _triton_buckets(layers: Sequence[WSMixin]) -> tuple[dict[tuple, list[WSMixin]], list[WSMixin]]:
    """Layers the Triton engine takes, by (preset, eps), and the rest (also layers of a dtype other than the first
    taken layer's: the engine's flat buffers have one dtype)."""
    buckets: dict[tuple, list[WSMixin]] = {}
    rest = []
    dtype = None
    for m in layers:
        w = m.weight
        fits = (
            w.dtype == (dtype or w.dtype)
            and m.gain is None
            and m.shift is None
            and not m.ws_transposed
            and w.requires_grad
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and m.ws_fan_in >= 2
            and _dense_rows(w)
        )
        if fits:
            dtype = w.dtype
            buckets.setdefault((m.ws_preset, m.ws_eps, w.dtype), []).append(m)
        else:
            rest.append(m)
    return buckets, rest


def build(layers: Sequence[WSMixin], groups: Sequence[_Group], engine: str = "auto") -> DeferredWS | None:
    """The deferred engine for ``layers`` (the batched pass's plan), or None where none applies.

    ``engine``: "numba" (CPU kernels), "triton" (multi-tensor kernels: CUDA, or CPU under ``TRITON_INTERPRET=1``),
    "graph" (the torch pass captured as CUDA graphs; every layer, all inputs of one dtype needing gradients) or
    "auto": numba on a CPU, graph on CUDA (H200, ResNet-50 steps: within a point of triton in fp32, 3-5 points
    ahead in bf16 + channels_last; bit-identical to per layer). The kernel engines take layers without gain, shift or
    transposition whose weight needs a gradient; the rest stay on the autograd pass.
    """
    from torchws._backends import _cpu_kernels, _make_groups, _numba_plan
    from torchws.kernels import is_available

    if not layers or not all(isinstance(m.weight, torch.nn.Parameter) for m in layers):
        return None  # (plain tensors swapped in, as torch.func.functional_call does: autograd.grad must reach them)
    devices = {m.weight.device for m in layers}
    if len(devices) != 1:  # (a model split over devices: one engine's buffers live on one device)
        return None
    device = devices.pop()
    if engine == "auto":
        engine = "numba" if device.type == "cpu" else "graph"
    if device.type == "cuda":  # streams, graphs and buffers on the weights' device, whatever the current one is
        with torch.cuda.device(device):
            return _build_cuda(layers, groups, engine, device)
    if engine == "numba" and device.type == "cpu" and _cpu_kernels() is not None:
        kernel = _cpu_kernels()
        frozen = [m for m in layers if not m.weight.requires_grad]
        plan = _numba_plan(_make_groups([m for m in layers if m.weight.requires_grad]), kernel)
        if plan.launches:
            return _NumbaDeferred(plan.launches, [*plan.rest, *_make_groups(frozen)], kernel)
    elif engine == "triton" and is_available(device):
        return _build_triton(layers)
    return None


def _build_triton(layers: Sequence[WSMixin]) -> DeferredWS | None:
    from torchws._backends import _make_groups

    buckets, rest = _triton_buckets(layers)
    return _TritonDeferred(buckets, _make_groups(rest)) if buckets else None


def _build_cuda(layers: Sequence[WSMixin], groups: Sequence[_Group], engine: str, device: torch.device):
    from torchws.kernels import is_available

    if engine == "triton" and is_available(device):
        return _build_triton(layers)
    if engine == "graph":
        inputs = [*(m.weight for m in layers), *(t for m in layers for t in (m.gain, m.shift) if t is not None)]
        if all(isinstance(t, torch.nn.Parameter) and t.requires_grad for t in inputs) and len(
            {t.dtype for t in inputs}
        ) == 1:
            try:
                return _GraphDeferred(layers, groups, inputs)
            except Exception as e:  # (out of memory, a capture the driver refuses): the autograd pass still runs
                _capture_failed(e, "the pass", "using the autograd pass")
                return None
    return None
