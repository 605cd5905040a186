"""MobileNetV2 for CIFAR as RepDistiller's ``mobile_half`` (expansion 6, width 0.5).

Layout (RepDistiller's, from "Knowledge Distillation via Route Constrained Optimization"): a
stride-2 3×3 conv-BN-ReLU stem (so a 32×32 input is 16×16 after it), seven groups of inverted
residuals (t, c, n, s) = (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
(6,320,1,1) with c scaled by the width, then a 1×1 conv-BN-ReLU to 1280 channels. Unlike
torchvision, the t = 1 block keeps its 1×1 expansion conv, as RepDistiller does.

Stages are RepDistiller's feature points (groups 0-1, 2, 3-4, 5-6), except that the closing 1×1
conv to 1280 channels is the last child of the last stage: it is the network's last convolution,
so the last stage's output is Grad-CAM's natural layer. For a 32×32 input at width 0.5:

    stage 0: 12×16×16  (RepDistiller f1)
    stage 1: 16×8×8    (f2)
    stage 2: 48×4×4    (f3)
    stage 3: 1280×2×2  (after the closing conv; ``stages.3.3``, the last inverted residual,
                        is RepDistiller's f4, 160×2×2)

Inverted residuals end in a *linear* bottleneck (BN, no ReLU; the paper's point), so their block
outputs are signed; the closing conv unit ends in a ReLU module.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.models.base import ClassifierHead, StagedNet
from kdlib.models.registry import register_model
from kdlib.models.resnet import repdistiller_init

#: (expansion t, channels c, repeats n, first stride s) of the seven groups
_SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]
#: which groups make each stage: RepDistiller's feature points f1..f4
_STAGE_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]


class ConvBNReLU(nn.Sequential):
    """conv (bias-free) - BN - ReLU; the output is the ReLU module's."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )


class InvertedResidual(nn.Module):
    """1×1 expand - 3×3 depthwise (carries the stride) - 1×1 linear projection; identity shortcut
    when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBNReLU(cin, hidden, 1)
        self.depthwise = ConvBNReLU(hidden, hidden, 3, stride, groups=hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


def mobilenet_v2(num_classes: int, width_mult: float = 0.5, expand: int = 6) -> StagedNet:
    """RepDistiller's ``mobilenetv2_T_w(T=expand, W=width_mult)``."""
    if width_mult <= 0 or expand < 1:
        raise KDLibError(f"MobileNetV2 needs width_mult > 0 and expand >= 1, got {width_mult}, {expand}")
    cin = int(32 * width_mult)
    stem = ConvBNReLU(3, cin, 3, stride=2)
    groups = []
    for t, c, n, s in _SETTING:
        cout = int(c * width_mult)
        t = expand if t != 1 else 1
        blocks = []
        for stride in [s] + [1] * (n - 1):
            blocks.append(InvertedResidual(cin, cout, stride, t))
            cin = cout
        groups.append(blocks)
    last_channels = int(1280 * width_mult) if width_mult > 1.0 else 1280
    stages = [nn.Sequential(*[b for g in ids for b in groups[g]]) for ids in _STAGE_GROUPS]
    stages[-1].append(ConvBNReLU(cin, last_channels, 1))
    model = StagedNet(stem, stages, ClassifierHead(last_channels, num_classes))
    repdistiller_init(model, linear="small_normal")
    return model


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int = 100, width_mult: float = 0.5, expand: int = 6) -> StagedNet:
    return mobilenet_v2(num_classes, width_mult, expand)
