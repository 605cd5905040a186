"""CIFAR ResNets (He et al. 2016, section 4.2) exactly as RepDistiller builds them.

``resnet{8,14,20,32,44,56,110}`` have widths 16-16-32-64 (stem, then three stages of ``n`` basic
blocks, depth ``6n + 2``); ``resnet8x4`` and ``resnet32x4`` are four times wider: 32-64-128-256.
The projection shortcut is a 1×1 conv + BN wherever the shape changes (RepDistiller's option B).

Stage outputs for a 32×32 input: 16×32×32, 32×16×16, 64×8×8 (×4 models: 64×32×32, 128×16×16,
256×8×8). They are RepDistiller's ``f1, f2, f3`` (post-ReLU, ``preact=False``).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.models.base import ClassifierHead, StagedNet, conv_bn
from kdlib.models.registry import register_model


def repdistiller_init(model: nn.Module, linear: str = "default") -> None:
    """RepDistiller's initialisation: He-normal convs (fan-out), BN weight 1 and bias 0.

    The linear layer differs between RepDistiller's files, so the caller says which:
    ``"default"`` keeps PyTorch's (ResNets), ``"zero_bias"`` zeroes the bias (WRN),
    ``"small_normal"`` draws N(0, 0.01²) weights and zero bias (VGG, MobileNetV2).
    ``N(0, 2/(k²·C_out))`` in the WRN/VGG files is the same distribution as kaiming fan-out.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "small_normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
            if linear in ("small_normal", "zero_bias"):
                nn.init.zeros_(m.bias)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity when the shape is kept, else the 1×1 conv + BN projection."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return conv_bn(cin, cout, 1, stride)


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, plus the shortcut, then ReLU.

    ``act`` is a module, so a hook on the block (or on ``act``) sees the very tensor the next block
    reads; RepDistiller's functional ReLU and ``(out, preact)`` tuple are gone.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = shortcut(cin, cout, stride)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


def resnet_stages(widths: list[int], blocks_per_stage: int) -> list[nn.Sequential]:
    """Three stages of basic blocks; the first block of stages 2 and 3 halves the resolution."""
    stages, cin = [], widths[0]
    for i, cout in enumerate(widths[1:]):
        blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                  for j in range(blocks_per_stage)]
        stages.append(nn.Sequential(*blocks))
        cin = cout
    return stages


def cifar_resnet(depth: int, widths: list[int], num_classes: int) -> StagedNet:
    """RepDistiller's ``ResNet(depth, num_filters, 'basicblock')``: depth = 6n + 2."""
    if (depth - 2) % 6:
        raise KDLibError(f"basic-block CIFAR ResNet depth must be 6n+2, got {depth}")
    stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
    model = StagedNet(stem, resnet_stages(widths, (depth - 2) // 6), ClassifierHead(widths[-1], num_classes))
    repdistiller_init(model)
    return model


_NARROW = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(8, _NARROW, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(14, _NARROW, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(20, _NARROW, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(32, _NARROW, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(44, _NARROW, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(56, _NARROW, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(110, _NARROW, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(8, _WIDE, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> StagedNet:
    return cifar_resnet(32, _WIDE, num_classes)
