"""WS layers: drop-in compatibility with torch.nn, forward against an independent reference, gradcheck."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchws.layers import (
    WS_LAYER_FOR,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    WSConvTranspose1d,
    WSConvTranspose2d,
    WSConvTranspose3d,
    WSLinear,
    WSMixin,
)


def ref_standardize(rows: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Paper preset written out: population variance, eps inside the square root."""
    mean = rows.mean(1, keepdim=True)
    var = ((rows - mean) ** 2).mean(1, keepdim=True)
    return (rows - mean) / torch.sqrt(var + eps)


def ref_conv_weight(w: torch.Tensor) -> torch.Tensor:
    return ref_standardize(w.reshape(w.shape[0], -1)).reshape(w.shape)


def ref_transposed_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    out = torch.empty_like(w)
    cin_g, cout_g = w.shape[0] // groups, w.shape[1]
    for g in range(groups):
        for j in range(cout_g):
            block = w[g * cin_g : (g + 1) * cin_g, j]
            out[g * cin_g : (g + 1) * cin_g, j] = ref_standardize(block.reshape(1, -1)).reshape(block.shape)
    return out


# (WS class, torch.nn class, constructor args, input shape, functional op)
CONV_CASES = [
    (WSConv1d, nn.Conv1d, (4, 6, 3), dict(padding=1, groups=2), (2, 4, 9), F.conv1d),
    (WSConv2d, nn.Conv2d, (4, 6, 3), dict(stride=2, groups=2), (2, 4, 9, 9), F.conv2d),
    (WSConv3d, nn.Conv3d, (2, 4, 3), dict(padding=1), (1, 2, 5, 5, 5), F.conv3d),
]
TRANSPOSED_CASES = [
    (WSConvTranspose1d, nn.ConvTranspose1d, (4, 6, 3), dict(stride=2, groups=2), (2, 4, 7), F.conv_transpose1d),
    (WSConvTranspose2d, nn.ConvTranspose2d, (6, 9, 3), dict(stride=2, groups=3), (2, 6, 5, 5), F.conv_transpose2d),
    (WSConvTranspose3d, nn.ConvTranspose3d, (2, 4, 2), dict(), (1, 2, 3, 3, 3), F.conv_transpose3d),
]


@pytest.mark.parametrize("ws_cls,nn_cls,args,kwargs,in_shape", [case[:5] for case in CONV_CASES + TRANSPOSED_CASES])
def test_layer_is_a_drop_in_for_torch_nn(ws_cls, nn_cls, args, kwargs, in_shape) -> None:
    """Same class tree, constructor and state_dict keys as the torch.nn layer; on an input of ``in_shape`` the plain
    layer holding the standardized weight computes the WS layer's output."""
    torch.manual_seed(0)
    m = ws_cls(*args, **kwargs)
    plain = nn_cls(*args, **kwargs)
    assert isinstance(m, nn_cls) and isinstance(m, WSMixin) and WS_LAYER_FOR[nn_cls] is ws_cls
    assert m.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(m.state_dict())  # a plain checkpoint loads into the WS layer and back
    m.load_state_dict(plain.state_dict())
    transposed = nn_cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    weight = m.weight.detach()
    with torch.no_grad():
        plain.weight.copy_(ref_transposed_weight(weight, m.groups) if transposed else ref_conv_weight(weight))
    x = torch.randn(in_shape)
    torch.testing.assert_close(m(x), plain(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ws_cls,nn_cls,args,kwargs,in_shape,fn", CONV_CASES)
def test_conv_forward_matches_reference(ws_cls, nn_cls, args, kwargs, in_shape, fn) -> None:
    torch.manual_seed(0)
    m = ws_cls(*args, **kwargs)
    x = torch.randn(in_shape)
    want = fn(x, ref_conv_weight(m.weight.detach()), m.bias, m.stride, m.padding, m.dilation, m.groups)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ws_cls,nn_cls,args,kwargs,in_shape,fn", TRANSPOSED_CASES)
def test_transposed_forward_matches_reference(ws_cls, nn_cls, args, kwargs, in_shape, fn) -> None:
    torch.manual_seed(0)
    m = ws_cls(*args, **kwargs)
    x = torch.randn(in_shape)
    w = ref_transposed_weight(m.weight.detach(), m.groups)
    want = fn(x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert m.ws_out_channels == args[1] and m.ws_fan_in == args[0] // m.groups * m.weight[0, 0].numel()


def test_transposed_output_size_argument() -> None:
    m = WSConvTranspose2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(1, 3, 5, 5)
    assert m(x, output_size=[10, 10]).shape == (1, 4, 10, 10)
    assert m(x).shape == (1, 4, 9, 9)


def test_linear_forward_matches_reference() -> None:
    m = WSLinear(7, 3)
    x = torch.randn(5, 7)
    torch.testing.assert_close(m(x), F.linear(x, ref_conv_weight(m.weight.detach()), m.bias), atol=1e-6, rtol=1e-6)
    assert isinstance(m, nn.Linear)


LAYERS_FOR_GRADCHECK = [
    (lambda **kw: WSConv1d(2, 4, 3, groups=2, **kw), (1, 2, 5)),
    (lambda **kw: WSConv2d(2, 3, 2, **kw), (1, 2, 3, 3)),
    (lambda **kw: WSConv3d(2, 2, 2, **kw), (1, 2, 3, 3, 3)),
    (lambda **kw: WSConvTranspose1d(4, 2, 2, groups=2, **kw), (1, 4, 3)),
    (lambda **kw: WSConvTranspose2d(2, 3, 2, **kw), (1, 2, 2, 2)),
    (lambda **kw: WSConvTranspose3d(2, 2, 2, **kw), (1, 2, 2, 2, 2)),
    (lambda **kw: WSLinear(4, 3, **kw), (2, 4)),
]


@pytest.mark.parametrize("make,in_shape", LAYERS_FOR_GRADCHECK)
@pytest.mark.parametrize("preset", ["paper", "official", "nf"])
def test_gradcheck_every_layer_kind(make, in_shape, preset) -> None:
    torch.manual_seed(0)
    m = make(preset=preset, gain=True, dtype=torch.float64)
    with torch.no_grad():
        m.gain.uniform_(0.5, 1.5)
    x = torch.randn(in_shape, dtype=torch.float64, requires_grad=True)
    params = [m.weight, m.gain, m.bias]

    def f(x, weight, gain, bias):
        return torch.func.functional_call(m, {"weight": weight, "gain": gain, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_fan_in_of_one_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"WSConv2d: fan-in per output channel is 1 .*use the plain torch.nn layer"):
        WSConv2d(1, 8, 1)
    with pytest.raises(ValueError, match="WSLinear: fan-in per output channel is 1"):
        WSLinear(1, 4)
    with pytest.raises(ValueError, match="WSConv2d: fan-in per output channel is 1"):
        WSConv2d(8, 8, 1, groups=8)  # depthwise 1x1
    WSConv2d(8, 8, 3, groups=8)  # depthwise 3x3 has fan-in 9: fine


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(TypeError, match="WSConv2d: weight standardization needs a floating dtype, got dtype=torch.int"):
        WSConv2d(3, 4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown WS preset 'bn'"):
        WSConv2d(3, 4, 3, preset="bn")
    with pytest.raises(ValueError, match="WSLinear: eps must be a positive finite number, got -1"):
        WSLinear(3, 4, eps=-1.0)


def test_gain_defaults_follow_preset_and_reset_to_one() -> None:
    assert WSConv2d(3, 4, 3).gain is None
    nf = WSConv2d(3, 4, 3, preset="nf")
    assert nf.gain.shape == (4,) and "gain" in nf.state_dict()
    assert WSConv2d(3, 4, 3, preset="nf", gain=False).gain is None
    t = WSConvTranspose2d(4, 6, 3, groups=2, gain=True, shift=True)
    assert t.gain.shape == (6,) and t.shift.shape == (6,)
    with torch.no_grad():
        t.gain.fill_(3.0)
        t.shift.fill_(1.0)
    t.reset_parameters()
    assert torch.equal(t.gain, torch.ones(6)) and torch.equal(t.shift, torch.zeros(6))


def test_gain_scales_output_channels() -> None:
    m = WSConv2d(3, 4, 3, bias=False, gain=True)
    x = torch.randn(1, 3, 6, 6)
    base = m(x).detach()
    with torch.no_grad():
        m.gain.copy_(torch.tensor([1.0, 2.0, 0.0, -1.0]))
    torch.testing.assert_close(m(x), base * torch.tensor([1.0, 2.0, 0.0, -1.0]).view(1, 4, 1, 1))


def test_cached_weight_is_used_inside_the_block_only() -> None:
    from torchws.layers import weight_cache

    m = WSConv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 5)
    computed = m(x)
    supplied, inner = torch.zeros_like(m.weight), torch.ones_like(m.weight)
    with weight_cache.cached({m: supplied}):
        assert m.standardized_weight() is supplied and m(x).abs().max() == m.bias.abs().max()
        with weight_cache.cached({m: inner}):  # caches nest; the innermost wins
            assert m.standardized_weight() is inner
        assert m.standardized_weight() is supplied
    torch.testing.assert_close(m(x), computed)


def test_rows_round_trip_on_layers() -> None:
    for m in (WSConv2d(4, 6, 3, groups=2), WSConvTranspose2d(6, 9, 3, groups=3), WSLinear(3, 5)):
        rows = m.ws_rows()
        assert rows.shape == (m.ws_out_channels, m.ws_fan_in)
        assert torch.equal(m.ws_from_rows(rows), m.weight)


def test_channels_last_model_matches_contiguous() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(WSConv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(), WSConv2d(8, 8, 3))
    x = torch.randn(2, 3, 8, 8)
    want = m(x)
    m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    assert m_cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert m_cl[0].standardized_weight().is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(m_cl(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_forward_and_backward() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(WSConv2d(3, 8, 3), nn.ReLU(), WSConv2d(8, 4, 3))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    ref = m(x)
    assert (y.float() - ref).norm() / ref.norm() < 0.02  # bf16 convs, fp32 standardization
    y.float().sum().backward()
    assert m[0].weight.grad.dtype == torch.float32 and torch.isfinite(m[0].weight.grad).all()


def test_bf16_weights() -> None:
    m = WSConv2d(3, 4, 3, dtype=torch.bfloat16)
    assert m.standardized_weight().dtype == torch.bfloat16
    assert m(torch.randn(1, 3, 5, 5, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_pickle_deepcopy_and_repr() -> None:
    m = WSConv2d(3, 4, 3, preset="timm", eps=1e-3)
    assert "preset=timm" in repr(m) and "eps=0.001" in repr(m)
    clone = pickle.loads(pickle.dumps(m))
    assert type(clone) is WSConv2d and clone.ws_eps == 1e-3
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(copy.deepcopy(m)(x), m(x))
