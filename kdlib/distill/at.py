"""Attention transfer (Zagoruyko & Komodakis 2017), code variant.

``L = CE + 1000·Σ_l mean((a(F_s^l) − a(F_t^l))²)`` over the stage outputs, with the larger map
average-pooled to the smaller; ``a`` is :func:`kdlib.attention.at_map`.
"""

from __future__ import annotations

import torch.nn.functional as F

from kdlib.attention import align_spatial, at_map
from kdlib.distill.feature_base import FeatureDistiller, paired_stage_names
from kdlib.distill.registry import register_distiller


def at_loss(s_feats, t_feats):
    """``Σ_l mean((a(F_s^l) − a(F_t^l))²)`` over paired features."""
    total = 0.0
    for fs, ft in zip(s_feats, t_feats, strict=True):
        fs, ft = align_spatial(fs, ft)
        total = total + (at_map(fs) - at_map(ft)).pow(2).mean()
    return total


@register_distiller("at")
class AT(FeatureDistiller):
    def __init__(self, student, teacher, *, at_weight: float = 1000.0, ce_weight: float = 1.0):
        super().__init__(student, teacher)
        self._setup_taps(*paired_stage_names(student, teacher))
        self.at_weight, self.ce_weight = at_weight, ce_weight

    def forward_train(self, x, y):
        logits, _, s_feats, t_feats = self.forward_both(x)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "at": self.at_weight * at_loss(s_feats, t_feats),
        }
