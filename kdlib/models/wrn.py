"""Wide ResNets (Zagoruyko & Komodakis 2016) as RepDistiller builds them: ``wrn_{depth}_{k}``.

Pre-activation blocks (BN-ReLU-conv twice), depth ``6n + 4``, widths 16-16k-32k-64k. A WRN block's
output is the residual *sum*, not a ReLU output: the activation belongs to the next block (or to the
network's final BN-ReLU). The stage outputs are those sums, exactly RepDistiller's ``f1, f2, f3``
and the group outputs the attention-transfer paper distils; they are signed tensors.

The final BN-ReLU has no convolution after the last stage, so it sits in the head
(:class:`PreActivationHead`); the last stage's output is then the last convolutional feature map,
Grad-CAM's layer, and the same tensor RepDistiller's AT/FitNets tap.

Stage outputs for a 32×32 input: ``wrn_x_2``: 32×32×32, 64×16×16, 128×8×8; ``wrn_x_1``: 16×32×32,
32×16×16, 64×8×8.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.models.base import ClassifierHead, StagedNet
from kdlib.models.registry import register_model
from kdlib.models.resnet import repdistiller_init


class PreActBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3, plus the shortcut.

    When the width changes, the 1×1 projection reads the *activated* input, as in RepDistiller
    and the original WRN code; otherwise the shortcut is the raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(act)))))
        residual = x if self.shortcut is None else self.shortcut(act)
        return residual + out


class PreActivationHead(ClassifierHead):
    """The pre-activation network's closing BN-ReLU, then pooling, flatten, linear."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bn = nn.BatchNorm2d(in_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act(self.bn(x)))


def wide_resnet(depth: int, widen: int, num_classes: int, drop_rate: float = 0.0) -> StagedNet:
    """RepDistiller's ``WideResNet(depth, num_classes, widen_factor, dropRate)``."""
    if (depth - 4) % 6:
        raise KDLibError(f"WRN depth must be 6n+4, got {depth}")
    if not 0.0 <= drop_rate < 1.0:
        raise KDLibError(f"drop_rate must be in [0, 1), got {drop_rate}")
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    stages, cin = [], widths[0]
    for i, cout in enumerate(widths[1:]):
        first = PreActBlock(cin, cout, 1 if i == 0 else 2, drop_rate)
        stages.append(nn.Sequential(first, *[PreActBlock(cout, cout, 1, drop_rate) for _ in range(n - 1)]))
        cin = cout
    stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    model = StagedNet(stem, stages, PreActivationHead(widths[-1], num_classes))
    repdistiller_init(model, linear="zero_bias")
    return model


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> StagedNet:
    return wide_resnet(16, 1, num_classes, drop_rate)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> StagedNet:
    return wide_resnet(16, 2, num_classes, drop_rate)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> StagedNet:
    return wide_resnet(40, 1, num_classes, drop_rate)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> StagedNet:
    return wide_resnet(40, 2, num_classes, drop_rate)
