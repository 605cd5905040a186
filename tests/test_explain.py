"""kdlib.explain: Grad-CAM++ plumbing, attention maps, localisation metrics, table and figure.

``pytorch_grad_cam`` takes seconds to import; it is imported once, here, so that every test after
the first pays nothing.
"""

from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
import pytorch_grad_cam  # noqa: F401  (slow import, once per module)
import torch
import torch.nn.functional as F
from conftest import tiny_net
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdlib import KDLibError
from kdlib import explain as E
from kdlib.models.base import ClassifierHead, StagedNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine two spinning
    OpenMP threads make these tests 10–20× slower; the setting is restored for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# helpers: models whose evidence sits in one known region, and independent re-implementations
# ---------------------------------------------------------------------------------------------


class KeepTopLeft(nn.Module):
    """Zero every pixel outside the top-left quadrant: only that region can matter."""

    def forward(self, x):
        h, w = x.shape[-2:]
        keep = torch.zeros_like(x)
        keep[..., : h // 2, : w // 2] = 1
        return x * keep


def pointwise_quadrant_net(seed: int = 0) -> StagedNet:
    """1×1 convolutions without bias, no downsampling: activations outside the quadrant are exactly 0."""
    torch.manual_seed(seed)
    stem = nn.Sequential(KeepTopLeft(), nn.Conv2d(3, 8, 1, bias=False), nn.ReLU())
    stages = [nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.ReLU()),
              nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.ReLU())]
    return StagedNet(stem, stages, ClassifierHead(16, 10)).eval()


def conv_quadrant_net(seed: int = 0) -> StagedNet:
    """The conftest tiny ResNet behind a quadrant-keeping stem: 3×3 convs blur the region a little."""
    torch.manual_seed(seed)
    net = tiny_net((4, 8, 16), blocks=1)
    net.stem = nn.Sequential(KeepTopLeft(), *net.stem)
    return net.eval()


def quadrant_masks(b: int, size: int) -> torch.Tensor:
    m = torch.zeros(b, size, size, dtype=torch.bool)
    m[:, : size // 2, : size // 2] = True
    return m


def minmax(t: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    lo = t.flatten(1).min(1).values[:, None, None]
    hi = t.flatten(1).max(1).values[:, None, None]
    return (t - lo) / (hi - lo + eps) if eps else (t - lo) / (hi - lo).clamp_min(1e-12)


def reference_cam(model, x, layer_name, method):
    """Grad-CAM / Grad-CAM++ written out with autograd (Chattopadhyay et al. 2018, eq. 19)."""
    model.eval()
    feats = {}
    handle = dict(model.named_modules())[layer_name].register_forward_hook(
        lambda _m, _i, out: feats.__setitem__("a", out))
    with torch.enable_grad():  # the input requires grad, so a frozen model still has a graph
        logits = model(x.clone().requires_grad_(True))
    handle.remove()
    a = feats["a"]
    score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    g = torch.autograd.grad(score, a)[0].detach()
    a = a.detach()
    if method == "gradcam":
        w = g.mean(dim=(2, 3))
    else:
        alpha = g**2 / (2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (g.clamp_min(0) * alpha).sum(dim=(2, 3))
    cam = (w[:, :, None, None] * a).sum(1).clamp_min(0)
    cam = minmax(cam, eps=1e-7)
    cam = F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return minmax(cam.clamp_min(0), eps=1e-7)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# ---------------------------------------------------------------------------------------------
# Grad-CAM++ through grad-cam
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gradcam++", "gradcam"])
def test_cam_matches_written_out_reference(tiny_pair, batch, method):
    _, teacher = tiny_pair
    x, _ = batch
    maps = E.cam_maps(teacher, x, method=method)
    assert maps.shape == (4, 16, 16) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(4), atol=1e-5)  # min-max scaled
    ref = reference_cam(teacher, x, teacher.last_stage_name, method)
    assert torch.allclose(maps, ref, atol=1e-4), (maps - ref).abs().max()
    # batching does not change the result
    assert torch.allclose(E.cam_maps(teacher, x, method=method, batch_size=3), maps, atol=1e-6)


def test_cam_restores_train_eval_state_of_every_submodule(tiny_pair, batch):
    student, teacher = tiny_pair
    x, _ = batch
    student.train()
    student.stages[0].eval()  # a mixed state must survive too
    modes = {n: m.training for n, m in student.named_modules()}
    stats = {n: b.clone() for n, b in student.named_buffers()}
    E.cam_maps(student, x)
    assert {n: m.training for n, m in student.named_modules()} == modes
    assert student.training and not student.stages[0].training
    # the CAM ran in eval mode: BatchNorm running statistics were not updated
    assert all(torch.equal(stats[n], b) for n, b in student.named_buffers())

    teacher.eval()
    E.cam_maps(teacher, x)
    assert not any(m.training for m in teacher.modules())


def test_cam_works_on_frozen_model_under_no_grad(tiny_pair, batch):
    student, teacher = tiny_pair
    x, _ = batch
    teacher.requires_grad_(False)
    with torch.no_grad():
        maps = E.cam_maps(teacher, x)
        assert not torch.is_grad_enabled()
    assert maps.shape == (4, 16, 16) and maps.max() > 0.99
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.allclose(maps, reference_cam(teacher, x, teacher.last_stage_name, "gradcam++"), atol=1e-4)
    with torch.inference_mode():
        assert torch.allclose(E.cam_maps(teacher, x), maps, atol=1e-6)

    # a model being trained keeps requires_grad and its accumulated gradients untouched
    sentinels = {n: torch.full_like(p, 0.5) for n, p in student.named_parameters()}
    for n, p in student.named_parameters():
        p.grad = sentinels[n]
    E.cam_maps(student, x)
    for n, p in student.named_parameters():
        assert p.requires_grad and p.grad is sentinels[n] and torch.all(p.grad == 0.5)


def test_cam_leaves_no_hooks_even_on_error(tiny_pair, batch):
    _, teacher = tiny_pair
    x, _ = batch
    E.cam_maps(teacher, x)
    assert no_hooks_left(teacher)
    with pytest.raises(KDLibError, match="out of range"):
        E.cam_maps(teacher, x, targets=[0, 1, 2, 99])  # grad-cam would swallow this IndexError
    assert no_hooks_left(teacher)


def test_cam_targets_and_layers(tiny_pair, batch):
    _, teacher = tiny_pair
    x, _ = batch
    pred = E.predictions(teacher, x)
    default = E.cam_maps(teacher, x)
    assert torch.allclose(E.cam_maps(teacher, x, targets=pred), default, atol=1e-6)
    assert torch.allclose(E.cam_maps(teacher, x, targets=pred.tolist()), default, atol=1e-6)
    other = (pred + 1) % 10
    assert not torch.allclose(E.cam_maps(teacher, x, targets=other), default, atol=1e-3)
    mid = E.cam_maps(teacher, x, target_layer="stages.1")
    assert mid.shape == (4, 16, 16) and not torch.allclose(mid, default, atol=1e-3)
    assert torch.allclose(E.cam_maps(teacher, x, target_layer=teacher.stages[-1]), default, atol=1e-6)
    with pytest.raises(KDLibError, match="no module named"):
        E.cam_maps(teacher, x, target_layer="stages.9")
    with pytest.raises(KDLibError, match="unknown CAM method"):
        E.cam_maps(teacher, x, method="scorecam")
    with pytest.raises(KDLibError, match="3 class indices for 4 images"):
        E.cam_maps(teacher, x, targets=[0, 1, 2])
    with pytest.raises(KDLibError, match="B×C×H×W"):
        E.cam_maps(teacher, x[0])


@pytest.mark.parametrize("method", ["gradcam++", "gradcam"])
def test_cam_energy_lies_where_the_evidence_is(method):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    masks = quadrant_masks(4, 16)
    assert torch.allclose(E.chance_level(masks), torch.full((4,), 0.25))

    # exact case: nothing outside the quadrant can be non-zero at any layer
    net = pointwise_quadrant_net()
    cam = E.cam_maps(net, x, method=method)
    assert torch.all(E.energy_in_mask(cam, masks) > 0.999)
    assert torch.all(E.pointing_game(cam, masks) == 1)
    att = E.attention_maps(net, x)[net.last_stage_name]
    assert torch.all(E.energy_in_mask(att, masks) > 0.999)

    # realistic case: 3×3 convs and stride 2 blur the region, but the mass stays well above chance
    net = conv_quadrant_net()
    x32 = torch.randn(4, 3, 32, 32, generator=g)
    share = E.energy_in_mask(E.cam_maps(net, x32, method=method), quadrant_masks(4, 32))
    assert share.mean() > 0.6, share


# ---------------------------------------------------------------------------------------------
# attention maps
# ---------------------------------------------------------------------------------------------


def test_attention_maps_match_definition_and_restore_state(tiny_pair, batch):
    student, _ = tiny_pair
    x, _ = batch
    student.train()
    stats = {n: b.clone() for n, b in student.named_buffers()}
    maps = E.attention_maps(student, x, batch_size=3)
    assert list(maps) == student.stage_names
    assert student.training and all(torch.equal(stats[n], b) for n, b in student.named_buffers())

    # independent: hooks by hand, eval forward, mean_c F², bilinear upsampling, min-max
    student.eval()
    feats = {}
    handles = [student.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: feats.__setitem__(n, out)) for n in student.stage_names]
    with torch.no_grad():
        student(x)
    for h in handles:
        h.remove()
    for n, m in maps.items():
        assert m.shape == (4, 16, 16) and m.min() >= 0 and m.max() <= 1 + 1e-6
        energy = (feats[n] ** 2).mean(1, keepdim=True)
        ref = minmax(F.interpolate(energy, size=(16, 16), mode="bilinear", align_corners=False)[:, 0])
        assert torch.allclose(m, ref, atol=1e-6)
    assert list(E.attention_maps(student, x, names=["stages.0.0"])) == ["stages.0.0"]


# ---------------------------------------------------------------------------------------------
# metrics on hand-made maps
# ---------------------------------------------------------------------------------------------


def test_energy_in_mask_known_values_and_loop_reference():
    mask = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)
    assert E.energy_in_mask(torch.tensor([[[1.0, 3.0], [2.0, 4.0]]]), mask).item() == pytest.approx(0.5)
    inside = torch.tensor([[[0.7, 0.0], [0.0, 0.2]]])
    assert E.energy_in_mask(inside, mask).item() == pytest.approx(1.0)
    masks = quadrant_masks(3, 8)
    masks[2, 6:, 6:] = True  # area 20/64
    uniform = torch.full((3, 8, 8), 0.3)
    assert torch.allclose(E.energy_in_mask(uniform, masks), E.chance_level(masks))
    assert torch.allclose(E.chance_level(masks), torch.tensor([0.25, 0.25, 20 / 64]))
    assert torch.allclose(E.energy_in_mask(torch.zeros(3, 8, 8), masks), E.chance_level(masks))

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 6, 7, generator=g)
    rmasks = torch.rand(5, 6, 7, generator=g) > 0.6
    got = E.energy_in_mask(maps, rmasks.float())  # float masks are thresholded at 0.5
    for b in range(5):
        num = sum(maps[b, i, j].item() for i in range(6) for j in range(7) if rmasks[b, i, j])
        assert got[b].item() == pytest.approx(num / maps[b].sum().item(), rel=1e-5)
    assert torch.allclose(got, torch.tensor([0.3397, 0.4903, 0.3531, 0.5418, 0.4870]), atol=1e-4)


def test_pointing_game_constructed_cases():
    masks = quadrant_masks(4, 4)
    maps = torch.zeros(4, 4, 4)
    maps[0, 1, 1] = 1.0  # peak inside -> hit
    maps[1, 3, 3] = 1.0  # peak outside -> miss
    maps[2] = 0.5  # flat map points nowhere -> miss
    maps[3, 0, 3], maps[3, 0, 0] = 0.9, 0.8  # highest value outside, second inside -> miss
    assert E.pointing_game(maps, masks).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert E.pointing_game(maps[:1, None], masks[:1, None]).tolist() == [1.0]  # B×1×H×W accepted


def test_map_agreement_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 10, 10, generator=g)
    same = E.map_agreement(a, a.clone())
    assert torch.allclose(same["cosine"], torch.ones(3)) and torch.allclose(same["iou"], torch.ones(3))

    left, right = torch.zeros(1, 10, 10), torch.zeros(1, 10, 10)
    left[0, :, :2], right[0, :, 8:] = 1.0, 1.0  # top 20 % regions are disjoint
    left = left + 0.01 * torch.rand(1, 10, 10, generator=g)  # small noise so no ties decide the top set
    right = right + 0.01 * torch.rand(1, 10, 10, generator=g)
    disjoint = E.map_agreement(left, right, top_k=0.2)
    assert disjoint["iou"].item() == 0.0

    x = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    got = E.map_agreement(x, y, top_k=0.5)
    assert got["cosine"].item() == pytest.approx(1 / math.sqrt(2))
    # top-2 of x: pixel 0 plus one tie among zeros; top-2 of y: pixels 0 and 1
    top_x = set(torch.tensor([1.0, 0, 0, 0]).topk(2).indices.tolist())
    assert got["iou"].item() == pytest.approx(len(top_x & {0, 1}) / len(top_x | {0, 1}))

    # different sizes: the larger map is average-pooled to the smaller
    big = a.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.allclose(E.map_agreement(big, a)["cosine"], torch.ones(3))

    with pytest.raises(KDLibError, match="top_k"):
        E.map_agreement(a, a, top_k=0)


def test_metrics_reject_bad_input():
    with pytest.raises(KDLibError, match="non-negative"):
        E.energy_in_mask(-torch.ones(1, 4, 4), quadrant_masks(1, 4))
    with pytest.raises(KDLibError, match="differ in shape"):
        E.pointing_game(torch.ones(1, 4, 4), quadrant_masks(1, 8))
    with pytest.raises(KDLibError, match="B×H×W"):
        E.chance_level(torch.ones(4, 4))


# ---------------------------------------------------------------------------------------------
# over a split, table, overlay and figure
# ---------------------------------------------------------------------------------------------


def test_where_models_look_over_batches(tiny_pair):
    student, _ = tiny_pair
    quad = pointwise_quadrant_net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    masks = quadrant_masks(6, 16)
    models = {"teacher": quad, "copy": quad, "student": student}
    student.train()

    rows = E.where_models_look(models, TensorDataset(x, y), masks, teacher_name="teacher", batch_size=4)
    by = {r["model"]: r for r in rows}
    assert [r["model"] for r in rows] == ["teacher", "copy", "student"] and student.training
    assert all(r["images"] == 6 and r["chance"] == pytest.approx(0.25) for r in rows)
    for name in ("teacher", "copy"):
        for col in ("cam_energy", "att_energy", "cam_pointing", "att_pointing"):
            assert by[name][col] == pytest.approx(1.0, abs=1e-3)
    assert "cam_cosine" not in by["teacher"]
    for col in ("cam_cosine", "cam_iou", "att_cosine", "att_iou"):
        assert by["copy"][col] == pytest.approx(1.0, abs=1e-5)
        assert 0 <= by["student"][col] <= 1
    assert by["student"]["top1"] == pytest.approx((E.predictions(student, x) == y).float().mean().item())
    # the student's maps are those of cam_maps/attention_maps on the true class, averaged
    cam = E.cam_maps(student, x, targets=y)
    assert by["student"]["cam_energy"] == pytest.approx(E.energy_in_mask(cam, masks).mean().item(), abs=1e-5)

    # the same split as (x, y, mask) triples, with max_images cutting a batch short
    triples = DataLoader(TensorDataset(x, y, masks), batch_size=4)
    short = E.where_models_look(models, triples, teacher_name="teacher", max_images=5)
    assert all(r["images"] == 5 for r in short)
    assert short[1]["cam_iou"] == pytest.approx(1.0)

    # no masks at all: accuracy and agreement only
    plain = E.where_models_look({"teacher": quad, "student": student}, TensorDataset(x, y),
                                teacher_name="teacher")
    assert "cam_energy" not in plain[1] and "att_iou" in plain[1]

    with pytest.raises(KDLibError, match="unshuffled"):
        E.where_models_look(models, DataLoader(TensorDataset(x, y), shuffle=True), masks)
    with pytest.raises(KDLibError, match="teacher_name"):
        E.where_models_look(models, TensorDataset(x, y), masks, teacher_name="nobody")


def test_format_table_markdown():
    rows = [{"model": "teacher", "images": 6, "top1": 0.5},
            {"model": "a|b", "images": 6, "top1": 1 / 3, "cam_iou": 0.25}]
    assert E.format_table(rows, digits=2) == (
        "| model | images | top1 | cam_iou |\n"
        "|---|---|---|---|\n"
        "| teacher | 6 | 0.50 | — |\n"
        "| a\\|b | 6 | 0.33 | 0.25 |"
    )
    with pytest.raises(KDLibError):
        E.format_table([])


def test_denormalize_and_overlay():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    normed = (rgb - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(E.to_rgb01(normed, (mean, std)), rgb, atol=1e-6)
    assert torch.allclose(E.to_rgb01(normed, E.denormalizer(mean, std)), rgb, atol=1e-6)
    with pytest.raises(KDLibError, match="denormalize"):
        E.to_rgb01(normed)

    cam = torch.zeros(8, 8)
    cam[:, 4:] = 1.0
    out = E.overlay(torch.zeros(3, 8, 8), cam)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    # JET: 0 is blue, 1 is red (RGB order)
    assert out[0, 0, 2] > out[0, 0, 0] and out[0, 7, 0] > out[0, 7, 2]
    assert np.array_equal(E.overlay(np.zeros((8, 8, 3), np.float32), cam.numpy()), out)
    with pytest.raises(KDLibError, match="de-normalise"):
        E.overlay(torch.full((3, 8, 8), 2.0), cam)


def test_plot_explanations_figure_and_png(tiny_pair, batch, tmp_path):
    student, teacher = tiny_pair
    x, _ = batch
    x = x[:2]
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = ((x.clamp(-2, 2) / 4 + 0.5) - 0.5) / 0.25  # a normalised image whose de-normalisation is in [0, 1]
    pred = E.predictions(student, x)
    labels = torch.stack([pred[0], (pred[1] + 1) % 10])  # student right on image 0, wrong on image 1
    classes = [f"c{i}" for i in range(10)]
    path = tmp_path / "explain.png"
    fig = E.plot_explanations({"teacher": teacher, "student": student}, x, labels, classes,
                              denormalize=(mean, std), masks=quadrant_masks(2, 16), save=path)
    try:
        assert isinstance(fig, matplotlib.figure.Figure)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        n_cols = 2 + len(student.stage_names)
        grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        assert len(grid) == 2 * 2 * n_cols and len(fig.axes) == len(grid) + 1  # one colour bar
        student_cam = [grid[(i * 2 + 1) * n_cols + n_cols - 1] for i in range(2)]
        assert student_cam[0].get_title() == f"student: c{pred[0]}"
        assert matplotlib.colors.same_color(student_cam[0].title.get_color(), "green")
        assert matplotlib.colors.same_color(student_cam[1].title.get_color(), "red")
        assert grid[0].get_title() == f"input: c{labels[0]}" and grid[0].collections  # mask contour
    finally:
        plt.close(fig)
    fig = E.plot_explanations({"student": student}, x, labels, denormalize=(mean, std), stages=False,
                              method="gradcam")
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) == 2 * 2
    plt.close(fig)
