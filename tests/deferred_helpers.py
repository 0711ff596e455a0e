"""What the deferred-WS test files share: tolerances, the loss, one intra-op thread, and the comparisons with the
per-layer path (the independent reference every test there uses)."""

from __future__ import annotations

import torch
from test_train_engine import one_thread  # noqa: F401 (the autouse fixture: one intra-op thread, shared)
from torch import nn

from torchws._deferred import DeferredWS
from torchws.batched import find_handle

RTOL, ATOL = 1e-5, 1e-5  # ATOL relative to the reference's largest element (fp32 rounding of sums over layers)


def loss(y: torch.Tensor) -> torch.Tensor:
    # weights every output differently: a plain sum would give every row of the last layer the same gradient
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + 0.5 * y.square().sum()


def engine_of(model: nn.Module) -> DeferredWS:
    engine = find_handle(model)._deferred
    assert isinstance(engine, DeferredWS), f"no deferred engine ran: {engine!r}"
    return engine


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "", rtol: float = RTOL, atol: float = ATOL) -> None:
    scale = max(1e-3, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_grads(ref: nn.Module, model: nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is None:
            assert q.grad is None, f"{name}: per layer has no gradient, deferred has one"
            continue
        assert q.grad is not None, f"{name}: deferred lost the gradient"
        assert_close(q.grad, p.grad, f"grad of {name}", rtol, atol)


def assert_params(ref: nn.Module, model: nn.Module, rtol: float = RTOL, atol: float = ATOL) -> None:
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert_close(q, p, name, rtol, atol)


def triton_on_cpu() -> bool:
    """Whether the Triton engine can run on CPU tensors here (its interpreter; not where CUDA is present)."""
    from torchws.kernels import is_available

    return not torch.cuda.is_available() and is_available("cpu")
