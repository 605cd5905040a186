"""ResNet50 with bottleneck blocks and a CIFAR stem, as RepDistiller's ``resnetv2.ResNet50``.

The stem is a single 3×3 conv-BN-ReLU at full resolution (no 7×7 conv, no max-pool), then four
stages of 3, 4, 6, 3 bottlenecks (widths 64, 128, 256, 512, expansion 4). Stage outputs for a
32×32 input, RepDistiller's ``f1..f4``: 256×32×32, 512×16×16, 1024×8×8, 2048×4×4.
About 23.7 M parameters at 100 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.models.base import ClassifierHead, StagedNet, conv_bn
from kdlib.models.registry import register_model
from kdlib.models.resnet import repdistiller_init, shortcut

EXPANSION = 4


class Bottleneck(nn.Module):
    """1×1 reduce - 3×3 (carries the stride) - 1×1 expand, each with BN; shortcut; ReLU module."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * EXPANSION
        self.reduce = conv_bn(cin, planes, 1)
        self.relu1 = nn.ReLU()
        self.spatial = conv_bn(planes, planes, 3, stride)
        self.relu2 = nn.ReLU()
        self.expand = conv_bn(planes, cout, 1)
        self.shortcut = shortcut(cin, cout, stride)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.spatial(self.relu1(self.reduce(x))))
        return self.act(self.expand(out) + self.shortcut(x))


def bottleneck_resnet(blocks: list[int], num_classes: int) -> StagedNet:
    stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    stages, cin = [], 64
    for i, (planes, n) in enumerate(zip([64, 128, 256, 512], blocks, strict=True)):
        first = Bottleneck(cin, planes, 1 if i == 0 else 2)
        cin = planes * EXPANSION
        stages.append(nn.Sequential(first, *[Bottleneck(cin, planes) for _ in range(n - 1)]))
    model = StagedNet(stem, stages, ClassifierHead(cin, num_classes))
    repdistiller_init(model)
    return model


@register_model("ResNet50")
def resnet50(num_classes: int = 100) -> StagedNet:
    return bottleneck_resnet([3, 4, 6, 3], num_classes)
