"""Attention transfer (Zagoruyko & Komodakis 2017), code variant.

``L = CE + 1000·Σ_l mean((a(F_s^l) − a(F_t^l))²)`` over the stage outputs, with the larger map
average-pooled to the smaller; ``a`` is :func:`kdlib.attention.at_map`. With ``kd_weight > 0`` a
``kd_weight·τ²·KL`` term is added: "AT+KD" (0.9), the control whose logit terms equal those of AFD,
SAKD, AFT-KD and SAM-KD, so that a comparison isolates the attention term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kdlib.attention import map_distance
from kdlib.distill.feature_base import FeatureDistiller, paired_stage_names
from kdlib.distill.kd import kd_loss
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller


def at_loss(s_feats, t_feats):
    """``Σ_l mean((a(F_s^l) − a(F_t^l))²)`` over paired features."""
    return sum(map_distance(fs, ft) for fs, ft in zip(s_feats, t_feats, strict=True))


@register_distiller("at")
class AT(FeatureDistiller):
    @dataclass(frozen=True)
    class Options(MethodOptions):
        at_weight: float = option(1000.0, "weight β of the AT term (Zagoruyko & Komodakis' code)", low=0)
        ce_weight: float = option(1.0, "weight of the cross-entropy term", low=0)
        kd_weight: float = option(0.0, "weight of a logit KD term (0.9: 'AT+KD', the attention methods' logit terms)",
                                  low=0)
        tau: float = option(4.0, "temperature τ of the logit KD term (with kd_weight > 0)", low=0, low_open=True)

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        self._setup_taps(*paired_stage_names(student, teacher))
        self.at_weight, self.ce_weight = self.options.at_weight, self.options.ce_weight

    def forward_train(self, x, y):
        logits, t_logits, s_feats, t_feats = self.forward_both(x)
        losses = {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "at": self.at_weight * at_loss(s_feats, t_feats),
        }
        if self.options.kd_weight > 0:
            losses["kd"] = self.options.kd_weight * kd_loss(logits, t_logits, self.options.tau)
        return logits, losses
