"""Activation checkpointing (torch.utils.checkpoint, reentrant and not) with a model-level WS pass, against the
layers computing their own weights; and the private torch functions weight_cache.checkpoint_recomputing reads.

Non-reentrant checkpointing recomputes a region during backward and requires the recomputation to save the same
tensors as the forward: the pass keeps the weights of its last grad-enabled forward for it (weight_cache.keep).
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchws.fast import disable_batched_ws, enable_batched_ws, find_handle, ws_accumulation
from torchws.fast.engines.numba import numba_status
from torchws.fast.engines.torch import TorchEngine
from torchws.layers import weight_cache
from torchws.layers.ws import WSConv2d

ENGINES = ["torch", "torch_concat"] + (["numba"] if numba_status() is None else [])


def _enable(model, engine):
    handle = enable_batched_ws(model, backend="numba" if engine == "numba" else "torch")
    if engine == "torch_concat":  # one autograd node per group, as on a GPU
        handle.engine = TorchEngine(handle.plan, concat=True)
    return handle


class _Checkpointed(nn.Module):
    """Three WS convs, the middle one checkpointed inside the forward."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.a = WSConv2d(3, 8, 3, padding=1)
        self.b, self.c = WSConv2d(8, 8, 3, padding=1), WSConv2d(8, 8, 3, padding=1)
        self.reentrant = reentrant

    def features(self, x):
        return checkpoint(lambda t: torch.relu(self.b(t)), torch.relu(self.a(x)), use_reentrant=self.reentrant)

    def forward(self, x):
        return self.c(self.features(x))


def _pair(engine="torch", reentrant=False, cls=_Checkpointed):
    torch.manual_seed(0)
    ref = cls(reentrant)
    net = copy.deepcopy(ref)
    _enable(net, engine)
    return net, ref


def _x(seed=1):
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _assert_same_grads(net, ref):
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        atol = 1e-5 * float(q.grad.abs().max())  # (the numba kernels round differently)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=lambda s, n=n: f"{n}: {s}")


# --- the private torch functions ----------------------------------------------------------------------------------
def test_the_private_torch_functions_checkpoint_recomputing_reads():
    # weight_cache.checkpoint_recomputing reads two private torch functions; if torch renames or changes them this
    # test fails (and with it every non-reentrant checkpoint test below)
    assert callable(torch._C._autograd._top_saved_tensors_default_hooks)
    assert callable(torch._C._current_graph_task_id)
    assert torch._C._current_graph_task_id() == -1  # outside a backward pass
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # no saved-tensor hooks
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
        assert callable(pack) and callable(unpack)

    seen = []

    def region(t):
        seen.append((weight_cache.checkpoint_phase(), weight_cache.checkpoint_recomputing(),
                     torch._C._current_graph_task_id()))  # fmt: skip
        return t.sin()

    x = torch.randn(3, requires_grad=True)
    assert not weight_cache.checkpoint_recomputing()  # outside
    y = checkpoint(region, x, use_reentrant=False)
    assert not weight_cache.checkpoint_recomputing()
    y.sum().backward()
    # the region's first forward (not recomputing), then its recomputation inside the backward
    assert [s[:2] for s in seen] == [("forward", False), ("recompute", True)]
    assert seen[0][2] == -1 and seen[1][2] != -1
    # reentrant: the recomputation runs a forward of its own under no saved-tensor hooks of checkpoint's
    seen.clear()
    checkpoint(region, x, use_reentrant=True).sum().backward()
    assert [s[:2] for s in seen] == [("", False), ("", False)]
    # a backward pass without checkpointing is not a recomputation
    z = torch.randn(3, requires_grad=True)
    z.register_hook(lambda g: seen.append(weight_cache.checkpoint_recomputing()) or g)
    z.exp().sum().backward()
    assert seen[-1] is False


# --- the pass under checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_stage_over_sgd_steps(engine, reentrant):
    # the recomputation during backward must see the weights the forward used (else CheckpointError)
    net, ref = _pair(engine, reentrant)
    for step in range(2):  # a second step: the kept weights are the new ones
        for m in (net, ref):
            m.zero_grad(set_to_none=True)
            m(_x(step)).square().mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(0.1 * p.grad)
        _assert_same_grads(net, ref)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reentrant", [False, True])
def test_whole_model_checkpointed(engine, reentrant):
    # the root's own forward runs again during backward (under no_grad first, if reentrant)
    net, ref = _pair(engine)
    for m in (net, ref):
        x = _x().requires_grad_(reentrant)
        checkpoint(m, x, use_reentrant=reentrant).square().mean().backward()
    _assert_same_grads(net, ref)


def test_layer_checkpointed_on_its_own_after_a_root_forward():
    # outside the root's forward the layer computes its weight in the region's first forward, so its recomputation
    # must too: the last root forward's kept weight saves other tensors (CheckpointError)
    net, _ = _pair()
    x = _x()
    net(x).sum().backward()
    alone = copy.deepcopy(net.a)  # no pass, nothing kept
    for layer in (net.a, alone):
        layer.zero_grad(set_to_none=True)
        checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(net.a.weight.grad, alone.weight.grad)


@pytest.mark.parametrize("root_first", [False, True])
def test_checkpointed_features_and_the_root_forward_in_one_backward(root_first):
    # a checkpointed region outside the root's forward (the layers compute their weights) and one inside it (the
    # pass's kept weights) before one backward: each recomputation must save what its own forward saved
    net, ref = _pair()
    for step in range(2):
        for m in (net, ref):
            m.zero_grad(set_to_none=True)
            if root_first:
                out, feats = m(_x(step)), m.features(_x(step) + 1)
            else:
                feats, out = m.features(_x(step) + 1), m(_x(step))
            (out.square().mean() + feats.square().mean()).backward()
        _assert_same_grads(net, ref)


def test_a_no_grad_forward_between_a_forward_and_its_backward():
    # an evaluation between a forward and its backward must not replace the kept weights by graph-less ones
    net, ref = _pair()
    for m in (net, ref):
        loss = m(_x()).square().mean()
        with torch.no_grad():
            m(_x() + 1)
        loss.backward()
    _assert_same_grads(net, ref)


def test_a_tracked_layer_in_a_checkpointed_region_after_a_grad_forward():
    # tracking hooks take the layers off the pass (pre-hooks): they compute per layer, while a kept weight from an
    # earlier forward (weights unchanged since) is still there; the recomputation must compute per layer as well
    from torchws.analysis.gradients import gradient_norm_identity, track_standardized_grads

    net, ref = _pair()
    net(_x()).sum()  # a grad-enabled forward without a step (an evaluation, a skipped batch)
    for m in (net, ref):
        with track_standardized_grads(m):
            m(_x()).square().sum().backward()
    _assert_same_grads(net, ref)
    for name in ("a", "b", "c"):  # the recorded dL/dW_hat too (counted once)
        torch.testing.assert_close(gradient_norm_identity(getattr(net, name)).rhs,
                                   gradient_norm_identity(getattr(ref, name)).rhs, rtol=1e-4, atol=0)  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_reentrant_checkpointing_under_other_saved_tensor_hooks(engine):
    # save_on_cpu around forward and backward: reentrant checkpointing's recomputation runs inside backward under
    # saved-tensor hooks that are not checkpoint's; it must compute per layer
    net, ref = _pair(engine, reentrant=True)
    for m in (net, ref):
        with torch.autograd.graph.save_on_cpu():
            m(_x()).square().mean().backward()
    _assert_same_grads(net, ref)


@pytest.mark.parametrize("inner_engine", ["torch", None])
def test_nested_passes_with_a_checkpointed_inner_model(inner_engine):
    # a backbone with (or without) its own pass inside a model with one: the outer post-hook runs after the inner
    # one and must not take away what the inner forward kept
    torch.manual_seed(0)
    inner, ref_inner = _Checkpointed(), None
    ref_inner = copy.deepcopy(inner)
    if inner_engine is not None:
        _enable(inner, inner_engine)
    head = WSConv2d(8, 4, 3)
    outer, ref = nn.Sequential(inner, nn.ReLU(), head), nn.Sequential(ref_inner, nn.ReLU(), copy.deepcopy(head))
    enable_batched_ws(outer, backend="torch")
    for step in range(2):
        for m in (outer, ref):
            m.zero_grad(set_to_none=True)
            m(_x(step)).square().mean().backward()
        _assert_same_grads(outer, ref)


def test_kept_weights_are_not_served_outside_a_recomputation_nor_copied():
    net, _ = _pair()
    x = _x()
    net(x).sum().backward()
    handle = find_handle(net)
    kept = weight_cache._kept.get(handle)
    assert kept is not None and net.a in kept[0]
    assert weight_cache.lookup(net.a) is None  # a layer called on its own computes its weight
    twin = copy.deepcopy(net)  # deepcopy refuses non-leaf tensors: nothing kept may travel with the copy
    assert weight_cache._kept.get(find_handle(twin)) is None
    torch.testing.assert_close(twin(x), net(x))
    disable_batched_ws(net)
    assert weight_cache._kept.get(handle) is None


def test_next_forward_releases_the_kept_weights():
    # what a forward keeps is released by the next grad-enabled forward (one standardized copy of every weight)
    net, _ = _pair()
    net(_x()).sum().backward()
    first = weakref.ref(weight_cache._kept[find_handle(net)][0][net.a])
    net(_x(2)).sum().backward()
    gc.collect()
    assert first() is None


def test_a_dropped_model_and_its_kept_weights_are_freed():
    net, _ = _pair("numba" if "numba" in ENGINES else "torch")
    net(_x()).sum().backward()
    weight, handle = weakref.ref(net.a.weight), weakref.ref(find_handle(net))
    del net
    gc.collect()
    assert handle() is None and weight() is None


def test_reentrant_checkpointing_inside_ws_accumulation_with_steps():
    # the last micro-batch backpropagates through the real standardized weights; reentrant checkpointing runs a
    # nested backward through part of them, so they must not share one autograd node between layers
    net, ref = _pair("torch_concat", reentrant=True)
    xs = [_x(1), _x(2)]
    for x in xs:
        ref(x).square().mean().backward()
    with ws_accumulation(net, steps=2):
        for x in xs:
            net(x).square().mean().backward()
    _assert_same_grads(net, ref)
