"""The student alone, trained with cross-entropy (also how teachers are trained)."""

from __future__ import annotations

import torch.nn.functional as F

from kdlib.distill.base import Distiller
from kdlib.distill.registry import register_distiller


@register_distiller("vanilla")
class Vanilla(Distiller):
    needs_teacher = False

    def __init__(self, student, teacher=None, **options):
        super().__init__(student, None, **options)  # a teacher, if given, is ignored: vanilla never uses one

    def forward_train(self, x, y):
        logits = self.student(x)
        return logits, {"ce": F.cross_entropy(logits, y)}
