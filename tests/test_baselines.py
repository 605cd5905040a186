"""KD, FitNets, AT and the Distiller contract: golden values, zero cases, gradient flow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlib import KDLibError
from kdlib.attention import at_map
from kdlib.distill import NonFiniteLossError, check_finite, create_distiller, kd_loss, list_distillers
from kdlib.distill.at import at_loss
from kdlib.distill.fitnets import hint_regressor


def seeded(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- golden values on seeded tensors ----------------------------------------------------------
def test_kd_loss_golden_and_independent():
    zs, zt = seeded(8, 10, seed=1), seeded(8, 10, seed=2)
    # Independent formula: tau^2 * mean_b sum_k p_t (log p_t - log p_s)
    pt, ps = torch.softmax(zt / 4, 1), torch.softmax(zs / 4, 1)
    expected = 16 * (pt * (pt.log() - ps.log())).sum(1).mean()
    got = kd_loss(zs, zt, tau=4.0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.item() == pytest.approx(0.9457505941390991, abs=1e-5)


def test_kd_zero_when_logits_equal():
    z = seeded(4, 10)
    assert kd_loss(z, z.clone(), 4.0).abs().item() < 1e-7


def test_at_loss_golden_and_pooling():
    fs = [seeded(2, 4, 8, 8, seed=3), seeded(2, 8, 4, 4, seed=4)]
    ft = [seeded(2, 6, 4, 4, seed=5), seeded(2, 16, 4, 4, seed=6)]
    # Independent: pool the larger map (energy-then-normalise after pooling the feature).
    def a(f):
        m = f.pow(2).mean(1).flatten(1)
        return m / m.norm(dim=1, keepdim=True)
    expected = (a(F.adaptive_avg_pool2d(fs[0], 4)) - a(ft[0])).pow(2).mean() + (a(fs[1]) - a(ft[1])).pow(2).mean()
    got = at_loss(fs, ft)
    assert torch.allclose(got, expected, atol=1e-7)
    assert got.item() == pytest.approx(0.0611979216337204, abs=1e-6)


def test_at_zero_for_identical_features():
    f = [seeded(2, 4, 8, 8), seeded(2, 8, 4, 4, seed=1)]
    assert at_loss(f, [t.clone() for t in f]).item() == 0.0
    assert torch.allclose(at_map(f[0]).norm(dim=1), torch.ones(2))


@pytest.mark.parametrize(
    "s_shape,t_shape,kind",
    [((4, 16, 16), (8, 8, 8), torch.nn.Conv2d), ((4, 8, 8), (8, 16, 16), torch.nn.ConvTranspose2d),
     ((4, 8, 8), (8, 8, 8), torch.nn.Conv2d), ((4, 10, 10), (8, 8, 8), torch.nn.Conv2d)],
)
def test_fitnets_regressor_maps_shapes(s_shape, t_shape, kind):
    r = hint_regressor(s_shape, t_shape)
    assert isinstance(r[0], kind)
    assert r(torch.randn(2, *s_shape)).shape == (2, *t_shape)


def test_fitnets_regressor_rejects_impossible_shapes():
    with pytest.raises(KDLibError, match="cannot map"):
        hint_regressor((4, 5, 5), (8, 16, 16))


# --- the Distiller contract, for every baseline --------------------------------------------------
@pytest.mark.parametrize("method", ["kd", "fitnets", "at"])
def test_gradients_reach_student_and_extras_never_teacher(method, tiny_pair, batch):
    student, teacher = tiny_pair
    d = create_distiller(method, student, teacher)
    d.train()
    assert not d.teacher.training, "teacher must stay in eval() when the distiller trains"
    stats = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    x, y = batch
    logits, losses = d.train_step(x, y)
    assert logits.shape == (4, 10)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.extras.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, stats[k]), f"teacher buffer {k} changed during a training step"
    assert set(losses) >= {"ce"}


def test_fitnets_trains_its_regressor_and_checkpoints_it(tiny_pair):
    d = create_distiller("fitnets", *tiny_pair)
    state = d.trainable_state_dict()
    assert any(k.startswith("extras.regressor") for k in state)
    assert not any(k.startswith("teacher.") for k in state)
    assert {id(p) for p in d.extras.parameters()} <= {id(p) for p in d.learnable_parameters()}


def test_vanilla_is_plain_cross_entropy(tiny_pair, batch):
    student, _ = tiny_pair
    d = create_distiller("vanilla", student)
    x, y = batch
    logits, losses = d.forward_train(x, y)
    assert list(losses) == ["ce"]
    assert torch.allclose(losses["ce"], F.cross_entropy(student(x), y))


def test_kd_terms_are_weighted(tiny_pair, batch):
    student, teacher = tiny_pair
    d = create_distiller("kd", student, teacher, ce_weight=0.1, kd_weight=0.9, tau=4.0)
    d.eval()  # BN in eval so two forwards agree
    x, y = batch
    _, losses = d.forward_train(x, y)
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
    assert torch.allclose(losses["ce"], 0.1 * F.cross_entropy(zs, y), atol=1e-6)
    assert torch.allclose(losses["kd"], 0.9 * kd_loss(zs, zt, 4.0), atol=1e-6)


def test_registry_errors_name_the_problem(tiny_pair):
    student, teacher = tiny_pair
    with pytest.raises(KDLibError, match="unknown method 'nope'.*available: .*kd"):
        create_distiller("nope", student, teacher)
    with pytest.raises(KDLibError, match="unknown option.*'temperature'"):
        create_distiller("kd", student, teacher, temperature=3)
    with pytest.raises(KDLibError, match="needs a teacher"):
        create_distiller("kd", student, None)
    assert {"vanilla", "kd", "fitnets", "at"} <= set(list_distillers())


def test_non_finite_loss_names_term_and_step():
    with pytest.raises(NonFiniteLossError, match="'kd' is nan at step 7"):
        check_finite({"ce": torch.tensor(1.0), "kd": torch.tensor(float("nan"))}, step=7)
    check_finite({"ce": torch.tensor(1.0)}, step=0)  # finite: no error
