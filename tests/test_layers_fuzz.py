"""Hypothesis over the WS layers' arguments: shapes, groups, stride, dilation, transposed convs with output padding,
dtypes (fp64, fp32, bf16, fp16), memory formats, weight scales 1e-8 to 1e8 and constant filters. The layer's
standardized weight and forward match the presets' formulas written out here in float64, and are finite; or the
layer raises a clear error at construction. Gradients are finite at constant filters for every preset;
the ``official`` preset's are not (docs/reliability.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchws.layers import WSConv1d, WSConv2d, WSConvTranspose2d, WSLinear
from torchws.presets import PRESETS

# (variance divisor: "n" or "n-1", eps, where eps goes), spelled from the peers' code (ANCHORS.md), not from presets.py
FORMULAS = {
    "paper": ("n", 1e-5, "inside_sqrt"),
    "official": ("n-1", 1e-5, "added_to_std"),
    "timm": ("n", 1e-6, "inside_sqrt"),
    "bit": ("n", 1e-10, "inside_sqrt"),
    "nf": ("n", 1e-4, "clamp_fan_in_var"),
}
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_rows(rows: torch.Tensor, preset: str) -> torch.Tensor:
    """Standardize each row (one output filter) in float64 by the preset's published formula."""
    divisor, eps, where = FORMULAS[preset]
    rows = rows.double()
    n = rows.shape[1]
    mean = rows.mean(1, keepdim=True)
    sum_sq = ((rows - mean) ** 2).sum(1, keepdim=True)
    var = sum_sq / (n - 1 if divisor == "n-1" else n)
    if where == "inside_sqrt":
        return (rows - mean) / torch.sqrt(var + eps)
    if where == "added_to_std":
        return (rows - mean) / (torch.sqrt(var) + eps)
    return (rows - mean) / torch.sqrt(torch.clamp(n * var, min=eps))  # NFNets: rsqrt(max(fan_in * var, eps))


def reference_weight(w: torch.Tensor, preset: str, transposed: bool, groups: int) -> torch.Tensor:
    if not transposed:
        return reference_rows(w.reshape(w.shape[0], -1), preset).reshape(w.shape)
    cin_g = w.shape[0] // groups  # (C_in, C_out / groups, k...): output channel j of group g reads w[g block, j]
    out = torch.empty(w.shape, dtype=torch.float64)
    for g in range(groups):
        block = w[g * cin_g : (g + 1) * cin_g]  # (cin_g, cout_g, k...)
        rows = block.transpose(0, 1).reshape(block.shape[1], -1)
        out[g * cin_g : (g + 1) * cin_g] = reference_rows(rows, preset).reshape(block.transpose(0, 1).shape) \
            .transpose(0, 1)  # fmt: skip
    return out


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["conv1d", "conv2d", "transposed2d", "linear"]))
    preset = draw(st.sampled_from(sorted(FORMULAS)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
    groups = draw(st.sampled_from([1, 2, 3])) if kind != "linear" else 1
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    scale = 10.0 ** draw(st.integers(-8, 3 if dtype == torch.float16 else 8))  # fp16 ends at 65504
    constant = draw(st.booleans())
    channels_last = kind in ("conv2d", "transposed2d") and draw(st.booleans())
    return kind, preset, dtype, groups, cin, cout, k, stride, dilation, output_padding, scale, constant, channels_last


def build(kind, preset, dtype, groups, cin, cout, k, stride, dilation, output_padding):
    if kind == "linear":
        return WSLinear(cin * k, cout, preset=preset, dtype=dtype), (2, cin * k)
    if kind == "conv1d":
        return WSConv1d(cin, cout, k, stride=stride, dilation=dilation, groups=groups, preset=preset,
                        dtype=dtype), (2, cin, 7)  # fmt: skip
    if kind == "conv2d":
        return WSConv2d(cin, cout, k, stride=stride, dilation=dilation, groups=groups, preset=preset,
                        dtype=dtype), (2, cin, 6, 5)  # fmt: skip
    return WSConvTranspose2d(cin, cout, k, stride=stride, dilation=dilation, groups=groups,
                             output_padding=output_padding, preset=preset, dtype=dtype), (2, cin, 4, 3)  # fmt: skip


def reference_forward(layer, x: torch.Tensor, w_hat: torch.Tensor, kind: str) -> torch.Tensor:
    x, bias = x.double(), layer.bias.double()
    if kind == "linear":
        return F.linear(x, w_hat, bias)
    if kind == "conv1d":
        return F.conv1d(x, w_hat, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    if kind == "conv2d":
        return F.conv2d(x, w_hat, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.conv_transpose2d(x, w_hat, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                              layer.dilation)  # fmt: skip


@SETTINGS
@given(layers())
def test_ws_layer_matches_the_formula_or_refuses_clearly(case):
    kind, preset, dtype, groups, cin, cout, k, stride, dilation, output_padding, scale, constant, channels_last = case
    transposed = kind == "transposed2d"
    fan_in = cin * k if kind == "linear" else cin // groups * (k if kind == "conv1d" else k * k)
    if fan_in == 1:  # a one-element filter standardizes to 0 whatever it holds: refused at construction
        with pytest.raises(ValueError, match=r"fan-in per output channel is 1 .*use the plain torch.nn layer"):
            build(kind, preset, dtype, groups, cin, cout, k, stride, dilation, output_padding)
        return
    torch.manual_seed(0)
    layer, in_shape = build(kind, preset, dtype, groups, cin, cout, k, stride, dilation, output_padding)
    with torch.no_grad():
        layer.weight.mul_(scale)
        if constant:
            layer.weight.fill_(0.5 * scale)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
    w_ref = reference_weight(layer.weight.detach(), preset, transposed, groups)
    w_hat = layer.compute_standardized_weight().detach()
    assert w_hat.dtype == dtype and bool(w_hat.isfinite().all())
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(w_hat.double(), w_ref, rtol=tol, atol=tol * max(1.0, float(w_ref.abs().max())))
    if dtype in (torch.float64, torch.float32):  # the CPU's half-precision convs are not what is tested here
        x = torch.randn(in_shape, dtype=dtype)
        out = layer(x).detach()
        want = reference_forward(layer, x, w_ref, kind)
        assert out.dtype == dtype and bool(out.isfinite().all())
        torch.testing.assert_close(out.double(), want, rtol=tol * 10, atol=tol * 10 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("preset", sorted(PRESETS))
@given(scale=st.sampled_from([1e-8, 1e-3, 1.0, 1e3, 1e8]))
@settings(max_examples=5, deadline=None)
def test_constant_filter_gradient_is_finite_for_every_preset(preset, scale):
    """A constant filter (std 0): the forward is finite for every preset (the filter standardizes to 0), and so is the
    weight gradient (docs/numerics.md: the derivative of the root is taken as 0 at variance 0)."""
    layer = WSConv2d(2, 3, 3, preset=preset, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[1].fill_(scale)
    out = layer(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert bool(out.isfinite().all())
    assert torch.equal(layer.compute_standardized_weight()[1], torch.zeros_like(layer.weight[1]))
    out.square().sum().backward()
    grad = layer.weight.grad
    assert bool(grad.isfinite().all())


def test_clear_errors_at_construction():
    with pytest.raises(TypeError, match=r"WSConv2d: weight standardization needs a floating dtype"):
        WSConv2d(3, 4, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"unknown WS preset 'bcn_typo'"):
        WSConv2d(3, 4, 3, preset="bcn_typo")
    with pytest.raises(ValueError, match=r"eps must be a positive finite number, got nan"):
        WSConv2d(3, 4, 3, eps=math.nan)
