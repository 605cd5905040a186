"""AFT-KD: the AFB losses, channel-block pooling, DWA weighting, gradient flow, checkpoint state."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import tiny_net

from kdlib import KDLibError
from kdlib.distill.aftkd import AFTKD, attention_loss, channel_block_pool
from kdlib.distill.base import IncompatibleModelsError, NonFiniteLossError
from kdlib.distill.loss_weighting import EpochDWA, FixedWeighting, IterationDWA, dwa_weights
from kdlib.distill.registry import create_distiller

NAMES = ("kd", "feat", "att")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared CPU than oversubscribing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- an independent, straightforward re-implementation (float64, explicit formulas) ----------------
def ref_pool(x, size):
    """Average pooling by an integer factor, as a reshape and a mean."""
    b, c, h, w = x.shape
    k = h // size
    return x.reshape(b, c, size, k, size, k).mean(dim=(3, 5))


def ref_align(fs, ft):
    if fs.shape[-1] > ft.shape[-1]:
        return ref_pool(fs, ft.shape[-1]), ft
    if ft.shape[-1] > fs.shape[-1]:
        return fs, ref_pool(ft, fs.shape[-1])
    return fs, ft


def ref_at(f):
    """``mean_c F²`` flattened, divided by its Euclidean length."""
    e = (f * f).sum(dim=1) / f.shape[1]
    e = e.reshape(f.shape[0], -1)
    return e / torch.sqrt((e * e).sum(dim=1, keepdim=True))


def ref_adapter(f, weight):
    """1×1 conv as an einsum, then train-mode BN (biased batch variance, γ=1, β=0, eps 1e-5)."""
    y = torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], f)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (y - mean) / torch.sqrt(var + 1e-5)


def ref_channel_pool(f, groups):
    """Average channels in equal consecutive groups (C_t divisible by C_s)."""
    b, c, h, w = f.shape
    return f.reshape(b, groups, c // groups, h, w).mean(dim=2)


def ref_gate(f):
    b, _, h, w = f.shape
    return (math.sqrt(h * w) * ref_at(f)).reshape(b, 1, h, w)


def ref_kd(zs, zt, tau):
    ps, pt = torch.softmax(zs / tau, 1), torch.softmax(zt / tau, 1)
    return (pt * (pt.log() - ps.log())).sum(1).mean() * tau * tau


def ref_losses(sf, tf, sl, tl, weights, afb, align):
    sf = [f.double() for f in sf]
    tf = [f.double() for f in tf]
    out = {"kd": ref_kd(sl.double(), tl.double(), 4.0)}
    att = feat = fused = 0.0
    for l, (fs, ft) in enumerate(zip(sf, tf)):
        fs, ft = ref_align(fs, ft)
        att = att + ((ref_at(fs) - ref_at(ft)) ** 2).mean()
        if align == "adapter":
            s_cmp, t_cmp = ref_adapter(fs, weights[l].double()), ft
        else:
            s_cmp, t_cmp = fs, ref_channel_pool(ft, fs.shape[1])
        feat = feat + ((s_cmp - t_cmp) ** 2).mean()
        fused = fused + ((s_cmp * ref_gate(fs) - t_cmp * ref_gate(ft)) ** 2).mean()
    if afb == "pair":
        out.update(feat=feat, att=att)
    else:
        out["afb"] = fused
    return {k: float(v) for k, v in out.items()}


def seeded_inputs():
    """Stage features for the tiny pair's channels, with both pooling directions and an equal size."""
    g = torch.Generator().manual_seed(1)
    sf = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 4, 4, generator=g),
          torch.randn(2, 16, 2, 2, generator=g)]
    tf = [torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 16, 8, 8, generator=g),
          torch.randn(2, 32, 2, 2, generator=g)]
    return sf, tf, torch.randn(2, 10, generator=g), torch.randn(2, 10, generator=g)


def seed_adapters(d):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for phi in d.extras["adapters"]:
            phi[0].weight.copy_(torch.randn(phi[0].weight.shape, generator=g) * 0.5)
    return [phi[0].weight.detach().clone() for phi in d.extras["adapters"]]


# --- golden values of the losses ---------------------------------------------------------------------
GOLDEN = {
    ("pair", "adapter"): {"kd": 0.803005, "feat": 5.435441, "att": 0.058345},
    ("pair", "channel_pool"): {"kd": 0.803005, "feat": 3.848257, "att": 0.058345},
    ("fused", "adapter"): {"kd": 0.803005, "afb": 7.193904},
    ("fused", "channel_pool"): {"kd": 0.803005, "afb": 5.061718},
}


@pytest.mark.parametrize("afb,align", sorted(GOLDEN))
def test_losses_golden_and_reimplementation(tiny_pair, afb, align):
    student, teacher = tiny_pair
    d = AFTKD(student, teacher, afb=afb, align=align)
    weights = seed_adapters(d) if align == "adapter" else None
    sf, tf, sl, tl = seeded_inputs()
    raw = {k: v.item() for k, v in d.raw_losses(sl, tl, sf, tf).items()}
    assert raw == pytest.approx(GOLDEN[afb, align], abs=2e-6)
    assert raw == pytest.approx(ref_losses(sf, tf, sl, tl, weights, afb, align), rel=1e-5)


def test_attention_loss_zero_when_features_coincide():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 8, 4, 4, generator=g)
    assert attention_loss([f], [f]).item() == 0.0
    # Same energy per position with other channels (sign flips, duplicates) -> same attention.
    assert attention_loss([f], [torch.cat([f, -f], dim=1)]).item() == pytest.approx(0.0, abs=1e-12)
    # A different feature must give a positive loss (the property is not vacuous).
    assert attention_loss([f], [torch.randn(2, 8, 4, 4, generator=g)]).item() > 1e-4


def test_distiller_zero_att_and_kd_when_teacher_is_student(batch):
    torch.manual_seed(0)
    student = tiny_net((4, 8, 16), blocks=1)
    d = AFTKD(student, copy.deepcopy(student), align="channel_pool").eval()  # BN alike on both sides
    _, losses = d.forward_train(*batch)
    assert losses["att"].item() == 0.0
    assert losses["feat"].item() == 0.0
    assert losses["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["ce"].item() > 0


# --- channel-block pooling ---------------------------------------------------------------------------
def test_channel_block_pool_means_of_groups():
    # Channel c holds the value c everywhere (plus a per-position offset): group means are exact.
    c = torch.arange(8, dtype=torch.float32).view(1, 8, 1, 1)
    offset = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3) * 100
    x = (c + offset).expand(2, 8, 3, 3)
    out = channel_block_pool(x, 4)
    assert out.shape == (2, 4, 3, 3)
    expected = torch.tensor([0.5, 2.5, 4.5, 6.5]).view(1, 4, 1, 1) + offset
    assert torch.equal(out, expected.expand(2, 4, 3, 3))
    g = torch.Generator().manual_seed(4)
    y = torch.randn(2, 12, 5, 5, generator=g)
    assert torch.allclose(channel_block_pool(y, 3), ref_channel_pool(y, 3), atol=1e-6)
    assert channel_block_pool(y, 12) is y


def test_channel_block_pool_uneven_groups():
    # C_t = 6 -> C_s = 4: windows [floor(i*6/4), ceil((i+1)*6/4)) = [0,2) [1,3) [3,5) [4,6).
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 6, 1, 1)
    assert channel_block_pool(x, 4).flatten().tolist() == [0.5, 1.5, 3.5, 4.5]
    with pytest.raises(IncompatibleModelsError, match="C_t >= C_s"):
        channel_block_pool(x, 7)


def test_channel_pool_alignment_is_parameter_free(tiny_pair):
    student, teacher = tiny_pair
    d = AFTKD(student, teacher, align="channel_pool")
    assert sum(p.numel() for p in d.extras.parameters()) == 0
    assert len(d.learnable_parameters()) == len(list(student.parameters()))
    # The adapter variant does add parameters: 1×1 convs 4→8, 8→16, 16→32 plus BN affine.
    n = sum(p.numel() for p in AFTKD(student, teacher).extras.parameters())
    assert n == (4 * 8 + 8 * 16 + 16 * 32) + 2 * (8 + 16 + 32)
    with pytest.raises(IncompatibleModelsError, match="channel_pool"):
        AFTKD(teacher, student, align="channel_pool")  # a wider "student" cannot pool the teacher


# --- DWA weights -------------------------------------------------------------------------------------
def feed_epoch(w, epoch, values):
    """Two steps per epoch whose means are ``values`` (the steps differ, the mean is exact)."""
    for sign in (1.0, -1.0):
        w.observe({k: torch.tensor(v + sign * 0.125 * v) for k, v in zip(NAMES, values)})
    return w.epoch_end(epoch)


def ref_dwa(ratios, temperature=2.0):
    exps = [math.exp(r / temperature) for r in ratios]
    return [len(ratios) * e / sum(exps) for e in exps]


def test_dwa_unit_first_two_epochs_then_golden():
    w = EpochDWA(NAMES, temperature=2.0)
    assert feed_epoch(w, 0, [1.0, 1.0, 1.0]) == {"kd": 1.0, "feat": 1.0, "att": 1.0}
    # Epoch 1 ends: the weights for epoch 2 come from r = L(1)/L(0) = (0.5, 0.9, 1.0).
    nxt = feed_epoch(w, 1, [0.5, 0.9, 1.0])
    golden = [0.8558156, 1.0452955, 1.0988889]
    assert [nxt[k] for k in NAMES] == pytest.approx(golden, abs=1e-6)
    assert [nxt[k] for k in NAMES] == pytest.approx(ref_dwa([0.5, 0.9, 1.0]), abs=1e-6)
    assert sum(nxt.values()) == pytest.approx(3.0, abs=1e-6)
    # History: epochs 0 and 1 ran with unit weights; raw means are the exact step means.
    assert w.weight_history == [{k: 1.0 for k in NAMES}] * 2
    assert len(w.raw_loss_history) == 2
    assert w.raw_loss_history[0] == pytest.approx(dict(zip(NAMES, [1.0, 1.0, 1.0])), abs=1e-7)
    assert w.raw_loss_history[1] == pytest.approx(dict(zip(NAMES, [0.5, 0.9, 1.0])), abs=1e-7)
    feed_epoch(w, 2, [0.25, 0.81, 1.0])
    assert [w.weight_history[2][k] for k in NAMES] == pytest.approx(golden, abs=1e-6)
    assert w.epochs == [0, 1, 2]


def test_dwa_slowest_decay_gets_most_weight():
    w = EpochDWA(NAMES)
    # kd halves every epoch, feat loses 10 %, att stays flat.
    for e in range(6):
        nxt = feed_epoch(w, e, [0.5**e, 0.9**e, 2.0])
        if e >= 1:
            assert nxt["att"] > nxt["feat"] > nxt["kd"]
            assert sum(nxt.values()) == pytest.approx(3.0, abs=1e-6)
    # Swapping which loss stalls swaps the order: the weighting follows the rate, not the name.
    w = EpochDWA(NAMES)
    for e in range(3):
        nxt = feed_epoch(w, e, [3.0, 0.5**e, 0.9**e])
    assert nxt["kd"] > nxt["att"] > nxt["feat"]


def test_dwa_temperature_flattens():
    r = torch.tensor([0.5, 0.9, 1.0], dtype=torch.float64)
    spread = [float(dwa_weights(r, t).max() - dwa_weights(r, t).min()) for t in (0.5, 2.0, 50.0)]
    assert spread[0] > spread[1] > spread[2] > 0


def test_fixed_weighting_stays_one_and_records():
    w = FixedWeighting(NAMES)
    for e in range(4):
        assert feed_epoch(w, e, [0.5**e, 1.0, 2.0]) == {k: 1.0 for k in NAMES}
    assert [h["kd"] for h in w.raw_loss_history] == [1.0, 0.5, 0.25, 0.125]


def test_iteration_dwa_golden():
    decay, window = 0.5, 2
    w = IterationDWA(NAMES, temperature=2.0, decay=decay, window=window)
    seq = [[1.0, 2.0, 4.0], [0.8, 2.0, 3.0], [0.6, 1.8, 3.5], [0.5, 1.9, 3.0], [0.3, 2.1, 2.0]]
    ema, smoothed, got = [0.0] * 3, [], []
    for t, values in enumerate(seq, start=1):
        got.append(w.weights.tolist())
        w.observe(dict(zip(NAMES, map(torch.tensor, values))))
        ema = [decay * m + (1 - decay) * v for m, v in zip(ema, values)]
        smoothed.append([m / (1 - decay**t) for m in ema])
    # Steps 1..W+1 use unit weights; step t+1 uses m̂_t / m̂_{t-W}.
    assert got[: window + 1] == [[1.0, 1.0, 1.0]] * (window + 1)
    expected_next = ref_dwa([a / b for a, b in zip(smoothed[4], smoothed[2])])
    assert w.weights.tolist() == pytest.approx(expected_next, abs=1e-6)
    assert got[4] == pytest.approx(ref_dwa([a / b for a, b in zip(smoothed[3], smoothed[1])]), abs=1e-6)
    assert w.weights.tolist() == pytest.approx([0.9059837, 1.1274474, 0.9665689], abs=1e-6)


def test_epoch_end_without_steps_raises():
    with pytest.raises(KDLibError, match="no training step"):
        EpochDWA(NAMES).epoch_end(0)


def test_epoch_end_with_a_non_finite_mean_is_a_nonfinite_loss_error():
    w = EpochDWA(["a", "b"])
    w.observe({"a": torch.tensor(float("inf")), "b": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLossError, match=r"\['a'\] is not finite in epoch 0"):
        w.epoch_end(0)


# --- the distiller: raw accumulation, gradients, options ---------------------------------------------
def batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 16, 16, generator=g) * (1 + i), torch.randint(0, 10, (4,), generator=g))
            for i in range(n)]


def run_steps(d, epoch, first=0, last=2, end=True):
    """Steps ``first..last-1`` of ``epoch`` (two steps per epoch, fixed batches per epoch)."""
    d.train()
    for x, y in batches(100 + epoch, 2)[first:last]:
        d.forward_train(x, y)
    if end:
        d.on_epoch_end(epoch, {})


def run_epochs(d, first_epoch, n_epochs):
    for e in range(first_epoch, first_epoch + n_epochs):
        run_steps(d, e)


def test_dwa_uses_raw_not_weighted_means(tiny_pair):
    student, teacher = tiny_pair
    d = AFTKD(student, teacher)
    run_epochs(d, 0, 2)
    w = d.weighting.weights_dict()
    assert any(abs(v.item() - 1.0) > 1e-3 for v in w.values())  # epoch 2 runs with adapted weights
    d.train()
    terms = {k: [] for k in NAMES}
    for x, y in batches(7, 2):
        _, losses = d.forward_train(x, y)
        for k in NAMES:
            terms[k].append(losses[k].item() / (w[k].item() * d.lambdas[k]))
    d.on_epoch_end(2, {})
    assert d.raw_loss_history[2] == pytest.approx({k: sum(v) / 2 for k, v in terms.items()}, rel=1e-5)
    assert d.weight_history[2] == pytest.approx({k: v.item() for k, v in w.items()}, abs=1e-7)
    assert len(d.weight_history) == len(d.raw_loss_history) == 3


def test_terms_scaled_by_lambdas(tiny_pair, batch):
    student, teacher = tiny_pair
    d = AFTKD(student, teacher, weighting="fixed", lambdas={"att": 10.0}).eval()
    _, losses = d.forward_train(*batch)
    s_logits, t_logits, sf, tf = d.forward_both(batch[0])
    raw = d.raw_losses(s_logits, t_logits, sf, tf)
    assert set(losses) == {"ce", "kd", "feat", "att"}
    assert losses["att"].item() == pytest.approx(10.0 * raw["att"].item(), rel=1e-6)
    assert losses["feat"].item() == pytest.approx(30.0 * raw["feat"].item(), rel=1e-6)
    assert losses["kd"].item() == pytest.approx(0.9 * raw["kd"].item(), rel=1e-6)
    assert d.weighting._steps_in_epoch == 0  # eval mode: nothing recorded for the weighting


def test_gradients_reach_student_and_adapters_not_teacher(tiny_pair, batch):
    student, teacher = tiny_pair
    d = AFTKD(student, teacher)
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d.train()
    d.train_step(*batch)
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, bn_before[k]), k
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.extras["adapters"].parameters())
    for stage in student.stages:
        assert stage[0].conv.weight.grad.abs().sum() > 0
    # The attention term alone reaches the student but not the adapters (they only map features).
    d.zero_grad(set_to_none=True)
    d.forward_train(*batch)[1]["att"].backward()
    assert student.stages[0][0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.extras["adapters"].parameters())


@pytest.mark.parametrize("afb,align", [("fused", "adapter"), ("fused", "channel_pool")])
def test_fused_terms_and_gradient(tiny_pair, batch, afb, align):
    student, teacher = tiny_pair
    d = AFTKD(student, teacher, afb=afb, align=align)
    _, losses = d.train_step(*batch)
    assert set(losses) == {"ce", "kd", "afb"}
    assert d.weighting.names == ("kd", "afb")
    assert student.stages[0][0].conv.weight.grad.abs().sum() > 0


def test_bad_options_raise(tiny_pair):
    student, teacher = tiny_pair
    for opts, word in [({"weighting": "dwa"}, "weighting"), ({"afb": "sum"}, "afb"),
                       ({"align": "pca"}, "align"), ({"lambdas": {"ce": 1.0}}, "lambdas"),
                       ({"temperature_w": 0.0}, "temperature"), ({"weighting": "iteration", "ema_decay": 1.0},
                                                                 "decay")]:
        with pytest.raises(KDLibError, match=word):
            create_distiller("aftkd", student, teacher, **opts)


# --- checkpoints -------------------------------------------------------------------------------------
def checkpoint_roundtrip(state):
    """As the engine would: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("weighting", ["adaptive", "iteration"])
def test_weighting_state_survives_checkpoint(tiny_pair, weighting, mid_epoch):
    student, teacher = tiny_pair
    opts = {"weighting": weighting, "ema_window": 3}
    a = AFTKD(student, teacher, **opts)
    run_epochs(a, 0, 3)
    if mid_epoch:
        run_steps(a, 3, 0, 1, end=False)  # saved half-way through epoch 3
    state = checkpoint_roundtrip(a.trainable_state_dict())

    def fresh():
        torch.manual_seed(123)  # different initial student: everything must come from the checkpoint
        return AFTKD(tiny_net((4, 8, 16), blocks=1), copy.deepcopy(teacher), **opts)

    def finish(d):  # the rest of epoch 3, then epoch 4
        run_steps(d, 3, 1 if mid_epoch else 0, 2)
        run_steps(d, 4)

    b = fresh()
    b.load_trainable_state_dict(state)
    assert torch.equal(b.weighting.weights, a.weighting.weights)
    finish(a)
    finish(b)
    assert len(a.weight_history) == 5
    assert b.weight_history == a.weight_history
    assert b.raw_loss_history == a.raw_loss_history
    assert torch.equal(b.weighting.weights, a.weighting.weights)
    assert any(abs(v - 1.0) > 1e-4 for v in a.weight_history[-1].values())
    # Control: without the checkpoint the weighting state starts over and the weights differ.
    c = fresh()
    state_without_history = dict(state)
    state_without_history["extras.weighting._extra_state"] = c.weighting.get_extra_state()
    c.load_trainable_state_dict(state_without_history)  # same networks as a, a blank weighting
    finish(c)
    assert c.weight_history[-1] != a.weight_history[-1]


def test_checkpoint_of_other_weighting_is_refused(tiny_pair):
    student, teacher = tiny_pair
    a = AFTKD(student, teacher)
    run_epochs(a, 0, 1)
    b = AFTKD(student, teacher, weighting="fixed")
    with pytest.raises(KDLibError, match="loss weighting"):
        b.load_trainable_state_dict(a.trainable_state_dict())
