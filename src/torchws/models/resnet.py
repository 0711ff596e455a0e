"""ResNet / ResNeXt with injectable conv and norm layers, module names identical to torchvision's.

State-dict keys match torchvision and the authors' GN+WS and BCN+WS checkpoints (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.bn1`, `layer1.0.downsample.0` / `.1`, `fc`); norms are named bn* whatever kind they are. Blocks build
every conv through `conv_layer` and every norm through `norm_layer(num_channels)`: nothing hard-codes nn.Conv2d.
Bottleneck puts the stride on the 3x3 conv (torchvision's "v1.5", as in the authors' code).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchws.models._common import (
    NORM_SUFFIXES,
    FeatureInfo,
    check_out_indices,
    init_resnet_weights,
    resolve_in_chans,
    resolve_layers,
)
from torchws.models.registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]

ConvLayer = Callable[..., nn.Conv2d]
NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). `stride` on the first; `downsample` maps the input to the output shape."""

    expansion = 1
    last_norm_name = "bn2"

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        conv_layer: ConvLayer,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                f"BasicBlock supports groups=1, base_width=64 only; got groups={groups}, "
                f"base_width={base_width} (use Bottleneck for ResNeXt)"
            )
        self.conv1 = conv_layer(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, groups) -> 1x1 with expansion 4; width = planes * base_width / 64 * groups (ResNeXt)."""

    expansion = 4
    last_norm_name = "bn3"

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        *,
        conv_layer: ConvLayer,
        norm_layer: NormLayer,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv_layer(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv_layer(width, width, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = conv_layer(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet/ResNeXt.

    stem: "imagenet" (7x7 stride-2 conv + 3x3 max-pool, reduction 4) or "cifar" (3x3 stride-1 conv, no pool).
    in_chans: input channels (1 for grayscale). With `features_only`, forward returns the list of feature maps at
    `out_indices` (0 = stem output after ReLU, 1..4 = layer1..layer4), `fc`/`avgpool` are not built and neither are
    stages after the last requested one; `feature_info` lists (index, module, channels, reduction) of the outputs.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        conv_layer: ConvLayer = nn.Conv2d,
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
        stem: str = "imagenet",
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet: layers must give 4 stage depths, got {list(layers)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"ResNet: stem={stem!r}; expected 'imagenet' or 'cifar'")
        self.features_only = features_only
        self.out_indices = check_out_indices(out_indices if features_only else (0, 1, 2, 3, 4), 5, "ResNet")
        self.inplanes, self.groups, self.base_width = 64, groups, width_per_group
        self._conv_layer, self._norm_layer = conv_layer, norm_layer
        if stem == "imagenet":
            self.conv1 = conv_layer(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv_layer(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        stem_reduction = 2 if stem == "imagenet" else 1
        infos = [FeatureInfo(0, "act1", 64, stem_reduction)]
        reduction = stem_reduction * (2 if stem == "imagenet" else 1)  # after the max-pool
        last_stage = self.out_indices[-1]
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            if i > last_stage:  # features_only: stages past the last requested output are not built
                break
            stride = 1 if i == 1 else 2
            reduction *= stride
            setattr(self, f"layer{i}", self._make_layer(block, planes, depth, stride))
            infos.append(FeatureInfo(i, f"layer{i}", planes * block.expansion, reduction))
        self.feature_info = [infos[i] for i in self.out_indices]
        self.num_features = 512 * block.expansion
        if not features_only:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(self.num_features, num_classes)
        del self._conv_layer, self._norm_layer  # only needed while building (a lambda here would block pickling)
        init_resnet_weights(self, zero_init_residual=zero_init_residual)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        conv_layer, norm_layer = self._conv_layer, self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv_layer(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        kwargs = dict(groups=self.groups, base_width=self.base_width, conv_layer=conv_layer, norm_layer=norm_layer)
        stage = [block(self.inplanes, planes, stride, downsample, **kwargs)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, **kwargs) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at `self.out_indices`, each (N, C_i, H / reduction_i, W / reduction_i)."""
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x] if 0 in self.out_indices else []
        x = self.maxpool(x)
        for i in range(1, self.out_indices[-1] + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_indices:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(N, in_chans, H, W) -> logits (N, num_classes), or the feature list when `features_only`."""
        if self.features_only:
            return self.forward_features(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------------------------------------------------------
# Registered ImageNet builders: <arch>_<bn|gn|gn_ws|bcn_ws>

# Files the authors released, per model-name suffix: the WS repo (joe-siyuan-qiao/pytorch-classification) for GN+WS,
# the Batch-Channel-Normalization repo (imagenet/README.md) for BCN+WS.
_R50 = {"gn_ws": "R-50-GN-WS.pth.tar", "bcn_ws": "rn50_bcn_ws.pth"}
_R101 = {"gn_ws": "R-101-GN-WS.pth.tar", "bcn_ws": "rn101_bcn_ws.pth"}
_X50 = {"gn_ws": "X-50-GN-WS.pth.tar", "bcn_ws": "rx50_bcn_ws.pth"}
_X101 = {"gn_ws": "X-101-GN-WS.pth.tar"}

# arch -> (block, depths, groups, width_per_group, torchvision parameter count at 1000 classes, released files)
_IMAGENET_ARCHS: dict[str, tuple[type[nn.Module], tuple[int, ...], int, int, int, dict[str, str]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64, 11_689_512, {}),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64, 21_797_672, {}),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64, 25_557_032, _R50),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64, 44_549_160, _R101),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64, 60_192_808, {}),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4, 25_028_904, _X50),
    "resnext101_32x4d": (Bottleneck, (3, 4, 23, 3), 32, 4, 44_177_704, _X101),
}


def _imagenet_builder(name: str, arch: str, norm: str, ws: bool) -> Callable[..., ResNet]:
    block, depths, groups, width, _, _ = _IMAGENET_ARCHS[arch]

    def build(
        *,
        num_classes: int = 1000,
        in_chans: int | None = None,
        channels: int | None = None,
        ws_preset: object = None,
        num_groups: int = 32,
        zero_init_residual: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3, 4),
    ) -> ResNet:
        conv_layer, norm_layer = resolve_layers(name, norm, ws, ws_preset=ws_preset, num_groups=num_groups)
        return ResNet(
            block,
            depths,
            num_classes=num_classes,
            in_chans=resolve_in_chans(name, in_chans, channels, default=3),
            groups=groups,
            width_per_group=width,
            conv_layer=conv_layer,
            norm_layer=norm_layer,
            zero_init_residual=zero_init_residual,
            features_only=features_only,
            out_indices=out_indices,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{arch} with {norm.upper()}{' + WS' if ws else ''} norm layers (torchvision module names)."
    return build


def _register_imagenet_models() -> None:
    for arch, (_, _, _, _, params, released) in _IMAGENET_ARCHS.items():
        for suffix, (norm, ws) in NORM_SUFFIXES.items():
            name = f"{arch}_{suffix}"
            register_model(
                name,
                family="resnext" if arch.startswith("resnext") else "resnet",
                norm=norm,
                ws=ws,
                input_size=(3, 224, 224),
                num_classes=1000,
                reference_params=None if norm.startswith("bcn") else params,
                official_checkpoint=released.get(suffix),
                description=f"ImageNet {arch}, {norm.upper()}{' + WS' if ws else ''}",
            )(_imagenet_builder(name, arch, norm, ws))


_register_imagenet_models()
