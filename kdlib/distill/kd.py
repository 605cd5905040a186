"""Hinton et al. 2015: ``L = w_ce·CE + w_kd·τ²·KL(p_t^τ ‖ p_s^τ)``; protocol 0.1, 0.9, τ = 4."""

from __future__ import annotations

import torch.nn.functional as F

from kdlib.distill.base import Distiller, kd_loss
from kdlib.distill.registry import register_distiller


@register_distiller("kd")
class KD(Distiller):
    def __init__(self, student, teacher, *, tau: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__(student, teacher)
        self.tau, self.ce_weight, self.kd_weight = tau, ce_weight, kd_weight

    def forward_train(self, x, y):
        logits = self.student(x)
        t_logits = self.teacher_forward(x)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.tau),
        }
