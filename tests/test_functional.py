"""The math: each preset against an independently written formula, and the paper's gradient properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchws.functional import (
    fan_in,
    rows_to_weight,
    standardize_rows,
    weight_standardize,
    weight_standardize_transposed,
    weight_to_rows,
)
from torchws.presets import PRESETS


def reference_rows(w: np.ndarray, preset: str) -> np.ndarray:
    """Each peer's formula, written out in float64 numpy from the peers' code (independent of torchws)."""
    rows = w.reshape(w.shape[0], -1).astype(np.float64)
    n = rows.shape[1]
    mean = rows.mean(axis=1, keepdims=True)
    centered = rows - mean
    if preset == "official":  # w.view(O,-1).std(dim=1) + 1e-5, unbiased
        return centered / (np.sqrt((centered**2).sum(axis=1, keepdims=True) / (n - 1)) + 1e-5)
    if preset == "bcn":  # torch.pow(w.view(O,-1).var(dim=1) + 1e-5, 0.5), unbiased, eps inside the root
        return centered / np.sqrt((centered**2).sum(axis=1, keepdims=True) / (n - 1) + 1e-5)
    if preset == "nf":  # (W - mean) / sqrt(max(fan_in * var, 1e-4))
        var = (centered**2).mean(axis=1, keepdims=True)
        return centered / np.sqrt(np.maximum(n * var, 1e-4))
    eps = {"paper": 1e-5, "timm": 1e-6, "bit": 1e-10}[preset]
    return centered / np.sqrt((centered**2).mean(axis=1, keepdims=True) + eps)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (16, 4, 1, 1), (5, 7), (4, 2, 5), (6, 2, 3, 3, 3)])
def test_presets_match_peer_formula(preset: str, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.1 + 0.03
    got = weight_standardize(w, preset=preset)
    want = reference_rows(w.numpy(), preset).reshape(shape)
    assert got.dtype == torch.float32 and got.shape == w.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_match_peer_formula_in_float64(preset: str) -> None:
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05 + 0.01
    want = reference_rows(w.numpy(), preset).reshape(w.shape)
    np.testing.assert_allclose(weight_standardize(w, preset=preset).numpy(), want, atol=1e-14, rtol=0)


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown WS preset 'papre'.*paper, official, bcn, timm, bit, nf"):
        weight_standardize(torch.randn(4, 4), preset="papre")


def test_eps_override_changes_only_eps() -> None:
    w = torch.full((2, 4), 0.0)
    w[:, 0] = 1.0  # var = 3/16 per row
    got = standardize_rows(w, preset="paper", eps=0.25)
    expected = (w - 0.25) / math.sqrt(3 / 16 + 0.25)
    torch.testing.assert_close(got, expected, atol=3e-7, rtol=0)


@pytest.mark.parametrize("preset", ["paper", "timm", "bit"])
def test_rows_have_zero_mean_unit_variance(preset: str) -> None:
    w = torch.randn(32, 64, 3, 3, dtype=torch.float64) * 0.05 + 1.0
    rows = weight_standardize(w, preset=preset).reshape(32, -1)
    torch.testing.assert_close(rows.mean(1), torch.zeros(32, dtype=torch.float64), atol=1e-12, rtol=0)
    # var = v / (v + eps) with v ~ 0.0025: within eps / v of 1
    torch.testing.assert_close(rows.var(1, unbiased=False), torch.ones(32, dtype=torch.float64), atol=5e-3, rtol=0)


def test_nf_rows_have_unit_sum_of_squares() -> None:
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    rows = weight_standardize(w, preset="nf").reshape(8, -1)
    torch.testing.assert_close((rows**2).sum(1), torch.ones(8, dtype=torch.float64), atol=1e-12, rtol=0)


def _grads(preset: str, seed: int = 0, eps: float | None = None):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 0.2 + 0.1).requires_grad_()
    w_hat = weight_standardize(w, preset=preset, eps=eps)
    upstream = torch.randn(w_hat.shape, generator=g, dtype=torch.float64)
    (grad_w,) = torch.autograd.grad(w_hat, w, upstream)
    return w.detach(), w_hat.detach(), upstream, grad_w


@pytest.mark.parametrize("preset", list(PRESETS))
def test_gradient_is_zero_mean_and_orthogonal_to_weight(preset: str) -> None:
    """Exact for eps -> 0 (the paper's statement); nf's clamp is inactive here, so it is exact at its own eps."""
    w, w_hat, _, grad_w = _grads(preset, eps=None if preset == "nf" else 1e-14)
    rows, zeros = grad_w.reshape(6, -1), torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(rows.sum(1), zeros, atol=1e-10, rtol=0)
    # orthogonal to W_hat and hence (being zero-mean) to W itself
    torch.testing.assert_close((rows * w_hat.reshape(6, -1)).sum(1), zeros, atol=1e-10, rtol=0)
    torch.testing.assert_close((rows * w.reshape(6, -1)).sum(1), zeros, atol=1e-10, rtol=0)


def test_gradient_keeps_an_eps_sized_component_along_the_weight() -> None:
    """With eps inside the root: <dL/dW, W - mean> = rstd * <g, W - mean> * eps / (var + eps), exactly."""
    w, _, g, grad_w = _grads("paper", seed=1)
    c = w.reshape(6, -1) - w.reshape(6, -1).mean(1, keepdim=True)
    var = (c**2).mean(1)
    expected = (g.reshape(6, -1) * c).sum(1) * 1e-5 / (var + 1e-5) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close((grad_w.reshape(6, -1) * c).sum(1), expected, rtol=1e-6, atol=1e-15)


def test_gradient_norm_identity_of_the_paper() -> None:
    """||dL/dW||^2 = (||g||^2 - <1,g>^2/n - <W_hat,g>^2/n) / var, population variance, eps -> 0 (``bit``)."""
    w, w_hat, g, grad_w = _grads("bit", seed=3)
    n = w[0].numel()
    g_rows, wh_rows, w_rows = g.reshape(6, -1), w_hat.reshape(6, -1), w.reshape(6, -1)
    var = w_rows.var(1, unbiased=False)
    rhs = ((g_rows**2).sum(1) - g_rows.sum(1) ** 2 / n - (wh_rows * g_rows).sum(1) ** 2 / n) / var
    torch.testing.assert_close((grad_w.reshape(6, -1) ** 2).sum(1), rhs, rtol=1e-7, atol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_constant_filter_is_finite(preset: str) -> None:
    w = torch.ones(3, 2, 3, 3).requires_grad_()
    out = weight_standardize(w, preset=preset)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()
    assert out.abs().max() == 0


def authors_official(w: torch.Tensor) -> torch.Tensor:
    """The authors' conv weight transform as their layer writes it (torch ops, so autograd gives their backward)."""
    o = w.shape[0]
    centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
    return centered / (w.view(o, -1).std(dim=1).view(o, 1, 1, 1) + 1e-5)


def bcn_repo_conv(w: torch.Tensor) -> torch.Tensor:
    """The BCN repo's ImageNet conv weight transform: unbiased variance, 1e-5 inside the root."""
    o = w.shape[0]
    centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
    return centered / torch.pow(centered.view(o, -1).var(dim=1) + 1e-5, 0.5).view(o, 1, 1, 1)


def _filters(constant_rows: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64) * 0.1 + 0.02
    for i in constant_rows:
        w[i] = 0.25 * (i + 1)
    return w


@pytest.mark.parametrize(("preset", "formula"), [("official", authors_official), ("bcn", bcn_repo_conv)])
@pytest.mark.parametrize("constant_rows", [(), (1,), (0, 2, 4)])
def test_unbiased_presets_match_the_authors_formulas_forward_and_backward(preset, formula, constant_rows) -> None:
    w = _filters(constant_rows).requires_grad_()
    up = torch.randn(w.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ours, theirs = weight_standardize(w, preset=preset), formula(w)
    (g_ours,) = torch.autograd.grad(ours, w, up)
    (g_theirs,) = torch.autograd.grad(theirs, w, up)
    assert torch.isfinite(g_theirs).all()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-10)


def test_official_gradient_at_a_constant_filter_is_the_centered_upstream_over_eps() -> None:
    w = _filters((1,)).requires_grad_()
    up = torch.randn(w.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(weight_standardize(w, preset="official"), w, up)
    torch.testing.assert_close(grad[1], (up[1] - up[1].mean()) / 1e-5, rtol=1e-13, atol=0)


def test_official_forward_is_var_mean_then_sqrt_bit_for_bit() -> None:
    rows = _filters((3,)).reshape(5, -1).float()
    var, mean = torch.var_mean(rows, dim=1, correction=1, keepdim=True)
    assert torch.equal(standardize_rows(rows, preset="official"), (rows - mean) * (1.0 / (var.sqrt() + 1e-5)))


def test_timm_eps_override_matches_timm_batch_norm_form() -> None:
    """timm's BiT ResNetV2 / ViT-hybrid convs: ``StdConv2d(eps=1e-8)``, computed as timm does with batch_norm."""
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.05
    timm_form = torch.nn.functional.batch_norm(w.reshape(1, 6, -1), None, None, training=True, momentum=0.0, eps=1e-8)
    torch.testing.assert_close(
        weight_standardize(w, preset="timm", eps=1e-8), timm_form.reshape_as(w), rtol=0, atol=1e-13
    )
    assert (weight_standardize(w, preset="timm") - timm_form.reshape_as(w)).abs().max() > 1e-4


def test_timm_scaled_std_conv_is_the_timm_preset_with_a_gain() -> None:
    """timm ``ScaledStdConv2d``: batch_norm form with ``weight = gain * gamma * fan_in ** -0.5`` and its eps."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 0.05
    timm_gain, gamma, eps = torch.rand(6, generator=g, dtype=torch.float64) + 0.5, 1.7015043497085571, 1e-5
    scale = timm_gain * gamma * w[0].numel() ** -0.5
    timm_form = torch.nn.functional.batch_norm(
        w.reshape(1, 6, -1), None, None, weight=scale, training=True, momentum=0.0, eps=eps
    ).reshape_as(w)
    torch.testing.assert_close(weight_standardize(w, preset="timm", eps=eps, gain=scale), timm_form, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_use_float32_statistics(dtype: torch.dtype) -> None:
    w = (torch.randn(8, 16, 3, 3) * 1e-2 + 5e-2).to(dtype)
    got = weight_standardize(w)
    want = weight_standardize(w.float()).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_autocast_keeps_float32_weight_and_result() -> None:
    w = torch.randn(8, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = weight_standardize(w)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_rows(w.numpy(), "paper").reshape(w.shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "memory_format,shape",
    [
        (torch.channels_last, (8, 4, 3, 3)),
        (torch.channels_last_3d, (8, 4, 3, 3, 3)),
    ],
)
def test_channels_last_weight_keeps_layout_and_values(memory_format: torch.memory_format, shape: tuple) -> None:
    w = torch.randn(shape)
    w_cl = w.contiguous(memory_format=memory_format)
    got = weight_standardize(w_cl)
    assert got.is_contiguous(memory_format=memory_format)
    # rows are read in memory order, so sums run in another order: equal up to fp32 rounding
    torch.testing.assert_close(got, weight_standardize(w), atol=1e-6, rtol=0)
    rows = weight_to_rows(w_cl)
    assert rows.data_ptr() == w_cl.data_ptr() and rows.is_contiguous()  # a view, no copy
    assert rows_to_weight(rows, w_cl).is_contiguous(memory_format=memory_format)


def reference_transposed(w: np.ndarray, groups: int, preset: str) -> np.ndarray:
    """Loop over output channels of a ConvTranspose weight (in, out/groups, *k)."""
    cin, cout_g = w.shape[:2]
    cin_g = cin // groups
    out = np.empty_like(w, dtype=np.float64)
    for g in range(groups):
        for j in range(cout_g):
            block = w[g * cin_g : (g + 1) * cin_g, j]  # everything feeding output channel g*cout_g + j
            out[g * cin_g : (g + 1) * cin_g, j] = reference_rows(block.reshape(1, -1), preset).reshape(block.shape)
    return out


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("preset", ["paper", "official", "nf"])
def test_transposed_standardizes_each_output_channel(groups: int, preset: str) -> None:
    w = torch.randn(6, 4, 3, 2)  # in=6, out/groups=4
    got = weight_standardize_transposed(w, groups=groups, preset=preset)
    np.testing.assert_allclose(got.numpy(), reference_transposed(w.numpy(), groups, preset), atol=1e-6, rtol=0)
    assert fan_in(w, transposed=True, groups=groups) == 6 // groups * 6


def test_gain_and_shift_are_per_output_channel() -> None:
    w = torch.randn(4, 3, 2, 2)
    gain, shift = torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([0.0, 0.1, 0.2, 0.3])
    got = weight_standardize(w, gain=gain, shift=shift)
    want = weight_standardize(w) * gain.view(4, 1, 1, 1) + shift.view(4, 1, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="gain has 3 elements, expected one per output channel \\(4\\)"):
        weight_standardize(w, gain=torch.ones(3))


def test_bad_inputs_name_what_was_wrong() -> None:
    with pytest.raises(TypeError, match="weight must be floating point, got dtype torch.int64"):
        weight_standardize(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rank >= 2"):
        weight_standardize(torch.ones(4))
    with pytest.raises(ValueError, match="fan-in is 1"):
        weight_standardize(torch.ones(4, 1, 1, 1))


@settings(max_examples=40, deadline=None)
@given(
    out_g=st.integers(1, 5),
    in_g=st.integers(1, 4),
    groups=st.integers(1, 3),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_property_rows_round_trip_and_standardize(out_g, in_g, groups, k, transposed, dtype, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (in_g * groups, out_g, *k) if transposed else (out_g * groups, in_g, *k)
    w = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    rows = weight_to_rows(w, transposed=transposed, groups=groups)
    assert rows.shape == (out_g * groups, fan_in(w, transposed=transposed, groups=groups))
    assert torch.equal(rows_to_weight(rows, w, transposed=transposed, groups=groups), w)
    if rows.shape[1] < 2:
        return
    if transposed:
        out = weight_standardize_transposed(w, groups=groups)
    else:
        out = weight_standardize(w)
    assert out.dtype == dtype and out.shape == w.shape
    out_rows = weight_to_rows(out, transposed=transposed, groups=groups).double()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out_rows.mean(1), torch.zeros(rows.shape[0], dtype=torch.float64), atol=tol, rtol=0)
    spread = weight_to_rows(w, transposed=transposed, groups=groups).double().var(1, unbiased=False)
    nonconstant = spread > 1e-3
    var = out_rows.var(1, unbiased=False)[nonconstant]
    torch.testing.assert_close(var, torch.ones_like(var), atol=max(tol, 2e-2), rtol=0)
