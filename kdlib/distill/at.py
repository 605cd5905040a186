"""Attention transfer (Zagoruyko & Komodakis 2017), code variant.

``L = CE + 1000·Σ_l mean((a(F_s^l) − a(F_t^l))²)`` over the stage outputs, with the larger map
average-pooled to the smaller; ``a`` is :func:`kdlib.attention.at_map`. ``at_kd``
(:mod:`kdlib.distill.at_kd`) adds the logit KD term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from kdlib.attention import map_distance
from kdlib.distill.feature_base import FeatureDistiller, paired_stage_names
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

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        self._setup_taps(*paired_stage_names(student, teacher))
        self.at_weight, self.ce_weight = self.options.at_weight, self.options.ce_weight

    def forward_train(self, x, y):
        logits, t_logits, s_feats, t_feats = self.forward_both(x)
        return logits, self.loss_terms(logits, t_logits, s_feats, t_feats, y)

    def loss_terms(self, logits, t_logits, s_feats, t_feats, y) -> dict:
        return {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "at": self.at_weight * at_loss(s_feats, t_feats),
        }
