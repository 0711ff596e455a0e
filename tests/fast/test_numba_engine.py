"""The numba engine (torchws.fast.engines.numba): its kernels against the per-layer torch formulas, and the engine
in a model's pass against the per-layer path (the layers computing their own weights)."""

from __future__ import annotations

import contextlib
import copy
import io
import os
import signal
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchws.fast import enable_batched_ws, find_handle
from torchws.fast.engines import numba as numba_engine
from torchws.fast.engines.numba import multi_standardize, numba_status
from torchws.functional import standardize_rows
from torchws.layers.ws import WSConv1d, WSConv2d, WSConv3d, WSLinear
from torchws.presets import PRESETS

pytestmark = pytest.mark.skipif(numba_status() is not None, reason=f"needs numba: {numba_status()}")

PRESET_NAMES = sorted(PRESETS)


def _weights(dtype, seed=0):
    """A conv weight, a channels_last conv weight, a linear weight and a Conv1d weight."""
    g = torch.Generator().manual_seed(seed)
    ws = [
        torch.randn(8, 3, 3, 3, generator=g, dtype=dtype),
        torch.randn(6, 5, 3, 3, generator=g, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(16, 40, generator=g, dtype=dtype) * 3 + 0.5,
        torch.randn(4, 2, 5, generator=g, dtype=dtype),
    ]
    return [w.requires_grad_() for w in ws]


def _reference(ws, preset):
    """The per-layer formula (torchws.functional.standardize_rows) on each weight's logical rows."""
    return [standardize_rows(w.reshape(w.shape[0], -1), preset=preset).reshape(w.shape) for w in ws]


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_forward_and_backward_match_the_per_layer_formula(preset, dtype, tol):
    ws = _weights(dtype)
    ys, refs = multi_standardize(ws, preset=preset), _reference(ws, preset)
    for y, ref, w in zip(ys, refs, ws):
        assert y.shape == w.shape and y.stride() == w.stride() and y.dtype == dtype  # same layout: no copies
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    ups = [torch.randn_like(y) for y in ys]
    for a, b in zip(torch.autograd.grad(ys, ws, ups), torch.autograd.grad(refs, ws, ups)):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_eps_argument_overrides_the_presets():
    w = torch.randn(3, 4, dtype=torch.float64) * 0.01  # variance ~1e-4: eps 1e-2 changes the result visibly
    (y,) = multi_standardize([w], preset="paper", eps=1e-2)
    expected = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, correction=0, keepdim=True) + 1e-2)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_gradcheck_and_gradgradcheck(preset):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in ((3, 5), (2, 2, 3))]
    assert torch.autograd.gradcheck(lambda *t: multi_standardize(list(t), preset=preset), ws)
    # create_graph=True (gradient penalties) differentiates the torch formula on the saved weights
    assert torch.autograd.gradgradcheck(lambda *t: multi_standardize(list(t), preset=preset), ws)


def test_gradient_arriving_in_another_layout():
    # the kernel walks g in y's element order: a channels_last weight's grad arriving contiguous must be re-laid
    w = _weights(torch.float64)[1]
    (y,) = multi_standardize([w], preset="paper")
    up = torch.randn(y.shape, dtype=torch.float64)  # contiguous, y is channels_last
    (got,) = torch.autograd.grad([y], [w], [up])
    (expected,) = torch.autograd.grad(_reference([w], "paper"), [w], [up])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_constant_filters_give_zero_rows_and_finite_gradients(preset):
    # v = 0: y = 0, and dL/dx = r(0) (g - mean(g)) with r'(0) taken as 0 (for 'official', 1 / (sqrt(v) + eps) has an
    # infinite derivative at 0; the engine takes 0 there, as torch's std backward does)
    p = PRESETS[preset]
    w = torch.full((3, 9), 0.7, dtype=torch.float64, requires_grad=True)
    (y,) = multi_standardize([w], preset=preset)
    assert torch.equal(y, torch.zeros_like(y))
    up = torch.randn_like(y)
    (got,) = torch.autograd.grad([y], [w], [up])
    r0 = {"inside_sqrt": p.eps**-0.5, "added_to_std": 1 / p.eps, "clamp_fan_in_var": p.eps**-0.5}[p.eps_placement]
    torch.testing.assert_close(got, r0 * (up - up.mean(1, keepdim=True)), rtol=1e-12, atol=0)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(2, 70)), min_size=1, max_size=5),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-10, 10),
)
def test_rows_come_out_standardized(shapes, scale, shift):
    g = torch.Generator().manual_seed(len(shapes))
    ws = [torch.randn(o, n, generator=g, dtype=torch.float64) * scale + shift for o, n in shapes]
    eps = PRESETS["bit"].eps
    for w, y in zip(ws, multi_standardize(ws, preset="bit")):  # mean 0, population variance v / (v + eps)
        v = w.var(1, correction=0)
        torch.testing.assert_close(y.mean(1), torch.zeros(w.shape[0], dtype=w.dtype), rtol=0, atol=1e-9)
        torch.testing.assert_close(y.var(1, correction=0), v / (v + eps), rtol=1e-9, atol=0)


def test_rejects_what_it_cannot_read():
    w = torch.randn(4, 9)
    with pytest.raises(ValueError, match=r"weight 1 \(shape \(9, 4\), torch.float32, cpu\) is not a dense-row"):
        multi_standardize([w, w.t()], preset="paper")
    with pytest.raises(ValueError, match=r"weight 1 \(shape \(4, 9\), torch.float64, cpu\) .*first weight's dtype"):
        multi_standardize([w, w.double()], preset="paper")
    with pytest.raises(ValueError, match=r"weight 0 \(shape \(4, 1\).*fan-in >= 2"):
        multi_standardize([torch.randn(4, 1)], preset="paper")
    with pytest.raises(ValueError, match=r"weight 0 \(shape \(4, 9\), torch.bfloat16"):
        multi_standardize([w.bfloat16()], preset="paper")
    with pytest.raises(ValueError, match="unknown WS preset .sample."):
        multi_standardize([w], preset="sample")
    assert multi_standardize([], preset="paper") == []


def test_backward_reads_the_saved_outputs():
    # saved-tensor hooks (activation checkpointing, offloading) hand the backward other tensors than the forward's
    # outputs, which may be changed by then: the backward must read what saved_tensors gives it
    w = _weights(torch.float64)[2]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        (y,) = multi_standardize([w], preset="paper")
    with torch.no_grad():
        y.zero_()  # the forward's own output, not the saved copy
    up = torch.randn_like(y)
    (got,) = torch.autograd.grad([y], [w], [up])
    (expected,) = torch.autograd.grad(_reference([w], "paper"), [w], [up])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_non_finite_weights_propagate_like_per_layer(preset):
    # a diverged weight (NaN, inf) gives NaN rows as per layer: no exception, and the other rows unaffected
    w = torch.randn(3, 10, dtype=torch.float64)
    w[1, 3], w[2, 0] = float("nan"), float("inf")
    w.requires_grad_()
    (y,) = multi_standardize([w], preset=preset)
    (ref,) = _reference([w], preset)
    torch.testing.assert_close(y, ref, equal_nan=True)
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1:]).all()
    up = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad([y], [w], [up])[0], torch.autograd.grad([ref], [w], [up])[0], equal_nan=True
    )


@pytest.mark.parametrize("create_graph", [False, True])
def test_backward_after_an_in_place_weight_change_raises_like_per_layer(create_graph):
    # the Function saves the weights: autograd refuses a backward once they changed (an optimizer step in between)
    for standardize in (lambda w: multi_standardize([w], preset="paper")[0], lambda w: _reference([w], "paper")[0]):
        w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
        y = standardize(w)
        with torch.no_grad():
            w.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad([y], [w], [torch.randn_like(y)], create_graph=create_graph)


# --- the engine in a model's pass ---------------------------------------------------------------------------------
@pytest.mark.parametrize("channels_last", [False, True])
def test_engine_matches_per_layer_and_takes_the_layers_it_can(channels_last, mixed_pair, backprop,
                                                               assert_grads_close):  # fmt: skip
    ref, model = mixed_pair()
    if channels_last:
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    handle = enable_batched_ws(model, backend="numba")
    assert handle.engine.name == "numba"
    x = torch.randn(2, 3, 8, 8)
    assert_grads_close(backprop(model, x), backprop(ref, x))
    # one launch per (preset, eps, dtype) of the layers without gain/shift whose rows are dense; the rest per layer
    names = {m: n for n, m in model.named_modules()}
    taken = sorted(({names[m] for m in launch.layers} for launch in handle.engine.launches), key=len)
    assert taken == [{"c4"}, {"c1", "c2b", "c6", "fc_a"}]
    assert {names[m] for _, m in handle.engine.rest} == {"c2", "c3", "c5", "t1", "fc_b"}


class _Dims(nn.Module):
    """Conv1d, Conv2d, Conv3d and Linear weights in one launch, and a layer that runs only on request."""

    def __init__(self) -> None:
        super().__init__()
        self.c1d, self.c2d, self.c3d = WSConv1d(2, 4, 3), WSConv2d(2, 4, 3), WSConv3d(2, 4, 3)
        self.fc, self.extra = WSLinear(12, 3), WSLinear(3, 3)

    def forward(self, x, use_extra=True):  # x: (N, 2, 5, 5, 5)
        h = torch.cat([self.c1d(x[:, :, 0, 0]).mean(2), self.c2d(x[:, :, 0]).mean((2, 3)),
                       self.c3d(x).mean((2, 3, 4))], 1)  # fmt: skip
        y = self.fc(h)
        return self.extra(y) if use_extra else y


def _dims_pair():
    torch.manual_seed(0)
    ref = _Dims()
    model = copy.deepcopy(ref)
    enable_batched_ws(model, backend="numba")
    return ref, model


def test_every_weight_rank_in_one_launch_and_unused_layers_get_no_gradient(backprop, assert_grads_close):
    ref, model = _dims_pair()
    (launch,) = find_handle(model).engine.launches
    assert len(launch.layers) == 5
    x = torch.randn(2, 2, 5, 5, 5)
    assert_grads_close(backprop(model, x), backprop(ref, x))
    # as per layer: a layer this forward did not use keeps grad None, so optimizers skip it (no weight decay, no
    # momentum step); a zero gradient would move its weights
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        m(x, use_extra=False).sum().backward()
    assert model.extra.weight.grad is None and ref.extra.weight.grad is None
    assert model.fc.weight.grad is not None


def test_double_backward_matches_per_layer(mixed_pair):
    ref, model = mixed_pair(torch.float64)
    enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for m in (model, ref):
        loss = m(x).pow(2).sum()
        penalty = sum(g.pow(2).sum() for g in torch.autograd.grad(loss, list(m.parameters()), create_graph=True))
        penalty.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=lambda m, n=n: f"grad of {n}: {m}")


def test_batched_grad_outputs():
    # autograd.grad(is_grads_batched=True) (jacobian/hessian with vectorize=True) vmaps the backward over its grads
    ref, model = _dims_pair()
    x = torch.randn(1, 2, 5, 5, 5)
    ups = torch.randn(3, 1, 3)
    got, expected = (torch.autograd.grad(m(x), m.fc.weight, ups, is_grads_batched=True)[0] for m in (model, ref))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_engine_follows_replaced_copied_and_relaid_weights():
    # the plan holds the weights it read: a new Parameter, a deepcopy and a new layout are never standardized stale
    torch.manual_seed(0)
    model = nn.Sequential(WSConv2d(3, 4, 3), nn.ReLU(), WSConv2d(4, 4, 3))
    handle = enable_batched_ws(model, backend="numba")
    x = torch.randn(1, 3, 7, 7)
    model(x)
    conv = model[0]
    conv.weight = nn.Parameter(conv.weight.detach() * 2 + 1)
    torch.testing.assert_close(handle.standardize()[conv], _reference([conv.weight], "paper")[0])
    assert handle.plan.sources[conv] is conv.weight
    twin = copy.deepcopy(model)
    twin(x).sum().backward()
    assert all(p.grad is None for p in model.parameters()) and twin[0].weight.grad is not None
    model.to(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert all(m.weight.grad is not None for m in model if isinstance(m, WSConv2d))
    assert handle.plan.sources[model[2]] is model[2].weight and handle.engine.name == "numba"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside forward_ad
def test_the_pass_steps_aside_under_torch_func_and_forward_ad(mixed_pair):
    # the kernels' Function has no vmap rule and no jvp: under torch.func transforms and forward-mode AD the layers
    # compute their own weights (as per layer, these work)
    import torch.autograd.forward_ad as fwAD

    ref, model = mixed_pair()
    enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8)
    params = {n: p.detach() for n, p in ref.named_parameters()}
    results = []
    for m in (model, ref):
        grads = torch.func.grad(lambda p, m=m: torch.func.functional_call(m, p, (x,)).square().sum())(params)
        with fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, torch.ones_like(p)) for n, p in params.items()}
            tangent = fwAD.unpack_dual(torch.func.functional_call(m, duals, (x,))).tangent
        results.append((grads, tangent))
    (ga, ta), (gb, tb) = results
    torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-5)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_the_pass_steps_aside_under_jit_trace(mixed_pair):
    # a traced module must not hold a call of the kernels' Python Function: it could not be saved (nor exported)
    ref, model = mixed_pair()
    enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(model, x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), ref(x), rtol=1e-5, atol=1e-5)


def test_backward_after_an_optimizer_step_raises_in_a_model(mixed_pair):
    # a step between a forward and its backward: per layer autograd refuses (the saved weights changed); so must the
    # engine, rather than push the gradient through statistics of weights that are gone
    ref, model = mixed_pair()
    enable_batched_ws(model, backend="numba")
    for m in (ref, model):
        y = m(torch.randn(1, 3, 8, 8))
        with torch.no_grad():
            m.c1.weight.add_(0.1)  # what a non-fused SGD step does
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


# --- the kernels on numba's threads -------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def kernel_calls(monkeypatch):
    """The names of the kernels that ran, in order; every launch may split (one element per chunk at least)."""
    from torchws.fast.engines import numba_kernels

    calls: list[str] = []

    def spy(name):
        kernel = getattr(numba_kernels, name)

        def run(*args):
            calls.append(name)
            return kernel(*args)

        return run

    names = ("forward", "backward", "forward_parallel", "backward_parallel")
    monkeypatch.setattr(numba_engine, "_kernels", lambda: tuple(spy(n) for n in names))
    monkeypatch.setattr(numba_engine, "MIN_CHUNK_ELEMENTS", 1)
    return calls


def _run_pass(ws, preset, ups):
    ys = multi_standardize(ws, preset=preset)
    return [y.detach() for y in ys], torch.autograd.grad(ys, ws, ups)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_on_numba_threads_give_the_same_bits(preset, dtype, kernel_calls):
    # (the parallel kernels are compiled in each process: loaded from numba's cache they gave other float64 bits)
    import numba

    ws = _weights(dtype)
    ups = [torch.randn_like(w) for w in ws]
    numba_threads = numba.get_num_threads()
    with _torch_threads(1):
        serial = _run_pass(ws, preset, ups)
    assert kernel_calls == ["forward", "backward"]
    with _torch_threads(2):
        parallel = _run_pass(ws, preset, ups)
    assert kernel_calls[2:] == ["forward_parallel", "backward_parallel"]
    assert numba.get_num_threads() == numba_threads  # numba's own setting is left as it was
    for a, b in zip([*serial[0], *serial[1]], [*parallel[0], *parallel[1]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_row_table_chunks_split_the_work_evenly(chunks):
    layers = nn.Sequential(WSConv2d(3, 16, 3), WSConv2d(16, 32, 3), WSConv2d(32, 64, 3), WSLinear(64, 10))
    handle = enable_batched_ws(layers, backend="numba")
    (launch,) = handle.engine.launches
    bounds, row_t, row_i, fan_in = launch.table(chunks)
    per_row = [int(fan_in[t]) for t in row_t]
    assert [(int(t), int(i)) for t, i in zip(row_t, row_i)] == [(t, i) for t, m in enumerate((16, 32, 64, 10))
                                                                for i in range(m)]  # fmt: skip
    assert len(bounds) == chunks + 1 and bounds[0] == 0 and bounds[-1] == len(per_row) == 122
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    work = [sum(per_row[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert sum(work) == launch.elements
    assert all(abs(w - launch.elements / chunks) <= max(per_row) for w in work)  # equal up to a row


def test_kernels_stay_on_the_calling_thread_outside_the_main_thread(kernel_calls):
    ws = _weights(torch.float32)
    ups = [torch.randn_like(w) for w in ws]
    out: list = []
    with _torch_threads(2):
        worker = threading.Thread(target=lambda: out.append(_run_pass(ws, "paper", ups)))
        worker.start()
        worker.join()
    assert kernel_calls == ["forward", "backward"] and len(out) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_the_kernels_on_its_calling_thread(kernel_calls):
    # numba's OpenMP threads do not survive a fork (GNU OpenMP is not fork-safe): once the parent ran the kernels on
    # them, a child runs them on its own thread, and finishes
    ws = _weights(torch.float32)
    ups = [torch.randn_like(w) for w in ws]
    with _torch_threads(2):
        expected = _run_pass(ws, "paper", ups)
        assert kernel_calls == ["forward_parallel", "backward_parallel"]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                got = _run_pass(ws, "paper", ups)
                same = all(torch.equal(a, b) for a, b in zip([*got[0], *got[1]], [*expected[0], *expected[1]]))
                os.write(write, f"{','.join(kernel_calls[2:])} {same}".encode())
            finally:
                os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in the WS kernels")
        time.sleep(0.05)
    with os.fdopen(read) as f:
        assert f.read() == "forward,backward True"
