"""Hinton et al. 2015: ``L = w_ce·CE + w_kd·τ²·KL(p_t^τ ‖ p_s^τ)``; protocol 0.1, 0.9, τ = 4."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlib.distill.base import Distiller
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton KD: ``τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``, summed over classes, batch mean."""
    log_ps = F.log_softmax(student_logits / tau, dim=1)
    log_pt = F.log_softmax(teacher_logits / tau, dim=1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * tau * tau


@register_distiller("kd")
class KD(Distiller):
    @dataclass(frozen=True)
    class Options(MethodOptions):
        tau: float = option(4.0, "softmax temperature τ of both sides", low=0, low_open=True)
        ce_weight: float = option(0.1, "weight of the cross-entropy term", low=0)
        kd_weight: float = option(0.9, "weight of the τ²·KL term", low=0)

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        self.tau, self.ce_weight, self.kd_weight = self.options.tau, self.options.ce_weight, self.options.kd_weight

    def forward_train(self, x, y):
        logits = self.student(x)
        t_logits = self.teacher_forward(x)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.tau),
        }
