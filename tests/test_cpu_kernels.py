"""torchws.kernels.cpu_ws (numba multi-tensor WS kernels) against the per-layer torch formulas, and the batched
pass's "numba" backend (what ``auto`` runs on a CPU) against the per-layer path."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchws.batched import BACKENDS, _resolve_backend, enable_batched_ws, find_handle
from torchws.functional import standardize_rows, weight_to_rows
from torchws.kernels import cpu_ws
from torchws.layers.ws import WSConv2d, WSMixin
from torchws.models import create_model
from torchws.presets import PRESETS

pytestmark = pytest.mark.skipif(not cpu_ws.is_available(), reason="needs numba")

PRESET_NAMES = sorted(PRESETS)


def _weights(dtype, seed=0):
    """A conv weight, a channels_last conv weight, a linear weight and a 3-D conv weight (Conv1d)."""
    g = torch.Generator().manual_seed(seed)
    ws = [
        torch.randn(8, 3, 3, 3, generator=g, dtype=dtype),
        torch.randn(6, 5, 3, 3, generator=g, dtype=dtype).to(memory_format=torch.channels_last),
        torch.randn(16, 40, generator=g, dtype=dtype) * 3 + 0.5,
        torch.randn(4, 2, 5, generator=g, dtype=dtype),
    ]
    return [w.requires_grad_() for w in ws]


def _reference(ws, preset):
    """The per-layer formula (torchws.functional.standardize_rows) on each weight's rows, back in its layout."""
    out = []
    for w in ws:
        rows = standardize_rows(weight_to_rows(w), preset=preset)
        out.append(rows.reshape(w.shape) if w.is_contiguous() else rows.reshape(6, 3, 3, 5).permute(0, 3, 1, 2))
    return out


def _run(preset, ws):
    p = PRESETS[preset]
    return cpu_ws.multi_standardize(ws, mode=p.eps_placement, eps=p.eps, variance=p.variance)


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_forward_and_backward_match_the_per_layer_formula(preset, dtype, tol):
    ws = _weights(dtype)
    ys, refs = _run(preset, ws), _reference(ws, preset)
    for y, ref, w in zip(ys, refs, ws):
        assert y.shape == w.shape and y.stride() == w.stride() and y.dtype == dtype  # same layout: no copies
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    ups = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, ws, ups)
    expected = torch.autograd.grad(refs, ws, ups)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_gradcheck(preset):
    ws = [w.detach()[:, :2].clone().requires_grad_() if w.dim() == 4 else w for w in _weights(torch.float64)]
    ws = [w for w in ws if w.is_contiguous()]
    assert torch.autograd.gradcheck(lambda *t: _run(preset, list(t)), ws)


def test_gradient_for_grads_in_another_layout():
    # the kernel walks g in y's element order: a channels_last weight's grad arriving contiguous must be re-laid
    (w,) = [_weights(torch.float64)[1]]
    (y,) = _run("paper", [w])
    up = torch.randn(y.shape, dtype=torch.float64)  # contiguous, y is channels_last
    (got,) = torch.autograd.grad([y], [w], [up])
    (expected,) = torch.autograd.grad(_reference([w], "paper"), [w], [up])
    torch.testing.assert_close(got, expected)


_NAN_AT_CONSTANT_FILTERS = pytest.mark.xfail(
    strict=True, reason="the numba added_to_std backward takes r'(0) as infinite (NaN); torch.std's backward, which "
    "the per-layer path follows, is 0 at std 0")


@pytest.mark.parametrize(
    "preset", [pytest.param(p, marks=_NAN_AT_CONSTANT_FILTERS) if p == "official" else p for p in PRESET_NAMES]
)
def test_constant_filters_follow_each_preset(preset):
    w = torch.ones(3, 9, dtype=torch.float64, requires_grad=True)
    (y,) = _run(preset, [w])
    assert torch.equal(y, torch.zeros_like(y))
    up = torch.randn_like(y)
    (g,) = torch.autograd.grad([y], [w], [up])
    (g_ref,) = torch.autograd.grad(_reference([w], preset), [w], [up])
    assert torch.isfinite(g_ref).all()
    torch.testing.assert_close(g, g_ref)


@settings(max_examples=30, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(2, 70)), min_size=1, max_size=5),
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-10, 10),
)
def test_rows_come_out_standardized(shapes, scale, shift):
    g = torch.Generator().manual_seed(len(shapes))
    ws = [torch.randn(o, n, generator=g, dtype=torch.float64) * scale + shift for o, n in shapes]
    eps = PRESETS["bit"].eps
    for w, y in zip(ws, _run("bit", ws)):  # mean 0 and population variance v / (v + eps), v the row's variance
        v = w.var(1, correction=0)
        torch.testing.assert_close(y.mean(1), torch.zeros(w.shape[0], dtype=w.dtype), rtol=0, atol=1e-9)
        torch.testing.assert_close(y.var(1, correction=0), v / (v + eps), rtol=1e-9, atol=0)


def test_rejects_what_it_cannot_read():
    w = torch.randn(4, 9)
    with pytest.raises(ValueError, match="weight 1 .*not a dense-row"):
        cpu_ws.multi_standardize([w, w.t()], mode="inside_sqrt", eps=1e-5)
    with pytest.raises(ValueError, match="weight 1 is torch.float64, weight 0 is torch.float32"):
        cpu_ws.multi_standardize([w, w.double()], mode="inside_sqrt", eps=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        cpu_ws.multi_standardize([w], mode="outside", eps=1e-5)
    with pytest.raises(ValueError, match="variance must be"):
        cpu_ws.multi_standardize([w], mode="inside_sqrt", eps=1e-5, variance="sample")
    with pytest.raises(ValueError, match="weight 0 .*not a dense-row"):
        cpu_ws.multi_standardize([torch.randn(4, 1)], mode="inside_sqrt", eps=1e-5)
    assert cpu_ws.multi_standardize([], mode="inside_sqrt", eps=1e-5) == []


# --- the batched pass's numba backend -----------------------------------------------------------------------------
def _mixed_pair(seed=0):
    from test_batched import Mixed  # every kind of WS layer: gains, shift, transposed, presets

    torch.manual_seed(seed)
    ref = Mixed()
    return ref, copy.deepcopy(ref)


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_numba_backend_matches_per_layer(channels_last):
    ref, model = _mixed_pair()
    if channels_last:
        ref, model = ref.to(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    handle = enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8)
    (ya, ga), (yb, gb) = _step(model, x), _step(ref, x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    for n in gb:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")
    # the kernels took the layers without gain/shift whose rows are dense; the rest ran the torch path
    # (one launch per preset: paper, official)
    taken = [{n for n, m in model.named_modules() if m in launch[0]} for launch in handle._numba.launches]
    assert sorted(taken, key=len) == [{"c4"}, {"c1", "c2b", "c6", "fc_a"}]


def test_auto_is_numba_on_cpu_and_torch_without_numba(monkeypatch):
    assert "numba" in BACKENDS
    model = create_model("cifar_resnet20_gn_ws")
    handle = find_handle(model)
    assert handle.backend == "auto" and _resolve_backend("auto", handle.groups) == "numba"
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert handle._numba is not None and len(handle._numba.launches[0][0]) == len(handle.layers)
    monkeypatch.setattr(cpu_ws, "is_available", lambda: False)
    assert _resolve_backend("auto", handle.groups) == "torch"
    with pytest.raises(RuntimeError, match="backend='numba' needs numba"):
        enable_batched_ws(copy.deepcopy(model), backend="numba").standardize()


def test_numba_plan_follows_the_weights():
    # the plan holds the weights it read: new parameters, a deepcopy, a new layout must not be standardized stale
    model = create_model("cifar_resnet20_gn_ws")
    x = torch.randn(1, 3, 32, 32)
    model(x)
    conv = model.conv1 if hasattr(model, "conv1") else next(m for m in model.modules() if isinstance(m, WSMixin))
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 2 + 1)  # a new parameter object
    out = find_handle(model).standardize()[conv]
    torch.testing.assert_close(out, _reference([conv.weight], "paper")[0], rtol=2e-6, atol=2e-6)
    twin = copy.deepcopy(model)
    twin(x).sum().backward()
    assert all(p.grad is None for p in model.parameters()) and twin.fc.weight.grad is not None
    model.to(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert all(m.weight.grad is not None for m in model.modules() if isinstance(m, WSConv2d))


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_rows_split_over_threads_are_bit_identical(monkeypatch, threads):
    # large launches are cut between rows (also inside a tensor) over torch.get_num_threads() threads; every row is
    # computed alone, so the result must not change by a bit
    ws = _weights(torch.float32, seed=1) + [torch.randn(5, 7, 3, dtype=torch.float32, requires_grad=True)]
    ups = None
    results = []
    for parallel in (False, True):
        monkeypatch.setattr(cpu_ws, "PARALLEL_MIN_ELEMENTS", 0 if parallel else 1 << 60)
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        ys = _run("official", ws)
        ups = ups or [torch.randn_like(y) for y in ys]
        results.append((ys, torch.autograd.grad(ys, ws, ups)))
    spec = cpu_ws.make_spec(ws, "inside_sqrt", 1e-5, "population")
    parts = spec.parts(threads)
    assert len(parts) == threads and sum(int(p.rows.sum()) for p in parts) == spec.num_rows
    for (a, ga), (b, gb) in [results]:
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_large_launch_in_a_forked_child(monkeypatch):
    # the thread pool of the parent does not exist in a fork (DataLoader workers): the child must make its own
    import multiprocessing as mp

    monkeypatch.setattr(cpu_ws, "PARALLEL_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ws = [torch.randn(8, 50)]
    expected = _run("paper", ws)[0]  # creates the parent's pool
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_standardize_in_child, (ws[0],)).get(timeout=60)
    assert torch.equal(got, expected)


def _standardize_in_child(w):
    cpu_ws.PARALLEL_MIN_ELEMENTS = 0
    torch.get_num_threads = lambda: 2
    return _run("paper", [w])[0]


def test_auto_leaves_large_cpu_models_to_torch(monkeypatch):
    import torchws._backends as backends

    handle = find_handle(create_model("cifar_resnet20_gn_ws"))
    total = sum(m.weight.numel() for m in handle.layers)
    assert _resolve_backend("auto", handle.groups) == "numba"
    monkeypatch.setattr(backends, "AUTO_NUMBA_MAX_ELEMENTS", total - 1)
    assert _resolve_backend("auto", handle.groups) == "torch"
    assert _resolve_backend("numba", handle.groups) == "numba"  # asked for explicitly: whatever the size


def test_backward_reads_the_saved_outputs():
    # saved-tensor hooks (activation checkpointing, offloading) hand the backward other tensors than the forward's
    # outputs, which may be freed or changed by then: the backward must read what saved_tensors gives it
    (w,) = [_weights(torch.float64)[2]]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        (y,) = _run("paper", [w])
    with torch.no_grad():
        y.zero_()  # the forward's own output, not the saved copy
    up = torch.randn_like(y)
    (got,) = torch.autograd.grad([y], [w], [up])
    (expected,) = torch.autograd.grad(_reference([w], "paper"), [w], [up])
    torch.testing.assert_close(got, expected)


def test_numba_backend_under_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    ref, model = _mixed_pair()
    enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8)
    model.zero_grad(set_to_none=True)
    y = checkpoint(model, x, use_reentrant=False)  # the recomputation makes new outputs; the forward's are freed
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, expected = _step(ref, x)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_gradgradcheck(preset):
    # create_graph=True (double backward: gradient penalties, meta-learning) works on the per-layer path
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True) for shape in ((3, 5), (2, 2, 3))]
    assert torch.autograd.gradgradcheck(lambda *t: _run(preset, list(t)), ws)


def test_numba_backend_double_backward_matches_per_layer():
    ref, model = _mixed_pair()
    ref, model = ref.double(), model.double()
    enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for m in (model, ref):
        loss = m(x).pow(2).sum()
        penalty = sum(g.pow(2).sum() for g in torch.autograd.grad(loss, list(m.parameters()), create_graph=True))
        penalty.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert find_handle(model)._numba.launches  # the kernels ran
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=lambda m, n=n: f"grad of {n}: {m}")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside forward_ad
def test_numba_backend_under_torch_func_and_forward_ad():
    # the kernels' autograd Function has no vmap rule and no jvp: under torch.func transforms and forward-mode AD
    # the pass must take the torch path (as the per-layer path, these work)
    import torch.autograd.forward_ad as fwAD

    ref, model = _mixed_pair()
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
def test_numba_backend_under_jit_trace():
    # a traced module must not hold a call of the kernels' Python Function: it could not be saved (nor exported)
    import io

    ref, model = _mixed_pair()
    enable_batched_ws(model, backend="numba")
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(model, x, check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), ref(x), rtol=1e-5, atol=1e-5)


class _TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = WSConv2d(3, 4, 3), WSConv2d(3, 4, 3)

    def forward(self, x, use_b=True):
        return self.a(x) + (self.b(x) if use_b else 0)


def test_numba_backend_unused_layers_get_no_gradient():
    # as per layer: a layer this forward did not use keeps grad None, so optimizers skip it (no weight decay, no
    # momentum step); a zero gradient would move its weights
    torch.manual_seed(0)
    model = _TwoHeads()
    enable_batched_ws(model, backend="numba")
    model(torch.randn(1, 3, 5, 5), use_b=False).sum().backward()
    assert len(find_handle(model)._numba.launches[0][0]) == 2  # one launch computed both
    assert model.a.weight.grad is not None and model.b.weight.grad is None


def test_accumulation_reports_a_layer_unused_in_the_last_micro_batch():
    from torchws.accumulate import ws_accumulation

    torch.manual_seed(0)
    model, x = _TwoHeads(), torch.randn(1, 3, 5, 5)
    with pytest.raises(RuntimeError, match="not used in the last micro-batch"):
        with ws_accumulation(model, steps=2, backend="numba"):
            model(x).sum().backward()
            model(x, use_b=False).sum().backward()


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_non_finite_weights_propagate_like_per_layer(preset):
    # a diverged weight (NaN, inf) gives NaN rows as per layer: no exception, and the other rows unaffected
    w = torch.randn(3, 10, dtype=torch.float64)
    w[1, 3], w[2, 0] = float("nan"), float("inf")
    w.requires_grad_()
    (y,) = _run(preset, [w])
    (ref,) = _reference([w], preset)
    torch.testing.assert_close(y, ref, equal_nan=True)
    up = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad([y], [w], [up])[0], torch.autograd.grad([ref], [w], [up])[0], equal_nan=True
    )


def test_numba_backend_with_batched_grad_outputs():
    # autograd.grad(is_grads_batched=True) (jacobian/hessian with vectorize=True) vmaps the backward over its grads
    torch.manual_seed(0)
    ref, x = _TwoHeads(), torch.randn(1, 3, 5, 5)
    model = copy.deepcopy(ref)
    enable_batched_ws(model, backend="numba")
    ups = torch.randn(3, 1, 4, 3, 3)
    got, expected = (torch.autograd.grad(m(x), m.a.weight, ups, is_grads_batched=True)[0] for m in (model, ref))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_double_backward_refuses_weights_modified_in_place():
    # the graph-building backward recomputes from the weights: modified since the forward, it would be silently wrong
    ws = _weights(torch.float64)[:1]
    (y,) = _run("paper", ws)
    with torch.no_grad():
        ws[0].mul_(2)
    with pytest.raises(RuntimeError, match="weight 0 .*modified in place after the forward"):
        torch.autograd.grad([y], ws, [torch.randn_like(y)], create_graph=True)
