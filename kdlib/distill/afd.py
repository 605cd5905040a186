"""AFD — attention-based feature distillation (Ji, Heo, Park, "Show, Attend and Distill", AAAI 2021).

Every teacher block output queries every student block output (METHODS.md §1):

- ``q_t = BN1d(Linear_t(GAP F_t))``, ``k_s = ReLU(BN1d(Linear_s(GAP F_s)))``, pair keys
  ``BN1d(Linear(d → d·T))(k_s)`` → ``B×S×T×d``, positional bias ``⟨P^T_t, P^S_s⟩``, ``d = 128``;
- ``α_{t,s} = softmax_s((⟨key_{s,t}, q_t⟩ + ⟨P^T_t, P^S_s⟩)/√d)``;
- ``L_AFD = Σ_t mean_b Σ_s α_{t,s}·mean_HW(v_{s→t} − v_t)²`` with AT-map values;
- ``L = CE + 0.9·KD(τ = 4) + 200·L_AFD``; the attention module trains with the student.

The computation is shared with SAKD (:mod:`kdlib.distill.sakd`), which builds on AFD: see
"Attention over teacher–student feature pairs" below for what was taken from the official code
(clovaai/attention-feature-distillation) and the one departure (a student map smaller than the
teacher's: the teacher map is pooled down). The loss weights and ``d`` are the official defaults
(``--alpha 0.9 --beta 200 --qk_dim 128``, τ = 4).

Options beyond the paper: ``taps="stages"`` (stage outputs only), ``pair_keys=False`` (the query
meets ``k_s`` directly), ``positional=False``, and ``queries="student"`` — the reversed role that
SAKD builds on (student queries, teacher keys, softmax over teacher taps); SAKD with ``p = 0`` is
exactly that.

Attention over teacher–student feature pairs: the computation AFD and SAKD share.
---------------------------------------------------------------------------------

Both methods tap every block output of teacher (``T`` taps) and student (``S`` taps), score every
(student, teacher) pair with a learned attention, and weight the AT-map distance of each pair by
that attention (METHODS.md §1–§2). They differ only in **which side queries**:

- AFD (Ji et al. 2021): teacher queries, student keys, ``α_{t,s} = softmax_s`` (``B×T×S``);
- SAKD (reconstruction): student queries, teacher keys, ``α_{s,t} = softmax_t`` (``B×S×T``),
  then dropout on the attention.

So one module, :class:`PairAttention`, computes ``softmax_key(·)`` for a "query side" and a "key
side", and :class:`PairAttentionDistiller` says which side is which (``queries="teacher"`` for
AFD, ``"student"`` for reversed-role AFD and SAKD). Attentions and distances are always handed
out in the student × teacher layout ``B×S×T``, so one loss serves both methods:
``mean_b Σ_s Σ_t α_{s,t}·D_{s,t}``, which for AFD is ``Σ_t mean_b Σ_s α_{t,s}·D_{s,t}`` (the sum
over taps and the batch mean commute).

Details taken from the official AFD code (clovaai/attention-feature-distillation,
``distill/AFD.py``) where METHODS.md is silent:

- every Linear is followed by ``BatchNorm1d`` (the query layer skips the ReLU, the key layer has
  it, the bilinear map skips it); the bilinear map is applied to the ``B·K`` stacked keys at once,
  so its BatchNorm normalises over batch *and* key taps together;
- the positional bias ``P^Q·P^Kᵀ`` is added to the content logit **before** dividing by ``√d``;
- student values are the channel-mean energy ``mean_c F²`` average-pooled to the teacher's
  resolution and then L2-normalised (pool the energy, not the feature).

One departure: the official code pools the student energy map to the teacher's size with
``AdaptiveAvgPool2d`` even when the student map is *smaller*, which silently upsamples it by
repetition. Here both maps of a pair are pooled down to their common size
``(min(H_s, H_t), min(W_s, W_t))``, so when the student map is smaller it is the teacher's map
that is pooled. For a pair whose student map is at least as large as the teacher's (a student
tap against a teacher tap of the same or a later stage) this is exactly the official computation;
for a late student tap against an early teacher tap the official code compares a blown-up student
map at the teacher's resolution, kdlib compares the two at the student's resolution.
"""


from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.attention import energy_map, pool_to
from kdlib.distill.feature_base import TAPS, FeatureDistiller, tap_names
from kdlib.distill.kd import kd_loss
from kdlib.distill.options import MethodOptions, option
from kdlib.distill.registry import register_distiller

QUERY_SIDES = ("teacher", "student")


def gap(feat: torch.Tensor) -> torch.Tensor:
    """Global average pooling ``B×C×H×W → B×C``."""
    return feat.mean(dim=(2, 3))


def linear_bn(cin: int, cout: int, relu: bool) -> nn.Sequential:
    """``Linear → BatchNorm1d`` (→ ``ReLU``): the projection AFD uses for queries, keys and pairs."""
    layers: list[nn.Module] = [nn.Linear(cin, cout), nn.BatchNorm1d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PairAttention(nn.Module):
    """``α[b, i, j] = softmax_j((⟨k_{j,i}, q_i⟩ + ⟨P^Q_i, P^K_j⟩)/√d)`` over query taps ``i``, key taps ``j``.

    - query of tap ``i``: ``BN1d(Linear_i(GAP F_i))`` (one Linear per tap: channel counts differ);
    - key of tap ``j``: ``ReLU(BN1d(Linear_j(GAP F_j)))``; with ``pair_keys`` a shared bilinear map
      ``BN1d(Linear(d → d·Q))`` turns it into one key per (j, i) pair; without, the query meets
      the key ``k_j`` directly;
    - with ``positional``, learned embeddings ``P^Q (Q×d)``, ``P^K (K×d)``, Xavier-normal, add the
      bias ``⟨P^Q_i, P^K_j⟩`` that lets the attention prefer tap pairs regardless of content.

    BatchNorm1d in training needs a batch of at least 2.
    """

    def __init__(
        self,
        query_channels: list[int],
        key_channels: list[int],
        dim: int = 128,
        *,
        pair_keys: bool = True,
        positional: bool = True,
    ):
        super().__init__()
        self.dim, self.n_query, self.n_key = dim, len(query_channels), len(key_channels)
        self.query = nn.ModuleList(linear_bn(c, dim, relu=False) for c in query_channels)
        self.key = nn.ModuleList(linear_bn(c, dim, relu=True) for c in key_channels)
        self.bilinear = linear_bn(dim, dim * self.n_query, relu=False) if pair_keys else None
        if positional:
            self.pos_query = nn.Parameter(torch.empty(self.n_query, dim))
            self.pos_key = nn.Parameter(torch.empty(self.n_key, dim))
            nn.init.xavier_normal_(self.pos_query)
            nn.init.xavier_normal_(self.pos_key)
        else:
            self.pos_query = self.pos_key = None

    def logits(self, query_feats: list[torch.Tensor], key_feats: list[torch.Tensor]) -> torch.Tensor:
        """Scaled attention logits ``B×Q×K`` (softmax over the last dimension gives ``α``)."""
        q = torch.stack([layer(gap(f)) for layer, f in zip(self.query, query_feats, strict=True)], 1)
        k = torch.stack([layer(gap(f)) for layer, f in zip(self.key, key_feats, strict=True)], 1)
        if self.bilinear is None:
            content = torch.einsum("bjd,bid->bij", k, q)
        else:
            b = k.shape[0]
            pair = self.bilinear(k.reshape(b * self.n_key, self.dim))
            pair = pair.view(b, self.n_key, self.n_query, self.dim)
            content = torch.einsum("bjid,bid->bij", pair, q)
        if self.pos_query is not None:
            content = content + self.pos_query @ self.pos_key.t()
        return content / math.sqrt(self.dim)

    def forward(self, query_feats: list[torch.Tensor], key_feats: list[torch.Tensor]) -> torch.Tensor:
        """Attention ``B×Q×K``, each row a distribution over the key taps."""
        return F.softmax(self.logits(query_feats, key_feats), dim=-1)


def pair_distances(s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> torch.Tensor:
    """``D_{s,t} = mean_HW (v_{s→t} − v_t)²`` for every pair: ``B×S×T``.

    ``v = norm(vec(pool(mean_c F²)))`` with both maps of a pair pooled to their common size
    (see the module docstring); an unpooled value is exactly :func:`kdlib.attention.at_map`.
    Each (tap, size) value is computed once and reused across pairs.
    """
    s_energy = [energy_map(f)[:, None] for f in s_feats]
    t_energy = [energy_map(f)[:, None] for f in t_feats]
    cache: dict[tuple[str, int, tuple[int, int]], torch.Tensor] = {}

    def value(side: str, i: int, energy: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        key = (side, i, size)
        if key not in cache:
            cache[key] = F.normalize(pool_to(energy, size).flatten(1), dim=1)
        return cache[key]

    rows = []
    for i, es in enumerate(s_energy):
        row = []
        for j, et in enumerate(t_energy):
            size = (min(es.shape[-2], et.shape[-2]), min(es.shape[-1], et.shape[-1]))
            row.append((value("s", i, es, size) - value("t", j, et, size)).pow(2).mean(dim=1))
        rows.append(torch.stack(row, dim=1))
    return torch.stack(rows, dim=1)


def weighted_distance(alpha: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_s Σ_t α_{s,t}·D_{s,t}`` for ``B×S×T`` attention and distances."""
    return (alpha * dist).sum(dim=(1, 2)).mean()



# The options AFD and SAKD share (official AFD defaults), one constructor each so that every method's
# Options dataclass can list them in its own order.
def taps_option():
    return option("blocks", "tap every residual block or only the stage outputs", choices=TAPS)


def pair_keys_option():
    return option(True, "a bilinear key per (key tap, query tap) pair; False: the key meets the query")


def positional_option():
    return option(True, "add the learned positional bias ⟨P^Q_i, P^K_j⟩ to the logits")


def beta_option():
    return option(200.0, "weight β of the attention-weighted pair distance", low=0)


def tau_option():
    return option(4.0, "temperature τ of the logit KD term", low=0, low_open=True)


def kd_weight_option():
    return option(0.9, "weight of the logit KD term", low=0)


def ce_weight_option():
    return option(1.0, "weight of the cross-entropy term", low=0)


def dim_option():
    return option(128, "dimension d of queries and keys", low=1)


class PairAttentionDistiller(FeatureDistiller):
    """CE + KD + β·(attention-weighted pair distance); AFD and SAKD are the two subclasses.

    ``queries`` picks the side that queries: ``"teacher"`` is AFD, ``"student"`` the reversed
    role that SAKD builds on. :meth:`sparsify` is the hook where SAKD drops attention entries; here
    it is the identity, so SAKD with ``p = 0`` is this computation with ``queries="student"``.
    """

    loss_name = "pair"

    queries = "student"  # the side that queries; AFD makes it an option

    def __init__(self, student, teacher, **options):
        super().__init__(student, teacher, **options)
        o = self.options
        queries = getattr(o, "queries", self.queries)
        self._setup_taps(tap_names(student, o.taps), tap_names(teacher, o.taps))
        channels = {
            "student": [self.s_shapes[n][0] for n in self.s_names],
            "teacher": [self.t_shapes[n][0] for n in self.t_names],
        }
        keys = "student" if queries == "teacher" else "teacher"
        self.extras["attention"] = PairAttention(
            channels[queries], channels[keys], o.dim, pair_keys=o.pair_keys, positional=o.positional
        )
        self.queries = queries
        self.beta, self.tau, self.kd_weight, self.ce_weight = o.beta, o.tau, o.kd_weight, o.ce_weight

    # --- the shared computation ---------------------------------------------------------------
    def query_key_logits(self, s_feats: list[torch.Tensor], t_feats: list[torch.Tensor]) -> torch.Tensor:
        """Attention logits in the query × key layout (``B×T×S`` for AFD, ``B×S×T`` reversed)."""
        if self.queries == "teacher":
            return self.extras["attention"].logits(t_feats, s_feats)
        return self.extras["attention"].logits(s_feats, t_feats)

    def to_student_teacher(self, qk: torch.Tensor) -> torch.Tensor:
        """Re-lay a query × key tensor as student × teacher ``B×S×T``."""
        return qk.transpose(1, 2) if self.queries == "teacher" else qk

    def sparsify(
        self, logits: torch.Tensor, sample: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α, α̃)`` from query × key logits; no sparsification here (AFD)."""
        alpha = F.softmax(logits, dim=-1)
        return alpha, alpha

    def distill_terms(
        self,
        s_feats: list[torch.Tensor],
        t_feats: list[torch.Tensor],
        *,
        sample: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(α, α̃, D)``, each ``B×S×T``.

        ``sample`` says whether to draw the sparsification (default: in training mode only).
        """
        sample = self.training if sample is None else sample
        alpha, alpha_tilde = self.sparsify(self.query_key_logits(s_feats, t_feats), sample, generator)
        dist = pair_distances(s_feats, t_feats)
        return self.to_student_teacher(alpha), self.to_student_teacher(alpha_tilde), dist

    def distill_loss(
        self,
        s_feats: list[torch.Tensor],
        t_feats: list[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The unweighted distillation loss ``mean_b Σ_s Σ_t α̃_{s,t}·D_{s,t}``."""
        _, alpha_tilde, dist = self.distill_terms(s_feats, t_feats, generator=generator)
        return weighted_distance(alpha_tilde, dist)

    def forward_train(self, x, y):
        logits, t_logits, s_feats, t_feats = self.forward_both(x)
        return logits, {
            "ce": self.ce_weight * F.cross_entropy(logits, y),
            "kd": self.kd_weight * kd_loss(logits, t_logits, self.tau),
            self.loss_name: self.beta * self.distill_loss(s_feats, t_feats),
        }

    # --- for the figures ----------------------------------------------------------------------
    @torch.no_grad()
    def attention(
        self, x: torch.Tensor, *, dropout: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(α, α̃, D)``, each ``B×S×T``, for a batch, without training side effects.

        Runs in eval mode (BatchNorm uses and keeps its running statistics, no gradients) and
        restores the previous mode. With ``dropout`` the sparsification is drawn as in training
        (seeded by ``generator``), so a figure can show the attention before and after it.
        For AFD the columns of ``α`` (over ``s``) sum to 1; for SAKD its rows (over ``t``).
        """
        was_training = self.training
        self.eval()
        try:
            _, _, s_feats, t_feats = self.forward_both(x)
            return self.distill_terms(s_feats, t_feats, sample=dropout, generator=generator)
        finally:
            self.train(was_training)


@register_distiller("afd")
class AFD(PairAttentionDistiller):
    loss_name = "afd"
    queries = "teacher"

    @dataclass(frozen=True)
    class Options(MethodOptions):
        taps: str = taps_option()
        pair_keys: bool = pair_keys_option()
        positional: bool = positional_option()
        queries: str = option("teacher", "the side that queries ('student': the reversed role SAKD builds on)",
                              choices=QUERY_SIDES)
        beta: float = beta_option()
        tau: float = tau_option()
        kd_weight: float = kd_weight_option()
        ce_weight: float = ce_weight_option()
        dim: int = dim_option()
