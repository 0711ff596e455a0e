"""Smoothness probes against analytic answers, the gradient identity against an independent autograd path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchws.analysis import (
    batch_loss_and_grad,
    gradient_norm_identity,
    loss_landscape_along_gradient,
    track_standardized_grads,
)
from torchws.layers import WSConv2d, WSConvTranspose2d, WSLinear, weight_cache


class Quadratic(nn.Module):
    """L(x) = 0.5 x^T A x (the "output" is the loss; targets are ignored)."""

    def __init__(self, a: torch.Tensor, x0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.x = nn.Parameter(x0.clone())

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.x @ self.a @ self.x


def _quadratic(seed: int = 0, dim: int = 6) -> tuple[Quadratic, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    a = q @ torch.diag(torch.linspace(0.5, 7.0, dim, dtype=torch.float64)) @ q.T  # SPD, eigenvalues 0.5..7
    return Quadratic(a, torch.randn(dim, generator=g, dtype=torch.float64)), a


def _identity_loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return out


DUMMY = (torch.zeros(1, 1), torch.zeros(1))


def test_quadratic_probe_matches_closed_form() -> None:
    model, a = _quadratic()
    x = model.x.detach().clone()
    g = a @ x
    steps = (0.01, 0.05, 0.2)
    probe = loss_landscape_along_gradient(model, _identity_loss, DUMMY, steps)
    # L(x - eta g) = L(x) - eta g.g + 0.5 eta^2 g.A.g ; delta grad = -eta A g
    want_losses = [float(0.5 * x @ a @ x - s * g @ g + 0.5 * s * s * g @ a @ g) for s in steps]
    assert probe.losses == pytest.approx(want_losses, rel=1e-12)
    assert probe.grad_change_norms == pytest.approx([s * float((a @ g).norm()) for s in steps], rel=1e-12)
    rayleigh_a2 = float(g @ a @ a @ g / (g @ g))
    assert probe.effective_beta == pytest.approx(math.sqrt(rayleigh_a2), rel=1e-12)
    assert probe.effective_beta <= 7.0 + 1e-9  # bounded by the largest eigenvalue (the global beta)
    assert probe.gradient_predictiveness == pytest.approx(0.2 * float((a @ g).norm()), rel=1e-12)
    assert probe.loss_range == pytest.approx(max(want_losses) - min(want_losses), rel=1e-10)
    assert probe.grad_norm == pytest.approx(float(g.norm()), rel=1e-12)


def test_custom_direction_along_eigenvector_gives_its_eigenvalue() -> None:
    model, a = _quadratic(seed=1)
    eigvals, eigvecs = torch.linalg.eigh(a)
    probe = loss_landscape_along_gradient(model, _identity_loss, DUMMY, (0.1, 0.3), direction=[eigvecs[:, 2]])
    assert probe.effective_beta == pytest.approx(float(eigvals[2]), rel=1e-10)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        WSConv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)
    )


def test_parameters_buffers_and_grads_are_restored_exactly() -> None:
    model = _bn_net().train()
    x, y = torch.randn(8, 1, 5, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()  # existing .grad must survive the probe
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    probe = loss_landscape_along_gradient(model, F.cross_entropy, (x, y), (0.5, 5.0, 50.0), micro_batch_size=2)
    assert probe.loss_range > 0 and probe.effective_beta > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_state_is_restored_when_the_loss_raises() -> None:
    model = _bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def flaky(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("boom")
        return F.cross_entropy(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape_along_gradient(model, flaky, (torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 0])), (1.0, 2.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_micro_batches_average_chunk_losses_like_accumulation() -> None:
    model = _bn_net().train()
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))
    params = list(model.parameters())
    loss, grads = batch_loss_and_grad(model, F.cross_entropy, (x, y), params, micro_batch_size=4)
    # independent: backward of each chunk into .grad, weighted by chunk size (4 and 2 of 6)
    model.zero_grad()
    want = 0.0
    for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
        chunk = F.cross_entropy(model(xs), ys) * xs.shape[0] / 6
        chunk.backward()
        want += float(chunk.detach())
    assert loss == pytest.approx(want, rel=1e-6)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad)
    full, _ = batch_loss_and_grad(model, F.cross_entropy, (x, y), params)
    assert abs(full - loss) > 1e-6  # BatchNorm: chunk statistics differ from whole-batch ones


def test_bad_arguments_are_named() -> None:
    model, _ = _quadratic()
    with pytest.raises(ValueError, match="steps must be a non-empty"):
        loss_landscape_along_gradient(model, _identity_loss, DUMMY, ())
    with pytest.raises(ValueError, match="direction needs one tensor per param"):
        loss_landscape_along_gradient(model, _identity_loss, DUMMY, (0.1,), direction=[torch.zeros(2)])


def _independent_grads(layer: WSConv2d, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """W_hat, dL/dW and dL/dW_hat with W_hat written out explicitly, not through torchws."""
    w = layer.weight.detach().clone().requires_grad_()
    rows = w.reshape(w.shape[0], -1)
    mean, var = rows.mean(1, keepdim=True), rows.var(1, correction=0, keepdim=True)
    w_hat = ((rows - mean) / torch.sqrt(var + layer.ws_eps)).reshape(w.shape)
    w_hat.retain_grad()
    loss = ((F.conv2d(x, w_hat, layer.bias, padding=1) - y) ** 2).sum()
    loss.backward()
    return w_hat.detach(), w.grad, w_hat.grad


def test_gradient_identity_on_a_layer_matches_independent_autograd() -> None:
    torch.manual_seed(0)
    layer = WSConv2d(3, 5, 3, padding=1, preset="bit", dtype=torch.float64)  # eps 1e-10: identity exact
    x, y = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 5, 6, 6, dtype=torch.float64)
    with track_standardized_grads(layer):
        ((layer(x) - y) ** 2).sum().backward()
    check = gradient_norm_identity(layer)
    w_hat, grad_w, grad_w_hat = _independent_grads(layer, x, y)
    torch.testing.assert_close(check.lhs, grad_w.reshape(5, -1).pow(2).sum(1))
    g, n, w_hat = grad_w_hat.reshape(5, -1), 27, w_hat.reshape(5, -1)
    var = layer.weight.detach().reshape(5, -1).var(1, correction=0)
    want_rhs = ((g * g).sum(1) - g.sum(1) ** 2 / n - (w_hat * g).sum(1) ** 2 / n) / var
    torch.testing.assert_close(check.rhs, want_rhs)
    assert check.max_relative_error() < 1e-7
    assert bool(((check.kept_fraction > 0) & (check.kept_fraction <= 1)).all())
    torch.testing.assert_close(check.w_hat_grad_sq, (g * g).sum(1))
    want_ratio = grad_w.norm() / grad_w_hat.norm()  # ||dL/dW|| / ||dL/dW_hat|| over the layer
    assert check.grad_norm_ratio() == pytest.approx(float(want_ratio), rel=1e-9)


def test_identity_with_gain_accumulation_and_default_eps() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(WSConv2d(2, 4, 3, gain=True), nn.ReLU(), nn.Flatten(), WSLinear(4 * 3 * 3, 3))
    with torch.no_grad():
        model[0].gain.uniform_(0.5, 2.0)
    with track_standardized_grads(model) as layers:
        for _ in range(2):  # two micro-batches accumulate into .grad and into the recorded g
            F.cross_entropy(model(torch.randn(3, 2, 5, 5)), torch.randint(0, 3, (3,))).backward()
    assert len(layers) == 2
    for layer in layers:
        check = gradient_norm_identity(layer)
        assert check.max_relative_error() < 1e-2  # eps 1e-5 vs var ~ 1/fan_in: off by O(eps/var) only
    assert weight_cache.lookup(model[0]) is None  # tracking did not leave a cached weight behind


def test_identity_on_transposed_groups() -> None:
    torch.manual_seed(2)
    layer = WSConvTranspose2d(4, 6, 3, groups=2, preset="bit", dtype=torch.float64)
    with track_standardized_grads(layer):
        layer(torch.randn(2, 4, 4, 4, dtype=torch.float64)).pow(3).sum().backward()
    assert gradient_norm_identity(layer).max_relative_error() < 1e-7


def test_identity_errors() -> None:
    layer = WSConv2d(2, 3, 3, preset="official")
    with pytest.raises(ValueError, match="preset 'official'"):
        gradient_norm_identity(layer)
    with pytest.raises(TypeError, match="not a WS layer"):
        gradient_norm_identity(nn.Conv2d(2, 3, 3))
    fresh = WSConv2d(2, 3, 3)
    with pytest.raises(ValueError, match="run a backward first"):
        gradient_norm_identity(fresh)
    fresh(torch.randn(1, 2, 4, 4)).sum().backward()
    with pytest.raises(ValueError, match="inside track_standardized_grads"):
        gradient_norm_identity(fresh)
    with pytest.raises(ValueError, match="holds no WS layer"):
        with track_standardized_grads(nn.Linear(2, 2)):
            pass


def test_identity_pairs_elements_when_the_gradient_is_channels_last() -> None:
    # conv backward may hand back dL/dW_hat in channels_last strides for a contiguous weight: the rows of g must still
    # line up with the rows of W_hat element for element
    torch.manual_seed(2)
    layer = WSConv2d(3, 4, 3, padding=1, preset="bit", dtype=torch.float64)
    x, y = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with track_standardized_grads(layer):
        ((layer(x) - y) ** 2).sum().backward()
    _, _, grad_w_hat = _independent_grads(layer, x, y)
    layer.weight.grad = None
    ((layer(x) - y) ** 2).sum().backward()
    plain = gradient_norm_identity(layer, grad_w_hat.contiguous())
    strided = gradient_norm_identity(layer, grad_w_hat.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(strided.rhs, plain.rhs)
    torch.testing.assert_close(strided.kept_fraction, plain.kept_fraction)
    assert strided.max_relative_error() < 1e-7
