"""The batched pass hands each layer its standardized weight; a forward interrupted by KeyboardInterrupt skips the
pass's clearing hook (torch runs always_call hooks for Exception only), so the layers must notice stale supplies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchws.batched import enable_batched_ws
from torchws.layers.ws import WSConv2d


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.ReLU(), WSConv2d(8, 8, 3, padding=1))
    enable_batched_ws(model, backend="torch")
    return model


def _interrupt(model, x, grad: bool):
    def stop(module, args, output):
        raise KeyboardInterrupt

    handle = model[2].register_forward_hook(stop)
    with torch.set_grad_enabled(grad), pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    assert model[0]._ws_supplied is not None  # the clearing hook did not run


def test_stale_supply_after_an_in_place_update_is_ignored():
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=True)
    with torch.no_grad():
        model[0].weight.mul_(-1).add_(0.3)  # what an optimizer step does
    expected = model[0].compute_standardized_weight()
    torch.testing.assert_close(model[0].standardized_weight(), expected)
    torch.testing.assert_close(model[0](x), torch.nn.functional.conv2d(x, expected, model[0].bias, padding=1))


def test_supply_made_without_grad_is_not_used_for_a_grad_forward():
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=False)
    model[0](x).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_stale_supply_after_the_weight_was_replaced_is_ignored():
    # load_state_dict(assign=True) puts in new Parameters whose version counters may equal the recorded one (a
    # fresh layer's weight and a loaded tensor are both at 1): the supply must belong to this very weight
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=True)
    torch.manual_seed(1)
    other = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.ReLU(), WSConv2d(8, 8, 3, padding=1))
    model.load_state_dict(other.state_dict(), assign=True)
    torch.testing.assert_close(model[0](x), other[0](x))


def test_valid_supply_is_used_and_user_supplies_are_not_second_guessed():
    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=True)
    supplied = model[0]._ws_supplied
    assert model[0].standardized_weight() is supplied  # unchanged weights: the supply is still right
    mine = torch.zeros_like(model[0].weight)
    model[0].set_standardized_weight(mine)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert model[0].standardized_weight() is mine  # set by the user: their contract
    model(x)  # a full forward supplies afresh and clears afterwards
    assert model[0]._ws_supplied is None and model[2]._ws_supplied is None


def _resnet_with_checkpointed_stage(backend, reentrant):
    from torch.utils.checkpoint import checkpoint

    from torchws.models import create_model

    class Net(nn.Module):  # a stage checkpointed inside the root's forward, as timm's grad checkpointing does
        def __init__(self) -> None:
            super().__init__()
            self.m = create_model("cifar_resnet20_gn_ws", batched_ws=False)

        def forward(self, x):
            m = self.m
            h = m.relu(m.bn1(m.conv1(x)))
            h = checkpoint(m.layer1, h, use_reentrant=reentrant)
            h = m.layer3(m.layer2(h))
            return m.fc(torch.flatten(m.avgpool(h), 1))

    torch.manual_seed(0)
    net = Net()
    if backend is not None:  # "torch+concat": one node per group, as on a GPU
        enable_batched_ws(net, backend=backend.split("+")[0], concat="+concat" in backend or None)
    return net


@pytest.mark.parametrize("backend", ["torch", "torch+concat", "numba"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_inside_the_forward(backend, reentrant):
    # the recomputation during backward must see the weights the forward used (it raised CheckpointError)
    if backend == "numba":
        from torchws.kernels import cpu_ws

        if not cpu_ws.is_available():
            pytest.skip("needs numba")
    net, ref = _resnet_with_checkpointed_stage(backend, reentrant), _resnet_with_checkpointed_stage(None, reentrant)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):  # a second step: the kept weights are the new ones
        for m in (net, ref):
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(0.1 * p.grad)
        for (n, p), q in zip(net.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


def test_kept_weights_are_not_used_outside_backward_nor_copied():
    import copy

    model = _model()
    x = torch.randn(1, 3, 6, 6)
    model(x).sum().backward()
    kept = model[0]._ws_last
    assert kept is not None and model[0]._ws_supplied is None
    assert model[0].standardized_weight() is not kept  # a layer called on its own computes its weight
    twin = copy.deepcopy(model)  # deepcopy refuses non-leaf tensors: the kept weight must not travel
    assert twin[0]._ws_last is None
    torch.testing.assert_close(twin(x), model(x))
    from torchws.batched import disable_batched_ws

    disable_batched_ws(model)
    assert model[0]._ws_last is None


class _Checkpointed(nn.Module):
    """Three WS convs, the middle one checkpointed inside the forward."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.a = WSConv2d(3, 8, 3, padding=1)
        self.b, self.c = WSConv2d(8, 8, 3, padding=1), WSConv2d(8, 8, 3, padding=1)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda t: torch.relu(self.b(t)), torch.relu(self.a(x)), use_reentrant=self.reentrant)
        return self.c(h)


def _checkpointed_pair(backend="torch", concat=None, reentrant=False):
    import copy

    torch.manual_seed(0)
    ref = _Checkpointed(reentrant)
    net = copy.deepcopy(ref)
    enable_batched_ws(net, backend=backend, concat=concat)
    return net, ref


def _assert_same_grads(net, ref):
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        atol = 1e-5 * float(q.grad.abs().max())  # (the numba kernels round differently; WS's projection cancels)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=lambda s, n=n: f"{n}: {s}")


def test_layer_checkpointed_on_its_own_after_a_root_forward():
    # outside the root's forward the layer computes its weight in the region's first forward, so its recomputation
    # must too: the last root forward's kept weight saves other tensors (CheckpointError)
    import copy

    from torch.utils.checkpoint import checkpoint

    model = _model()
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    alone = copy.deepcopy(model[0])  # no pass, nothing kept
    for layer in (model[0], alone):
        layer.zero_grad(set_to_none=True)
        checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, alone.weight.grad)


def test_tracked_layers_in_a_checkpointed_region_after_a_grad_forward():
    # tracking hooks take the layers off the pass (pre-hooks): they compute per layer, while a kept weight from an
    # earlier forward (weights unchanged since) is still there; the recomputation must compute per layer as well
    from torchws.analysis.gradients import gradient_norm_identity, track_standardized_grads

    net, ref = _checkpointed_pair()
    x = torch.randn(2, 3, 6, 6)
    net(x).sum()  # a grad-enabled forward without a step (an evaluation, a skipped batch)
    for m in (net, ref):
        with track_standardized_grads(m):
            m(x).square().sum().backward()
    _assert_same_grads(net, ref)
    for name in ("a", "b", "c"):  # the recorded dL/dW_hat too (counted once)
        torch.testing.assert_close(gradient_norm_identity(getattr(net, name)).rhs,
                                   gradient_norm_identity(getattr(ref, name)).rhs, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend,concat", [("torch", True), ("numba", None)])
def test_reentrant_checkpointing_under_other_saved_tensor_hooks(backend, concat):
    # save_on_cpu around forward and backward: reentrant checkpointing's recomputation runs inside backward under
    # saved-tensor hooks that are not checkpoint's; it must compute per layer (the kept weight led its backward into
    # the forward's pass graph, shared with the other layers: "backward through the graph a second time")
    if backend == "numba":
        from torchws.kernels import cpu_ws

        if not cpu_ws.is_available():
            pytest.skip("needs numba")
    net, ref = _checkpointed_pair(backend, concat, reentrant=True)
    x = torch.randn(2, 3, 6, 6)
    for m in (net, ref):
        with torch.autograd.graph.save_on_cpu():
            m(x).square().mean().backward()
    _assert_same_grads(net, ref)


def test_next_forward_releases_the_kept_weights_before_computing_its_own():
    # the kept weights (one standardized copy of every WS weight) must not stay alive through the next forward,
    # next to that forward's own: it would raise every step's peak memory by that copy
    import weakref

    model = _model()
    x = torch.randn(1, 3, 6, 6)
    model(x).sum().backward()
    kept = weakref.ref(model[0]._ws_last)
    alive = []
    model[1].register_forward_hook(lambda *args: alive.append(kept() is not None))  # mid-forward (the ReLU)
    model(x).sum().backward()
    assert alive == [False]
    assert model[0]._ws_last is not None  # this forward's own are kept


def test_checkpointed_forward_then_a_no_grad_forward_then_its_backward():
    # a no-grad forward between a forward and its backward (an evaluation, a forward inside a backward hook) must
    # not replace the kept weights by graph-less ones, which the recomputation cannot take (CheckpointError)
    net, ref = _checkpointed_pair()
    x = torch.randn(2, 3, 6, 6)
    for m in (net, ref):
        loss = m(x).square().mean()
        with torch.no_grad():
            m(x + 1)
        loss.backward()
    _assert_same_grads(net, ref)


def test_model_copies_after_an_interrupted_forward():
    # the supply left by the interrupted forward is part of its graph: deepcopy refuses non-leaf tensors, so copying
    # the model (deepcopy, fold() for export) after Ctrl-C raised; a copy has no use for it
    import copy

    from torchws.convert import fold

    model = _model()
    x = torch.randn(1, 3, 6, 6)
    _interrupt(model, x, grad=True)
    twin = copy.deepcopy(model)
    assert twin[0]._ws_supplied is None and model[0]._ws_supplied is not None
    expected = model[2](torch.relu(model[0](x)))
    torch.testing.assert_close(twin(x), expected)
    torch.testing.assert_close(fold(model)(x), expected)


def test_checkpointing_inside_a_model_nested_in_another_with_its_own_pass():
    # a backbone with its own pass inside a model with one (a zoo model under convert()): the outer pass's clearing
    # hook runs after the inner one's and must not overwrite the inner forward's kept weights with None
    import copy

    net, ref_inner = _checkpointed_pair()
    head = WSConv2d(8, 4, 3)
    outer, ref = nn.Sequential(net, nn.ReLU(), head), nn.Sequential(ref_inner, nn.ReLU(), copy.deepcopy(head))
    enable_batched_ws(outer, backend="torch")
    x = torch.randn(2, 3, 6, 6)
    for m in (outer, ref):
        m(x).square().mean().backward()
    _assert_same_grads(outer, ref)


class _WithFeatures(_Checkpointed):
    """_Checkpointed whose checkpointed part is also a method called on its own (features for an extra loss)."""

    def features(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda t: torch.relu(self.b(t)), torch.relu(self.a(x)), use_reentrant=False)

    def forward(self, x):
        return self.c(self.features(x))


@pytest.mark.parametrize("root_first", [False, True])
def test_checkpointed_features_and_the_root_forward_in_one_backward(root_first):
    # a checkpointed region outside the root's forward (features for an extra loss: no supply, the layers compute
    # their weights) and one inside it (the pass's kept weights) before one backward: each recomputation must save
    # what its own forward saved, whichever of the two ran last (CheckpointError)
    import copy

    torch.manual_seed(0)
    ref = _WithFeatures()
    net = copy.deepcopy(ref)
    enable_batched_ws(net, backend="torch")
    x = torch.randn(2, 3, 6, 6)
    for _ in range(2):
        for m in (net, ref):
            m.zero_grad(set_to_none=True)
            if root_first:
                out = m(x)
                feats = m.features(x + 1)
            else:
                feats = m.features(x + 1)
                out = m(x)
            (out.square().mean() + feats.square().mean()).backward()
        _assert_same_grads(net, ref)


def test_checkpointed_region_under_enable_grad_in_a_no_grad_forward():
    # a root forward under no_grad that enables grad inside (an inner optimisation loop): the graph-less supply does
    # not serve there, the layers compute their weights; the recomputation must not take an earlier step's kept ones
    class EnablesGrad(_Checkpointed):
        def forward(self, x):
            with torch.enable_grad():
                return super().forward(x)

    import copy

    torch.manual_seed(0)
    ref = EnablesGrad()
    net = copy.deepcopy(ref)
    enable_batched_ws(net, backend="torch")
    x = torch.randn(2, 3, 6, 6)
    for m in (net, ref):
        m(x).sum().backward()  # a grad step first: its weights are kept
        m.zero_grad(set_to_none=True)
        with torch.no_grad():
            out = m(x)
        out.square().mean().backward()
    _assert_same_grads(net, ref)


@pytest.mark.parametrize("backend", ["auto", "torch+concat"])  # the pass's backend; ws_accumulation's is "auto"
def test_reentrant_checkpointing_inside_ws_accumulation_with_steps(backend):
    # the last micro-batch backpropagates through the real standardized weights; reentrant checkpointing runs a
    # nested backward through part of them, so they must not share one autograd node between layers
    from torchws.accumulate import ws_accumulation

    net, ref = _resnet_with_checkpointed_stage(backend, True), _resnet_with_checkpointed_stage(None, True)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    for x in xs:
        ref(x).square().mean().backward()
    with ws_accumulation(net, steps=2):
        for x in xs:
            net(x).square().mean().backward()
    for (n, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")
