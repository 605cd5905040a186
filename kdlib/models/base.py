"""The shape every zoo model shares: ``stem -> stages -> head``.

Distillers, Grad-CAM and LAKD's local modules all need to find a model's features by name.
Instead of tuple-returning blocks (RepDistiller, mdistiller), every feature is the output of a
named module, so a forward hook sees exactly the tensor the next layer consumes.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Global average pooling, flatten, linear classifier."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class StagedNet(nn.Module):
    """A classifier made of a stem, a list of stages and a head.

    ``forward`` returns logits only. ``stages[i]`` is an ``nn.Sequential`` whose output is stage
    ``i``'s feature; its children are the blocks (one residual block each for ResNets), so
    ``stages.i.j`` names block ``j`` of stage ``i``. No module applies an in-place operation to
    another module's output.
    """

    def __init__(self, stem: nn.Module, stages: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    @property
    def stage_names(self) -> list[str]:
        """Module names whose outputs are the stage features, shallow to deep."""
        return [f"stages.{i}" for i in range(len(self.stages))]

    @property
    def block_names(self) -> list[str]:
        """Module names of every block output (every residual block for ResNets)."""
        return [f"stages.{i}.{j}" for i, stage in enumerate(self.stages) for j in range(len(stage))]

    @property
    def last_stage_name(self) -> str:
        """The default Grad-CAM++ target layer."""
        return self.stage_names[-1]


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """A bias-free conv ('same' padding) followed by BN: the unit every residual branch is made of."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


def channel_adapter(c_in: int, c_out: int) -> nn.Sequential:
    """1×1 conv (no bias: BN follows) + BN from ``c_in`` to ``c_out`` channels.

    The one channel adapter of the book: ResNet shortcuts (with a stride), AFT-KD's ``φ_l``,
    SAM-KD's ``g_l`` and LAKD's ``φ_k`` map a student feature to the teacher's channel count with it.
    """
    return conv_bn(c_in, c_out, 1)

