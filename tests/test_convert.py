"""convert() / fold(): model surgery on a small ResNet-ish model written here."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torchws.convert import ConversionReport, convert, fold, function_preserving_gain_shift
from torchws.functional import standardize_rows
from torchws.layers import WSConv2d, WSMixin
from torchws.layers.bcn import BatchChannelNorm2d

PRESETS = ["paper", "official", "bcn", "timm", "bit", "nf"]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        if stride != 1 or cin != cout:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class TinyNet(nn.Module):
    """conv-bn-relu stem, two blocks (downsample, grouped conv), grouped ConvTranspose2d, Linear head."""

    def __init__(self, width: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block(width, width, groups=4), Block(width, 2 * width, stride=2, groups=8))
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.up(self.layer1(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine, weights with non-zero filter means (as in pretrained nets)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.add_(torch.randn(m.weight.shape[0], *[1] * (m.weight.dim() - 1), generator=g) * 0.05)
    return model


def _net() -> TinyNet:
    torch.manual_seed(0)
    return _trained_like(TinyNet()).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_convert_keeps_keys_types_and_parameters():
    net = _net()
    out = convert(net)
    assert out is not net and not isinstance(net.conv1, WSMixin)  # a copy
    assert list(out.state_dict()) == list(net.state_dict())
    convs = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    for name in convs:
        m = out.get_submodule(name)
        assert isinstance(m, WSMixin) and isinstance(m, type(net.get_submodule(name)))
        assert torch.equal(m.weight, net.get_submodule(name).weight)
    assert type(out.fc) is nn.Linear  # linear=False by default
    assert out.layer1[0].conv2.groups == 4 and out.up.groups == 4 and out.layer1[1].conv1.stride == (2, 2)


def test_inplace_reuses_parameters_and_keeps_requires_grad_mode_dtype():
    net = _net().double()
    net.conv1.weight.requires_grad_(False)
    net.layer1.train()
    w = net.layer1[0].conv1.weight
    out = convert(net, inplace=True, linear=True)
    assert out is net and out.layer1[0].conv1.weight is w
    assert not out.conv1.weight.requires_grad and out.layer1[0].conv2.weight.requires_grad
    assert out.layer1[0].conv1.training and not out.conv1.training and not out.fc.training
    assert all(p.dtype == torch.float64 for p in out.parameters())
    assert all(p.device == w.device for p in out.parameters())


def test_preset_eps_gain_reach_the_layers():
    out = convert(_net(), preset="official", eps=1e-3, gain=True)
    assert out.conv1.ws_preset.name == "official" and out.conv1.ws_eps == 1e-3
    assert out.conv1.gain is not None and "conv1.gain" in out.state_dict()


def test_exclude_names_and_patterns():
    out = convert(_net(), exclude=("conv1", "layer1.1.*"), linear=True, norm="gn")
    assert type(out.conv1) is nn.Conv2d and type(out.bn1) is nn.GroupNorm
    assert isinstance(out.layer1[0].conv1, WSMixin)
    assert type(out.layer1[1].conv1) is nn.Conv2d and type(out.layer1[1].bn1) is nn.BatchNorm2d
    assert type(out.layer1[1].downsample[0]) is nn.Conv2d  # below an excluded path too
    out = convert(_net(), exclude=("layer1",))
    assert not any(isinstance(m, WSMixin) for m in out.layer1.modules())


def test_gn_conversion_copies_affine():
    net = _net()
    out = convert(net, norm="gn", num_groups=8)
    assert type(out.bn1) is nn.GroupNorm and out.bn1.num_groups == 8
    assert torch.equal(out.bn1.weight, net.bn1.weight) and torch.equal(out.bn1.bias, net.bn1.bias)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())


def test_bcn_conversion_copies_batchnorm_state():
    net = _net()
    out = convert(net, norm="bcn", num_groups=8)
    bcn = out.layer1[1].downsample[1]
    bn = net.layer1[1].downsample[1]
    assert isinstance(bcn, BatchChannelNorm2d) and bcn.num_groups == 8 and not bcn.training
    for key, value in bn.state_dict().items():
        assert torch.equal(bcn.bn.state_dict()[key], value), key
    assert bcn.bn.momentum == bn.momentum and bcn.bn.eps == bn.eps
    out(_x())  # runs


def test_non_divisible_groups_error_names_path_and_fallback():
    net = TinyNet(width=48)
    with pytest.raises(ValueError, match=r"^bn1: 48 channels are not divisible by num_groups=32"):
        convert(net, norm="gn")
    out, rep = convert(net, norm="gn", group_fallback="largest_divisor", report=True)
    assert out.bn1.num_groups == 24 and out.layer1[1].bn1.num_groups == 32  # 48 -> 24, 96 -> 32
    assert ("bn1", "BatchNorm2d", "GroupNorm(24)") in rep.converted
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1: 48 channels"):
        convert(net, norm="gn", exclude=("bn1",))


def test_fan_in_one_layers_are_skipped_and_reported():
    net = nn.Sequential(nn.Conv2d(8, 8, 1, groups=8), nn.Linear(1, 4), nn.Conv1d(2, 4, 3))
    out, rep = convert(net, linear=True, report=True)
    assert type(out[0]) is nn.Conv2d and type(out[1]) is nn.Linear and isinstance(out[2], WSMixin)
    assert [p for p, _ in rep.skipped] == ["0", "1"] and "fan-in" in rep.skipped[0][1]
    assert isinstance(rep, ConversionReport) and "skipped 0" in str(rep)


def test_convert_twice_is_idempotent():
    once = convert(_net(), norm="bcn", num_groups=8, preserve_function=True, linear=True)
    twice, rep = convert(once, norm="bcn", num_groups=8, preserve_function=True, linear=True, report=True)
    assert rep.converted == [] and list(twice.state_dict()) == list(once.state_dict())
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    x = _x()
    torch.testing.assert_close(twice(x), once(x), rtol=0, atol=0)


def test_root_module_and_shared_module():
    assert isinstance(convert(nn.Conv2d(3, 4, 3)), WSConv2d)
    shared = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    out = convert(net)
    assert out[0] is out[2] and isinstance(out[0], WSConv2d)


def test_hooks_move_to_the_replacement():
    net = _net()
    calls = []
    handle = net.conv1.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    out = convert(net, inplace=True)
    out(_x())
    assert calls == ["WSConv2d"]
    handle.remove()
    out(_x())
    assert calls == ["WSConv2d"]


def test_subclass_and_parametrized_layers_are_skipped():
    class MyConv(nn.Conv2d):
        pass

    net = nn.Sequential(MyConv(3, 4, 3), nn.Conv2d(4, 4, 3))
    nn.utils.parametrize.register_parametrization(net[1], "weight", nn.Identity())
    out, rep = convert(net, report=True)
    assert type(out[0]) is MyConv and not isinstance(out[1], WSMixin)
    assert {p for p, _ in rep.skipped} == {"0", "1"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        convert(_net(), norm="bn")
    with pytest.raises(ValueError, match="group_fallback"):
        convert(_net(), group_fallback="nearest")
    with pytest.raises(ValueError, match="gain"):
        convert(_net(), preserve_function=True, gain=False)
    with pytest.raises(ValueError, match="preset"):
        convert(_net(), preset="nope")
    with pytest.raises(ValueError, match=r"0: norm='bcn' replaces BatchNorm2d"):
        convert(nn.Sequential(nn.BatchNorm1d(32)), norm="bcn")


@pytest.mark.parametrize("preset", PRESETS)
def test_preserve_function_equals_original(preset: str):
    net = _net()
    out = convert(net, preset=preset, preserve_function=True, linear=True)
    assert {k for k in out.state_dict()} - set(net.state_dict()) == {
        f"{n}.{p}" for n, m in out.named_modules() if isinstance(m, WSMixin) for p in ("gain", "shift")
    }
    x = _x()
    with torch.no_grad():
        assert _rel(out(x), net(x)) <= 1e-5
        # and the WS layers are really standardizing: the plain conversion computes something else
        assert _rel(convert(net, preset=preset, linear=True)(x), net(x)) > 1e-2


@settings(max_examples=25, deadline=None)
@given(
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2, 3]),
    cin_g=st.integers(1, 3),
    cout_g=st.integers(1, 3),
    k=st.integers(1, 3),
    preset=st.sampled_from(PRESETS),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_preserve_function_property(transposed, groups, cin_g, cout_g, k, preset, scale, seed):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    torch.manual_seed(seed)
    layer = cls(cin_g * groups, cout_g * groups, k, groups=groups)
    with torch.no_grad():
        layer.weight.mul_(scale).add_(0.1 * scale)
    out, rep = convert(layer, preset=preset, preserve_function=True, report=True)
    if cin_g * k * k < 2:
        assert out is not layer and type(out) is cls and rep.skipped
        return
    w = out.standardized_weight().detach()
    torch.testing.assert_close(w, layer.weight.detach(), rtol=1e-5, atol=1e-6 * scale)
    x = torch.randn(1, cin_g * groups, 4, 4)
    torch.testing.assert_close(out(x), layer(x), rtol=1e-5, atol=1e-5 * scale)


def test_function_preserving_gain_shift_inverts_standardize_rows():
    rows = torch.randn(6, 10, dtype=torch.float64) * 3 + 1
    rows[0] = 2.0  # a constant row: W_hat = 0, shift carries it
    for preset in PRESETS:
        gain, shift = function_preserving_gain_shift(rows, preset=preset)
        back = standardize_rows(rows, preset=preset) * gain[:, None] + shift[:, None]
        torch.testing.assert_close(back, rows, rtol=1e-12, atol=1e-12)


def _random_gain_shift(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WSMixin):
                m.gain.uniform_(0.5, 2.0)
                m.shift.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv1d(4, 6, 3, groups=2, padding=1), (2, 4, 7)),
        (nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding_mode="reflect", padding=2), (2, 4, 9, 9)),
        (nn.Conv3d(4, 6, 2, groups=2), (2, 4, 4, 4, 4)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1, groups=2), (2, 4, 5)),
        (nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), (2, 6, 4, 4)),
        (nn.ConvTranspose3d(4, 6, 2, groups=2), (2, 4, 3, 3, 3)),
        (nn.Linear(5, 3), (2, 5)),
    ],
)
def test_fold_equals_ws_layer(layer: nn.Module, shape: tuple[int, ...]):
    ws = _random_gain_shift(convert(layer, linear=True, gain=True, preserve_function=True))
    folded = fold(ws)
    assert type(folded) is type(layer) and isinstance(ws, WSMixin)
    x = torch.randn(*shape)
    torch.testing.assert_close(folded(x), ws(x), rtol=1e-5, atol=1e-6)
    assert getattr(folded, "padding_mode", None) == getattr(layer, "padding_mode", None)
    assert folded.weight.shape == layer.weight.shape and folded.weight.requires_grad


def _assert_pure_torch_nn(model: nn.Module) -> None:
    for m in model.modules():
        assert not type(m).__module__.startswith("torchws"), type(m)


def test_convert_fold_round_trip():
    ws = _random_gain_shift(convert(_net(), norm="gn", num_groups=8, linear=True, preserve_function=True)).eval()
    folded = fold(ws)
    _assert_pure_torch_nn(folded)
    assert list(folded.state_dict()) == [k for k in ws.state_dict() if not k.endswith((".gain", ".shift"))]
    x = _x()
    with torch.no_grad():
        assert _rel(folded(x), ws(x)) <= 1e-5
    assert isinstance(ws.conv1, WSMixin)  # fold copied


def test_fold_leaves_bcn_modules():
    ws = convert(_net(), norm="bcn", num_groups=8)
    folded = fold(ws)
    assert isinstance(folded.bn1, BatchChannelNorm2d)
    assert not any(isinstance(m, WSMixin) for m in folded.modules())
    x = _x()
    torch.testing.assert_close(folded(x), ws(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_folded_model_exports_and_scripts():
    ws = _random_gain_shift(convert(_net(), norm="gn", num_groups=8, preserve_function=True)).eval()
    folded = fold(ws)
    x = _x()
    with torch.no_grad():
        ref = ws(x)
        exported = torch.export.export(folded, (x,))
        torch.testing.assert_close(exported.module()(x), ref, rtol=1e-5, atol=1e-5)
        scripted = torch.jit.script(folded)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)


def test_convert_keeps_an_existing_batched_pass_configuration():
    from torchws.fast import enable_batched_ws, find_handle

    net = nn.Sequential(WSConv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    enable_batched_ws(net, backend="torch")
    out = convert(net, inplace=True)
    handle = find_handle(out)
    assert handle.backend == "torch"  # not reset to the default
    assert len(handle.layers) == 2  # the new WS layer is in the plan
    assert find_handle(convert(out, batched_ws=False)) is None  # False: the returned model has no pass
