"""FitNets (Romero et al. 2015) as reimplemented by CRD: one hint at the middle stage.

``L = CE + 100·MSE(r(F_s), F_t)``; the regressor ``r`` matches the student's map to the
teacher's (3×3 stride 2 when twice as large, 4×4 transposed stride 2 when half as large, a valid
conv of kernel ``1+H_s−H_t`` otherwise), then BN and ReLU, and trains with the student.
``fitnets_kd`` (:mod:`kdlib.distill.fitnets_kd`) adds the logit KD term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from kdlib.distill.base import IncompatibleModelsError
from kdlib.distill.feature_base import FeatureDistiller
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller
from kdlib.features import stage_names


def hint_regressor(s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]) -> nn.Module:
    (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
    if hs == 2 * ht:
        conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
    elif 2 * hs == ht:
        conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
    elif hs >= ht and ws >= wt:
        conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
    else:
        raise IncompatibleModelsError(
            f"FitNets cannot map a {hs}×{ws} student hint to a {ht}×{wt} teacher hint"
        )
    return nn.Sequential(conv, nn.BatchNorm2d(ct), nn.ReLU())


@register_distiller("fitnets")
class FitNets(FeatureDistiller):
    @dataclass(frozen=True)
    class Options(MethodOptions):
        hint_weight: float = option(100.0, "weight of the hint MSE (CRD's FitNets)", low=0)
        ce_weight: float = option(1.0, "weight of the cross-entropy term", low=0)

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        s_names, t_names = stage_names(student), stage_names(teacher)
        self._setup_taps([s_names[len(s_names) // 2]], [t_names[len(t_names) // 2]])
        self.extras["regressor"] = hint_regressor(
            self.s_shapes[self.s_names[0]], self.t_shapes[self.t_names[0]]
        )
        self.hint_weight, self.ce_weight = self.options.hint_weight, self.options.ce_weight

    def forward_train(self, x, y):
        logits, t_logits, s_feats, t_feats = self.forward_both(x)
        return logits, self.loss_terms(logits, t_logits, s_feats, t_feats, y)

    def loss_terms(self, logits, t_logits, s_feats, t_feats, y) -> dict:
        (fs,), (ft,) = s_feats, t_feats
        return {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "fitnet": self.hint_weight * F.mse_loss(self.extras["regressor"](fs), ft),
        }
