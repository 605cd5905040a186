"""ShuffleNet V1 (g = 3) and V2 (1×) for CIFAR, as RepDistiller's ``ShuffleV1`` and ``ShuffleV2``.

Both use RepDistiller's CIFAR stem, a 1×1 conv-BN-ReLU to 24 channels at full resolution (no
max-pool), then three stages whose first block halves the resolution. Channel shuffles are
:class:`torch.nn.ChannelShuffle`.

Stage outputs for a 32×32 input:

- ``ShuffleV1`` (widths 240-480-960, 4-8-4 blocks): 240×16×16, 480×8×8, 960×4×4, RepDistiller's
  ``f1, f2, f3``. Every block ends in a ReLU module.
- ``ShuffleV2`` (widths 116-232-464, a down-sampling block then 3-7-3 basic blocks): 116×16×16,
  232×8×8, 1024×4×4. The closing 1×1 conv-BN-ReLU to 1024 channels is the last child of the last
  stage: it is the network's last convolution, so the last stage's output is Grad-CAM's natural
  layer. ``stages.2.3``, the last basic block, is RepDistiller's ``f3`` (464×4×4). Each V2 block
  ends in the channel shuffle of two post-ReLU halves.

Initialisation: RepDistiller leaves both ShuffleNets at PyTorch's defaults (no custom init), and
so does kdlib, so that trained results compare.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib import KDLibError
from kdlib.models.base import ClassifierHead, StagedNet
from kdlib.models.registry import register_model


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


def _cifar_stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())


# --- ShuffleNet V1 -------------------------------------------------------------------------------

class ShuffleV1Block(nn.Module):
    """Grouped 1×1 - shuffle - depthwise 3×3 - grouped 1×1; add (stride 1) or concatenate a
    3×3 average-pooled shortcut (stride 2); then a ReLU module.

    The first grouped conv of the network is ungrouped (24 input channels do not split into
    meaningful groups), as in the paper and RepDistiller.
    """

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        g1 = 1 if cin == 24 else groups
        self.reduce = _conv_bn(cin, mid, 1, groups=g1)
        self.relu1 = nn.ReLU()
        self.shuffle = nn.ChannelShuffle(g1)
        self.depthwise = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.relu2 = nn.ReLU()
        self.expand = _conv_bn(mid, cout, 1, groups=groups)
        self.stride = stride
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle(self.relu1(self.reduce(x)))
        out = self.expand(self.relu2(self.depthwise(out)))
        res = self.shortcut(x)
        return self.act(torch.cat([out, res], 1) if self.stride == 2 else out + res)


def shufflenet_v1(num_classes: int, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3) -> StagedNet:
    stages, cin = [], 24
    for cout, n in zip(widths, blocks, strict=True):
        # The stride-2 block concatenates its pooled input, so its branch makes only cout - cin.
        layer = [ShuffleV1Block(cin, cout - cin, 2, groups)]
        layer += [ShuffleV1Block(cout, cout, 1, groups) for _ in range(n - 1)]
        stages.append(nn.Sequential(*layer))
        cin = cout
    return StagedNet(_cifar_stem(), stages, ClassifierHead(cin, num_classes))


# --- ShuffleNet V2 -------------------------------------------------------------------------------

class ShuffleV2Block(nn.Module):
    """Split the channels in half; the second half goes 1×1-BN-ReLU, depthwise 3×3-BN,
    1×1-BN-ReLU; concatenate with the untouched first half; shuffle (2 groups)."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.split = half
        self.conv1 = _conv_bn(half, half, 1)
        self.relu1 = nn.ReLU()
        self.depthwise = _conv_bn(half, half, 3, groups=half)
        self.conv3 = _conv_bn(half, half, 1)
        self.relu3 = nn.ReLU()
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = self.relu3(self.conv3(self.depthwise(self.relu1(self.conv1(x2)))))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches, each half of the output: depthwise 3×3-BN then 1×1-BN-ReLU (left),
    1×1-BN-ReLU, depthwise 3×3-BN, 1×1-BN-ReLU (right); concatenate; shuffle."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.left_dw = _conv_bn(cin, cin, 3, 2, groups=cin)
        self.left_pw = _conv_bn(cin, mid, 1)
        self.left_relu = nn.ReLU()
        self.right_pw1 = _conv_bn(cin, mid, 1)
        self.right_relu1 = nn.ReLU()
        self.right_dw = _conv_bn(mid, mid, 3, 2, groups=mid)
        self.right_pw2 = _conv_bn(mid, mid, 1)
        self.right_relu2 = nn.ReLU()
        self.shuffle = nn.ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.left_relu(self.left_pw(self.left_dw(x)))
        right = self.right_relu2(self.right_pw2(self.right_dw(self.right_relu1(self.right_pw1(x)))))
        return self.shuffle(torch.cat([left, right], 1))


#: RepDistiller's ShuffleNetV2 configurations: (stage widths, closing conv width), blocks per stage
_V2_SIZES = {
    0.5: ((48, 96, 192), 1024, (3, 7, 3)),
    1.0: ((116, 232, 464), 1024, (3, 7, 3)),
    1.5: ((176, 352, 704), 1024, (3, 7, 3)),
    2.0: ((224, 488, 976), 2048, (3, 7, 3)),
}


def shufflenet_v2(num_classes: int, net_size: float = 1.0) -> StagedNet:
    if net_size not in _V2_SIZES:
        raise KDLibError(f"ShuffleV2 net_size must be one of {sorted(_V2_SIZES)}, got {net_size}")
    widths, last, blocks = _V2_SIZES[net_size]
    stages, cin = [], 24
    for cout, n in zip(widths, blocks, strict=True):
        stages.append(nn.Sequential(ShuffleV2DownBlock(cin, cout), *[ShuffleV2Block(cout) for _ in range(n)]))
        cin = cout
    stages[-1].append(nn.Sequential(*_conv_bn(cin, last, 1), nn.ReLU()))
    return StagedNet(_cifar_stem(), stages, ClassifierHead(last, num_classes))


@register_model("ShuffleV1")
def shuffle_v1(num_classes: int = 100) -> StagedNet:
    return shufflenet_v1(num_classes)


@register_model("ShuffleV2")
def shuffle_v2(num_classes: int = 100, net_size: float = 1.0) -> StagedNet:
    return shufflenet_v2(num_classes, net_size)
