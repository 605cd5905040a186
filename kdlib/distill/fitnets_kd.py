"""FitNets+KD: FitNets plus the logit KD term ``kd_weight·τ²·KL`` — a control for the book's grid.

AFD, SAKD, AFT-KD and SAM-KD add ``0.9·τ²·KL(p_t^τ ‖ p_s^τ)`` to their own term; FitNets does not. FitNets+KD
carries the same logit terms as those methods, so that comparing them with KD isolates the
feature or attention term (kdlib.grid pairs every method with the reference of its logit terms).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.distill.fitnets import FitNets
from kdlib.distill.kd import kd_loss
from kdlib.distill.options import option
from kdlib.distill.registry import register_distiller


@register_distiller("fitnets_kd")
class FitNetsKD(FitNets):
    @dataclass(frozen=True)
    class Options(FitNets.Options):
        kd_weight: float = option(0.9, "weight of the logit KD term (the attention methods' 0.9)", low=0)
        tau: float = option(4.0, "temperature τ of the logit KD term", low=0, low_open=True)

    def loss_terms(self, logits, t_logits, s_feats, t_feats, y) -> dict:
        return {**super().loss_terms(logits, t_logits, s_feats, t_feats, y),
                "kd": self.options.kd_weight * kd_loss(logits, t_logits, self.options.tau)}
