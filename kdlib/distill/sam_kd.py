"""Spatial-attention-map KD (Wang & Liu 2024), reconstructed from the abstracts (METHODS.md §4).

Stated by the paper: a conditional probability distribution fits the spatial distribution of the
teacher's middle-layer features; the resulting spatial attention maps are transferred together
with "other beneficial information"; a small convolutional layer narrows the teacher–student gap.
Everything below that is more precise than that sentence is a reconstruction:

- ``P(i | c) = softmax_i(F[c, i] / τ)`` over the ``N = H·W`` positions of each channel;
- the spatial attention map is the channel marginal ``M(i) = (1/C) Σ_c P(i | c)``;
- the student feature passes through ``g_l`` = 1×1 conv + BN to the teacher's channel count, then
  the larger map is average-pooled to the smaller one **before** any softmax;
- ``L_SAM = τ² · Σ_l KL(M_t^l ‖ M_s^l)`` (KL summed over positions, batch mean) over the paired stage
  outputs; "other beneficial information" = logit KD; ``L = CE + 0.9·L_KD + β·L_SAM``, τ = 4.

Options (``distribution``): ``"marginal"`` (default, above); ``"channelwise"``
``τ²/C · Σ_c KL(P_t(·|c) ‖ P_s(·|c))``; ``"position"`` — ``P(c | i) = softmax_c(F[c, i]/τ)``, KL over
channels averaged over positions, also times τ².

Why τ² — the high-temperature limit (exact, and tested). Take the logits of one pair of
distributions over ``N`` outcomes, e.g. ``a = F_t[c, ·]`` and ``b = g(F_s)[c, ·]``; let ``d = a − b``
and ``d̄`` its mean. For ``τ → ∞``, ``softmax(a/τ)_i = (1/N)(1 + (a_i − ā)/τ) + O(τ⁻²)`` and, using
``KL(p ‖ q) = ½ Σ_i (p_i − q_i)²/p_i + O(‖p − q‖³)``,

    τ² · KL(softmax(a/τ) ‖ softmax(b/τ))  →  (1/(2N)) · Σ_i (d_i − d̄)²,   error O(1/τ).

So τ² makes the loss finite and non-zero as τ grows (as in Hinton's KD): it becomes a squared
error between centred maps, zero only when ``d`` is constant (softmax ignores shifts). Per option:

- marginal: ``M(i) = (1/N)(1 + (m_i − m̄)/τ) + O(τ⁻²)`` with ``m = mean_c F`` (the channel-mean map),
  so ``τ²·KL(M_t ‖ M_s) → (1/(2N)) Σ_i (e_i − ē)²``, ``e = mean_c F_t − mean_c g(F_s)``: an MSE
  between centred channel-mean maps — the un-squared cousin of AT's ``mean_c F²``;
- channelwise: ``→ (1/(2NC)) Σ_c Σ_i (d_{c,i} − d̄_{c,·})²``  (centred over positions per channel);
- position: ``→ (1/(2NC)) Σ_i Σ_c (d_{c,i} − d̄_{·,i})²``  (centred over channels per position).

Each limit is per sample, then averaged over the batch and summed over stages. Consequently
``KL(τ) ≈ limit/τ²`` decreases with τ *for large τ*. It is **not** monotone in general: when teacher
and student share the arg-max, both distributions tend to the same one-hot as ``τ → 0`` and KL → 0
there too, so KL rises and then falls (a test pins an example). Exact invariances that follow from
the softmax: marginal and channelwise ignore a per-channel constant added to ``F``; position ignores
a per-position constant.

β: ``beta="auto"`` (default) sets ``β = CE / L_SAM`` (both detached) on the first call of
:meth:`SpatialAttentionKD.forward_train` — the first training batch — so that ``β·L_SAM = CE`` there,
as the spec asks ("β chosen so that β·L_SAM ≈ CE at initialisation, and reported"). It is stored in
the buffer ``beta`` (NaN until set), so checkpoints carry it and a resumed run keeps it; it never
changes afterwards. A float fixes β from the start (also stored in the buffer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdlib import KDLibError
from kdlib.attention import (
    align_spatial,
    channel_marginal,
    position_channel_distribution,
    spatial_distribution,
)
from kdlib.distill.base import IncompatibleModelsError
from kdlib.distill.feature_base import FeatureDistiller, paired_stage_names
from kdlib.distill.kd import kd_loss
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller
from kdlib.models.base import channel_adapter

#: The distributions the loss can compare, and the axis of a ``B×…`` tensor each one sums to 1 along.
DISTRIBUTION_AXIS = {"marginal": 1, "channelwise": 2, "position": 1}
STAGES = ("all", "middle")


def _check_distribution(kind: str) -> None:
    if kind not in DISTRIBUTION_AXIS:
        raise KDLibError(f"unknown distribution {kind!r}; choose one of {tuple(DISTRIBUTION_AXIS)}")


def distribution(feat: torch.Tensor, tau: float, kind: str = "marginal") -> torch.Tensor:
    """The probabilities an option compares: ``B×HW`` (marginal) or ``B×C×HW`` (the other two).

    They sum to 1 along ``DISTRIBUTION_AXIS[kind]``. Figures use this; the loss uses
    :func:`log_distribution`, which is the same thing in log space.
    """
    _check_distribution(kind)
    if kind == "marginal":
        return channel_marginal(feat, tau)
    if kind == "channelwise":
        return spatial_distribution(feat, tau)
    return position_channel_distribution(feat, tau)


def log_channel_marginal(feat: torch.Tensor, tau: float) -> torch.Tensor:
    """``log M(i)`` computed as ``logsumexp_c log P(i | c) − log C``.

    Equal to ``channel_marginal(feat, tau).log()`` but without taking the log of a sum of small
    probabilities, which underflows to ``-inf`` for peaked features and makes the KL NaN.
    """
    log_p = F.log_softmax(feat.flatten(2) / tau, dim=2)
    return torch.logsumexp(log_p, dim=1) - math.log(feat.shape[1])


def log_distribution(feat: torch.Tensor, tau: float, kind: str = "marginal") -> torch.Tensor:
    """``log`` of :func:`distribution`, computed stably."""
    _check_distribution(kind)
    if kind == "marginal":
        return log_channel_marginal(feat, tau)
    return F.log_softmax(feat.flatten(2) / tau, dim=DISTRIBUTION_AXIS[kind])


def distribution_kl(fs: torch.Tensor, ft: torch.Tensor, tau: float, kind: str = "marginal") -> torch.Tensor:
    """``KL(P_t ‖ P_s)`` for one pair of same-shape features, without the τ² factor.

    Summed along the distribution's axis, averaged over the remaining non-batch axis (channels for
    ``channelwise``, positions for ``position``), then averaged over the batch.
    """
    if fs.shape != ft.shape:
        raise KDLibError(f"spatial-attention KL needs same-shape features, got {tuple(fs.shape)} and "
                         f"{tuple(ft.shape)}; adapt channels and align sizes first")
    log_s, log_t = log_distribution(fs, tau, kind), log_distribution(ft, tau, kind)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(dim=DISTRIBUTION_AXIS[kind])
    return kl.flatten(1).mean(dim=1).mean() if kl.dim() > 1 else kl.mean()


def sam_loss(s_feats, t_feats, tau: float = 4.0, kind: str = "marginal") -> torch.Tensor:
    """``L_SAM = τ² · Σ_l KL(P_t^l ‖ P_s^l)`` over paired features (student already channel-adapted).

    The larger map of each pair is average-pooled to the smaller one *before* the softmax, so the
    distributions are over the same positions.
    """
    if tau <= 0:
        raise KDLibError(f"tau must be positive, got {tau}")
    total = 0.0
    for fs, ft in zip(s_feats, t_feats, strict=True):
        fs, ft = align_spatial(fs, ft)
        total = total + distribution_kl(fs, ft, tau, kind)
    return tau * tau * total


def _select_stages(student, teacher, stages: str) -> tuple[list[str], list[str]]:
    """All paired stage outputs (deepest backwards), or only the middle pair of them."""
    if stages not in STAGES:
        raise KDLibError(f"unknown stages {stages!r}; choose one of {STAGES}")
    s_names, t_names = paired_stage_names(student, teacher)
    if not s_names:
        raise IncompatibleModelsError("spatial-attention KD found no stage outputs to pair")
    if stages == "middle":
        k = len(s_names) // 2
        return [s_names[k]], [t_names[k]]
    return s_names, t_names


def _initial_beta(beta) -> float:
    """NaN for ``"auto"`` (set on the first batch), else a validated non-negative float."""
    if isinstance(beta, str):
        if beta != "auto":
            raise KDLibError(f"beta must be 'auto' or a number, got {beta!r}")
        return math.nan
    beta = float(beta)
    if not math.isfinite(beta) or beta < 0:
        raise KDLibError(f"beta must be a finite non-negative number, got {beta}")
    return beta


@register_distiller("sam_kd")
class SpatialAttentionKD(FeatureDistiller):
    """Spatial-attention-map KD, Wang & Liu 2024, 基于空间注意力图的知识蒸馏算法.

    (王礼乐, 刘渊, 计算机应用研究 41(6):1693–1698, doi 10.19734/j.issn.1001-3695.2023.10.0496.)
    ``L = CE + kd_weight·L_KD(τ) + β·L_SAM(τ) [+ feat_mse·Σ_l MSE(g_l(F_s^l), F_t^l)]``; loss terms
    ``"ce"``, ``"kd"``, ``"sam"`` and, with ``feat_mse > 0``, ``"feat"``. See the module docstring
    for what is stated by the paper and what is reconstructed, and for the τ derivation.

    Options: ``distribution`` ∈ {"marginal", "channelwise", "position"}; ``stages`` ∈ {"all",
    "middle"} of the paired stage outputs; ``feat_mse`` weight of the extra feature MSE (0 = off);
    ``beta`` "auto" or a float; ``tau``; ``kd_weight``. The chosen β is :attr:`beta_value`.
    """

    @dataclass(frozen=True)
    class Options(MethodOptions):
        distribution: str = option("marginal", "which spatial distribution the maps compare",
                                   choices=tuple(DISTRIBUTION_AXIS))
        stages: str = option("all", "every paired stage output or only the middle pair", choices=STAGES)
        feat_mse: float = option(0.0, "weight of an extra feature MSE (0: off)", low=0)
        beta: str | float = option("auto", "weight β of L_SAM; 'auto': CE/L_SAM on the first batch",
                                   choices=("auto",), low=0)
        tau: float = option(4.0, "temperature τ of the maps and of the logit KD term", low=0, low_open=True)
        kd_weight: float = option(0.9, "weight of the logit KD term", low=0)

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        o = self.options
        distribution, stages, beta = o.distribution, o.stages, o.beta
        self.distribution, self.stages = distribution, stages
        self.tau, self.kd_weight, self.feat_mse = o.tau, o.kd_weight, o.feat_mse
        self._setup_taps(*_select_stages(student, teacher, stages))
        self.extras["adapters"] = nn.ModuleList(
            channel_adapter(self.s_shapes[s][0], self.t_shapes[t][0])
            for s, t in zip(self.s_names, self.t_names, strict=True)
        )
        # A buffer, not a Python float: checkpoints carry β, so a resumed run does not re-pick it.
        self.register_buffer("beta", torch.tensor(_initial_beta(beta), dtype=torch.float32))

    @property
    def beta_value(self) -> float | None:
        """The β in use (for the report), or ``None`` while ``beta="auto"`` has not seen a batch."""
        value = float(self.beta)
        return None if math.isnan(value) else value

    def _aligned_pairs(self, s_feats, t_feats, adapted: bool = True):
        """``(g_l(F_s^l), F_t^l)`` with the larger map average-pooled to the smaller one."""
        pairs = []
        for g, fs, ft in zip(self.extras["adapters"], s_feats, t_feats, strict=True):
            pairs.append(align_spatial(g(fs) if adapted else fs, ft))
        return pairs

    def _beta_for(self, ce: torch.Tensor, sam: torch.Tensor) -> torch.Tensor:
        """β from the buffer; with ``"auto"``, set it once to ``CE/L_SAM`` on the first batch."""
        if torch.isnan(self.beta):
            sam_value = float(sam.detach())
            if not sam_value > 0:
                raise KDLibError(
                    f"beta='auto' needs L_SAM > 0 on the first batch, got {sam_value}; pass a float beta"
                )
            self.beta.fill_(float(ce.detach()) / sam_value)
        return self.beta

    def forward_train(self, x, y):
        logits, t_logits, s_feats, t_feats = self.forward_both(x)
        pairs = self._aligned_pairs(s_feats, t_feats)
        ce = F.cross_entropy(logits, y)
        sam = sam_loss([p[0] for p in pairs], [p[1] for p in pairs], self.tau, self.distribution)
        losses = {
            "ce": ce,
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.tau),
            "sam": self._beta_for(ce, sam) * sam,
        }
        if self.feat_mse > 0:
            losses["feat"] = self.feat_mse * sum(F.mse_loss(fs, ft) for fs, ft in pairs)
        return logits, losses

    @torch.no_grad()
    def maps(self, x: torch.Tensor, *, tau: float | None = None, adapted: bool = True):
        """Spatial attention maps ``(M_s per stage, M_t per stage)``, each ``B×H×W`` summing to 1.

        For the chapter's figure. Runs every module in ``eval()`` (no BN statistic changes), without
        gradients, and restores each module's mode afterwards; β is untouched. The student side is
        ``g_l(F_s)`` as the loss sees it (``adapted=False``: the raw student feature), both sides at
        the aligned size; ``tau`` defaults to the training τ.
        """
        tau = self.tau if tau is None else tau
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            _, _, s_feats, t_feats = self.forward_both(x)
            pairs = self._aligned_pairs(s_feats, t_feats, adapted=adapted)
        finally:
            for m, mode in modes.items():
                m.training = mode
        shape = [(fs.shape[0], *fs.shape[-2:]) for fs, _ in pairs]
        m_s = [channel_marginal(fs, tau).view(sh) for (fs, _), sh in zip(pairs, shape, strict=True)]
        m_t = [channel_marginal(ft, tau).view(sh) for (_, ft), sh in zip(pairs, shape, strict=True)]
        return m_s, m_t
