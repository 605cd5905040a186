"""Spatial-attention-map KD (Wang & Liu 2024): distributions, loss, τ limit, goldens, β, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_net

from kdlib import KDLibError
from kdlib.attention import channel_marginal
from kdlib.distill.registry import create_distiller, distiller_options
from kdlib.distill.sam_kd import (
    DISTRIBUTION_AXIS,
    SpatialAttentionKD,
    distribution,
    distribution_kl,
    log_channel_marginal,
    log_distribution,
    sam_loss,
)

KINDS = tuple(DISTRIBUTION_AXIS)


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- an independent, straightforward re-implementation (Python lists, math.exp) ------------------
def _softmax(values, tau):
    top = max(values)
    exps = [math.exp((v - top) / tau) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def _pool(feat, out):
    """Average k×k blocks of a C×H×W nested list down to C×out×out."""
    k = len(feat[0]) // out
    return [[[sum(ch[y * k + a][x * k + b] for a in range(k) for b in range(k)) / (k * k)
              for x in range(out)] for y in range(out)] for ch in feat]


def _naive_pair(fs, ft, tau, kind):
    """KL(P_t ‖ P_s) for one B×C×H×W pair, batch mean, without τ²."""
    fs, ft = fs.tolist(), ft.tolist()
    out = min(len(fs[0][0]), len(ft[0][0]))
    per_sample = []
    for s, t in zip(fs, ft):
        s = [sum(row, []) for row in _pool(s, out)]  # C lists of N = out² values
        t = [sum(row, []) for row in _pool(t, out)]
        channels, n = len(s), out * out
        if kind == "marginal":
            ps, pt = [_softmax(c, tau) for c in s], [_softmax(c, tau) for c in t]
            ms = [sum(p[i] for p in ps) / channels for i in range(n)]
            mt = [sum(p[i] for p in pt) / channels for i in range(n)]
            per_sample.append(_kl(mt, ms))
        elif kind == "channelwise":
            kls = [_kl(_softmax(tc, tau), _softmax(sc, tau)) for sc, tc in zip(s, t)]
            per_sample.append(sum(kls) / channels)
        else:
            kls = [_kl(_softmax([c[i] for c in t], tau), _softmax([c[i] for c in s], tau)) for i in range(n)]
            per_sample.append(sum(kls) / n)
    return sum(per_sample) / len(per_sample)


def naive_sam(s_feats, t_feats, tau, kind):
    return tau * tau * sum(_naive_pair(fs, ft, tau, kind) for fs, ft in zip(s_feats, t_feats))


def naive_limit(fs, ft, kind):
    """The τ → ∞ limit of τ²·KL derived in the module docstring (same-size features)."""
    b, c, n = fs.shape[0], fs.shape[1], fs.shape[2] * fs.shape[3]
    if kind == "marginal":
        e = (ft.mean(1) - fs.mean(1)).flatten(1)
        return float(((e - e.mean(1, keepdim=True)) ** 2).sum() / (2 * n * b))
    d = (ft - fs).flatten(2)
    axis = 2 if kind == "channelwise" else 1  # centred over positions, or over channels
    return float(((d - d.mean(axis, keepdim=True)) ** 2).sum() / (2 * n * c * b))


def golden_inputs():
    """Two stages: the student map larger in one, the teacher map larger in the other."""
    fs = [seeded(2, 3, 4, 4, seed=11), seeded(2, 3, 2, 2, seed=12)]
    ft = [seeded(2, 3, 2, 2, seed=13), seeded(2, 3, 4, 4, seed=14)]
    return fs, ft


# Computed once with kdlib (float64) and confirmed by naive_sam below.
GOLDEN = {
    ("marginal", 4.0): 0.4556531131312123,
    ("channelwise", 4.0): 1.0913757628192693,
    ("position", 4.0): 0.7699990409460072,
    ("marginal", 1.0): 0.38465195982359557,
    ("channelwise", 1.0): 0.960176245135635,
    ("position", 1.0): 0.5812150280730621,
}


# --- distributions -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tau", [0.5, 4.0])
def test_each_distribution_is_a_probability_along_its_axis(kind, tau):
    feat = seeded(2, 5, 3, 3, seed=1) * 3
    p = distribution(feat, tau, kind)
    assert p.shape == ((2, 9) if kind == "marginal" else (2, 5, 9))
    assert (p >= 0).all()
    sums = p.sum(DISTRIBUTION_AXIS[kind])
    torch.testing.assert_close(sums, torch.ones_like(sums))
    # The loss works in log space; it must be the same distribution.
    torch.testing.assert_close(log_distribution(feat, tau, kind).exp(), p)


def test_log_marginal_is_stable_where_the_naive_log_underflows():
    feat = seeded(1, 4, 4, 4, seed=2) * 500
    assert torch.isinf(channel_marginal(feat, 1.0).log()).any()  # the trap the log-space form avoids
    log_m = log_channel_marginal(feat, 1.0)
    assert torch.isfinite(log_m).all()
    torch.testing.assert_close(log_m.exp().sum(1), torch.ones(1, dtype=torch.float64))
    assert torch.isfinite(sam_loss([feat], [seeded(1, 4, 4, 4, seed=3) * 500], 1.0)).all()


# --- loss properties -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_zero_for_identical_inputs_and_positive_otherwise(kind):
    fs, ft = golden_inputs()
    assert sam_loss(ft, ft, 4.0, kind).item() == pytest.approx(0.0, abs=1e-12)
    assert sam_loss(fs, ft, 4.0, kind).item() > 1e-3


@pytest.mark.parametrize(("kind", "tau"), list(GOLDEN))
def test_golden_values_match_an_independent_implementation(kind, tau):
    fs, ft = golden_inputs()
    value = sam_loss(fs, ft, tau, kind).item()
    assert value == pytest.approx(GOLDEN[(kind, tau)], rel=1e-9)
    assert value == pytest.approx(naive_sam(fs, ft, tau, kind), rel=1e-9)


def test_alignment_pools_features_before_the_softmax():
    fs, ft = seeded(2, 3, 4, 4, seed=4), seeded(2, 3, 2, 2, seed=5)
    before = sam_loss([fs], [ft], 4.0).item()
    assert before == pytest.approx(sam_loss([F.avg_pool2d(fs, 2)], [ft], 4.0).item(), rel=1e-12)
    # Pooling the probabilities instead would give a different (wrong) number.
    m_s = F.avg_pool2d(channel_marginal(fs, 4.0).view(2, 1, 4, 4), 2).flatten(1) * 4
    m_t = channel_marginal(ft, 4.0)
    after = 16 * (m_t * (m_t / m_s).log()).sum(1).mean().item()
    assert abs(before - after) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_tau_squared_kl_tends_to_the_derived_limit(kind):
    fs, ft = seeded(2, 3, 4, 4, seed=7), seeded(2, 3, 4, 4, seed=8)
    limit = naive_limit(fs, ft, kind)
    assert limit > 0.1
    errors = [abs(t * t * distribution_kl(fs, ft, t, kind).item() - limit) / limit for t in (1e2, 1e3, 1e4)]
    assert errors[2] < 1e-3
    assert errors[0] > errors[1] > errors[2]  # the error shrinks like 1/τ


@pytest.mark.parametrize("kind", KINDS)
def test_kl_decreases_with_tau_in_the_large_tau_regime(kind):
    fs, ft = seeded(2, 3, 4, 4, seed=7), seeded(2, 3, 4, 4, seed=8)
    kls = [distribution_kl(fs, ft, t, kind).item() for t in (1, 2, 4, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(kls, kls[1:]))
    assert kls[-1] * 64**2 == pytest.approx(naive_limit(fs, ft, kind), rel=0.05)  # KL ≈ limit/τ²


def test_kl_is_not_monotone_in_tau_in_general():
    """Same arg-max: both distributions tend to the same one-hot as τ → 0, so KL → 0 there too."""
    ft = torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64).view(1, 1, 1, 3)
    fs = torch.tensor([0.0, 2.0, 5.0], dtype=torch.float64).view(1, 1, 1, 3)
    kls = [distribution_kl(fs, ft, t, "channelwise").item() for t in (0.1, 1.0, 100.0)]
    assert kls[0] < kls[1] and kls[2] < kls[1]


def test_softmax_shift_invariances():
    fs, ft = seeded(2, 3, 4, 4, seed=9), seeded(2, 3, 4, 4, seed=10)
    per_channel = seeded(2, 3, 1, 1, seed=15) * 5
    per_position = seeded(2, 1, 4, 4, seed=16) * 5
    for kind in ("marginal", "channelwise"):
        assert sam_loss([fs + per_channel], [ft], 4.0, kind).item() == pytest.approx(
            sam_loss([fs], [ft], 4.0, kind).item(), rel=1e-10)
    assert sam_loss([fs + per_position], [ft], 4.0, "position").item() == pytest.approx(
        sam_loss([fs], [ft], 4.0, "position").item(), rel=1e-10)
    assert sam_loss([fs + per_position], [ft], 4.0, "marginal").item() != pytest.approx(
        sam_loss([fs], [ft], 4.0, "marginal").item(), rel=1e-3)


# --- the distiller -------------------------------------------------------------------------------
def make(tiny_pair, **options):
    student, teacher = tiny_pair
    torch.manual_seed(1)
    return create_distiller("sam_kd", student, teacher, **options)


def test_registered_with_keyword_options(tiny_pair):
    assert distiller_options("sam_kd") == {
        "distribution": "marginal", "stages": "all", "feat_mse": 0.0,
        "beta": "auto", "tau": 4.0, "kd_weight": 0.9,
    }
    d = make(tiny_pair)
    assert isinstance(d, SpatialAttentionKD)
    assert "基于空间注意力图的知识蒸馏算法" in SpatialAttentionKD.__doc__
    assert len(d.extras["adapters"]) == 3
    for g, t in zip(d.extras["adapters"], d.t_names):
        assert g[0].kernel_size == (1, 1) and g[0].out_channels == d.t_shapes[t][0]


@pytest.mark.parametrize("options", [
    {"distribution": "joint"}, {"stages": "first"}, {"tau": 0.0}, {"feat_mse": -1.0},
    {"beta": "automatic"}, {"beta": -2.0}, {"beta": float("nan")},
])
def test_bad_options_raise(tiny_pair, options):
    with pytest.raises(KDLibError):
        make(tiny_pair, **options)


@pytest.mark.parametrize("kind", KINDS)
def test_sam_term_equals_beta_times_the_independent_loss(tiny_pair, batch, kind):
    d = make(tiny_pair, distribution=kind, beta=2.5, feat_mse=3.0)
    x, y = batch
    logits, losses = d.forward_train(x, y)
    assert set(losses) == {"ce", "kd", "sam", "feat"}
    with torch.no_grad():  # the adapters' BN is in train mode: same batch statistics, same output
        s_feats = [g(f).double() for g, f in zip(d.extras["adapters"], d.s_tap.ordered())]
        t_feats = [f.double() for f in d.t_tap.ordered()]
    assert losses["sam"].item() == pytest.approx(2.5 * naive_sam(s_feats, t_feats, 4.0, kind), rel=1e-5)
    assert losses["feat"].item() == pytest.approx(
        3.0 * sum(F.mse_loss(s, t).item() for s, t in zip(s_feats, t_feats)), rel=1e-5)
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_middle_stage_only(tiny_pair, batch):
    d = make(tiny_pair, stages="middle")
    assert d.s_names == ["stages.1"] and d.t_names == ["stages.1"] and len(d.extras["adapters"]) == 1
    assert set(d.forward_train(*batch)[1]) == {"ce", "kd", "sam"}


def test_unequal_spatial_sizes_are_aligned(tiny_pair, batch):
    """A 4-stage student pairs its last three stages (8, 4, 2 px) with the teacher's (16, 8, 4 px)."""
    torch.manual_seed(0)
    d = create_distiller("sam_kd", tiny_net((4, 8, 16, 32), blocks=1), tiny_pair[1])
    _, losses = d.forward_train(*batch)
    assert torch.isfinite(losses["sam"]) and losses["sam"].item() > 0
    m_s, m_t = d.maps(batch[0])
    assert [tuple(m.shape) for m in m_s] == [(4, 8, 8), (4, 4, 4), (4, 2, 2)]
    assert [tuple(m.shape) for m in m_t] == [(4, 8, 8), (4, 4, 4), (4, 2, 2)]


def test_gradients_reach_student_and_adapters_never_the_teacher(tiny_pair, batch):
    d = make(tiny_pair, beta=1.0)
    d.train()
    teacher_state = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    _, losses = d.forward_train(*batch)
    losses["sam"].backward()  # the attention term alone must move the student and g_l
    assert all(p.grad is not None for p in d.extras["adapters"].parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in d.extras["adapters"].parameters())
    assert d.student.stages[0][0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.teacher.parameters())
    d.train_step(*batch)
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), f"teacher {k} changed"


def test_beta_auto_is_set_once_on_the_first_batch(tiny_pair, batch):
    d = make(tiny_pair)
    assert d.beta_value is None and torch.isnan(d.beta)
    _, first = d.forward_train(*batch)
    beta = d.beta_value
    assert beta is not None and beta > 0
    assert first["sam"].item() == pytest.approx(first["ce"].item(), rel=1e-5)
    other = (torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3)), batch[1].flip(0))
    _, second = d.forward_train(*other)
    assert d.beta_value == beta
    assert second["sam"].item() != pytest.approx(second["ce"].item(), rel=1e-3)

    # The buffer is checkpointed: a fresh distiller that loads it keeps it on its own first batch.
    state = d.trainable_state_dict()
    assert "beta" in state
    fresh = make(tiny_pair)
    fresh.load_trainable_state_dict(state)
    assert fresh.beta_value == beta
    fresh.forward_train(*other)
    assert fresh.beta_value == beta


def test_float_beta_is_fixed(tiny_pair, batch):
    d = make(tiny_pair, beta=7.0)
    assert d.beta_value == 7.0
    _, losses = d.forward_train(*batch)
    assert d.beta_value == 7.0
    assert losses["sam"].item() != pytest.approx(losses["ce"].item(), rel=1e-3)


def test_maps_are_distributions_without_side_effects(tiny_pair, batch):
    d = make(tiny_pair)
    d.train()
    d.extras["adapters"][0].eval()  # a mixed mode must survive too
    before = {k: v.clone() for k, v in d.state_dict().items()}
    modes = {n: m.training for n, m in d.named_modules()}
    m_s, m_t = d.maps(batch[0])
    assert len(m_s) == len(m_t) == 3
    for ms, mt, side in zip(m_s, m_t, (16, 8, 4)):
        for m in (ms, mt):
            assert m.shape == (4, side, side) and (m >= 0).all()
            torch.testing.assert_close(m.sum((1, 2)), torch.ones(4))
    assert {n: m.training for n, m in d.named_modules()} == modes
    for k, v in d.state_dict().items():
        assert torch.equal(v, before[k]) or (torch.isnan(v).all() and torch.isnan(before[k]).all()), k
    assert all(p.grad is None for p in d.parameters())
    raw_s, _ = d.maps(batch[0], adapted=False)
    assert not torch.allclose(raw_s[0], m_s[0])
