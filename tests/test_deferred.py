"""enable_batched_ws(model, deferred=True) (torchws._deferred) against the same model computed per layer.

Every test builds two copies of one model: ``ref`` without the batched pass (each layer standardizes its own weight
through autograd) and ``model`` with the deferred pass, runs the same steps on both and compares outputs, gradients
and weights. The numba engine (CPU) runs in most tests; the Triton engine runs in Triton's interpreter, which needs
TRITON_INTERPRET=1 before triton is first imported: set at the top of this module without CUDA, as in
test_kernels.py; if another module imported triton first, that test skips.
"""

from __future__ import annotations

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deferred_helpers import ATOL, RTOL, one_thread  # noqa: E402, F401 (one_thread: autouse)
from deferred_helpers import assert_close as _assert_close  # noqa: E402
from deferred_helpers import assert_grads as _assert_grads  # noqa: E402
from deferred_helpers import assert_params as _assert_params  # noqa: E402
from deferred_helpers import engine_of as _engine  # noqa: E402
from deferred_helpers import loss as _loss  # noqa: E402
from deferred_helpers import triton_on_cpu as _triton_on_cpu  # noqa: E402

from torchws._deferred import DeferredWS  # noqa: E402
from torchws.accumulate import ws_accumulation  # noqa: E402
from torchws.batched import disable_batched_ws, enable_batched_ws, find_handle  # noqa: E402
from torchws.kernels import cpu_ws  # noqa: E402
from torchws.layers.ws import WSConv1d, WSConv2d, WSConv3d, WSConvTranspose2d, WSLinear, WSMixin  # noqa: E402
from torchws.models import create_model  # noqa: E402

needs_numba = pytest.mark.skipif(not cpu_ws.is_available(), reason="the CPU deferred engine needs numba")


class Hand(nn.Module):
    """WS layers of every kind. c1, c1d, c3d, fc are the engine's; c2 (gain), c3 (shift), t1 (transposed) and
    ``frozen`` stay on the autograd pass; ``unused`` never runs in forward."""

    def __init__(self, checkpointing: str = "") -> None:
        super().__init__()
        self.checkpointing = checkpointing  # "", "reentrant" or "non_reentrant": the middle block checkpointed
        self.c1 = WSConv2d(3, 8, 3, padding=1)
        self.c2 = WSConv2d(8, 8, 3, padding=1, gain=True)
        self.c3 = WSConv2d(8, 8, 1, shift=True)
        self.c4 = WSConv2d(8, 8, 3, padding=1)
        self.t1 = WSConvTranspose2d(8, 4, 3, padding=1)
        self.frozen = WSConv2d(4, 6, 3, padding=1)
        self.frozen.weight.requires_grad_(False)
        self.c1d = WSConv1d(6, 6, 3, padding=1)
        self.c3d = WSConv3d(1, 2, 3, padding=1)
        self.fc = WSLinear(8, 5)
        self.unused = WSLinear(5, 5)
        with torch.no_grad():
            self.c2.gain.normal_(1.0, 0.3)
            self.c3.shift.normal_(0.0, 0.3)

    @staticmethod
    def _scaled(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer(h) * layer.ws_fan_in**-0.5  # keeps activations O(1): a standardized row has norm sqrt(fan-in)

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        f = self._scaled
        return F.relu(f(self.c4, F.relu(f(self.c3, F.relu(f(self.c2, h))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._scaled
        h = F.relu(f(self.c1, x))
        if self.checkpointing:
            h = checkpoint(self._block, h, use_reentrant=self.checkpointing == "reentrant")
        else:
            h = self._block(h)
        h = F.relu(f(self.frozen, F.relu(f(self.t1, h))))
        a = f(self.c1d, h.mean(2)).mean(2)  # (N, 6)
        b = f(self.c3d, h[:, :1].unsqueeze(1)).mean((2, 3, 4))  # (N, 2)
        return f(self.fc, torch.cat([a, b], 1))


ENGINE_LAYERS = ("c1", "c4", "c1d", "c3d", "fc", "unused")
AUTOGRAD_LAYERS = ("c2", "c3", "t1", "frozen")


def _hand_pair(seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ref = Hand(**kwargs)
    model = copy.deepcopy(ref)
    enable_batched_ws(model, deferred=True)
    return ref, model


def _resnet_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ref = create_model("cifar_resnet20_gn_ws", num_classes=10)
    model = copy.deepcopy(ref)
    disable_batched_ws(ref)
    enable_batched_ws(model, deferred=True)  # the builder's handle, switched to deferred
    assert find_handle(ref) is None
    return ref, model


def _hand_input(seed: int = 1, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _assert_engine_ran(model: nn.Module, names=ENGINE_LAYERS) -> None:
    """The named layers' last forward used the engine's leaves (not the autograd pass)."""
    engine = _engine(model)
    leaves = dict(zip(engine.layers, engine.leaves))
    for name in names:
        layer = model.get_submodule(name)
        assert layer in leaves, f"{name} is not on the deferred engine"
        assert layer._ws_last is leaves[layer], f"{name}'s last forward did not read the engine's leaf"


# --- training against per layer -------------------------------------------------------------------------------------
@needs_numba
def test_layers_the_engine_takes_and_the_ones_it_leaves_to_autograd():
    _, model = _hand_pair()
    model(_hand_input())
    engine = _engine(model)
    assert type(engine).__name__ == "_NumbaDeferred"
    assert {model.get_submodule(n) for n in ENGINE_LAYERS} == set(engine.layers)
    assert {model.get_submodule(n) for n in AUTOGRAD_LAYERS} == set(engine.rest_layers)
    for layer, leaf in zip(engine.layers, engine.leaves):
        assert leaf.is_leaf and leaf.requires_grad and leaf.shape == layer.weight.shape
        assert leaf.data_ptr() != layer.weight.data_ptr()
        # the engine's leaf holds exactly this forward's standardized weight
        torch.testing.assert_close(leaf, layer.compute_standardized_weight(), rtol=1e-5, atol=1e-6)
    assert all(m._ws_supplied is None for m in model.modules() if isinstance(m, WSMixin))  # taken back after forward


@needs_numba
@pytest.mark.parametrize("set_to_none", [True, False])
def test_hand_model_matches_per_layer_over_sgd_steps(set_to_none):
    ref, model = _hand_pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
    for step in range(3):
        x = _hand_input(seed=step)
        outs = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=set_to_none)
            held = m.c1.weight.grad  # (model last: its own after the loop)
            y = m(x)
            _loss(y).backward()
            outs.append(y.detach())
        _assert_close(outs[1], outs[0], what="output")
        _assert_grads(ref, model)
        assert model.frozen.weight.grad is None and model.unused.weight.grad is None
        assert (model.c1.weight.grad is held) == (not set_to_none and step > 0)  # zeroed .grad: added to in place
        for opt in opts:
            opt.step()
        _assert_params(ref, model)
    _assert_engine_ran(model)


@needs_numba
def test_resnet20_matches_per_layer_over_sgd_steps():
    ref, model = _resnet_pair()
    # the same kernels as the (non-deferred) numba pass, pushed at the end of backward: the same numbers exactly
    batched = copy.deepcopy(ref)
    enable_batched_ws(batched, backend="numba")
    gen = torch.Generator().manual_seed(0)
    # (lr 0.1 with momentum: by the third step GN over 2 samples amplifies fp32 rounding to ~10% anywhere)
    opts = [torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4) for m in (ref, model, batched)]
    for _ in range(3):
        x, target = torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 10, (2,), generator=gen)
        outs = []
        for m, opt in zip((ref, model, batched), opts):
            opt.zero_grad()
            y = m(x)
            F.cross_entropy(y, target).backward()
            outs.append(y.detach())
        _assert_close(outs[1], outs[0], what="output")
        _assert_grads(ref, model)
        assert torch.equal(outs[1], outs[2])
        for p, q in zip(batched.parameters(), model.parameters()):
            assert torch.equal(q.grad, p.grad)
        for opt in opts:
            opt.step()
        _assert_params(ref, model)
    engine = _engine(model)
    assert len(engine.layers) == sum(isinstance(m, WSMixin) for m in model.modules()) and not engine.rest_layers


@needs_numba
@pytest.mark.parametrize("set_to_none", [True, False])
def test_two_backwards_before_one_step_accumulate(set_to_none):
    ref, model = _hand_pair()
    for m in (ref, model):
        m(_hand_input(seed=5)).sum().backward()  # .grad exists before zero_grad
        m.zero_grad(set_to_none=set_to_none)
        for seed in (1, 2):
            _loss(m(_hand_input(seed=seed))).backward()
    _assert_grads(ref, model)
    single = copy.deepcopy(model)
    single.zero_grad(set_to_none=True)
    _loss(single(_hand_input(seed=1))).backward()
    assert not torch.allclose(single.c1.weight.grad, model.c1.weight.grad)  # both micro-batches are in there


@needs_numba
@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), id="sgd"),
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True), id="sgd-foreach"),
        pytest.param(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True), id="sgd-fused"),
        pytest.param(lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True), id="adam-fused"),
        pytest.param(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True), id="adamw-foreach"),
    ],
)
def test_optimizers_and_a_discarded_forward_before_each_step(make_optimizer):
    # a grad-enabled forward whose output is dropped (logging, a metric) leaves a backward pending; the optimizer
    # step that follows changes the weights (fused: without bumping their version counters), and the next forward
    # must standardize the new weights
    ref, model = _hand_pair()
    opts = [make_optimizer(list(m.parameters())) for m in (ref, model)]
    for step in range(3):
        outs = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            y = m(_hand_input(seed=step))
            _loss(y).backward()
            outs.append(y.detach())
            m(_hand_input(seed=10 + step))  # discarded
            opt.step()
        _assert_close(outs[1], outs[0], what="output")
        _assert_params(ref, model)
    y_ref, y = ref(_hand_input(seed=9)), model(_hand_input(seed=9))
    _assert_close(y, y_ref, what="output")
    _assert_engine_ran(model)


@needs_numba
def test_siamese_two_forwards_one_backward():
    ref, model = _hand_pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for step in range(2):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            a, b = m(_hand_input(seed=step)), m(_hand_input(seed=step + 10))
            (_loss(a) + (a - b).square().sum()).backward()
        _assert_grads(ref, model)
        for opt in opts:
            opt.step()
    _assert_params(ref, model)


@needs_numba
def test_forward_step_then_backward_of_an_older_forward_raises():
    # the weights changed after the forward and a newer forward took new leaves: the old graph's are retired
    _, model = _hand_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _loss(model(_hand_input())).backward()
    old = model(_hand_input(seed=2))
    opt.step()
    model(_hand_input(seed=3))
    with pytest.raises(RuntimeError, match="between a forward and its backward|modified by an inplace operation"):
        _loss(old).backward()


@needs_numba
def test_step_between_forward_and_backward_gives_the_forwards_gradient():
    # documented (torchws._deferred): with no forward in between, the backward pushes through the statistics of the
    # forward it belongs to: the gradient at the weights that forward used (per layer, a non-fused optimizer's
    # in-place update would make autograd raise instead)
    ref, model = _resnet_pair()
    x = torch.randn(2, 3, 16, 16)
    (expected,) = [[p.grad for p in m.parameters()] for m in [ref] if not m(x).sum().backward()]
    ws_weights = [m.weight for m in model.modules() if isinstance(m, WSMixin)]
    opt = torch.optim.SGD(ws_weights, lr=0.1)
    y = model(x)
    opt.step()  # no .grad yet: a no-op for the values, but it counts as a change for the engine
    with torch.no_grad():
        for w in ws_weights:
            w.mul_(2.0)  # the WS weights really change, and their versions (others would make autograd raise)
    y.sum().backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5 * g.abs().max().item())


@needs_numba
def test_after_a_retired_backward_training_goes_on_right():
    ref, model = _hand_pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for m, opt in zip((ref, model), opts):
        _loss(m(_hand_input())).backward()
        old = m(_hand_input(seed=2))
        opt.step()
        opt.zero_grad()
        m(_hand_input(seed=3))
        with pytest.raises(RuntimeError):
            _loss(old).backward()
        opt.zero_grad()
        _loss(m(_hand_input(seed=4))).backward()
    _assert_grads(ref, model)


@needs_numba
def test_no_grad_and_eval_forwards_between_steps():
    ref, model = _hand_pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for step in range(3):
        outs = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            _loss(m(_hand_input(seed=step))).backward()
            opt.step()
            m.eval()
            with torch.no_grad():
                outs.append(m(_hand_input(seed=20)))
            with torch.inference_mode():
                outs.append(m(_hand_input(seed=21)).clone())
            m.train()
        for got, want in zip(outs[2:], outs[:2]):
            _assert_close(got, want)
        _assert_params(ref, model)
    _assert_grads(ref, model)


@needs_numba
def test_no_grad_forward_between_forward_and_backward():
    ref, model = _hand_pair()
    for m in (ref, model):
        y = m(_hand_input())
        with torch.no_grad():
            m(_hand_input(seed=7))
        _loss(y).backward()
    _assert_grads(ref, model)


@needs_numba
@pytest.mark.parametrize(
    "mode",
    [
        "no_grad",
        "inference_mode",  # the engine's buffers are built outside inference mode
    ],
)
def test_first_forward_without_grad_then_training(mode):
    # e.g. evaluating a loaded checkpoint before fine-tuning
    ref, model = _hand_pair()
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        model(_hand_input())
    for m in (ref, model):
        _loss(m(_hand_input(seed=2))).backward()
    _assert_grads(ref, model)
    _assert_engine_ran(model)


class _FailsInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("backward failed on purpose")


@needs_numba
def test_a_failed_backward_does_not_break_the_next_step():
    # e.g. a training loop that skips a batch whose backward raised (out of memory, a NaN check)
    ref, model = _hand_pair()
    for m in (ref, model):
        with pytest.raises(ValueError, match="on purpose"):
            _loss(m(_FailsInBackward.apply(_hand_input().requires_grad_()))).backward()
        m.zero_grad(set_to_none=True)
        _loss(m(_hand_input(seed=2))).backward()
    _assert_grads(ref, model)


# --- graphs: retain_graph, create_graph, checkpointing ------------------------------------------------------------
@needs_numba
def test_retain_graph_double_backward():
    ref, model = _hand_pair()
    for m in (ref, model):
        loss = _loss(m(_hand_input()))
        loss.backward(retain_graph=True)
        (2 * loss).backward()
    _assert_grads(ref, model)


@needs_numba
def test_retain_graph_then_a_new_forward_protects_the_old_graph():
    # the next forward overwrites the leaves in place: the retained graph must not backpropagate stale values
    _, model = _hand_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = _loss(model(_hand_input()))
    loss.backward(retain_graph=True)
    opt.step()
    model(_hand_input(seed=2))
    with pytest.raises(RuntimeError):
        loss.backward()


@needs_numba
@pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True:UserWarning")
def test_create_graph_raises_clearly_and_training_goes_on():
    ref, model = _hand_pair()
    with pytest.raises(RuntimeError, match="create_graph=True.*deferred=False"):
        _loss(model(_hand_input())).backward(create_graph=True)
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        _loss(m(_hand_input(seed=2))).backward()
    _assert_grads(ref, model)


@needs_numba
def test_input_gradient_penalty_double_backward():
    # d(out)/dx with create_graph, then the penalty's backward: the leaves' gradients (not differentiable
    # themselves) are pushed as usual
    ref, model = _hand_pair()
    for m in (ref, model):
        x = _hand_input().requires_grad_()
        y = m(x)
        (gx,) = torch.autograd.grad(_loss(y), x, create_graph=True)
        (_loss(y) + gx.square().sum()).backward()
    _assert_grads(ref, model)


@needs_numba
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_activation_checkpointing_matches_per_layer(mode):
    ref, model = _hand_pair(checkpointing=mode)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for step in range(2):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            _loss(m(_hand_input(seed=step))).backward()
        _assert_grads(ref, model)
        for opt in opts:
            opt.step()
    _assert_params(ref, model)
    _assert_engine_ran(model)


# --- AMP, model surgery, copies -----------------------------------------------------------------------------------
@needs_numba
def test_autocast_bfloat16_as_close_to_fp32_as_per_layer():
    ref, model = _hand_pair()
    x = _hand_input(n=4)
    _loss(ref(x)).backward()
    fp32 = (ref(x).detach(), {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    results = []
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
            assert y.dtype == torch.bfloat16
        _loss(y.float()).backward()
        results.append((y.float().detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    _assert_engine_ran(model)
    (y_ref, g_ref), (y_def, g_def) = results
    assert g_def.keys() == g_ref.keys() == fp32[1].keys()

    def err(a, b):
        return (a - b).norm().item() / b.norm().item()

    bf16_err = err(y_ref, fp32[0])
    assert 0 < bf16_err < 0.05  # bf16 did run, and is still close
    assert err(y_def, fp32[0]) <= 1.5 * bf16_err + 1e-4
    for n in g_ref:
        assert err(g_def[n], fp32[1][n]) <= 1.5 * err(g_ref[n], fp32[1][n]) + 1e-3, n


@needs_numba
@pytest.mark.parametrize("surgery", ["float64", "channels_last", "new_parameter", "load_state_dict", "assign"])
def test_model_surgery_keeps_results_right(surgery):
    ref, model = _hand_pair()
    for m in (ref, model):  # an engine exists, and a forward is pending during the surgery
        _loss(m(_hand_input())).backward()
        m(_hand_input(seed=3))
    old_engine = _engine(model)
    torch.manual_seed(5)
    donor = Hand().state_dict()
    dtype = torch.float32
    for m in (ref, model):
        if surgery == "float64":
            m.to(torch.float64)
            dtype = torch.float64
        elif surgery == "channels_last":  # (Module.to(memory_format=...) refuses the 5-d weight of c3d)
            for layer in m.modules():
                if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                    layer.to(memory_format=torch.channels_last)
            m.c3d.to(memory_format=torch.channels_last_3d)
        elif surgery == "new_parameter":
            m.c1.weight = nn.Parameter(donor["c1.weight"].clone())
            m.fc.weight = nn.Parameter(donor["fc.weight"].clone())
        else:
            m.load_state_dict(donor, assign=surgery == "assign")
        m.zero_grad(set_to_none=True)
    for m in (ref, model):
        _loss(m(_hand_input(seed=4).to(dtype))).backward()
    tol = 1e-10 if dtype == torch.float64 else RTOL
    _assert_grads(ref, model, rtol=tol, atol=tol)
    _assert_engine_ran(model)
    engine = _engine(model)
    assert all(leaf.dtype == dtype for leaf in engine.leaves)
    if surgery != "load_state_dict":  # a new plan: weights' identity, dtype or strides changed
        assert engine is not old_engine
    if surgery == "channels_last":
        assert model.c1.weight.is_contiguous(memory_format=torch.channels_last) and not model.c1.weight.is_contiguous()
        for layer, leaf in zip(engine.layers, engine.leaves):
            assert leaf.stride() == layer.weight.stride()
    if surgery == "new_parameter":
        assert engine.inputs[engine.layers.index(model.c1)] is model.c1.weight


@needs_numba
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_train_right_and_independently(how):
    ref, model = _hand_pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for m, opt in zip((ref, model), opts):
        _loss(m(_hand_input())).backward()
        opt.step()
        opt.zero_grad()
    if how == "deepcopy":
        clone = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    handle = find_handle(clone)
    assert handle is not None and handle.deferred and handle.model is clone and handle._deferred is None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_clone = copy.deepcopy(ref)
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.1)
    ref_clone_opt = torch.optim.SGD(ref_clone.parameters(), lr=0.1)
    for step in range(2):
        for m, opt in ((ref_clone, ref_clone_opt), (clone, clone_opt)):
            opt.zero_grad()
            _loss(m(_hand_input(seed=step + 1))).backward()
        _assert_grads(ref_clone, clone)
        ref_clone_opt.step()
        clone_opt.step()
    _assert_params(ref_clone, clone)
    _assert_engine_ran(clone)
    assert all(p.grad is None for p in model.parameters())  # the original's gradients were not touched
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not set(map(id, _engine(clone).inputs)) & set(map(id, model.parameters()))
    # the original still trains on its own parameters
    for m in (ref, model):
        _loss(m(_hand_input(seed=9))).backward()
    _assert_grads(ref, model)


# --- torch.compile, torch.func, accumulation ----------------------------------------------------------------------
@needs_numba
def test_torch_compile_falls_back_to_the_autograd_pass():
    torch._dynamo.reset()
    ref, model = _hand_pair()
    compiled = torch.compile(model, backend="eager")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for step in range(2):
        outs = []
        for m, opt in zip((ref, compiled), opts):
            opt.zero_grad()
            y = m(_hand_input(seed=step))
            _loss(y).backward()
            outs.append(y.detach())
        _assert_close(outs[1], outs[0], what="output")
        _assert_grads(ref, model)
        for opt in opts:
            opt.step()
    assert find_handle(model)._deferred is None  # never built: compiled forwards run the autograd pass
    # the eager model next to it still takes the deferred path, and stays right
    for m, opt in zip((ref, model), opts):
        opt.zero_grad()
        _loss(m(_hand_input(seed=5))).backward()
    _assert_grads(ref, model)
    _assert_engine_ran(model)
    torch._dynamo.reset()


@needs_numba
def test_functional_call_backward_and_func_grad_and_vmap():
    ref, model = _hand_pair()
    _loss(model(_hand_input())).backward()  # the engine exists for the model's own parameters
    model.zero_grad(set_to_none=True)
    x = _hand_input(seed=2)
    grads = []
    for m in (ref, model):
        params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in m.named_parameters()}
        _loss(torch.func.functional_call(m, params, (x,))).backward()
        grads.append({n: p.grad for n, p in params.items()})
    for n, g in grads[0].items():
        if g is None:
            assert grads[1][n] is None, n
        else:
            _assert_close(grads[1][n], g, what=n)
    assert all(p.grad is None for p in model.parameters())  # the module's own parameters were not used

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(m):
        return lambda p, xx: _loss(torch.func.functional_call(m, p, (xx,)))

    want, got = (torch.func.grad(loss_of(m))(params, x) for m in (ref, model))
    for n in want:
        _assert_close(got[n], want[n], what=n)
    xs = torch.stack([_hand_input(seed=s) for s in range(3)])  # (3, 2, 3, 6, 6)
    want, got = (
        torch.func.vmap(lambda xx, m=m: torch.func.functional_call(m, params, (xx,)))(xs) for m in (ref, model)
    )
    _assert_close(got, want)
    # and the model trains on its own parameters afterwards
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        _loss(m(_hand_input(seed=3))).backward()
    _assert_grads(ref, model)
    _assert_engine_ran(model)


@needs_numba
def test_functional_call_autograd_grad():
    ref, model = _hand_pair()
    x = _hand_input()
    grads = []
    for m in (ref, model):
        params = {n: p.detach().clone().requires_grad_() for n, p in m.named_parameters() if p.requires_grad}
        grads.append(torch.autograd.grad(_loss(torch.func.functional_call(m, params, (x,))), list(params.values()),
                                         allow_unused=True))  # fmt: skip
    for want, got in zip(*grads):
        if want is None:
            assert got is None
        else:
            assert got is not None
            _assert_close(got, want)


@needs_numba
def test_ws_accumulation_with_a_deferred_model():
    ref, model = _hand_pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    _loss(model(_hand_input(seed=9)))  # a pending forward before the block
    model.zero_grad()
    for step in range(2):
        for opt in opts:
            opt.zero_grad()
        for seed in (1, 2, 3):
            _loss(ref(_hand_input(seed=seed + step))).backward()
        with ws_accumulation(model):
            for seed in (1, 2, 3):
                _loss(model(_hand_input(seed=seed + step))).backward()
        _assert_grads(ref, model)
        for opt in opts:
            opt.step()
    # a deferred step after the blocks
    for m, opt in zip((ref, model), opts):
        opt.zero_grad()
        _loss(m(_hand_input(seed=8))).backward()
    _assert_grads(ref, model)
    _assert_engine_ran(model)


@needs_numba
def test_switching_deferred_off_and_removing_the_pass():
    ref, model = _hand_pair()
    _loss(model(_hand_input())).backward()
    handle = enable_batched_ws(model, deferred=False)
    assert handle is find_handle(model) and not handle.deferred and handle._deferred is None
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        _loss(m(_hand_input(seed=2))).backward()
    _assert_grads(ref, model)
    assert find_handle(model)._deferred is None
    enable_batched_ws(model, deferred=True)
    assert disable_batched_ws(model)
    for m in (ref, model):
        m.zero_grad(set_to_none=True)
        _loss(m(_hand_input(seed=3))).backward()
    _assert_grads(ref, model)


def test_data_parallel_wrapped_model_raises():
    torch.manual_seed(0)
    wrapped = nn.DataParallel(Hand())
    with pytest.raises(ValueError, match="DataParallel.*deferred=False"):
        enable_batched_ws(wrapped, deferred=True)
    assert find_handle(wrapped) is None
    enable_batched_ws(wrapped)  # deferred=False is allowed


# --- the Triton engine in Triton's interpreter ----------------------------------------------------------------------
class _Convs(nn.Module):
    """Small enough for Triton's interpreter; c3 (gain) stays on the autograd pass."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = WSConv2d(3, 4, 3, padding=1)
        self.c2 = WSConv2d(4, 4, 3, padding=1)
        self.c3 = WSConv2d(4, 4, 1, gain=True)
        self.fc = WSLinear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x) / 27**0.5)
        h = F.relu(self.c3(F.relu(self.c2(h) / 6)) / 2)
        return self.fc(h.mean((2, 3))) / 2


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_engine_in_interpreter_matches_per_layer(channels_last):
    if torch.cuda.is_available() or not _triton_on_cpu():
        pytest.skip("no Triton interpreter here (CUDA present, or triton imported before TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    ref = _Convs()
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
    model = copy.deepcopy(ref)
    handle = enable_batched_ws(model, backend="triton", deferred=True)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, model)]
    for step in range(2):
        x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(step))
        outs = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad(set_to_none=step == 0)
            y = m(x)
            _loss(y).backward()
            outs.append(y.detach())
        _assert_close(outs[1], outs[0], what="output")
        _assert_grads(ref, model)
        for opt in opts:
            opt.step()
        _assert_params(ref, model)
    engine = handle._deferred
    assert type(engine).__name__ == "_TritonDeferred"
    assert set(engine.layers) == {model.c1, model.c2, model.fc} and engine.rest_layers == (model.c3,)
    for layer, leaf in zip(engine.layers, engine.leaves):
        assert leaf.shape == layer.weight.shape and leaf.stride() == layer.weight.stride()
        assert layer._ws_last is leaf
    assert model.c1.weight.is_contiguous(memory_format=torch.channels_last) == channels_last


@needs_numba
def test_standardize_called_directly_leaves_no_supply_behind():
    # handle.standardize() outside a forward returns the leaves but must not leave them with the layers: a layer
    # called on its own after the weights change would otherwise read a stale leaf
    ref, model = _hand_pair()
    handle = find_handle(model)
    out = handle.standardize()
    engine = handle._deferred
    assert all(out[m] is leaf for m, leaf in zip(engine.layers, engine.leaves))
    assert all(m._ws_supplied is None for m in engine.layers)
    for r, m in zip(ref.modules(), model.modules()):
        if isinstance(m, WSMixin) and m.weight.requires_grad:
            with torch.no_grad():
                r.weight.mul_(-1.5)
                m.weight.mul_(-1.5)
            torch.testing.assert_close(m.standardized_weight(), r.standardized_weight(), rtol=0, atol=0)


@needs_numba
def test_unfreezing_after_an_all_frozen_forward_brings_the_engine_back():
    # with every WS weight frozen no engine applies; unfreezing must not leave the model on the autograd pass for good
    ref, model = _resnet_pair()
    for m in (ref, model):
        for layer in m.modules():
            if isinstance(layer, WSMixin):
                layer.weight.requires_grad_(False)
    model(torch.randn(1, 3, 16, 16))
    assert find_handle(model)._deferred is False
    for m in (ref, model):
        for layer in m.modules():
            if isinstance(layer, WSMixin):
                layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, 16, 16)
    for m in (ref, model):
        m(x).sum().backward()
    assert isinstance(find_handle(model)._deferred, DeferredWS)
    _assert_grads(ref, model)


def test_a_graph_capture_that_fails_warns_and_leaves_the_autograd_pass(monkeypatch):
    # (the CUDA graph engine's construction, made to fail here on the CPU: the forward must not crash the run)
    import torchws._deferred_engines as engines

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(engines, "_GraphDeferred", refuse)
    with pytest.warns(RuntimeWarning, match="capturing the pass as CUDA graphs failed.*capture refused"):
        assert engines._build_cuda([WSConv2d(3, 4, 3)], [], "graph", torch.device("cpu")) is None
