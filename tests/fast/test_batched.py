"""The model-level WS pass (torchws.fast.batched), its plan (torchws.fast.plan) and the one place that picks an
engine (torchws.fast.engines.select_engine): mechanics, against the layers computing their own weights.

Engine x feature equivalence (autocast, channels_last, checkpointing, accumulation, compile, DDP, frozen and changed
weights) is in test_equivalence.py.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from torchws.fast import (
    auto_enable,
    auto_engine,
    disable_batched_ws,
    enable_batched_ws,
    find_handle,
    select_engine,
)
from torchws.fast import engines as engines_module
from torchws.fast.engines import AUTO_NUMBA_MAX_ELEMENTS
from torchws.fast.engines import numba as numba_engine
from torchws.fast.engines.torch import TorchEngine
from torchws.fast.plan import Plan
from torchws.layers import weight_cache
from torchws.layers.ws import WSConv2d, WSLinear, WSMixin

HAS_NUMBA = numba_engine.numba_status() is None
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="needs numba")


@pytest.fixture
def per_layer_calls(monkeypatch):
    """The layers whose forward computed their own weight (none was served from a cache)."""
    calls = []
    original = WSMixin.compute_standardized_weight

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(WSMixin, "compute_standardized_weight", counting)
    return calls


def _names(model):
    return {m: n for n, m in model.named_modules()}


# --- plan and the torch engine ------------------------------------------------------------------------------------
def test_plan_groups_the_layers_by_what_one_call_shares(mixed_pair):
    _, model = mixed_pair()
    plan = Plan(model)
    names = _names(model)
    assert [names[m] for m in plan.layers] == ["c1", "c2", "c3", "c2b", "c4", "c5", "t1", "c6", "fc_a", "fc_b"]
    groups = {tuple(names[m] for m in g.layers): g.natural for g in plan.groups}
    assert groups == {("c1",): True, ("c2", "c3"): True, ("c2b", "fc_a"): False, ("c4",): True, ("c5",): True,
                      ("t1", "c6"): False, ("fc_b",): True}  # fmt: skip
    assert plan.sources[model.c1] is model.c1.weight
    assert len(plan.tensors()) == 10 + 2 + 1 + 1  # weights, gains of c2, c3, fc_b, the shift of c5


@pytest.mark.parametrize("concat", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_engine_matches_each_layers_own_weight(mixed_pair, concat, dtype, tol, channels_last):
    _, model = mixed_pair(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = TorchEngine(Plan(model), concat=concat)()
    for m in Plan(model).layers:
        own = m.compute_standardized_weight()
        if concat:
            torch.testing.assert_close(out[m], own, rtol=tol, atol=tol)
        else:
            assert torch.equal(out[m], own)  # the layer's own ops: bit for bit
        # the rows are read in memory order: the standardized weight keeps the weight's layout without a copy
        if m.ws_transposed:
            continue  # (the layer's own transposed weight comes out contiguous too)
        formats = [torch.contiguous_format] + ([torch.channels_last] if m.weight.dim() == 4 else [])
        assert [out[m].is_contiguous(memory_format=f) for f in formats] == \
               [m.weight.is_contiguous(memory_format=f) for f in formats]  # fmt: skip


# --- pass mechanics -----------------------------------------------------------------------------------------------
def test_remove_and_standalone_layers_compute_per_layer(mixed_pair, per_layer_calls):
    ref, model = mixed_pair()
    handle = enable_batched_ws(model, backend="torch")
    assert handle.engine.name == "torch" and len(handle.layers) == 10
    x = torch.randn(1, 3, 8, 8)
    model(x)
    assert per_layer_calls == [] and all(weight_cache.lookup(m) is None for m in handle.layers)
    # a layer used alone after its weight moved: must not reuse the last forward's weight
    with torch.no_grad():
        model.c2.weight.mul_(-2.0).add_(0.1)
        ref.c2.weight.mul_(-2.0).add_(0.1)
    h = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(model.c2(h), ref.c2(h))
    assert per_layer_calls == [model.c2, ref.c2]
    assert disable_batched_ws(model) and find_handle(model) is None and not disable_batched_ws(model)
    per_layer_calls.clear()
    torch.testing.assert_close(model(x), ref(x))
    assert len(per_layer_calls) == 20


def test_pre_hooked_layers_are_not_batchable(mixed_pair, backprop, assert_grads_close):
    ref, model = mixed_pair()
    for m in (ref, model):
        torch.manual_seed(1)
        prune.random_unstructured(m.c3, "weight", amount=0.5)  # weight recomputed in a pre-hook
    handle = enable_batched_ws(model, backend="torch")
    assert model.c3 not in handle.layers and model.c2 in handle.layers
    x = torch.randn(2, 3, 8, 8)
    assert_grads_close(backprop(model, x), backprop(ref, x), rtol=0, atol=0)


def test_a_pre_hook_added_after_enabling_takes_the_layer_off_the_pass(mixed_pair):
    ref, model = mixed_pair()
    handle = enable_batched_ws(model, backend="torch")
    x = torch.randn(1, 3, 8, 8)
    model(x)

    def halve(module, args):  # a hook that changes the weight, as pruning does
        module.weight.data.mul_(0.5)

    for m in (ref, model):
        m.c1.register_forward_pre_hook(halve)
    torch.testing.assert_close(model(x), ref(x))
    assert model.c1 not in handle.layers


def test_exception_in_forward_deactivates_the_cache(mixed_pair):
    ref, model = mixed_pair()
    handle = enable_batched_ws(model, backend="torch")
    with pytest.raises(RuntimeError, match="channels"):
        model(torch.randn(1, 5, 8, 8))  # wrong channel count
    assert all(weight_cache.lookup(m) is None for m in handle.layers) and handle._open == []
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))


def _interrupted(model, layer, grad: bool) -> None:
    """A forward of ``model`` stopped by KeyboardInterrupt after ``layer`` (torch runs ``always_call`` hooks for
    Exception only: the pass's post-hook does not run)."""

    def stop(module, args, output):
        raise KeyboardInterrupt

    hook = layer.register_forward_hook(stop)
    with torch.set_grad_enabled(grad), pytest.raises(KeyboardInterrupt):
        model(torch.randn(1, 3, 8, 8))
    hook.remove()


def test_a_forward_interrupted_by_keyboard_interrupt_leaves_no_stale_weights(mixed_pair):
    ref, model = mixed_pair()
    enable_batched_ws(model, backend="torch")
    _interrupted(model, model.c2b, grad=True)
    assert weight_cache.lookup(model.c1) is not None  # still active: the weights did not change
    with torch.no_grad():  # what an optimizer step does
        for m in (ref, model):
            m.c1.weight.mul_(-1).add_(0.3)
            m.c2.gain.add_(0.5)
    h = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(model.c1(h), ref.c1(h))
    h2 = torch.randn(1, 8, 5, 5)
    torch.testing.assert_close(model.c2(h2), ref.c2(h2))
    # a replaced weight (load_state_dict(assign=True)) whose version counter equals the old one
    torch.manual_seed(3)
    other = WSConv2d(3, 8, 3, padding=1)
    for m in (ref, model):
        m.c1.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(model.c1(h), ref.c1(h))
    model(torch.randn(1, 3, 8, 8))  # the next root forward drops what the interrupted one left
    assert all(weight_cache.lookup(m) is None for m in find_handle(model).layers)


def test_model_copies_after_an_interrupted_forward(mixed_pair):
    # what the interrupted forward left is part of its graph: a copy (deepcopy, fold() for export) must neither
    # refuse it (deepcopy refuses non-leaf tensors) nor use it
    from torchws import fold

    ref, model = mixed_pair()
    enable_batched_ws(model, backend="torch")
    _interrupted(model, model.c2b, grad=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for m in (ref, twin):
            m.c1.weight.add_(0.2)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(twin(x), ref(x))
    folded = fold(model)
    assert type(folded.c1) is nn.Conv2d
    torch.testing.assert_close(folded.c1.weight, model.c1.compute_standardized_weight().detach())


def test_weights_of_an_interrupted_no_grad_forward_do_not_serve_a_grad_forward(mixed_pair):
    _, model = mixed_pair()
    enable_batched_ws(model, backend="torch")
    _interrupted(model, model.c2b, grad=False)
    model.c1(torch.randn(1, 3, 6, 6)).sum().backward()
    assert model.c1.weight.grad is not None and model.c1.weight.grad.abs().sum() > 0


def test_a_no_grad_forward_that_enables_grad_inside(mixed_pair, backprop, assert_grads_close):
    # an inner optimisation loop under no_grad: the graph-less weights of the pass must not serve there
    class EnablesGrad(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.enable_grad():
                return self.inner(x)

    ref, model = (EnablesGrad(m) for m in mixed_pair())
    enable_batched_ws(model, backend="torch")
    x = torch.randn(2, 3, 8, 8)
    results = []
    for m in (model, ref):
        with torch.no_grad():
            y = m(x)
        y.square().sum().backward()
        results.append({n: p.grad for n, p in m.named_parameters()})
    assert_grads_close(*results, rtol=0, atol=0)


def test_deepcopy_gets_its_own_pass(mixed_pair):
    _, model = mixed_pair()
    enable_batched_ws(model, backend="torch")
    x = torch.randn(1, 3, 8, 8)
    y = model(x)  # a forward pending: the copy must not take its weights
    clone = copy.deepcopy(model)
    assert find_handle(clone) is not find_handle(model) and find_handle(clone).model is clone
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    expected = copy.deepcopy(clone)
    disable_batched_ws(expected)
    torch.testing.assert_close(clone(x), expected(x))
    assert find_handle(clone).plan.sources[clone.c1] is clone.c1.weight
    assert not torch.allclose(clone(x), y)
    torch.testing.assert_close(model(x), y)


def test_auto_enable_and_the_environment_switch(mixed_pair, monkeypatch):
    _, model = mixed_pair()
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("TORCHWS_BATCHED", off)
        assert auto_enable(model) is None and find_handle(model) is None
    monkeypatch.setenv("TORCHWS_BATCHED", "1")
    assert auto_enable(model, enabled=False) is None and find_handle(model) is None
    assert auto_enable(nn.Sequential(nn.Conv2d(3, 4, 3))) is None  # nothing to batch
    handle = auto_enable(model)
    assert handle is find_handle(model) and handle.backend == "auto"
    assert enable_batched_ws(model, backend="torch") is handle and handle.engine.name == "torch"  # re-selected


def test_enable_rejects_an_unknown_backend(mixed_pair):
    _, model = mixed_pair()
    with pytest.raises(ValueError, match=r"enable_batched_ws: backend must be one of \('auto', .*got 'triton'"):
        enable_batched_ws(model, backend="triton")
    assert find_handle(model) is None


@pytest.mark.parametrize(
    "change",
    ["replaced", "eps", "dtype", "requires_grad", "channels_last", "gain_replaced"],
)
def test_plan_goes_stale_when_the_model_changes(mixed_pair, change):
    ref, model = mixed_pair()
    handle = enable_batched_ws(model, backend="torch")
    x = torch.randn(1, 3, 8, 8)
    model(x)
    plan = handle.plan
    assert not plan.stale()
    for m in (ref, model):
        if change == "replaced":
            m.c1.weight = nn.Parameter(m.c1.weight.detach() * 2 + 0.5)
        elif change == "eps":
            m.c1.ws_eps = 0.5  # a large eps changes the standardized weight visibly
        elif change == "dtype":
            m.double()
        elif change == "requires_grad":
            m.c2b.weight.requires_grad_(False)
        elif change == "channels_last":
            m.to(memory_format=torch.channels_last)
        else:
            m.c2.gain = nn.Parameter(torch.full_like(m.c2.gain, 2.0))
    assert plan.stale() != (change == "gain_replaced")  # a new gain is read where it lies: no new plan needed
    xx = x.double() if change == "dtype" else x
    y, y_ref = model(xx), ref(xx)
    assert (handle.plan is not plan) != (change == "gain_replaced") and not handle.plan.stale()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y.sum().backward()
    if change == "requires_grad":
        assert model.c2b.weight.grad is None and model.c1.weight.grad is not None


def test_refresh_after_adding_a_layer(mixed_pair):
    _, model = mixed_pair()
    handle = enable_batched_ws(model, backend="torch")
    model.extra = WSLinear(5, 5)
    assert model.extra not in handle.layers  # surgery is not seen without refresh
    handle.refresh()
    assert model.extra in handle.layers and len(handle.layers) == 11


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
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_nested_models_each_with_a_pass_and_a_shared_layer(backprop, assert_grads_close):
    torch.manual_seed(0)
    inner = nn.Sequential(WSConv2d(3, 4, 3, padding=1), nn.ReLU(), WSConv2d(4, 4, 3, padding=1))
    ref = nn.Sequential(inner, nn.ReLU(), WSConv2d(4, 2, 3))
    model = copy.deepcopy(ref)
    inner_handle = enable_batched_ws(model[0], backend="torch")
    outer_handle = enable_batched_ws(model, backend="torch")
    assert set(inner_handle.layers) < set(outer_handle.layers)
    x = torch.randn(2, 3, 7, 7)
    assert_grads_close(backprop(model, x), backprop(ref, x), rtol=0, atol=0)
    assert_grads_close(backprop(model[0], x), backprop(ref[0], x), rtol=0, atol=0)  # the inner one alone


def test_tied_weights_two_layers_one_parameter(backprop, assert_grads_close):
    torch.manual_seed(0)
    ref = nn.Sequential(WSConv2d(3, 3, 3, padding=1), nn.ReLU(), WSConv2d(3, 3, 3, padding=1))
    ref[2].weight = ref[0].weight
    engines = ["torch"] + (["numba"] if HAS_NUMBA else [])
    x = torch.randn(2, 3, 6, 6)
    want = backprop(ref, x)
    for backend in engines:
        model = copy.deepcopy(ref)
        assert model[2].weight is model[0].weight
        enable_batched_ws(model, backend=backend)
        assert_grads_close(backprop(model, x), want)


def test_backward_with_inputs_and_post_accumulate_grad_hooks(mixed_pair, assert_grads_close):
    # backward(inputs=params) and PyTorch's "optimizer step in backward" recipe reach the WS weights
    ref, model = mixed_pair()
    enable_batched_ws(model)
    x = torch.randn(1, 3, 8, 8)
    grads, fired = [], []
    for m in (model, ref):
        m(x).square().sum().backward(inputs=list(m.parameters()))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p, owner=m: fired.append(owner))
        m(x).square().sum().backward()
    assert_grads_close(*grads)
    assert fired.count(model) == fired.count(ref) == len(list(ref.parameters()))


def test_retain_graph_siamese_and_a_failed_backward(mixed_pair, assert_grads_close):
    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise ValueError("backward failed on purpose")

    ref, model = mixed_pair()
    enable_batched_ws(model)
    a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    grads = []
    for m in (model, ref):
        with pytest.raises(ValueError, match="on purpose"):
            m(Fails.apply(a.requires_grad_())).sum().backward()
        m.zero_grad(set_to_none=True)
        ya, yb = m(a), m(b)  # two forwards, one backward
        loss = (ya - yb).square().sum()
        loss.backward(retain_graph=True)
        (2 * loss).backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert_grads_close(*grads)


# --- select_engine and auto_engine --------------------------------------------------------------------------------
def test_select_engine_rejects_unknown_names(mixed_pair):
    _, model = mixed_pair()
    with pytest.raises(ValueError, match=r"WS pass: backend must be one of \('auto', 'torch', 'numba', 'cuda_graph'\)"
                                         r", got 'trition'"):  # fmt: skip
        select_engine("trition", Plan(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only model")
def test_cuda_graph_on_a_cpu_model_raises(mixed_pair):
    _, model = mixed_pair()
    with pytest.raises(ValueError, match=r"backend='cuda_graph' needs every WS weight.*found one on cpu"):
        enable_batched_ws(model, backend="cuda_graph")
    assert find_handle(model) is None


@needs_numba
def test_numba_with_weights_not_on_the_cpu_raises(mixed_pair):
    _, model = mixed_pair()
    model.c4.to("meta")  # a weight on another device: no CUDA needed to place one off the CPU
    with pytest.raises(ValueError, match=r"backend='numba' runs on the CPU, but 1 WS weight\(s\) are not on the CPU "
                                         r"\(first: WSConv2d\)"):  # fmt: skip
        enable_batched_ws(model, backend="numba")
    assert auto_engine(Plan(model)) == "torch"  # mixed devices: auto takes torch


@pytest.fixture
def numba_missing(monkeypatch):
    """``set(status)``: what numba_status() reports (None: importable), cache cleared on both sides."""

    def set_status(find_spec_result, import_error=None):
        numba_engine.numba_status.cache_clear()
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, real=importlib.util.find_spec:
                            find_spec_result if name == "numba" else real(name, *a))  # fmt: skip
        real_import = importlib.import_module

        def fake_import(name, *args):
            if name == "numba" and import_error is not None:
                raise import_error
            return real_import(name, *args)

        monkeypatch.setattr(importlib, "import_module", fake_import)
        return numba_engine.numba_status()

    yield set_status
    numba_engine.numba_status.cache_clear()


def test_numba_not_installed_raises_for_a_named_request_and_auto_takes_torch(mixed_pair, numba_missing, recwarn):
    _, model = mixed_pair()
    assert numba_missing(None) == "not installed (pip install 'torchws[cpu]')"
    with pytest.raises(RuntimeError, match=r"backend='numba' needs numba, which is not installed \(pip install "):
        enable_batched_ws(model, backend="numba")
    assert find_handle(model) is None
    assert enable_batched_ws(model).engine.name == "torch"
    assert not [w for w in recwarn if "numba" in str(w.message)]  # not installed: nothing to warn about


def test_a_broken_numba_is_reported_as_broken(mixed_pair, numba_missing):
    _, model = mixed_pair()
    status = numba_missing(object(), ImportError("numpy version mismatch"))
    assert status == "installed but broken: ImportError: numpy version mismatch"
    with pytest.raises(RuntimeError, match="numba, which is installed but broken: ImportError: numpy version mismatch"):
        enable_batched_ws(model, backend="numba")
    with pytest.warns(UserWarning, match="numba is installed but broken: .*the WS pass runs the torch engine"):
        handle = enable_batched_ws(model)
    assert handle.engine.name == "torch"


@needs_numba
def test_auto_runs_numba_on_small_cpu_models_and_torch_above_the_limit(monkeypatch):
    from torchws.models import create_model

    model = create_model("cifar_resnet20_gn_ws")
    handle = find_handle(model)
    assert handle.backend == "auto" and handle.engine.name == "numba"
    assert len(handle.engine.launches[0].layers) == len(handle.layers)  # every layer in one kernel launch
    total = sum(m.weight.numel() for m in handle.layers)
    assert total <= AUTO_NUMBA_MAX_ELEMENTS == 1 << 21
    monkeypatch.setattr(engines_module, "AUTO_NUMBA_MAX_ELEMENTS", total - 1)
    assert auto_engine(handle.plan) == "torch"
    handle.refresh()
    assert handle.engine.name == "torch"
    assert select_engine("numba", handle.plan).name == "numba"  # asked for by name: whatever the size
    big = nn.Sequential(WSLinear(1500, 1500))  # 2.25M elements
    assert auto_engine(Plan(big)) == "torch"


def test_the_pass_compiles_without_graph_breaks(mixed_pair):
    # under torch.compile the pass steps aside: the compiler traces the layers' own ops
    torch._dynamo.reset()
    ref, model = mixed_pair()
    enable_batched_ws(model)
    x = torch.randn(1, 3, 8, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-6, atol=1e-6)
    assert all(weight_cache.lookup(m) is None for m in find_handle(model).layers)
    torch._dynamo.reset()


@needs_numba
def test_enabling_again_with_an_engine_that_cannot_run_keeps_the_current_one(mixed_pair):
    _, model = mixed_pair()
    handle = enable_batched_ws(model, backend="numba")
    engine = handle.engine
    with pytest.raises(ValueError, match="backend='cuda_graph' needs every WS weight"):
        enable_batched_ws(model, backend="cuda_graph")
    assert (handle.backend, handle.engine) == ("numba", engine)
    model.c1.weight = nn.Parameter(model.c1.weight.detach().clone())  # stale plan: selected again, still numba
    model(torch.randn(1, 3, 8, 8))
    assert handle.engine.name == "numba" and handle.engine is not engine


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_warm_up_writes_no_gradient_and_changes_no_step(mixed_pair, backprop, backend):
    """``warm_up`` runs the pass forward and backward once (the engine's one-time set-up): no ``.grad`` appears, and
    the next forward and backward are bit for bit those of a pass that was not warmed up."""
    if backend == "numba" and numba_engine.numba_status() is not None:
        pytest.skip(f"needs numba: {numba_engine.numba_status()}")
    ref, model = mixed_pair()
    ref_handle, handle = enable_batched_ws(ref, backend=backend), enable_batched_ws(model, backend=backend)
    model.c1.weight.requires_grad_(False)
    ref.c1.weight.requires_grad_(False)  # (frozen weights are skipped)
    handle.warm_up()
    assert all(p.grad is None for p in model.parameters())
    assert ref_handle.engine.name == handle.engine.name == backend
    x = torch.randn(2, 3, 8, 8)
    y_ref, g_ref = backprop(ref, x)
    y, g = backprop(model, x)
    assert torch.equal(y, y_ref)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert (g[name] is None) == (g_ref[name] is None), name
        assert g[name] is None or torch.equal(g[name], g_ref[name]), name
