"""CIFAR VGGs with BatchNorm, as RepDistiller's ``vgg{8,11,13,16,19}_bn``: no FC stack, one linear.

RepDistiller has five conv groups separated by 2×2 max-pools; on a 32×32 input its fourth pool is
skipped, so groups 4 and 5 both run at 4×4. kdlib makes that one stage, giving four stages:

    stage 0: conv units at 32×32          -> 64×32×32   (RepDistiller f0)
    stage 1: max-pool, conv units         -> 128×16×16  (f1)
    stage 2: max-pool, conv units         -> 256×8×8    (f2)
    stage 3: max-pool, groups 4 and 5     -> 512×4×4    (f4; f3 is the last unit of group 4)

Each conv-BN-ReLU unit is one block (:class:`ConvUnit`); the max-pools are children of the stage
but not blocks, so :attr:`VGG.block_names` skips them. The conv layers keep their bias, as in
RepDistiller (it matters for the parameter counts: vgg8 3.97 M, vgg13 9.46 M at 100 classes).
RepDistiller's conditional fourth pool (only for 64×64 inputs) is not reproduced: the zoo is for
CIFAR-sized inputs.
"""

from __future__ import annotations

from torch import nn

from kdlib.models.base import ClassifierHead, StagedNet
from kdlib.models.registry import register_model
from kdlib.models.resnet import repdistiller_init

#: conv widths of RepDistiller's five groups per configuration
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class ConvUnit(nn.Sequential):
    """conv3×3 (with bias) - BN - ReLU: one VGG block; its output is the ReLU module's."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class VGG(StagedNet):
    """A StagedNet whose block names skip the stages' leading max-pools."""

    @property
    def block_names(self) -> list[str]:
        return [f"stages.{i}.{j}" for i, stage in enumerate(self.stages)
                for j, block in enumerate(stage) if isinstance(block, ConvUnit)]


def _units(widths: list[int], cin: int) -> list[ConvUnit]:
    units = []
    for w in widths:
        units.append(ConvUnit(cin, w))
        cin = w
    return units


def vgg(config: str, num_classes: int) -> VGG:
    groups = _CONFIGS[config]
    stage_groups = [groups[0], groups[1], groups[2], groups[3] + groups[4]]
    stages, cin = [], 3
    for i, widths in enumerate(stage_groups):
        pool = [nn.MaxPool2d(2, 2)] if i > 0 else []
        stages.append(nn.Sequential(*pool, *_units(widths, cin)))
        cin = widths[-1]
    # The first stage is all blocks, so the stem is empty: every conv is a hookable block.
    model = VGG(nn.Identity(), stages, ClassifierHead(cin, num_classes))
    repdistiller_init(model, linear="small_normal")
    return model


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    return vgg("vgg8", num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    return vgg("vgg11", num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    return vgg("vgg13", num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    return vgg("vgg16", num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    return vgg("vgg19", num_classes)
