"""SAKD — sparse attention knowledge distillation (Guo, Zhang, Liang, IVC 2024), reconstructed.

Stated by the paper (abstract only): student features are the queries and teacher features the
keys/values; the attention is made sparse by random deactivation (dropout); the sparse attention
reweights the distance of every teacher–student feature pair. Everything else is the
reconstruction of METHODS.md §2 — AFD with the roles reversed, plus dropout:

- ``q_s = BN1d(Linear_s(GAP F_s))``, ``k_t = ReLU(BN1d(Linear_t(GAP F_t)))``, bilinear pair keys,
  positional bias ``⟨P^S_s, P^T_t⟩``; ``α_{s,t} = softmax_t(·)`` → ``B×S×T``;
- in training only, ``α̃ = Dropout_p(α)``; ``D_{s,t} = mean_HW(v_{s→t} − v_t)²``;
- ``L_SAKD = mean_b Σ_s Σ_t α̃_{s,t}·D_{s,t}``; ``L = CE + 0.9·KD(τ = 4) + β·L_SAKD``, β = 200.

Dropout forms (``dropout_form``):

- ``"inverted"`` (default): ``α̃ = α·m/(1−p)`` — what ``nn.Dropout`` does; rows no longer sum to 1
  but ``E[α̃] = α``;
- ``"renorm"``: ``α̃ = α·m / Σ_t α·m`` — rows still sum to 1; a row whose entries were all dropped
  keeps its undropped values (there is nothing to renormalise);
- ``"dropkey"`` (Li et al., CVPR 2023): dropped logits are set to ``−∞`` before the softmax, so the
  kept entries share the mass; a row with every logit dropped keeps all of them (otherwise the
  softmax would be 0/0). The original DropKey adds ``−1e12`` instead, which turns such a row into a
  uniform one; ``−∞`` with the rescue keeps the attention's own preferences.
  Note: a softmax over the kept logits is ``α_j / Σ_kept α``, so given the same mask DropKey
  *equals* ``"renorm"`` (a test checks the values; the functions being equal, so are their
  gradients). Li et al. set DropKey against dropout applied after the softmax (the ``"inverted"``
  form), not against drop-and-renormalise; the ablation should show ``"renorm"`` and ``"dropkey"``
  agreeing up to rounding, which is itself worth saying in the chapter.

The keep-mask ``m`` is one ``Bernoulli(1−p)`` draw of shape ``B×S×T`` (``torch.bernoulli``) rather
than ``F.dropout``, so the three forms share one draw and the figures can seed it with a
generator. With ``p = 0`` (or in eval mode) ``α̃ = α`` and SAKD is exactly reversed-role AFD
(``create_distiller("afd", ..., queries="student")``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlib import KDLibError
from kdlib.distill import afd
from kdlib.distill.afd import PairAttentionDistiller
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller

DROPOUT_FORMS = ("inverted", "renorm", "dropkey")


def keep_mask(like: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask, each entry kept independently with probability ``1 − p``."""
    probs = torch.full(like.shape, 1.0 - p, device=like.device)
    return torch.bernoulli(probs, generator=generator).bool()


def drop_attention(
    logits: torch.Tensor, form: str, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sparsified attention ``α̃`` from logits (softmax over the last dimension), one dropout form."""
    if form not in DROPOUT_FORMS:
        raise KDLibError(f"unknown dropout form {form!r}; choose one of {DROPOUT_FORMS}")
    keep = keep_mask(logits, p, generator)
    if form == "dropkey":
        keep = keep | ~keep.any(dim=-1, keepdim=True)  # an all-dropped row keeps every logit
        return F.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    alpha = F.softmax(logits, dim=-1)
    if form == "inverted":
        return alpha * keep / (1.0 - p)
    kept = alpha * keep
    total = kept.sum(dim=-1, keepdim=True)
    empty = total == 0
    # A safe denominator: the discarded branch of torch.where must not produce NaN gradients.
    return torch.where(empty, alpha, kept / torch.where(empty, torch.ones_like(total), total))


@register_distiller("sakd")
class SAKD(PairAttentionDistiller):
    loss_name = "sakd"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        dropout_form: str = option("inverted", "how attention entries are dropped", choices=DROPOUT_FORMS)
        p: float = option(0.1, "dropout rate of the attention entries", low=0.0, high=1.0, high_open=True)
        pair_keys: bool = afd.pair_keys_option()
        positional: bool = afd.positional_option()
        taps: str = afd.taps_option()
        beta: float = afd.beta_option()
        tau: float = afd.tau_option()
        kd_weight: float = afd.kd_weight_option()
        ce_weight: float = afd.ce_weight_option()
        dim: int = afd.dim_option()

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        self.dropout_form, self.p = self.options.dropout_form, self.options.p

    def sparsify(
        self, logits: torch.Tensor, sample: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, α̃)``: ``α̃`` is ``α`` itself unless sampling with ``p > 0``."""
        alpha = F.softmax(logits, dim=-1)
        if not sample or self.p == 0.0:
            return alpha, alpha
        return alpha, drop_attention(logits, self.dropout_form, self.p, generator)
