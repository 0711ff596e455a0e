"""The cuda_graph engine: the torch engine's pass captured as two CUDA graphs, one forward and one backward.

At batch 1-2 a ResNet-50 step on a modern GPU is bound by the host: each kernel launch and each autograd node
costs microseconds of Python and C++ while the GPU idles. Standardizing 53 weights is ~10 tiny kernels forward
and as many backward, plus ~100 autograd bookkeeping steps; replaying them as captured graphs turns that into one
launch each way, plus one multi-tensor copy of the incoming gradients and one copy out.

Rules the replay relies on (the same as ``torch.cuda.make_graphed_callables``):
    * the inputs (weights, gains, shifts) keep their storage: optimizers update them in place. A changed tensor
      object, pointer, shape, stride, dtype or ``requires_grad`` is detected and the pass is captured again;
    * the outputs live in graph memory and are overwritten by the next replay: use them in the forward they were
      made for (two forwards before one backward are fine while the weights do not change in between);
    * gradients handed back are copied out of graph memory (``.grad`` never aliases it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchws.fast.engines.torch import TorchEngine, standardize_group
from torchws.fast.plan import Plan

__all__ = ["CudaGraphEngine", "GraphedPass"]


def graph_signature(inputs: Sequence[Tensor]) -> tuple:
    """What a captured graph depends on: pointer, shape, stride, dtype and requires_grad of every input."""
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.requires_grad) for t in inputs)


def _dense_strides(t: Tensor) -> tuple[int, ...]:
    """``t``'s strides when they describe a dense layout we keep (contiguous, channels_last), else contiguous ones."""
    formats = [torch.contiguous_format]
    if t.dim() == 4:
        formats.append(torch.channels_last)
    if t.dim() == 5:
        formats.append(torch.channels_last_3d)
    if any(t.is_contiguous(memory_format=f) for f in formats):
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def _copy_grads_into(buffers: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
    """``buffers[i] = grads[i]`` in one multi-tensor copy (zeros where a gradient is None)."""
    if any(g is None for g in grads):
        pairs = [(b, g) for b, g in zip(buffers, grads) if g is not None]
        for b, g in zip(buffers, grads):
            if g is None:
                b.zero_()
        if pairs:
            torch._foreach_copy_([b for b, _ in pairs], [g for _, g in pairs])
    else:
        torch._foreach_copy_(list(buffers), list(grads))


def _contiguous_likes(layout: Sequence[tuple[torch.Size, tuple[int, ...]]]) -> tuple[Tensor, ...] | None:
    """Storage-less tensors of the layout's shapes when every stride is the contiguous one (what torch's C++
    ``unflatten_dense_tensors`` cuts views by), else None."""
    likes = tuple(torch.empty(shape, device="meta") for shape, _ in layout)
    return likes if all(like.stride() == stride for like, (_, stride) in zip(likes, layout)) else None


class GraphedPass:
    """``fn(tensors) -> list[Tensor]``, differentiable in ``tensors``, captured as forward and backward graphs.

    ``fn`` is captured on detached aliases of ``inputs`` (same storage, so every replay reads the inputs' current
    values), never on ``inputs`` themselves: the inputs' own autograd nodes are not touched by the capture. Call the
    instance to replay: it returns ``fn``'s outputs with an autograd node whose backward replays the captured
    backward and returns gradients for ``inputs``.
    """

    def __init__(self, fn: Callable[[list[Tensor]], list[Tensor]], inputs: Sequence[Tensor], warmup: int = 3) -> None:
        if not inputs or not all(t.is_cuda and t.requires_grad for t in inputs):
            raise ValueError("GraphedPass: inputs must be CUDA tensors that require grad")
        if len({t.dtype for t in inputs}) != 1:
            raise ValueError("GraphedPass: inputs must share one dtype (their gradients share one buffer)")
        self.inputs = tuple(inputs)
        self.signature = graph_signature(self.inputs)
        self._capture(fn, warmup)

    def _capture(self, fn: Callable[[list[Tensor]], list[Tensor]], warmup: int) -> None:
        aliases = [t.detach().requires_grad_() for t in self.inputs]  # leaves of the captured graphs only
        # One stream for warm-up and both captures. An autograd node keeps the stream that was current when it was
        # made; the aliases' AccumulateGrad nodes are made in the first warm-up forward (on `side`). Captured on
        # another stream, the backward capture would hand their gradients across streams (an event wait during
        # capture, and PyTorch >= 2.10's "AccumulateGrad node's stream does not match" warning).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast("cuda", enabled=False):
            for _ in range(warmup):  # lazy inits, allocator warm-up, library handles: nothing of that may be captured
                outs = fn(aliases)
                torch.autograd.grad(outs, aliases, [torch.ones_like(o) for o in outs], allow_unused=True)
            outs = None  # drop the last warm-up graph (it holds the aliases' AccumulateGrad nodes) before capturing
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.autocast("cuda", enabled=False), torch.cuda.graph(self.forward_graph, pool=pool, stream=side):
            outs = fn(aliases)
        self.static_outputs = tuple(outs)
        self.static_grad_outputs = tuple(torch.empty_like(o) for o in outs)
        self._layout = [(t.shape, _dense_strides(t)) for t in self.inputs]
        self._likes = _contiguous_likes(self._layout)
        self._offsets = [0]
        for t in self.inputs:
            self._offsets.append(self._offsets[-1] + t.numel())
        self.backward_graph = torch.cuda.CUDAGraph()
        with torch.autocast("cuda", enabled=False), torch.cuda.graph(self.backward_graph, pool=pool, stream=side):
            grads = torch.autograd.grad(outs, aliases, self.static_grad_outputs, allow_unused=True)
            # (sum numel,): one buffer holding every input's gradient in that input's own memory layout, so the
            # views handed to autograd match the parameters' layout (no re-striding copy in AccumulateGrad)
            dtype, device = self.inputs[0].dtype, self.inputs[0].device
            self.static_flat_grad = torch.zeros(self._offsets[-1], device=device, dtype=dtype)
            for g, dst in zip(grads, self.unflatten(self.static_flat_grad)):
                if g is not None:
                    dst.copy_(g)
        # the captured autograd graph is not needed any more: the CUDA graphs hold what they replay
        self.static_outputs = tuple(o.detach() for o in self.static_outputs)

    def matches(self, inputs: Sequence[Tensor]) -> bool:
        """Whether this capture is valid for ``inputs`` (same tensors, storage and layout)."""
        # identity too: the replay returns gradients for self.inputs, and a new Parameter can share the old storage
        return (
            len(inputs) == len(self.inputs)
            and all(a is b for a, b in zip(inputs, self.inputs))
            and graph_signature(inputs) == self.signature
        )

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Input-shaped (and input-strided) views into a flat gradient buffer (all inputs contiguous: cut in C++,
        one call instead of a Python ``as_strided`` per input, ~2 us each on a GPU host)."""
        likes = getattr(self, "_likes", None)
        if likes is not None:
            return list(torch._utils._unflatten_dense_tensors(flat, likes))
        return [
            flat.as_strided(shape, stride, flat.storage_offset() + start)
            for (shape, stride), start in zip(self._layout, self._offsets)
        ]

    def __call__(self) -> list[Tensor]:
        return list(_Replay.apply(self, *self.inputs))

    def replay_backward(self, grads: Sequence[Tensor | None]) -> list[Tensor]:
        """Gradients w.r.t. the inputs for ``grads`` w.r.t. the outputs of the last forward replay (None: zeros),
        in one fresh buffer (views laid out like the inputs): nothing returned aliases graph memory."""
        _copy_grads_into(self.static_grad_outputs, grads)
        self.backward_graph.replay()
        return self.unflatten(self.static_flat_grad.clone())

    @property
    def nbytes(self) -> int:
        """Graph-owned bytes of the static outputs, incoming and outgoing gradients (saved tensors excluded)."""
        tensors = (*self.static_outputs, *self.static_grad_outputs, self.static_flat_grad)
        return sum(math.prod(t.shape) * t.element_size() for t in tensors)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: GraphedPass, *inputs: Tensor) -> tuple[Tensor, ...]:
        runner.forward_graph.replay()
        ctx.runner, ctx.versions = runner, [t._version for t in inputs]
        return tuple(o.detach() for o in runner.static_outputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor | None) -> tuple:
        # the graphs hold the statistics of the last replay: valid for this forward while no input changed since,
        # which is also what autograd demands of the per-layer path's saved weights
        for i, (t, v) in enumerate(zip(ctx.runner.inputs, ctx.versions)):
            if t._version != v:
                raise RuntimeError(
                    f"cuda_graph WS engine: input {i} (shape {tuple(t.shape)}) was modified in place after the "
                    f"forward (version {v} -> {t._version}); run the backward before the optimizer step"
                )
        return (None, *ctx.runner.replay_backward(grads))


class CudaGraphEngine:
    """The torch engine (concatenated groups) replayed from CUDA graphs for grad-enabled forwards; forwards
    without grad, or inside a user's own graph capture, run the torch engine itself (the same kernels, so the same
    numbers). Captured on first use and again whenever :meth:`GraphedPass.matches` fails."""

    name = "cuda_graph"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.torch = TorchEngine(plan, concat=True)
        self.graphed: GraphedPass | None = None

    def _run_on(self, tensors: list[Tensor]) -> list[Tensor]:
        """The torch engine on ``tensors`` (:meth:`Plan.tensors` order) instead of the layers' own parameters."""
        layers = self.plan.layers
        by_layer = dict(zip(layers, tensors))
        extra = iter(tensors[len(layers) :])  # each layer's gain, then its shift, where present (Plan.tensors)
        gains, shifts = {}, {}
        for m in layers:
            if m.gain is not None:
                gains[m] = next(extra)
            if m.shift is not None:
                shifts[m] = next(extra)
        out = {}
        for g in self.plan.groups:
            ls = g.layers
            out.update(zip(ls, standardize_group(g, [by_layer[m] for m in ls], [gains.get(m) for m in ls],
                                                 [shifts.get(m) for m in ls], concat=True)))  # fmt: skip
        return [out[m] for m in layers]

    def __call__(self) -> dict:
        if not torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return self.torch()
        inputs = self.plan.tensors()
        if self.graphed is None or not self.graphed.matches(inputs):
            self.graphed = None  # free the old capture's memory before taking the new one
            self.graphed = GraphedPass(self._run_on, inputs)
        return dict(zip(self.plan.layers, self.graphed()))
