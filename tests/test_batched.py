"""torchws.batched (model-level WS pass) and torchws.accumulate (one WS per accumulated step) vs the per-layer path."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn

from torchws.accumulate import ws_accumulation
from torchws.batched import auto_enable, batched_standardize, disable_batched_ws, enable_batched_ws, find_handle
from torchws.layers.ws import WSConv2d, WSConvTranspose2d, WSLinear, WSMixin


class Mixed(nn.Module):
    """WS layers of every kind: presets, gains, shift, equal fan-ins with different shapes, a grouped transpose."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = WSConv2d(3, 8, 3, padding=1)  # n=27
        self.c2 = WSConv2d(8, 8, 3, padding=1, gain=True)  # n=72, gain: one group with c3
        self.c3 = WSConv2d(8, 8, 3, padding=1, gain=True)
        self.c2b = WSConv2d(8, 8, 3, padding=1, bias=True)  # n=72, no gain: grouped with fc_a (trailing shape differs)
        self.c4 = WSConv2d(8, 16, 3, padding=1, preset="official")
        self.c5 = WSConv2d(16, 8, 1, preset="timm", shift=True)  # n=16
        self.t1 = WSConvTranspose2d(8, 6, 3, padding=1, groups=2)  # rows n = 4 * 9 = 36
        self.c6 = WSConv2d(6, 8, (2, 3), padding=1)  # n=36, same group as t1 (not "natural")
        self.fc_a = WSLinear(72, 10)
        self.fc_b = WSLinear(10, 5, preset="nf")  # learnable gain by default
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, WSMixin):
                    for p in (m.gain, m.shift):
                        if p is not None:
                            p.normal_(1.0 if p is m.gain else 0.0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def f(layer, h):  # keeps activations O(1): a standardized row has norm sqrt(fan-in)
            return layer(h) * layer.ws_fan_in**-0.5

        h = F.relu(f(self.c1, x))
        h = F.relu(f(self.c3, F.relu(f(self.c2, h))) + f(self.c2b, h))
        h = f(self.t1, F.relu(f(self.c5, F.relu(f(self.c4, h)))))
        h = F.relu(f(self.c6, h))
        return f(self.fc_b, F.relu(f(self.fc_a, F.adaptive_avg_pool2d(h, 3).flatten(1))))


def _pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    ref = Mixed().to(dtype)
    return ref, copy.deepcopy(ref)


def _run(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(a, b, rtol, atol):
    (ya, ga), (yb, gb) = a, b
    torch.testing.assert_close(ya, yb, rtol=rtol, atol=atol)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_batched_matches_per_layer(dtype, tol, concat):
    ref, model = _pair(dtype)
    handle = enable_batched_ws(model, backend="torch", concat=concat)
    assert len(handle.layers) == 10
    # groups: {c1} {c2,c3} {c2b,fc_a} {c4} {c5} {t1,c6} {fc_b}
    assert sorted(len(g.layers) for g in handle.groups) == [1, 1, 1, 1, 2, 2, 2]
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    _assert_same(_run(model, x), _run(ref, x), tol, tol)


@pytest.mark.parametrize("concat", [False, True])
def test_channels_last_and_bfloat16(concat):
    ref, model = _pair()
    ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    enable_batched_ws(model, backend="torch", concat=concat)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    _assert_same(_run(model, x), _run(ref, x), 1e-5, 1e-5)
    handle = find_handle(model)
    assert model.c2.weight.is_contiguous(memory_format=torch.channels_last)
    # the rows are read in memory order, so the standardized weight keeps the layout without a copy
    w = handle.standardize()[model.c2]
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    ref, model = ref.to(torch.bfloat16), model.to(torch.bfloat16)  # plan is rebuilt for the new dtype
    _assert_same(_run(model, x.bfloat16()), _run(ref, x.bfloat16()), 2e-2, 2e-2)


def _count_per_layer_calls(monkeypatch):
    """Layers whose forward computed their own weight (nothing supplied by a model-level pass)."""
    calls = []
    original = WSMixin.standardized_weight

    def counting(self):
        if self._ws_supplied is None:
            calls.append(self)
        return original(self)

    monkeypatch.setattr(WSMixin, "standardized_weight", counting)
    return calls


def test_remove_and_standalone_layers_compute_per_layer(monkeypatch):
    ref, model = _pair()
    handle = enable_batched_ws(model, backend="torch")
    calls = _count_per_layer_calls(monkeypatch)
    x = torch.randn(1, 3, 8, 8)
    model(x)
    assert calls == [] and all(m._ws_supplied is None for m in handle.layers)
    # a layer used alone after its weight moved: must not reuse the last forward's weight
    with torch.no_grad():
        model.c2.weight.mul_(-2.0).add_(0.1)
        ref.c2.weight.mul_(-2.0).add_(0.1)
    h = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(model.c2(h), ref.c2(h))
    assert calls == [model.c2, ref.c2]
    assert disable_batched_ws(model) and find_handle(model) is None and not disable_batched_ws(model)
    calls.clear()
    model(x)
    assert len(calls) == 10


def test_layers_with_pre_hooks_fall_back():
    ref, model = _pair()
    for m in (ref, model):
        torch.manual_seed(1)
        prune.random_unstructured(m.c3, "weight", amount=0.5)  # weight recomputed in a pre-hook
    handle = enable_batched_ws(model, backend="torch")
    assert model.c3 not in handle.layers and model.c2 in handle.layers
    x = torch.randn(2, 3, 8, 8)
    _assert_same(_run(model, x), _run(ref, x), 1e-5, 1e-5)


def test_exception_in_forward_clears_supplied_weights():
    _, model = _pair()
    handle = enable_batched_ws(model, backend="torch")
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 5, 8, 8))  # wrong channel count
    assert all(m._ws_supplied is None for m in handle.layers)


def test_deepcopy_gets_its_own_pass():
    _, model = _pair()
    enable_batched_ws(model, backend="torch")
    clone = copy.deepcopy(model)
    assert find_handle(clone) is not find_handle(model) and find_handle(clone).model is clone
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 3, 8, 8)
    expected = copy.deepcopy(clone)
    disable_batched_ws(expected)
    torch.testing.assert_close(clone(x), expected(x))
    assert not torch.allclose(clone(x), model(x))


def test_auto_enable(monkeypatch):
    _, model = _pair()
    monkeypatch.setenv("TORCHWS_BATCHED", "0")
    assert auto_enable(model) is None and find_handle(model) is None
    monkeypatch.delenv("TORCHWS_BATCHED")
    assert auto_enable(model, enabled=False) is None
    assert auto_enable(nn.Sequential(nn.Conv2d(3, 4, 3))) is None
    handle = auto_enable(model)
    assert handle is find_handle(model) and enable_batched_ws(model) is handle


def _micro_batches(k, dtype):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 3, 8, 8, generator=g, dtype=dtype) for _ in range(k)]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("steps", [None, 4])
@pytest.mark.parametrize("batched", [False, True])
def test_accumulation_equals_per_micro_batch_backward(dtype, rtol, steps, batched):
    ref, model = _pair(dtype)
    if batched:
        enable_batched_ws(model, backend="torch")
    mbs = _micro_batches(4, dtype)
    for x in mbs:
        ref(x).square().mean().backward()
    with ws_accumulation(model, steps=steps) as acc:
        for x in mbs:
            model(x).square().mean().backward()
        # without steps the WS grads wait for the exit; with steps the last micro-batch's backward carries them
        assert (model.c1.weight.grad is None) == (steps is None)
    assert acc.forwards == (4 if steps else 0)
    expected, got = _grads(ref), _grads(model)
    for n in expected:
        scale = expected[n].abs().max()
        torch.testing.assert_close(got[n], expected[n], rtol=rtol, atol=rtol * scale, msg=lambda m, n=n: f"{n}: {m}")
    assert all(m._ws_supplied is None for m in model.modules() if isinstance(m, WSMixin))
    if batched:  # the pass resumes after the block
        assert not find_handle(model).paused


def test_accumulation_standardizes_once(monkeypatch):
    _, model = _pair()
    calls = _count_per_layer_calls(monkeypatch)
    counts = []
    from torchws import accumulate

    original = accumulate.batched_standardize
    monkeypatch.setattr(accumulate, "batched_standardize", lambda *a, **k: counts.append(1) or original(*a, **k))
    with ws_accumulation(model):
        for x in _micro_batches(3, torch.float32):
            model(x).sum().backward()
    assert counts == [1] and calls == []


def test_accumulation_too_many_forwards_raises():
    _, model = _pair()
    with pytest.raises(RuntimeError, match="steps=2"):
        with ws_accumulation(model, steps=2):
            for x in _micro_batches(3, torch.float32):
                model(x).sum().backward()
    assert all(m._ws_supplied is None for m in model.modules() if isinstance(m, WSMixin))


def test_accumulation_object_reused_across_steps():
    # one WSAccumulation entered once per optimizer step: every step must deliver the WS gradients
    ref, model = _pair()
    acc = ws_accumulation(model)
    for step in range(2):
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        x = _micro_batches(step + 1, torch.float32)[-1]
        ref(x).square().mean().backward()
        with acc:
            model(x).square().mean().backward()
        assert model.c1.weight.grad is not None, f"step {step}: WS gradients lost"
        torch.testing.assert_close(model.c1.weight.grad, ref.c1.weight.grad, rtol=1e-5, atol=1e-7)


def test_accumulation_failing_enter_resumes_the_batched_pass(monkeypatch):
    from torchws import accumulate

    _, model = _pair()
    handle = enable_batched_ws(model, backend="torch")

    def failing(*args, **kwargs):
        raise RuntimeError("standardization failed")

    monkeypatch.setattr(accumulate, "batched_standardize", failing)
    with pytest.raises(RuntimeError, match="standardization failed"):
        with ws_accumulation(model):
            pass
    assert not handle.paused  # the model's pass must keep working after the failed block
    assert all(m._ws_supplied is None for m in model.modules() if isinstance(m, WSMixin))


def test_accumulation_rejects_unknown_backend():
    _, model = _pair()
    with pytest.raises(ValueError, match="ws_accumulation: backend must be one of .*got 'trition'"):
        ws_accumulation(model, backend="trition")


def test_accumulation_under_ddp_no_sync(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ref, model = _pair()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        k = 3
        for _ in range(2):  # a second iteration catches reductions DDP did not finish in the first
            mbs = _micro_batches(k, torch.float32)
            opt_ref.zero_grad()
            opt.zero_grad()
            for x in mbs:
                (ref(x).square().mean() / k).backward()
            with ws_accumulation(ddp, steps=k):
                for i, x in enumerate(mbs):
                    with ddp.no_sync() if i < k - 1 else contextlib.nullcontext():
                        (ddp(x).square().mean() / k).backward()
            for (n, p), q in zip(ref.named_parameters(), model.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
            opt_ref.step()
            opt.step()
    finally:
        dist.destroy_process_group()


def test_accumulation_under_ddp_requires_steps(tmp_path):
    # without steps the WS gradients are pushed on exit, outside DDP's backward: they would miss the all-reduce
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _, model = _pair()
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(ValueError, match="DistributedDataParallel.*steps"):
            ws_accumulation(ddp)
        ws_accumulation(ddp, steps=2)  # fine
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("deferred", [False, True])
def test_compile_without_graph_breaks(deferred):
    # deferred: the compiler traces the autograd pass (torch ops it can fuse), not the engine's kernels
    torch._dynamo.reset()
    _, model = _pair()
    enable_batched_ws(model, backend="auto", deferred=deferred)
    x = torch.randn(1, 3, 8, 8)

    def step(inp):
        return model(inp)

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(step, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    assert all(m._ws_supplied is None for m in find_handle(model).layers)


_HAS_KERNEL = importlib.util.find_spec("triton") is not None and importlib.util.find_spec("torchws.kernels") is not None


@pytest.mark.skipif(not _HAS_KERNEL, reason="torchws.kernels (and triton) not installed")
def test_triton_backend_in_interpreter():
    # triton reads TRITON_INTERPRET at import, so the interpreter runs in a fresh process
    code = textwrap.dedent(
        """
        import copy, torch, sys
        sys.path.insert(0, {tests!r})
        from test_batched import Mixed, _run, _assert_same
        from torchws.batched import enable_batched_ws
        torch.manual_seed(0)
        ref = Mixed(); model = copy.deepcopy(ref)
        enable_batched_ws(model, backend="triton")
        x = torch.randn(2, 3, 8, 8)
        _assert_same(_run(model, x), _run(ref, x), 1e-5, 1e-5)
        print("ok")
        """
    ).format(tests=os.path.dirname(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# --- cuda_graph backend -------------------------------------------------------------------------------------------
def test_cuda_graph_backend_falls_back_to_torch_on_cpu_and_copies():
    ref, model = _pair()
    handle = enable_batched_ws(model, backend="cuda_graph")
    x = torch.randn(2, 3, 8, 8)
    _assert_same(_run(model, x), _run(ref, x), 1e-6, 1e-6)
    assert handle._graph is None  # CPU: the torch pass ran, nothing was captured
    clone = copy.deepcopy(model)
    assert find_handle(clone).backend == "cuda_graph" and find_handle(clone)._graph is None
    _assert_same(_run(clone, x), _run(ref, x), 1e-6, 1e-6)


def test_graphed_pass_gradient_views_follow_each_input_layout():
    from torchws.kernels.cuda_graph import GraphedPass, _dense_strides

    inputs = [torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last), torch.randn(5, 7),
              torch.randn(6, 2, 3)[:, :, :2]]  # fmt: skip
    assert _dense_strides(inputs[0]) == inputs[0].stride() and _dense_strides(inputs[2]) == (4, 2, 1)
    runner = object.__new__(GraphedPass)  # only the layout bookkeeping, no capture (needs CUDA)
    runner._layout = [(t.shape, _dense_strides(t)) for t in inputs]
    runner._offsets = [0, 48, 83, 107]
    flat = torch.arange(107.0)
    views = runner.unflatten(flat)
    assert [v.shape for v in views] == [t.shape for t in inputs]
    assert views[0].is_contiguous(memory_format=torch.channels_last) and views[1].is_contiguous()
    # every element of the flat buffer is used exactly once
    assert torch.equal(torch.sort(torch.cat([v.reshape(-1) for v in views])).values, flat)


def test_graphed_pass_cuts_contiguous_gradient_views_in_one_call():
    from torchws.kernels.cuda_graph import GraphedPass, _contiguous_likes, _dense_strides

    inputs = [torch.randn(4, 3, 2, 2), torch.randn(5, 7), torch.randn(6)]
    runner = object.__new__(GraphedPass)
    runner._layout = [(t.shape, _dense_strides(t)) for t in inputs]
    runner._offsets = [0, 48, 83, 89]
    flat = torch.arange(89.0)
    slow = runner.unflatten(flat)  # (no _likes: the as_strided path)
    runner._likes = _contiguous_likes(runner._layout)
    assert runner._likes is not None
    fast = runner.unflatten(flat)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()
        assert torch.equal(a, b)
    channels_last = [torch.randn(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)]
    assert _contiguous_likes([(t.shape, _dense_strides(t)) for t in channels_last]) is None


def test_graphed_pass_does_not_match_new_parameters_sharing_storage():
    # e.g. load_state_dict(model.state_dict(), assign=True): new Parameter objects over the same storage. The
    # replay hands gradients to the captured inputs, so a capture for the old objects must not be reused.
    from torchws.kernels.cuda_graph import GraphedPass, graph_signature

    old = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))]
    runner = object.__new__(GraphedPass)  # only the bookkeeping, no capture (needs CUDA)
    runner.inputs, runner.signature = tuple(old), graph_signature(old)
    assert runner.matches(list(old))
    new = [nn.Parameter(t.detach()) for t in old]
    assert graph_signature(new) == runner.signature  # same pointers, shapes, strides: only identity differs
    assert not runner.matches(new)


def _sgd_steps_match(ref: nn.Module, model: nn.Module, steps: int = 4) -> None:
    """SGD-momentum steps on CUDA: ``model``'s parameters stay equal to ``ref``'s (per layer)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
    for step in range(steps):
        x = torch.randn(2, 3, 8, 8, device="cuda")
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=step % 2 == 0)  # also the in-place zeroing path: .grad must not alias
            m(x).square().mean().backward()
            opt.step()
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# capture and replay must not hand gradients across streams (PyTorch >= 2.10 warns once per process when they do)
@pytest.mark.filterwarnings("error:The AccumulateGrad node's stream:UserWarning")
def test_cuda_graph_backend_matches_per_layer_over_sgd_steps():
    torch.manual_seed(0)
    ref, model = _pair()
    ref, model = ref.cuda(), model.cuda()
    enable_batched_ws(model, backend="cuda_graph")
    _sgd_steps_match(ref, model)
    assert find_handle(model)._graph is not None


def test_parameters_swapped_lets_the_pass_run_on_aliases():
    from torchws.batched import _parameters_swapped

    _, model = _pair()
    handle = enable_batched_ws(model, backend="torch")
    inputs = handle._graph_inputs()
    aliases = [t.detach().requires_grad_() for t in inputs]
    with _parameters_swapped(handle.layers, aliases):
        assert all(m.weight is a for m, a in zip(handle.layers, aliases))
        out = batched_standardize(handle.groups, "torch", concat=True)
    assert all(m.weight is w for m, w in zip(handle.layers, inputs[: len(handle.layers)]))  # restored
    assert all(isinstance(m.weight, torch.nn.Parameter) for m in handle.layers)
    grads = torch.autograd.grad([out[m].sum() for m in handle.layers], aliases, allow_unused=True)
    assert all(p.grad is None for p in inputs)  # gradients reached the aliases, not the parameters
    ref = {m: m.compute_standardized_weight() for m in handle.layers}
    for m in handle.layers:
        torch.testing.assert_close(out[m], ref[m], rtol=1e-6, atol=1e-6)
    assert sum(g is not None for g in grads) == len(inputs)


def test_zoo_and_convert_enable_the_pass_and_fold_removes_it():
    from torchws import convert, fold
    from torchws.models import create_model

    model = create_model("cifar_resnet20_gn_ws", num_classes=10, in_chans=1).eval()
    assert find_handle(model) is not None
    assert find_handle(create_model("cifar_resnet20_gn_ws", batched_ws=False)) is None
    assert find_handle(create_model("cifar_resnet20_gn")) is None  # nothing to batch
    plain = create_model("cifar_resnet20_bn", num_classes=10, in_chans=1)
    converted = convert(plain, norm="gn", num_groups=8)
    handle = find_handle(converted)
    assert handle is not None and len(handle.layers) == sum(isinstance(m, WSMixin) for m in converted.modules())
    folded = fold(model)
    assert find_handle(folded) is None and not any(isinstance(m, WSMixin) for m in folded.modules())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_plan_notices_a_changed_eps():
    ref, model = _pair()
    enable_batched_ws(model, backend="torch")
    x = torch.randn(1, 3, 8, 8)
    model(x)
    for m in (ref, model):
        m.c1.ws_eps = 0.5  # a large eps changes the standardized weight visibly
    torch.testing.assert_close(model(x), ref(x), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("error:The AccumulateGrad node's stream:UserWarning")
def test_deferred_graph_engine_matches_per_layer_over_sgd_steps():
    torch.manual_seed(0)
    ref, model = _pair()
    ref, model = ref.cuda(), model.cuda()
    handle = enable_batched_ws(model, deferred=True)  # "auto" on CUDA: the captured torch pass
    _sgd_steps_match(ref, model)
    assert type(handle._deferred).__name__ == "_GraphDeferred"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.filterwarnings("error:The AccumulateGrad node's stream:UserWarning")
@pytest.mark.parametrize("channels_last", [False, True])
def test_deferred_triton_engine_matches_per_layer_over_sgd_steps(channels_last):
    torch.manual_seed(0)
    ref, model = _pair()
    ref, model = ref.cuda(), model.cuda()
    if channels_last:
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    handle = enable_batched_ws(model, backend="triton", deferred=True)
    _sgd_steps_match(ref, model)
    assert type(handle._deferred).__name__ == "_TritonDeferred" and handle._deferred.capture_error is None
