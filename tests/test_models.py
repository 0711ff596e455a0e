"""Model zoo: registry, exact torchvision parameter counts and key names, injected layers, features, GN groups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from torchws.layers import WSConv2d, WSMixin
from torchws.layers.norms import make_conv_layer, make_norm_layer, small_image_groups
from torchws.models import (
    Bottleneck,
    ResNet,
    create_model,
    get_model_info,
    list_models,
    register_model,
)

# torchvision's parameter counts at 1000 classes (torchvision.models.<arch>().parameters())
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x4d": 44_177_704,
}
DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_model(name: str, **kw) -> nn.Module:
    with torch.device("meta"):  # no memory, no init cost: enough for counting and names
        return create_model(name, **kw)


def torchvision_keys(depths: tuple[int, ...], bottleneck: bool, *, bn: bool) -> list[str]:
    """state_dict keys of torchvision's resnet, written out from its layout (not from our code)."""
    norm = ["weight", "bias"] + (["running_mean", "running_var", "num_batches_tracked"] if bn else [])
    keys = ["conv1.weight"] + [f"bn1.{p}" for p in norm]
    n_convs = 3 if bottleneck else 2
    for stage, depth in enumerate(depths, start=1):
        for b in range(depth):
            pre = f"layer{stage}.{b}."
            for c in range(1, n_convs + 1):
                keys += [f"{pre}conv{c}.weight"] + [f"{pre}bn{c}.{p}" for p in norm]
            if b == 0 and (bottleneck or stage > 1):
                keys += [f"{pre}downsample.0.weight"] + [f"{pre}downsample.1.{p}" for p in norm]
    return keys + ["fc.weight", "fc.bias"]


# --- registry --------------------------------------------------------------------------------------------------
def test_registered_names():
    archs = list(TORCHVISION_PARAMS) + [f"cifar_resnet{d}" for d in (8, 18, 20, 32, 56, 110)]
    suffixes = ("bn", "gn", "gn_ws", "bcn_ws", "bn_ws", "ln_ws", "bcn_est_ws")
    expected = {f"{a}_{s}" for a in archs for s in suffixes}
    assert set(list_models()) == expected
    assert list_models("resnet50_*") == [
        "resnet50_bcn_est_ws",
        "resnet50_bcn_ws",
        "resnet50_bn",
        "resnet50_bn_ws",
        "resnet50_gn",
        "resnet50_gn_ws",
        "resnet50_ln_ws",
    ]
    assert len(list_models("*_gn_ws")) == 13


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="resnet50_gn_ws"):
        create_model("resnet50_gnws")
    with pytest.raises(ValueError, match="valid names: .*cifar_resnet20_bn"):
        create_model("vgg16")


def test_unknown_override_lists_valid_ones():
    with pytest.raises(TypeError, match="unknown override.*foo; valid: in_chans, channels, ws_preset"):
        create_model("resnet18_bn", foo=1)


def test_register_duplicate_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_model(
            "resnet50_gn_ws", family="resnet", norm="gn", ws=True, input_size=(3, 224, 224), num_classes=1000
        )(lambda **kw: nn.Identity())


def test_metadata():
    info = get_model_info("resnext101_32x4d_gn_ws")
    assert (info.family, info.norm, info.ws, info.input_size, info.num_classes) == (
        "resnext",
        "gn",
        True,
        (3, 224, 224),
        1000,
    )
    assert info.official_checkpoint == "X-101-GN-WS.pth.tar"
    small = get_model_info("cifar_resnet20_bn")
    assert (small.family, small.input_size, small.num_classes, small.ws) == ("cifar_resnet", (3, 32, 32), 10, False)


# --- exact sizes and names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TORCHVISION_PARAMS))
def test_torchvision_param_counts(arch):
    assert n_params(meta_model(f"{arch}_gn_ws")) == TORCHVISION_PARAMS[arch]
    assert n_params(meta_model(f"{arch}_bn")) == TORCHVISION_PARAMS[arch]


def test_resnet50_counts_all_variants_and_classes():
    for suffix in ("bn", "gn", "gn_ws"):
        assert n_params(meta_model(f"resnet50_{suffix}")) == 25_557_032
    # 10 classes: fc shrinks from 2048*1000+1000 to 2048*10+10; grayscale: stem loses 2 of 3 input planes
    assert n_params(meta_model("resnet50_gn_ws", num_classes=10)) == 25_557_032 - 2_049_000 + 20_490
    assert n_params(meta_model("resnet50_gn_ws", in_chans=1)) == 25_557_032 - 2 * 64 * 49


def test_small_image_param_counts():
    # He et al. CIFAR ResNets with option-B shortcuts (two 1x1 projections: +2,752 over option A's 269,722)
    # depth 8 by hand: stem 432 + 32, layer1 4,672, layer2 14,528 (with its 1x1 projection), layer3 57,728, fc 650
    expected = {8: 78_042, 20: 272_474, 32: 466_906, 56: 855_770, 110: 1_730_714}
    for depth, count in expected.items():
        assert n_params(meta_model(f"cifar_resnet{depth}_gn_ws")) == count
    assert n_params(meta_model("cifar_resnet18_bn")) == 11_173_962


def test_reference_params_metadata_matches_models():
    for name in list_models():
        info = get_model_info(name)
        if info.reference_params is not None:
            assert n_params(meta_model(name)) == info.reference_params, name


@pytest.mark.parametrize(
    "arch,bottleneck", [("resnet18", False), ("resnet34", False), ("resnet50", True), ("resnet101", True)]
)
def test_state_dict_keys_equal_torchvision(arch, bottleneck):
    gn = meta_model(f"{arch}_gn_ws").state_dict()
    assert list(gn) == torchvision_keys(DEPTHS[arch], bottleneck, bn=False)
    bn = meta_model(f"{arch}_bn").state_dict()
    assert list(bn) == torchvision_keys(DEPTHS[arch], bottleneck, bn=True)


def test_gn_ws_layout():
    model = meta_model("resnext50_32x4d_gn_ws")
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(isinstance(m, WSConv2d) for _, m in convs)
    names = {n for n, _ in convs}
    assert {"conv1", "layer1.0.downsample.0", "layer4.0.downsample.0"} <= names
    assert model.layer2[0].conv2.groups == 32
    norms = [m for n, m in model.named_modules() if n.split(".")[-1].startswith("bn") or n.endswith("downsample.1")]
    assert len(norms) == 53 and all(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in norms)
    assert type(model.fc) is nn.Linear and not isinstance(model.fc, WSMixin)
    assert not any(isinstance(m, WSMixin) for m in meta_model("resnet50_gn").modules())


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    # a BCN's inner `bn` is part of its norm layer, not one of the model's
    leaves = [(n.split(".")[-1], n, m) for n, m in model.named_modules()]
    return [m for leaf, n, m in leaves if (leaf.startswith("bn") and leaf != "bn") or n.endswith("downsample.1")]


def test_bn_ws_ln_ws_bcn_est_ws_layouts():
    from torchws.layers import BatchChannelNorm2d

    for suffix, norm_type in (("bn_ws", nn.BatchNorm2d), ("ln_ws", nn.GroupNorm), ("bcn_est_ws", BatchChannelNorm2d)):
        model = create_model(f"cifar_resnet8_{suffix}", in_chans=1)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 9 and all(isinstance(m, WSConv2d) for m in convs), suffix  # 7 3x3 + 2 projections
        norms = _norm_layers(model)
        assert len(norms) == 9 and all(type(m) is norm_type for m in norms), suffix
    ln = _norm_layers(create_model("cifar_resnet8_ln_ws"))
    assert all(m.num_groups == 1 and m.weight.shape == (m.num_channels,) for m in ln)  # LN: one group, per-channel
    est = _norm_layers(create_model("cifar_resnet8_bcn_est_ws"))
    assert all(m.estimate and m.num_groups == small_image_groups(m.num_channels) for m in est)
    assert not any(m.estimate for m in _norm_layers(create_model("cifar_resnet8_bcn_ws")))
    assert get_model_info("resnet50_ln_ws").norm == "ln" and get_model_info("resnet50_bcn_est_ws").norm == "bcn_est"


def test_ln_ws_normalizes_each_sample_over_all_channels():
    norm = make_norm_layer("ln")(6)
    x = torch.randn(3, 6, 5, 5) * 4 + 2
    flat = x.reshape(3, -1)  # reference: layer norm over (C, H, W) per sample, population variance, eps 1e-5
    ref = (flat - flat.mean(1, keepdim=True)) / torch.sqrt(flat.var(1, correction=0, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), ref.reshape(x.shape), atol=1e-5, rtol=1e-5)


def test_ws_preset_override():
    model = meta_model("resnet18_gn_ws", ws_preset="official")
    presets = {m.ws_preset.name for m in model.modules() if isinstance(m, WSMixin)}
    assert presets == {"official"}
    assert {m.ws_preset.name for m in meta_model("resnet18_gn_ws").modules() if isinstance(m, WSMixin)} == {"paper"}
    with pytest.raises(ValueError, match="no WS convs"):
        create_model("resnet18_gn", ws_preset="official")
    with pytest.raises(ValueError, match="unknown WS preset"):
        create_model("resnet18_gn_ws", ws_preset="nope")


def test_in_chans_alias():
    assert meta_model("resnet18_bn", channels=1).conv1.weight.shape == (64, 1, 7, 7)
    assert meta_model("cifar_resnet20_bn", in_chans=1).conv1.weight.shape == (16, 1, 3, 3)
    with pytest.raises(ValueError, match="disagree"):
        create_model("resnet18_bn", in_chans=1, channels=3)


# --- injected layers and init ------------------------------------------------------------------------------------
class CountingConv(nn.Conv2d):
    pass


def test_blocks_never_hard_code_conv2d():
    with torch.device("meta"):
        model = ResNet(
            Bottleneck,
            (1, 1, 1, 1),
            groups=32,
            width_per_group=4,
            conv_layer=CountingConv,
            norm_layer=make_norm_layer("gn"),
        )
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 4 * 3 + 4 and all(type(m) is CountingConv for m in convs)


def test_init_like_torchvision():
    torch.manual_seed(0)
    model = create_model("resnet18_gn_ws")
    w = model.layer4[0].conv2.weight  # fan_out = 512 * 9
    assert abs(w.std().item() - (2.0 / (512 * 9)) ** 0.5) < 0.02 * (2.0 / (512 * 9)) ** 0.5
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in gns)
    zeroed = create_model("resnet18_gn_ws", zero_init_residual=True)
    assert all(
        bool((blk.bn2.weight == 0).all()) and bool((blk.bn1.weight == 1).all())
        for stage in (zeroed.layer1, zeroed.layer4)
        for blk in stage
    )


def test_zero_init_residual_bottleneck_and_blocks_start_as_identity():
    torch.manual_seed(0)
    model = create_model("cifar_resnet20_gn_ws", zero_init_residual=True).eval()
    x = torch.relu(torch.randn(2, 16, 8, 8))  # block input is post-ReLU
    assert torch.equal(model.layer1[1](x), x)
    small = ResNet(Bottleneck, (1, 1, 2, 1), zero_init_residual=True)
    assert all(bool((b.bn3.weight == 0).all()) and bool((b.bn2.weight == 1).all()) for b in small.layer3)


# --- norms factory -----------------------------------------------------------------------------------------------
def test_make_norm_layer_kinds():
    bn = make_norm_layer("bn", eps=1e-3)(8)
    assert isinstance(bn, nn.BatchNorm2d) and (bn.num_features, bn.eps) == (8, 1e-3)
    gn = make_norm_layer("gn", num_groups=4)(8)
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (4, 8)
    assert all(isinstance(make_norm_layer(kind)(8), nn.Identity) for kind in ("none", "identity", "None"))
    assert make_norm_layer("gn", num_groups=small_image_groups)(16).num_groups == 8
    with pytest.raises(ValueError, match="unknown kind 'in'"):
        make_norm_layer("in")


def test_group_norm_indivisible_names_counts():
    with pytest.raises(ValueError, match=r"num_groups=32 does not divide num_channels=16"):
        make_norm_layer("gn")(16)


def test_make_conv_layer():
    assert make_conv_layer(False) is nn.Conv2d
    conv = make_conv_layer(True, preset="timm")(4, 8, 3, padding=1, bias=False)
    assert isinstance(conv, WSConv2d) and conv.ws_preset.name == "timm"
    with pytest.raises(ValueError, match="unknown WS preset"):
        make_conv_layer(True, preset="nope")


def test_small_image_groups_values_and_models():
    assert [small_image_groups(c) for c in (16, 32, 64, 128, 512)] == [8, 16, 32, 32, 32]
    model = meta_model("cifar_resnet20_gn")
    assert (model.bn1.num_groups, model.layer2[0].bn1.num_groups, model.layer3[0].downsample[1].num_groups) == (
        8,
        16,
        32,
    )
    assert meta_model("cifar_resnet18_gn_ws").layer1[0].bn1.num_groups == 32
    assert meta_model("cifar_resnet20_gn", num_groups=4).bn1.num_groups == 4


@given(st.integers(min_value=2, max_value=4096))
def test_small_image_groups_property(channels):
    g = small_image_groups(channels)
    assert channels % g == 0 and 1 <= g <= 32 and channels // g >= 2
    assert not any(channels % h == 0 and channels // h >= 2 for h in range(g + 1, 33))  # g is the largest such


# --- forward and features ----------------------------------------------------------------------------------------
def test_forward_shapes():
    torch.manual_seed(0)
    with torch.no_grad():
        assert create_model("resnet50_gn_ws").eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        assert create_model("cifar_resnet20_gn_ws", in_chans=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert create_model("cifar_resnet18_bn", num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_features_only_imagenet():
    model = create_model("resnet18_gn_ws", features_only=True, out_indices=(0, 1, 2, 3, 4))
    assert not hasattr(model, "fc")
    feats = model(torch.randn(1, 3, 64, 64))
    info = [(f.index, f.module, f.channels, f.reduction) for f in model.feature_info]
    assert info == [
        (0, "act1", 64, 2),
        (1, "layer1", 64, 4),
        (2, "layer2", 128, 8),
        (3, "layer3", 256, 16),
        (4, "layer4", 512, 32),
    ]
    assert [tuple(f.shape) for f in feats] == [(1, c, 64 // r, 64 // r) for _, _, c, r in info]
    m50 = meta_model("resnet50_gn_ws", features_only=True, out_indices=(1, 2, 3))
    assert [f.channels for f in m50.feature_info] == [256, 512, 1024] and not hasattr(m50, "layer4")
    with pytest.raises(ValueError, match="out_indices"):
        create_model("resnet18_bn", features_only=True, out_indices=(5,))


def test_features_only_small_and_matches_classifier_trunk():
    torch.manual_seed(0)
    full = create_model("cifar_resnet20_gn_ws", in_chans=1).eval()
    feat = create_model("cifar_resnet20_gn_ws", in_chans=1, features_only=True, out_indices=(0, 2, 3)).eval()
    feat.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        outs = feat(x)
        trunk = full.layer3(full.layer2(full.layer1(full.relu(full.bn1(full.conv1(x))))))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)]
    # the root's forward standardizes through the batched pass (on CPU the numba kernels when installed), the
    # layers called one by one through torch's layer_norm: equal to fp32 rounding
    torch.testing.assert_close(outs[-1], trunk, rtol=1e-4, atol=1e-4)
    assert [
        f.reduction
        for f in meta_model("cifar_resnet18_bn", features_only=True, out_indices=(0, 1, 2, 3, 4)).feature_info
    ] == [1, 1, 2, 4, 8]


# --- BCN variants (the BCN layer is written in parallel) ---------------------------------------------------------
def test_bcn_models_build_and_run():
    from torchws.layers.bcn import BatchChannelNorm2d

    model = create_model("cifar_resnet20_bcn_ws")
    norms = [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    assert len(norms) == 1 + 18 + 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # BCN = BatchNorm affine (2C) + per-group affine (2G): 7 norms each at 16 (8 groups), 32 (16), 64 channels (32)
    assert n_params(model) == 272_474 + 2 * 7 * (8 + 16 + 32)
    zeroed = create_model("cifar_resnet20_bcn_ws", zero_init_residual=True)
    assert all(bool((blk.bn2.weight == 0).all()) for blk in zeroed.layer2)
    big = meta_model("resnet50_bcn_ws")
    assert sum(isinstance(m, BatchChannelNorm2d) for m in big.modules()) == 53
    assert all(isinstance(m, WSConv2d) for m in big.modules() if isinstance(m, nn.Conv2d))
