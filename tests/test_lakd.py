"""LAKD: losses (golden values), gradient truncation, the memory-saving mode, curriculum, memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_net
from torch import nn

from kdlib import KDLibError
from kdlib.distill.base import IncompatibleModelsError
from kdlib.distill.lakd import LAKD, local_feature_loss, ndam_loss, ndam_weights
from kdlib.distill.lakd_memory import lakd_memory_comparison
from kdlib.distill.registry import create_distiller
from kdlib.features import extract_features
from kdlib.memory import measure_peak_memory
from kdlib.models.base import ClassifierHead, StagedNet


# --- independent references (loops and reshapes, no kdlib) -------------------------------------------
def ref_pool(f: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, c, hh, ww = f.shape
    return f.reshape(b, c, h, hh // h, w, ww // w).mean(dim=(3, 5))


def ref_align(fs, ft):
    (hs, ws), (ht, wt) = fs.shape[-2:], ft.shape[-2:]
    if hs * ws > ht * wt:
        return ref_pool(fs, ht, wt), ft
    if ht * wt > hs * ws:
        return fs, ref_pool(ft, hs, ws)
    return fs, ft


def ref_ndam(f: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(f.shape[0]):
        energy = sum(f[b, c] ** 2 for c in range(f.shape[1])) / f.shape[1]
        v = energy.flatten()
        rows.append(v / v.norm())
    return torch.stack(rows)


def ref_ndam_loss(fs, ft):
    fs, ft = ref_align(fs, ft)
    return ((ref_ndam(fs) - ref_ndam(ft)) ** 2).mean()


def ref_lf(fs, ft, weighted=False):
    fs, ft = ref_align(fs, ft)
    err = (fs - ft) ** 2
    if weighted:
        m = ref_ndam(ft)
        w = (m / m.mean(dim=1, keepdim=True)).reshape(ft.shape[0], 1, *ft.shape[-2:])
        err = err * w
    return err.mean()


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 3, 4, 4, generator=g),
        torch.randn(2, 3, 4, 4, generator=g),
        torch.randn(2, 5, 2, 2, generator=g),
        torch.randn(2, 3, 2, 2, generator=g),
    )


# --- golden values ----------------------------------------------------------------------------------
GOLDEN = {
    "ndam_same": 0.034259606,
    "ndam_pooled": 0.06002602,
    "lf_same": 1.6787211,
    "lf_pooled": 0.5226596,
    "lf_weighted": 2.2692411,
}


def test_golden_losses(feats):
    a, b, c, d = feats
    values = {
        "ndam_same": (ndam_loss(a, b), ref_ndam_loss(a, b)),
        "ndam_pooled": (ndam_loss(a, c), ref_ndam_loss(a, c)),  # 4×4 student pooled to the 2×2 teacher
        "lf_same": (local_feature_loss(a, b), ref_lf(a, b)),
        "lf_pooled": (local_feature_loss(a, d), ref_lf(a, d)),
        "lf_weighted": (local_feature_loss(a, b, ndam_weighted=True), ref_lf(a, b, weighted=True)),
    }
    for name, (got, ref) in values.items():
        assert got.item() == pytest.approx(GOLDEN[name], rel=1e-5), name
        assert got.item() == pytest.approx(ref.item(), rel=1e-5), name


def test_ndam_weights_have_unit_mean_and_follow_the_teacher(feats):
    _, b, _, _ = feats
    w = ndam_weights(b)
    assert w.shape == (2, 1, 4, 4)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    energy = b.pow(2).mean(1, keepdim=True)
    torch.testing.assert_close(w, energy / energy.mean(dim=(2, 3), keepdim=True))
    # uniform attention gives the plain MSE
    flat = torch.ones(1, 3, 4, 4)
    assert local_feature_loss(flat * 2, flat, True).item() == pytest.approx(1.0)


def test_lf_rejects_unprojected_channels(feats):
    a, _, c, _ = feats
    with pytest.raises(IncompatibleModelsError):
        local_feature_loss(a, c)


# --- the distiller's terms --------------------------------------------------------------------------
def make_lakd(pair, seed=1, **options):
    """A LAKD around copies of the pair; the seed fixes φ's initialisation."""
    student, teacher = (copy.deepcopy(m) for m in pair)
    torch.manual_seed(seed)
    return LAKD(student, teacher, **options).train()


@pytest.mark.parametrize("ndam", ["loss", "weights", "both"])
def test_terms_match_the_formula(tiny_pair, batch, ndam):
    x, y = batch
    d = make_lakd(tiny_pair, ndam=ndam, alpha=0.3, beta=10.0, att_weight=500.0)
    logits, losses = d.forward_train(x, y)
    has_att = ndam in ("loss", "both")
    att_keys = [f"att/{k}" for k in range(3)] if has_att else []
    assert list(losses) == ["ce", *att_keys, "lf/0", "lf/1", "lf/2"]

    # Recompute from a plain forward (truncation changes gradients, not values).
    s_logits, s_feats = extract_features(d.student, x)
    _, t_feats = extract_features(d.teacher, x)
    torch.testing.assert_close(logits, s_logits)
    assert losses["ce"].item() == pytest.approx(0.3 * F.cross_entropy(s_logits, y).item(), rel=1e-5)
    for k, (fs, ft) in enumerate(zip(s_feats.values(), t_feats.values(), strict=True)):
        if has_att:
            att = 0.7 * 500 * ref_ndam_loss(fs, ft).item()
            assert losses[f"att/{k}"].item() == pytest.approx(att, rel=1e-4)
        lf = ref_lf(d.extras["proj"][k](fs), ft, weighted=ndam != "loss")
        assert losses[f"lf/{k}"].item() == pytest.approx(10.0 * lf.item(), rel=1e-4)


def test_projection_only_where_channels_differ(tiny_pair):
    student, _ = tiny_pair
    same = LAKD(student, copy.deepcopy(student))
    assert all(isinstance(p, nn.Identity) for p in same.extras["proj"])
    d = LAKD(*tiny_pair)
    assert [p[0].out_channels for p in d.extras["proj"]] == [8, 16, 32]


# --- gradient truncation ----------------------------------------------------------------------------
def grads_of(d: LAKD, k: int) -> list[torch.Tensor | None]:
    return [p.grad for p in d.module_parameters(k)]


def has_grad(d: LAKD, k: int) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads_of(d, k))


@pytest.mark.parametrize("truncate", [True, False])
def test_each_modules_loss_reaches_earlier_modules_only_without_truncation(tiny_pair, batch, truncate):
    x, y = batch
    d = make_lakd(tiny_pair, truncate=truncate)
    _, losses = d.forward_train(x, y)
    for k in range(d.num_modules):
        d.zero_grad(set_to_none=True)
        sum(losses[n] for n in d.module_loss_names(k)).backward(retain_graph=True)
        assert has_grad(d, k), f"module {k} gets no gradient from its own loss"
        for j in range(k):
            if truncate:  # parameter by parameter: nothing at all reaches module j
                assert all(g is None or not g.any() for g in grads_of(d, j)), (k, j)
            else:
                assert has_grad(d, j), f"without truncation module {k}'s loss should reach module {j}"
        for j in range(k + 1, d.num_modules):
            assert not has_grad(d, j)


def test_local_modules_cover_every_student_parameter_once(tiny_pair):
    d = make_lakd(tiny_pair)
    ids = [id(p) for k in range(d.num_modules) for p in d.module_parameters(k)]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in d.learnable_parameters()}


# --- memory-saving mode ------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"ndam": "both"}, {"curriculum": 1}])
def test_memory_saving_gives_the_same_update_as_one_backward(tiny_pair, batch, options):
    x, y = batch
    single = make_lakd(tiny_pair, **options)
    saving = make_lakd(tiny_pair, memory_saving=True, **options)
    assert saving.custom_backward and not single.custom_backward
    results = []
    for d in (single, saving):
        opt = torch.optim.SGD(d.learnable_parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        opt.zero_grad()
        results.append(d.train_step(x, y, step=0))
        grads = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
        results.append(grads)
        opt.step()
    (logits_a, losses_a), grads_a, (logits_b, losses_b), grads_b = results
    torch.testing.assert_close(logits_a, logits_b)
    assert list(losses_a) == list(losses_b)
    for name in losses_a:
        torch.testing.assert_close(losses_a[name], losses_b[name], msg=name)
        assert not losses_b[name].requires_grad
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    assert any(g.abs().sum() > 0 for g in grads_a.values())
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    state_a, state_b = single.state_dict(), saving.state_dict()
    for name in state_a:
        torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_memory_saving_needs_truncation(tiny_pair):
    with pytest.raises(KDLibError, match="truncate"):
        LAKD(*tiny_pair, memory_saving=True, truncate=False)


@pytest.mark.parametrize(
    "options", [{"ndam": "sideways"}, {"curriculum": -1}, {"curriculum": 1.5}, {"alpha": 1.5}]
)
def test_bad_options_raise(tiny_pair, options):
    with pytest.raises(KDLibError):
        LAKD(*tiny_pair, **options)


def test_teacher_with_fewer_stages_is_rejected(tiny_pair):
    student, _ = tiny_pair
    with pytest.raises(IncompatibleModelsError):
        LAKD(student, tiny_net((8, 16), blocks=1))


def test_non_finite_term_is_caught_before_backward(tiny_pair, batch):
    x, y = batch
    d = make_lakd(tiny_pair, memory_saving=True)
    with pytest.raises(KDLibError, match="step 7"):
        d.train_step(x * float("nan"), y, step=7)
    assert all(p.grad is None for p in d.learnable_parameters())


@pytest.mark.parametrize("memory_saving", [False, True])
def test_teacher_gets_no_gradient_and_keeps_its_bn_statistics(tiny_pair, batch, memory_saving):
    x, y = batch
    d = make_lakd(tiny_pair, memory_saving=memory_saving)
    before = copy.deepcopy(d.teacher.state_dict())
    d.train_step(x, y)
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training
    for name, value in d.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not d.teacher._forward_hooks and not any(m._forward_hooks for m in d.teacher.modules())


def test_created_by_name(tiny_pair):
    d = create_distiller("lakd", *tiny_pair, memory_saving=True, curriculum=2)
    assert isinstance(d, LAKD) and d.custom_backward and d.curriculum == 2


# --- curriculum ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_saving", [False, True])
def test_curriculum_releases_modules_in_turn(tiny_pair, batch, memory_saving):
    x, y = batch
    d = make_lakd(tiny_pair, curriculum=2, memory_saving=memory_saving)
    released_by_epoch = []
    for epoch in range(5):
        d.zero_grad(set_to_none=True)
        _, losses = d.train_step(x, y)
        released_by_epoch.append([has_grad(d, k) for k in range(3)])
        for k in range(3):
            counted = any(losses[n] != 0 for n in d.module_loss_names(k))
            assert counted == d.released(k) == released_by_epoch[-1][k], (epoch, k)
        d.on_epoch_end(epoch, {})
    assert released_by_epoch == [
        [True, False, False], [True, False, False],
        [True, True, False], [True, True, False],
        [True, True, True],
    ]


def test_curriculum_counter_survives_a_checkpoint(tiny_pair):
    d = make_lakd(tiny_pair, curriculum=1)
    for epoch in range(2):
        d.on_epoch_end(epoch, {})
    state = copy.deepcopy(d.trainable_state_dict())
    assert int(state["epochs_done"]) == 2
    fresh = make_lakd(tiny_pair, curriculum=1)
    assert [fresh.released(k) for k in range(3)] == [True, False, False]
    fresh.load_trainable_state_dict(state)
    assert [fresh.released(k) for k in range(3)] == [True, True, True]
    fresh.on_epoch_end(2, {})
    assert int(fresh.epochs_done) == 3


# --- peak memory -------------------------------------------------------------------------------------
def test_measure_peak_memory_counts_allocations():
    small = measure_peak_memory(lambda: torch.ones(1_000) * 2)
    large = measure_peak_memory(lambda: torch.ones(1_000_000) * 2)
    assert small["bytes"] > 0 and small["method"].startswith("cpu")
    assert large["bytes"] >= 2 * 4_000_000 > small["bytes"]  # two live 4 MB tensors at the peak
    again = measure_peak_memory(lambda: torch.ones(1_000_000) * 2)
    assert again["bytes"] == large["bytes"]  # reproducible


def flat_net(width=8, stages=4, layers=3, num_classes=10) -> StagedNet:
    """Stages of equal activation size: the case where module-wise backward must pay off."""
    def stage(cin):
        mods = []
        for i in range(layers):
            conv = nn.Conv2d(cin if i == 0 else width, width, 3, padding=1)
            mods += [conv, nn.BatchNorm2d(width), nn.ReLU()]
        return nn.Sequential(*mods)

    return StagedNet(nn.Identity(), [stage(3 if i == 0 else width) for i in range(stages)],
                     ClassifierHead(width, num_classes))


def test_memory_saving_mode_lowers_the_peak():
    torch.manual_seed(0)
    student, teacher = flat_net(), flat_net(width=8, layers=1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    rows = lakd_memory_comparison(student, teacher, (x, y))
    assert [r["mode"] for r in rows] == ["memory-saving", "single-backward", "end-to-end"]
    by_mode = {r["mode"]: r for r in rows}
    assert all(r["peak_bytes"] > 0 and r["batch_size"] == 8 for r in rows)
    assert by_mode["end-to-end"]["relative_to_kd"] == 1.0
    # only one of four equal modules is alive at a time
    assert by_mode["memory-saving"]["peak_bytes"] < 0.6 * by_mode["single-backward"]["peak_bytes"]
    assert by_mode["memory-saving"]["peak_bytes"] < by_mode["end-to-end"]["peak_bytes"]


def test_memory_comparison_leaves_the_student_alone(tiny_pair, batch):
    student, teacher = tiny_pair
    before = copy.deepcopy(student.state_dict())
    rows = lakd_memory_comparison(student, teacher, batch, lakd_options={"ndam": "both"})
    assert len(rows) == 3
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(KDLibError):
        lakd_memory_comparison(student, teacher, batch, lakd_options={"memory_saving": True})
