"""Shared plumbing for distillers that compare intermediate features of student and teacher."""

from __future__ import annotations

import torch
from torch import nn

from kdlib.distill.base import Distiller, IncompatibleModelsError, feature_shapes
from kdlib.features import FeatureTap, block_names, stage_names

TAPS = ("stages", "blocks")


def tap_names(model: nn.Module, taps: str) -> list[str]:
    """Stage outputs (``"stages"``) or every block output (``"blocks"``)."""
    if taps == "stages":
        return stage_names(model)
    if taps == "blocks":
        return block_names(model)
    raise IncompatibleModelsError(f"unknown taps {taps!r}; choose one of {TAPS}")


def paired_stage_names(student: nn.Module, teacher: nn.Module) -> tuple[list[str], list[str]]:
    """Pair stage outputs from the deepest one backwards, as many as the shallower model has."""
    s, t = stage_names(student), stage_names(teacher)
    k = min(len(s), len(t))
    return s[-k:], t[-k:]


class FeatureDistiller(Distiller):
    """A distiller with forward-hook taps on named student and teacher modules."""

    def _setup_taps(self, s_names: list[str], t_names: list[str], image_size: int = 32) -> None:
        self.s_names, self.t_names = list(s_names), list(t_names)
        self.s_shapes = feature_shapes(self.student, self.s_names, image_size)
        self.t_shapes = feature_shapes(self.teacher, self.t_names, image_size)
        self.s_tap = FeatureTap(self.student, self.s_names)
        self.t_tap = FeatureTap(self.teacher, self.t_names)

    def forward_both(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Student forward (with grad) and teacher forward (no grad), with their tapped features."""
        s_logits = self.student(x)
        s_feats = self.s_tap.ordered()
        t_logits = self.teacher_forward(x)
        t_feats = self.t_tap.ordered()
        return s_logits, t_logits, s_feats, t_feats
