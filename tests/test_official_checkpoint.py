"""Loading the authors' released ImageNet checkpoints (WS repo GN+WS, BCN repo BCN+WS).

The released files cannot be downloaded in tests, so the authors' models are written out here as their repos write
them (`models/layers.py`, `models/imagenet/resnet.py` and `resnext.py` of joe-siyuan-qiao/pytorch-classification;
`imagenet/models/layers.py` and `imagenet/models/imagenet/*.py` of joe-siyuan-qiao/Batch-Channel-Normalization),
independently of torchws' modules, and saved the way their `imagenet.py` saves: DataParallel-wrapped, inside
`{'epoch', 'state_dict', 'acc', 'best_acc', 'optimizer'}`. Loading such a file into the matching `create_model`
name must reproduce the authors' outputs.
"""

from __future__ import annotations

import math
import warnings

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

# ---------------------------------------------------------------------------------------------------------------
# The authors' modules, as their repositories write them


class WSRepoConv2d(nn.Conv2d):
    """WS repo conv: unbiased std, 1e-5 added to the std."""

    def forward(self, x):
        weight = self.weight
        weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        weight = weight - weight_mean
        std = weight.view(weight.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        weight = weight / std.expand_as(weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BCNRepoConv2d(nn.Conv2d):
    """BCN repo ImageNet conv: unbiased variance, 1e-5 inside the root."""

    def forward(self, x):
        weight = self.weight
        weight_mean = weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        weight = weight - weight_mean
        std = torch.pow(weight.view(weight.size(0), -1).var(dim=1) + 1e-5, 0.5).view(-1, 1, 1, 1)
        weight = weight / std.expand_as(weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BCNRepoGN(nn.Module):
    """BCN repo norm (their `GN`): BatchNorm2d `pbn`, group standardization, per-group affine (1, G, 1)."""

    def __init__(self, num_channels, num_groups):
        super().__init__()
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1))
        self.pbn = nn.BatchNorm2d(num_channels)

    def forward(self, inp):
        out = self.pbn(inp)
        out = out.view(1, inp.size(0) * self.num_groups, -1)
        out = torch.batch_norm(out, None, None, None, None, True, 0, 1e-5, True)
        out = out.view(inp.size(0), self.num_groups, -1)
        out = self.weight * out + self.bias
        return out.view_as(inp)


class EstBN(nn.Module):
    """The BCN repo README's estimated BatchNorm: always normalizes with running estimates, moved at rate ms."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.register_buffer("estbn_moving_speed", torch.zeros(1))

    def forward(self, inp):
        ms = self.estbn_moving_speed.item()
        if self.training:
            with torch.no_grad():
                inp_t = inp.transpose(0, 1).contiguous().view(self.num_features, -1)
                running_mean = inp_t.mean(dim=1)
                inp_t = inp_t - self.running_mean.view(-1, 1)
                running_var = torch.mean(inp_t * inp_t, dim=1)
                self.running_mean.data.mul_(1 - ms).add_(ms * running_mean.data)
                self.running_var.data.mul_(1 - ms).add_(ms * running_var.data)
        out = inp - self.running_mean.view(1, -1, 1, 1)
        out = out / torch.sqrt(self.running_var + 1e-5).view(1, -1, 1, 1)
        return self.weight.view(1, -1, 1, 1) * out + self.bias.view(1, -1, 1, 1)


class BCNorm(nn.Module):
    """The BCN repo README's BCNorm (estimated mode): the batch part is `bn`, here an EstBN."""

    def __init__(self, num_channels, num_groups, eps):
        super().__init__()
        self.num_channels, self.num_groups, self.eps = num_channels, num_groups, eps
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1))
        self.bn = EstBN(num_channels)

    def forward(self, inp):
        out = self.bn(inp)
        out = out.view(1, inp.size(0) * self.num_groups, -1)
        out = torch.batch_norm(out, None, None, None, None, True, 0, self.eps, True)
        out = out.view(inp.size(0), self.num_groups, -1)
        return (self.weight * out + self.bias).view_as(inp)


REPOS = {  # repo -> (conv, their `L.BatchNorm2d(num_features)`)
    "ws": (WSRepoConv2d, lambda c: nn.GroupNorm(num_channels=c, num_groups=32)),
    "bcn": (BCNRepoConv2d, lambda c: BCNRepoGN(num_channels=c, num_groups=32)),
    "bcn_estimated": (BCNRepoConv2d, lambda c: BCNorm(num_channels=c, num_groups=32, eps=1e-5)),
}


class AuthorsBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, conv, norm, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64):
        super().__init__()
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class AuthorsBottleneck(nn.Module):
    """ResNet (stride on the 3x3 conv) and ResNeXt type C: width D * C with D = floor(planes * base_width / 64)."""

    expansion = 4

    def __init__(self, conv, norm, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64))) * cardinality
        self.conv1 = conv(inplanes, width, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = norm(width)
        self.conv2 = conv(width, width, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = norm(width)
        self.conv3 = conv(width, planes * 4, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class AuthorsResNet(nn.Module):
    """Their ImageNet ResNet / ResNeXt (module names as in their files; the pooling layers hold no parameters)."""

    def __init__(self, repo, block, layers, cardinality=1, base_width=64, num_classes=1000):
        super().__init__()
        self.conv, self.norm = REPOS[repo]
        self.cardinality, self.base_width, self.inplanes = cardinality, base_width, 64
        self.conv1 = self.conv(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self.norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                self.conv(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                self.norm(planes * block.expansion),
            )
        extra = dict(cardinality=self.cardinality, base_width=self.base_width)
        layers = [block(self.conv, self.norm, self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = planes * block.expansion
        layers += [block(self.conv, self.norm, self.inplanes, planes, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).view(x.size(0), -1))


ARCHS = {  # model name stem -> (block, layers, cardinality, base width)
    "resnet18": (AuthorsBasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet50": (AuthorsBottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (AuthorsBottleneck, (3, 4, 23, 3), 1, 64),
    "resnext50_32x4d": (AuthorsBottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x4d": (AuthorsBottleneck, (3, 4, 23, 3), 32, 4),
}
PRESET = {"ws": "official", "bcn": "bcn"}
SUFFIX = {"ws": "gn_ws", "bcn": "bcn_ws"}


def authors_model(repo: str, arch: str, seed: int = 0) -> AuthorsResNet:
    """The authors' model with every parameter and buffer random (so a swapped weight/bias or stat shows)."""
    torch.manual_seed(seed)
    block, layers, cardinality, base_width = ARCHS[arch]
    model = AuthorsResNet(repo, block, layers, cardinality, base_width)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(1234)
            elif name.endswith("estbn_moving_speed"):
                t.fill_(0.05)
            elif name.endswith("running_var") or name.endswith("weight") and t.dim() != 4:
                t.uniform_(0.5, 1.5)
            elif t.dim() == 4:
                t.normal_(0.0, math.sqrt(2.0 / t[0].numel())).add_(0.01)
            else:
                t.normal_(0.0, 0.2)
    return model


def save_like_imagenet_py(model: nn.Module, path, *, step: bool = False) -> None:
    """What both repos' `imagenet.py` saves, with the model wrapped in DataParallel (the `module.` prefix)."""
    parallel = nn.DataParallel(model)  # on a machine without GPUs: only the wrapper
    optimizer = torch.optim.SGD(parallel.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if step:  # momentum buffers in the optimizer state, as in a file saved during training
        for p in parallel.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    torch.save(
        {
            "epoch": 90,
            "state_dict": parallel.state_dict(),
            "acc": torch.tensor(76.1),
            "best_acc": torch.tensor(76.3),
            "optimizer": optimizer.state_dict(),
        },
        path,
    )


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    model = authors_model("ws", "resnet18").eval()
    path = tmp_path_factory.mktemp("ckpt") / "R-18-GN-WS.pth.tar"
    save_like_imagenet_py(model, path, step=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    return model, path, x, y


def test_official_checkpoint_names():
    assert official_checkpoint_name("resnet50_gn_ws") == "R-50-GN-WS.pth.tar"
    assert official_checkpoint_name("resnet101_gn_ws") == "R-101-GN-WS.pth.tar"
    assert official_checkpoint_name("resnext50_32x4d_gn_ws") == "X-50-GN-WS.pth.tar"
    assert official_checkpoint_name("resnext101_32x4d_gn_ws") == "X-101-GN-WS.pth.tar"
    assert official_checkpoint_name("resnet50_bcn_ws") == "rn50_bcn_ws.pth"
    assert official_checkpoint_name("resnet101_bcn_ws") == "rn101_bcn_ws.pth"
    assert official_checkpoint_name("resnext50_32x4d_bcn_ws") == "rx50_bcn_ws.pth"
    with pytest.raises(ValueError, match="resnet18_gn_ws has no official checkpoint; .*resnet50_bcn_ws"):
        official_checkpoint_name("resnet18_gn_ws")


def _load_quietly(model: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching preset: no warning
        result = load_official_checkpoint(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []


@pytest.mark.parametrize("repo", ["ws", "bcn"])
@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_released_layout_loads_and_reproduces_the_authors_outputs(tmp_path, repo, arch):
    authors = authors_model(repo, arch).double().eval()
    path = tmp_path / official_checkpoint_name(f"{arch}_{SUFFIX[repo]}")
    save_like_imagenet_py(authors, path)
    ours = create_model(f"{arch}_{SUFFIX[repo]}", ws_preset=PRESET[repo]).double().eval()
    _load_quietly(ours, path)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), authors(x), rtol=1e-10, atol=1e-10)
    if repo == "bcn":  # training mode: batch statistics and the same running-stat updates
        with torch.no_grad():
            torch.testing.assert_close(ours.train()(x), authors.train()(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.layer2[0].bn2.bn.running_var, authors.layer2[0].bn2.pbn.running_var)
        assert int(ours.layer2[0].bn2.bn.num_batches_tracked) == 1235


@pytest.mark.parametrize(("repo", "arch"), [("ws", "resnet101"), ("ws", "resnext101_32x4d"), ("bcn", "resnet101")])
def test_deeper_released_layouts_load_strictly(tmp_path, repo, arch):
    authors = authors_model(repo, arch)
    path = tmp_path / official_checkpoint_name(f"{arch}_{SUFFIX[repo]}")
    torch.save({"state_dict": nn.DataParallel(authors).state_dict()}, path)
    ours = create_model(f"{arch}_{SUFFIX[repo]}", ws_preset=PRESET[repo])
    _load_quietly(ours, path)
    theirs = authors.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key.replace(".bn.", ".pbn.") if repo == "bcn" else key]), key


def test_estimated_mode_norms_load_and_keep_their_rate(tmp_path):
    authors = authors_model("bcn_estimated", "resnet18").double()
    path = tmp_path / "r18_bcn_estimated.pth"
    save_like_imagenet_py(authors, path)
    ours = create_model("resnet18_bcn_ws", ws_preset="bcn").double()
    _load_quietly(ours, path)
    assert ours.layer1[0].bn1.estimate and ours.layer1[0].bn1.estimate_rate == pytest.approx(0.05)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), authors.eval()(x), rtol=1e-10, atol=1e-10)
        for _ in range(2):  # training forwards move the estimates, then normalize with them
            torch.testing.assert_close(ours.train()(x), authors.train()(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.layer3[1].bn2.bn.running_mean, authors.layer3[1].bn2.bn.running_mean)
    torch.testing.assert_close(ours.layer3[1].bn2.bn.running_var, authors.layer3[1].bn2.bn.running_var)


def test_bcn_repo_file_into_a_gn_model_names_the_pbn_keys(tmp_path):
    path = tmp_path / "rn50_bcn_ws.pth"
    torch.save({"state_dict": nn.DataParallel(authors_model("bcn", "resnet50")).state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: bn1\.pbn\.weight"):
        load_official_checkpoint(create_model("resnet50_gn_ws", ws_preset="official"), path)
    with pytest.warns(UserWarning, match=r"preset paper .*'bcn' \(unbiased variance, 1e-5 inside the root\)"):
        load_official_checkpoint(create_model("resnet50_bcn_ws"), path)


def test_bare_state_dict_and_legacy_pickle(tmp_path, r18):
    source, _, x, y = r18
    bare = tmp_path / "bare.pth"
    torch.save(source.state_dict(), bare)  # the dict itself, no `module.` prefix
    legacy = tmp_path / "legacy.pth.tar"  # the pre-1.6 pickle format the 2019 files were written in
    torch.save(
        {"epoch": 90, "state_dict": nn.DataParallel(source).state_dict()}, legacy, _use_new_zipfile_serialization=False
    )
    for path in (bare, legacy):
        target = create_model("resnet18_gn_ws", ws_preset="official").eval()
        _load_quietly(target, path)
        with torch.no_grad():
            torch.testing.assert_close(target(x), y, rtol=1e-5, atol=1e-5)


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
    small = ResNet(BasicBlock, (1, 1, 1, 1), norm_layer=lambda c: nn.GroupNorm(32, c))  # plain convs
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
