"""The cuda_graph engine (torchws.fast.engines.cuda_graph): the capture's bookkeeping (runs anywhere) and, on a
CUDA device (marked ``gpu``), the replayed pass against the layers computing their own weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchws.fast import enable_batched_ws, find_handle
from torchws.fast.engines.cuda_graph import (
    CudaGraphEngine,
    GraphedPass,
    _contiguous_likes,
    _dense_strides,
    graph_signature,
)
from torchws.fast.engines.torch import TorchEngine
from torchws.fast.plan import Plan

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- bookkeeping (no capture) -------------------------------------------------------------------------------------
def test_gradient_views_follow_each_input_layout():
    inputs = [torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last), torch.randn(5, 7),
              torch.randn(6, 2, 3)[:, :, :2]]  # fmt: skip
    assert _dense_strides(inputs[0]) == inputs[0].stride() and _dense_strides(inputs[2]) == (4, 2, 1)
    runner = object.__new__(GraphedPass)  # only the layout bookkeeping, no capture (needs CUDA)
    runner._layout = [(t.shape, _dense_strides(t)) for t in inputs]
    runner._offsets = [0, 48, 83, 107]
    runner._likes = _contiguous_likes(runner._layout)
    assert runner._likes is None  # a channels_last input: cut with as_strided
    flat = torch.arange(107.0)
    views = runner.unflatten(flat)
    assert [v.shape for v in views] == [t.shape for t in inputs]
    assert views[0].is_contiguous(memory_format=torch.channels_last) and views[1].is_contiguous()
    # every element of the flat buffer is used exactly once
    assert torch.equal(torch.sort(torch.cat([v.reshape(-1) for v in views])).values, flat)


def test_contiguous_gradient_views_are_cut_in_one_call_like_as_strided():
    inputs = [torch.randn(4, 3, 2, 2), torch.randn(5, 7), torch.randn(6)]
    runner = object.__new__(GraphedPass)
    runner._layout = [(t.shape, _dense_strides(t)) for t in inputs]
    runner._offsets = [0, 48, 83, 89]
    runner._likes = None
    flat = torch.arange(89.0)
    slow = runner.unflatten(flat)  # the as_strided path
    runner._likes = _contiguous_likes(runner._layout)
    assert runner._likes is not None
    fast = runner.unflatten(flat)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
        assert torch.equal(a, b)


def test_a_capture_does_not_match_new_parameters_sharing_storage():
    # e.g. load_state_dict(model.state_dict(), assign=True): new Parameter objects over the same storage. The
    # replay hands gradients to the captured inputs, so a capture for the old objects must not be reused.
    old = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))]
    runner = object.__new__(GraphedPass)
    runner.inputs, runner.signature = tuple(old), graph_signature(old)
    assert runner.matches(list(old))
    new = [nn.Parameter(t.detach()) for t in old]
    assert graph_signature(new) == runner.signature  # same pointers, shapes, strides: only identity differs
    assert not runner.matches(new)
    old[0].requires_grad_(False)
    assert not runner.matches(list(old))


def test_graphed_pass_refuses_inputs_it_cannot_capture():
    with pytest.raises(ValueError, match="GraphedPass: inputs must be CUDA tensors that require grad"):
        GraphedPass(lambda ts: ts, [torch.randn(3, requires_grad=True)])


# --- on a GPU -----------------------------------------------------------------------------------------------------
def _sgd_steps_match(ref: nn.Module, model: nn.Module, steps: int = 4, channels_last: bool = False) -> None:
    """SGD-momentum steps on CUDA: ``model``'s outputs, gradients and parameters stay equal to ``ref``'s."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
    for step in range(steps):
        x = torch.randn(2, 3, 8, 8, device="cuda")
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        outs = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=step % 2 == 0)  # also the in-place zeroing path: .grad must not alias
            y = m(x)
            (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
            outs.append(y.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for (n, p), q in zip(ref.named_parameters(), model.parameters()):
            scale = float(p.grad.abs().max())
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda s, n=n: f"{n}: {s}")
        for opt in opts:
            opt.step()
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_the_captured_function_maps_gains_and_shifts_to_their_layers(mixed_pair):
    """What the engine captures, run on the plan's tensors (weights, then each layer's gain and shift in layer order),
    equals the torch engine on the layers' own parameters: every gain and shift reaches its own layer."""
    _, model = mixed_pair(torch.float64)
    with torch.no_grad():
        for m in model.modules():
            for p in (getattr(m, "gain", None), getattr(m, "shift", None)):
                if isinstance(p, torch.Tensor):
                    p.copy_(torch.randn_like(p))  # distinct values: a gain read as another layer's shift shows
    plan = Plan(model)
    assert any(m.gain is not None for m in plan.layers) and any(m.shift is not None for m in plan.layers)
    got = CudaGraphEngine(plan)._run_on(plan.tensors())
    want = TorchEngine(plan, concat=True)()
    for m, w in zip(plan.layers, got):
        torch.testing.assert_close(w, want[m], rtol=1e-12, atol=1e-12)


@gpu
@needs_cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.filterwarnings("error:The AccumulateGrad node's stream:UserWarning")  # no cross-stream gradients
def test_engine_matches_per_layer_over_sgd_steps(mixed_pair, channels_last):
    ref, model = mixed_pair()
    ref, model = ref.cuda(), model.cuda()
    if channels_last:
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    handle = enable_batched_ws(model, backend="cuda_graph")
    _sgd_steps_match(ref, model, channels_last=channels_last)
    assert handle.engine.name == "cuda_graph" and handle.engine.graphed is not None
    graphed = handle.engine.graphed
    _sgd_steps_match(ref, model, steps=2, channels_last=channels_last)
    assert handle.engine.graphed is graphed  # optimizer steps in place: no new capture
    assert find_handle(model).engine.name == "cuda_graph"


@gpu
@needs_cuda
def test_auto_picks_cuda_graph_on_a_cuda_model_and_torch_with_frozen_weights(mixed_pair):
    _, model = mixed_pair()
    handle = enable_batched_ws(model.cuda())
    assert handle.engine.name == "cuda_graph"
    model.c1.weight.requires_grad_(False)
    model(torch.randn(1, 3, 8, 8, device="cuda"))  # stale plan: engine selected again
    assert handle.engine.name == "torch"
    with pytest.raises(ValueError, match="backend='cuda_graph' needs every WS weight.*requires_grad=False"):
        enable_batched_ws(model, backend="cuda_graph")


@gpu
@needs_cuda
def test_no_grad_forwards_and_a_replaced_weight(mixed_pair):
    ref, model = mixed_pair()
    ref, model = ref.cuda(), model.cuda()
    handle = enable_batched_ws(model, backend="cuda_graph")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with torch.no_grad():  # the torch engine itself, nothing captured
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert handle.engine.graphed is None
    model(x).sum().backward()
    first = handle.engine.graphed
    for m in (ref, model):
        m.c1.weight = nn.Parameter(m.c1.weight.detach() * 2)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert handle.engine.graphed is not first  # captured again for the new Parameter


@gpu
@needs_cuda
def test_backward_after_an_input_was_modified_in_place_raises(mixed_pair):
    _, model = mixed_pair()
    model = model.cuda()
    enable_batched_ws(model, backend="cuda_graph")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    model(x).sum().backward()  # captured
    y = model(x)
    with torch.no_grad():
        model.c1.weight.add_(0.1)  # an optimizer step between the forward and its backward
    with pytest.raises(RuntimeError, match=r"cuda_graph WS engine: input 0 \(shape \(8, 3, 3, 3\)\) was modified in "
                                           r"place after the forward \(version \d+ -> \d+\)"):  # fmt: skip
        y.sum().backward()
