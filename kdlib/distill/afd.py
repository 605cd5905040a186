"""AFD — attention-based feature distillation (Ji, Heo, Park, "Show, Attend and Distill", AAAI 2021).

Every teacher block output queries every student block output (METHODS.md §1):

- ``q_t = BN1d(Linear_t(GAP F_t))``, ``k_s = ReLU(BN1d(Linear_s(GAP F_s)))``, pair keys
  ``BN1d(Linear(d → d·T))(k_s)`` → ``B×S×T×d``, positional bias ``⟨P^T_t, P^S_s⟩``, ``d = 128``;
- ``α_{t,s} = softmax_s((⟨key_{s,t}, q_t⟩ + ⟨P^T_t, P^S_s⟩)/√d)``;
- ``L_AFD = Σ_t mean_b Σ_s α_{t,s}·mean_HW(v_{s→t} − v_t)²`` with AT-map values;
- ``L = CE + 0.9·KD(τ = 4) + 200·L_AFD``; the attention module trains with the student.

The computation lives in :mod:`kdlib.distill.pair_attention`, shared with SAKD; its docstring
lists what was taken from the official code (clovaai/attention-feature-distillation) and the
one departure (a student map smaller than the teacher's: the teacher map is pooled down). The
loss weights and ``d`` are the official defaults (``--alpha 0.9 --beta 200 --qk_dim 128``, τ = 4).

Options beyond the paper: ``taps="stages"`` (stage outputs only), ``pair_keys=False`` (the query
meets ``k_s`` directly), ``positional=False``, and ``queries="student"`` — the reversed role that
SAKD builds on (student queries, teacher keys, softmax over teacher taps); SAKD with ``p = 0`` is
exactly that.
"""

from __future__ import annotations

from kdlib.distill.pair_attention import PairAttentionDistiller
from kdlib.distill.registry import register_distiller


@register_distiller("afd")
class AFD(PairAttentionDistiller):
    loss_name = "afd"

    def __init__(
        self,
        student,
        teacher,
        *,
        taps: str = "blocks",
        pair_keys: bool = True,
        positional: bool = True,
        queries: str = "teacher",
        beta: float = 200.0,
        tau: float = 4.0,
        kd_weight: float = 0.9,
        ce_weight: float = 1.0,
        dim: int = 128,
    ):
        super().__init__(
            student,
            teacher,
            queries=queries,
            taps=taps,
            pair_keys=pair_keys,
            positional=positional,
            dim=dim,
            beta=beta,
            tau=tau,
            kd_weight=kd_weight,
            ce_weight=ce_weight,
        )
