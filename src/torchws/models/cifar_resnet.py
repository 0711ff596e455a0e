"""Small-image ResNets for 28x28 / 32x32 inputs (CIFAR-10/100, Fashion-MNIST with in_chans=1).

- `cifar_resnet{8,20,32,56,110}_*`: He et al. 2016 (arXiv 1512.03385, sec. 4.2): 3x3 stem with 16 channels, three
  stages of n BasicBlocks (16/32/64 channels, stride 1/2/2; depth = 6n + 2), global average pool, Linear.
  Shortcuts are option B: a 1x1 conv + norm where the shape changes (identity elsewhere), so every conv can be
  a WS conv. ResNet-20 has 272,474 parameters with BN and 10 classes (option A's zero padding would give 269,722).
- `cifar_resnet18_*`: torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool (reductions 1/1/2/4/8).

GroupNorm / BCN group count in both families: `torchws.layers.norms.small_image_groups`, i.e. the largest divisor
of the channel count that is <= 32 and leaves >= 2 channels per group: 16 ch -> 8 groups, 32 -> 16, 64 and up
-> 32 (the ImageNet models' 32 groups on 64 channels also have 2 channels per group). `num_groups=` overrides it.
Module names follow torchvision (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0/.1, fc).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchws.layers.norms import GroupsArg, small_image_groups
from torchws.models._common import (
    NORM_SUFFIXES,
    FeatureInfo,
    check_out_indices,
    init_resnet_weights,
    resolve_in_chans,
    resolve_layers,
)
from torchws.models.registry import register_model
from torchws.models.resnet import BasicBlock, ResNet

__all__ = ["CifarResNet"]

ConvLayer = Callable[..., nn.Conv2d]
NormLayer = Callable[[int], nn.Module]


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet of depth 6 * blocks_per_stage + 2, option-B projection shortcuts.

    features_only / out_indices: as in `ResNet`, with 0 = stem output (reduction 1) and 1..3 = layer1..layer3
    (reductions 1, 2, 4).
    """

    widths = (16, 32, 64)

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        in_chans: int = 3,
        conv_layer: ConvLayer = nn.Conv2d,
        norm_layer: NormLayer = nn.BatchNorm2d,
        zero_init_residual: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] = (1, 2, 3),
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"CifarResNet: blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.features_only = features_only
        self.out_indices = check_out_indices(out_indices if features_only else (0, 1, 2, 3), 4, "CifarResNet")
        self.conv1 = conv_layer(in_chans, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        infos, inplanes, reduction = [FeatureInfo(0, "act1", 16, 1)], 16, 1
        for i, planes in enumerate(self.widths, start=1):
            if i > self.out_indices[-1]:  # features_only: later stages are not built
                break
            stride = 1 if i == 1 else 2
            reduction *= stride
            blocks = []
            for b in range(blocks_per_stage):
                s = stride if b == 0 else 1
                downsample = None
                if s != 1 or inplanes != planes:
                    downsample = nn.Sequential(
                        conv_layer(inplanes, planes, kernel_size=1, stride=s, bias=False), norm_layer(planes)
                    )
                blocks.append(BasicBlock(inplanes, planes, s, downsample, conv_layer=conv_layer, norm_layer=norm_layer))
                inplanes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            infos.append(FeatureInfo(i, f"layer{i}", planes, reduction))
        self.feature_info = [infos[i] for i in self.out_indices]
        self.num_features = self.widths[-1]
        if not features_only:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(self.num_features, num_classes)
        init_resnet_weights(self, zero_init_residual=zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at `self.out_indices`, each (N, C_i, H / reduction_i, W / reduction_i)."""
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x] if 0 in self.out_indices else []
        for i in range(1, self.out_indices[-1] + 1):
            x = getattr(self, f"layer{i}")(x)
            if i in self.out_indices:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(N, in_chans, H, W) -> logits (N, num_classes), or the feature list when `features_only`."""
        if self.features_only:
            return self.forward_features(x)
        x = self.layer3(self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cifar_params(n: int, num_classes: int = 10) -> int:
    """Parameter count of CifarResNet(n) with BN/GN at `num_classes` (used as registry metadata, tested)."""
    block = [2 * 9 * w * w + 4 * w for w in CifarResNet.widths]  # two 3x3 convs + two norms (weight, bias)
    first_extra = [9 * (w // 2) * w - 9 * w * w + (w // 2) * w + 2 * w for w in CifarResNet.widths[1:]]
    stem = 3 * 16 * 9 + 2 * 16
    return stem + n * sum(block) + sum(first_extra) + 64 * num_classes + num_classes


def _small_builder(name: str, depth: int | None, norm: str, ws: bool) -> Callable[..., nn.Module]:
    def build(
        *,
        num_classes: int = 10,
        in_chans: int | None = None,
        channels: int | None = None,
        ws_preset: object = None,
        num_groups: GroupsArg = small_image_groups,
        zero_init_residual: bool = False,
        features_only: bool = False,
        out_indices: Sequence[int] | None = None,
    ) -> nn.Module:
        conv_layer, norm_layer = resolve_layers(name, norm, ws, ws_preset=ws_preset, num_groups=num_groups)
        common = dict(
            num_classes=num_classes,
            in_chans=resolve_in_chans(name, in_chans, channels, default=3),
            conv_layer=conv_layer,
            norm_layer=norm_layer,
            zero_init_residual=zero_init_residual,
            features_only=features_only,
        )
        if depth is None:  # CIFAR-stem ResNet-18
            return ResNet(BasicBlock, (2, 2, 2, 2), stem="cifar", out_indices=out_indices or (1, 2, 3, 4), **common)
        return CifarResNet((depth - 2) // 6, out_indices=out_indices or (1, 2, 3), **common)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: small-image ResNet, {norm.upper()}{' + WS' if ws else ''} (see module docstring)."
    return build


def _register_small_models() -> None:
    archs: dict[str, tuple[int | None, int, str]] = {
        f"cifar_resnet{d}": (d, _cifar_params((d - 2) // 6), "cifar_resnet") for d in (8, 20, 32, 56, 110)
    }
    # torchvision ResNet-18 (11,689,512) minus the 7x7 -> 3x3 stem (-7,680) and a 10-way fc (-507,870)
    archs["cifar_resnet18"] = (None, 11_173_962, "cifar_resnet18")
    for arch, (depth, params, family) in archs.items():
        for suffix, (norm, ws) in NORM_SUFFIXES.items():
            name = f"{arch}_{suffix}"
            register_model(
                name,
                family=family,
                norm=norm,
                ws=ws,
                input_size=(3, 32, 32),
                num_classes=10,
                reference_params=None if norm.startswith("bcn") else params,
                description=f"small-image {arch}, {norm.upper()}{' + WS' if ws else ''}",
            )(_small_builder(name, depth, norm, ws))


_register_small_models()
