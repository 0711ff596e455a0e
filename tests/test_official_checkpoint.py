"""Loading the authors' GN+WS checkpoints: files written here in their exact format (the real ones are not
downloadable in tests), round trip, the authors' WS numerics, and the errors for wrong files."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchws.models import (
    BasicBlock,
    CheckpointFormatError,
    CheckpointMismatchError,
    ResNet,
    create_model,
    load_official_checkpoint,
    official_checkpoint_name,
    read_official_state_dict,
)


def authors_format(model: nn.Module, arch: str) -> dict:
    """What the authors' training script saves: DataParallel-prefixed keys inside a bigger dict."""
    state = OrderedDict(("module." + k, v.clone()) for k, v in model.state_dict().items())
    return {"epoch": 90, "arch": arch, "state_dict": state, "best_prec1": 76.28,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]}}


def randomize_norms(model: nn.Module) -> None:
    """GN weights 1 / bias 0 after init would hide a swapped weight and bias; make them distinct."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resnet18_gn_ws", ws_preset="official").eval()
    randomize_norms(model)
    path = tmp_path_factory.mktemp("ckpt") / "R-18-GN-WS.pth.tar"
    torch.save(authors_format(model, "resnet18"), path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    return model, path, x, y


class AuthorsConv2d(nn.Conv2d):
    """The authors' WS conv, written as in their repository: unbiased std with 1e-5 added outside the root."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        std = w.view(w.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, w / std, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_official_checkpoint_names():
    assert official_checkpoint_name("resnet50_gn_ws") == "R-50-GN-WS.pth.tar"
    assert official_checkpoint_name("resnet101_gn_ws") == "R-101-GN-WS.pth.tar"
    assert official_checkpoint_name("resnext50_32x4d_gn_ws") == "X-50-GN-WS.pth.tar"
    assert official_checkpoint_name("resnext101_32x4d_gn_ws") == "X-101-GN-WS.pth.tar"
    with pytest.raises(ValueError, match="resnet18_gn_ws has no official checkpoint; .*resnet50_gn_ws"):
        official_checkpoint_name("resnet18_gn_ws")


def test_round_trip_identical_outputs(r18):
    _, path, x, y = r18
    target = create_model("resnet18_gn_ws", ws_preset="official").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching preset: no warning
        result = load_official_checkpoint(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(target(x), y)


def test_official_preset_matches_authors_numerics(r18):
    _, path, x, y = r18
    authors = ResNet(BasicBlock, (2, 2, 2, 2), conv_layer=AuthorsConv2d,
                     norm_layer=lambda c: nn.GroupNorm(32, c)).eval()
    authors.load_state_dict(read_official_state_dict(path))
    with torch.no_grad():
        torch.testing.assert_close(authors(x), y, rtol=1e-4, atol=1e-5)


def test_plain_state_dict_and_unprefixed_keys(tmp_path):
    torch.manual_seed(1)
    model = create_model("cifar_resnet20_gn_ws", ws_preset="official")
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)  # the dict itself, no `module.` prefix
    legacy = tmp_path / "legacy.pth.tar"  # the pre-1.6 pickle format the 2019 files were written in
    torch.save(authors_format(model, "resnet20"), legacy, _use_new_zipfile_serialization=False)
    for path in (bare, legacy):
        target = create_model("cifar_resnet20_gn_ws", ws_preset="official")
        load_official_checkpoint(target, path)
        assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))


def test_wrong_architecture_lists_keys(r18):
    _, path, _, _ = r18
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: layer1\.2\.conv1\.weight.*\(\+\d+ more\)"):
        load_official_checkpoint(create_model("resnet34_gn_ws"), path)
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as info:
        load_official_checkpoint(create_model("cifar_resnet18_gn_ws", num_classes=1000), path)
    msg = str(info.value)
    assert "R-18-GN-WS.pth.tar" in msg and "\n" not in msg
    assert "1 shape mismatches: conv1.weight (64, 3, 7, 7) vs model (64, 3, 3, 3)" in msg
    assert isinstance(info.value, ValueError)


def test_unexpected_keys_and_non_strict(r18):
    source, path, _, _ = r18
    small = ResNet(BasicBlock, (1, 1, 1, 1), norm_layer=lambda c: nn.GroupNorm(32, c))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: layer1\.1\.conv1\.weight"):
        load_official_checkpoint(small, path)
    with pytest.warns(UserWarning, match="no WS layers"):
        result = load_official_checkpoint(small, path, strict=False)
    assert result.missing_keys == [] and "layer4.1.bn2.bias" in result.unexpected_keys
    assert torch.equal(small.layer4[0].conv2.weight, source.layer4[0].conv2.weight)


def test_preset_mismatch_warns(r18):
    _, path, _, _ = r18
    with pytest.warns(UserWarning, match=r"preset paper .*ws_preset='official'"):
        load_official_checkpoint(create_model("resnet18_gn_ws"), path)


def test_features_only_backbone_ignores_head(r18):
    source, path, _, _ = r18
    backbone = create_model("resnet18_gn_ws", ws_preset="official", features_only=True, out_indices=(1, 2, 3))
    load_official_checkpoint(backbone, path)
    assert torch.equal(backbone.layer3[1].bn2.bias, source.layer3[1].bn2.bias)


def test_unreadable_files(tmp_path, r18):
    _, path, _, _ = r18
    data = path.read_bytes()
    truncated = tmp_path / "R-50-GN-WS.pth.tar"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match=r"R-50-GN-WS\.pth\.tar: unreadable torch checkpoint") as info:
        load_official_checkpoint(create_model("resnet18_gn_ws"), truncated)
    assert "\n" not in str(info.value)
    legacy = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": {"module.w": torch.zeros(1000)}}, legacy, _use_new_zipfile_serialization=False)
    (tmp_path / "cut.pth.tar").write_bytes(legacy.read_bytes()[:300])
    with pytest.raises(CheckpointFormatError, match="cut.pth.tar"):
        read_official_state_dict(tmp_path / "cut.pth.tar")
    (tmp_path / "text.pth.tar").write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="text.pth.tar"):
        read_official_state_dict(tmp_path / "text.pth.tar")
    torch.save({"epoch": 3, "arch": "resnet50"}, tmp_path / "nostate.pth.tar")
    with pytest.raises(CheckpointFormatError, match="no state dict of tensors.*epoch, arch"):
        read_official_state_dict(tmp_path / "nostate.pth.tar")
    with pytest.raises(FileNotFoundError, match="missing.pth.tar"):
        read_official_state_dict(tmp_path / "missing.pth.tar")
