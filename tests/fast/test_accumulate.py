"""ws_accumulation (torchws.fast.accumulate): one WS per optimizer step, against a backward per micro-batch with
every layer computing its own weight. (DDP and checkpointing inside the block: test_equivalence.py and
test_checkpointing.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchws.fast import accumulate as accumulate_module
from torchws.fast import enable_batched_ws, find_handle, ws_accumulation
from torchws.fast.engines.torch import TorchEngine
from torchws.layers import weight_cache
from torchws.layers.ws import WSConv2d, WSMixin


def _micro_batches(k, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(2, 3, 8, 8, generator=g, dtype=dtype) for _ in range(k)]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _no_cache_left(model):
    return all(weight_cache.lookup(m) is None for m in model.modules() if isinstance(m, WSMixin))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("steps", [None, 4])
@pytest.mark.parametrize("backend", [None, "torch", "numba"])
def test_accumulation_equals_a_backward_per_micro_batch(mixed_pair, assert_grads_close, dtype, tol, steps, backend):
    ref, model = mixed_pair(dtype)
    if backend is not None:
        handle = enable_batched_ws(model, backend=backend)
    mbs = _micro_batches(4, dtype)
    for x in mbs:
        ref(x).square().mean().backward()
    with ws_accumulation(model, steps=steps) as acc:
        for x in mbs:
            model(x).square().mean().backward()
        # without steps the WS grads wait for the exit; with steps the last micro-batch's backward carries them
        assert (model.c1.weight.grad is None) == (steps is None)
        if backend is not None:
            assert handle._paused == 1
    assert acc.forwards == (4 if steps else 0)
    assert_grads_close(_grads(model), _grads(ref), rtol=tol, atol=tol)
    assert _no_cache_left(model)
    if backend is not None:  # the pass resumes after the block
        assert handle._paused == 0 and find_handle(model) is handle


def test_accumulation_standardizes_once(mixed_pair, monkeypatch):
    _, model = mixed_pair()
    calls, computed = [], []
    monkeypatch.setattr(TorchEngine, "__call__", lambda self, real=TorchEngine.__call__: calls.append(1) or real(self))
    original = WSMixin.compute_standardized_weight
    monkeypatch.setattr(WSMixin, "compute_standardized_weight", lambda self: computed.append(self) or original(self))
    with ws_accumulation(model):
        for x in _micro_batches(3):
            model(x).sum().backward()
    assert calls == [1] and computed == []


def test_no_grad_forwards_do_not_count_as_micro_batches(mixed_pair):
    ref, model = mixed_pair()
    mbs = _micro_batches(2)
    for x in mbs:
        ref(x).sum().backward()
    with ws_accumulation(model, steps=2) as acc:
        for x in mbs:
            with torch.no_grad():
                model(x)  # an evaluation inside the block
            model(x).sum().backward()
    assert acc.forwards == 2
    for n, p in ref.named_parameters():
        torch.testing.assert_close(model.get_parameter(n).grad, p.grad, rtol=1e-5, atol=1e-6)


def test_too_many_forwards_raises(mixed_pair):
    _, model = mixed_pair()
    with pytest.raises(RuntimeError, match=r"ws_accumulation\(steps=2\): forward number 3 with grad enabled"):
        with ws_accumulation(model, steps=2):
            for x in _micro_batches(3):
                model(x).sum().backward()
    assert _no_cache_left(model)


def test_steps_must_be_positive(mixed_pair):
    _, model = mixed_pair()
    with pytest.raises(ValueError, match="ws_accumulation: steps must be a positive number of micro-batches, got 0"):
        ws_accumulation(model, steps=0)


def test_one_object_entered_once_per_optimizer_step(mixed_pair):
    # every step must deliver the WS gradients
    ref, model = mixed_pair()
    acc = ws_accumulation(model)
    for step in range(2):
        ref.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        x = _micro_batches(step + 1)[-1]
        ref(x).square().mean().backward()
        with acc:
            model(x).square().mean().backward()
        assert model.c1.weight.grad is not None, f"step {step}: WS gradients lost"
        torch.testing.assert_close(model.c1.weight.grad, ref.c1.weight.grad, rtol=1e-5, atol=1e-7)


def test_a_failing_enter_resumes_the_pass(mixed_pair, monkeypatch):
    _, model = mixed_pair()
    handle = enable_batched_ws(model, backend="torch")

    def failing(self):
        raise RuntimeError("standardization failed")

    monkeypatch.setattr(TorchEngine, "__call__", failing)
    with pytest.raises(RuntimeError, match="standardization failed"):
        with ws_accumulation(model):
            pass
    assert handle._paused == 0  # the model's pass must keep working after the failed block
    assert _no_cache_left(model)


def test_an_exception_inside_the_block_pushes_nothing(mixed_pair):
    _, model = mixed_pair()
    with pytest.raises(ValueError, match="stop"):
        with ws_accumulation(model):
            model(_micro_batches(1)[0]).sum().backward()
            raise ValueError("stop")
    assert model.c1.weight.grad is None and model.c1.bias.grad is not None
    assert _no_cache_left(model)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = WSConv2d(3, 4, 3), WSConv2d(3, 4, 3)

    def forward(self, x, use_b=True):
        return self.a(x) + (self.b(x) if use_b else 0)


def test_a_layer_unused_in_the_last_micro_batch_is_reported():
    torch.manual_seed(0)
    model, x = _TwoHeads(), torch.randn(1, 3, 5, 5)
    with pytest.raises(RuntimeError, match=r"1 WS layer\(s\) \(first: WSConv2d\) were not used in the last "
                                           r"micro-batch's backward"):  # fmt: skip
        with ws_accumulation(model, steps=2):
            model(x).sum().backward()
            model(x, use_b=False).sum().backward()
    # without steps the same loop is exact
    ref = _TwoHeads()
    ref.load_state_dict(model.state_dict())
    model.zero_grad(set_to_none=True)
    with ws_accumulation(model):
        model(x).sum().backward()
        model(x, use_b=False).sum().backward()
    ref(x).sum().backward()
    ref(x, use_b=False).sum().backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(model.get_parameter(n).grad, p.grad)


def test_frozen_weights_get_no_gradient(mixed_pair):
    _, model = mixed_pair()
    model.c1.weight.requires_grad_(False)
    with ws_accumulation(model, steps=2):
        for x in _micro_batches(2):
            model(x).sum().backward()
    assert model.c1.weight.grad is None and model.c2.weight.grad is not None


def test_ddp_without_steps_raises(mixed_pair, gloo_group):
    # without steps the WS gradients are pushed on exit, outside DDP's backward: they would miss the all-reduce
    _, model = mixed_pair()
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel; pass steps=<micro-batches>"):
        ws_accumulation(ddp)
    assert ws_accumulation(ddp, steps=2).root is model  # unwrapped


def test_ddp_no_sync_with_steps_over_sgd_steps(mixed_pair, gloo_group):
    # the usual no_sync pattern: the last micro-batch's backward carries every WS gradient into DDP's all-reduce
    import contextlib

    ref, model = mixed_pair()
    enable_batched_ws(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    k = 3
    for _ in range(2):  # a second iteration catches reductions DDP did not finish in the first
        mbs = _micro_batches(k)
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


def test_compiled_wrapper_is_unwrapped(mixed_pair):
    _, model = mixed_pair()
    compiled = torch.compile(model, backend="eager")
    assert accumulate_module.WSAccumulation(compiled).root is model
