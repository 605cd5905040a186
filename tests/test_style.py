"""kdlib.style: sizes for the book's column, colour maps by sign, mask contours, legends and labels off the data."""

from __future__ import annotations

import struct

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet
from matplotlib.text import Text

from kdlib import KDLibError, report, style
from kdlib import explain as E


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def png_width(path) -> int:
    """Pixel width from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


# ---------------------------------------------------------------------------------------------
# sizes and rcParams
# ---------------------------------------------------------------------------------------------


def test_full_width_figure_holds_twice_the_column_and_legible_text(tmp_path):
    assert style.figsize()[0] * style.DPI >= 2 * style.COLUMN_PX >= 1400
    with style.book_style():
        fig, ax = plt.subplots(figsize=style.figsize())
        ax.plot([0, 1], [0, 1])
        assert fig.canvas.get_width_height()[0] >= 1400
        fig.savefig(tmp_path / "f.png")
    assert png_width(tmp_path / "f.png") >= 1400
    sizes = [v for k, v in style.RC.items() if k.endswith(("size", "labelsize", "fontsize")) and k != "figure.figsize"]
    assert min(sizes) == style.MIN_FONT_PT
    # shrunk into the column, the smallest text still reads as 9 pt; a half-width figure is not shrunk as much
    assert style.rendered_pt(style.MIN_FONT_PT) >= 9
    assert style.rendered_pt(9, width_in=style.figsize(0.5)[0]) > style.rendered_pt(9)
    assert style.rendered_pt(9, width_in=7.0, dpi=100) == pytest.approx(9 * 100 / 96)  # 700 px: not shrunk


def test_figsize_and_book_style_restore():
    w, h = style.figsize(0.5, aspect=2.0)
    assert (w, h) == pytest.approx((style.FULL_WIDTH_IN / 2, style.FULL_WIDTH_IN / 4))
    for bad in ({"columns": 0}, {"columns": 1.5}, {"aspect": 0}):
        with pytest.raises(KDLibError):
            style.figsize(**bad)
    before = dict(matplotlib.rcParams)
    with style.book_style():
        assert matplotlib.rcParams["figure.dpi"] == style.DPI
        assert matplotlib.rcParams["figure.constrained_layout.use"] is True
    assert matplotlib.rcParams["figure.dpi"] == before["figure.dpi"]
    assert matplotlib.rcParams["font.size"] == before["font.size"]


# ---------------------------------------------------------------------------------------------
# colour maps
# ---------------------------------------------------------------------------------------------


def test_cmap_for_non_negative_maps_is_sequential_from_zero():
    cam = np.array([[0.0, 0.25], [0.5, 2.0]])
    scale = style.cmap_for(cam)
    assert scale["cmap"] == style.SEQUENTIAL != "jet"
    assert (scale["norm"].vmin, scale["norm"].vmax) == (0.0, 2.0)
    # rounding below zero of a ReLU or a square is still a non-negative map; NaN is ignored
    assert style.cmap_for(np.array([-1e-9, 0.5, np.nan, 1.0]))["cmap"] == style.SEQUENTIAL
    assert style.cmap_for(torch.rand(4, 4), vmax=1.0)["norm"].vmax == 1.0
    assert style.cmap_for(np.zeros(3))["norm"].vmax > 0  # a constant map still gets a usable norm


def test_cmap_for_signed_maps_is_diverging_centred_at_zero():
    diff = np.array([-1.0, 0.0, 3.0])
    scale = style.cmap_for(diff)
    assert scale["cmap"] == style.DIVERGING == "RdBu_r"
    norm = scale["norm"]
    assert float(norm(0.0)) == pytest.approx(0.5)  # white is zero
    assert float(norm(-3.0)) == pytest.approx(0.0) and float(norm(3.0)) == pytest.approx(1.0)  # symmetric
    assert float(norm(-1.0)) == pytest.approx(1 / 3)
    assert style.cmap_for(np.array([0.2, 0.4]), signed=True)["cmap"] == style.DIVERGING
    assert float(style.cmap_for(np.array([0.2, 0.4]), signed=True)["norm"](0.0)) == pytest.approx(0.5)
    with pytest.raises(KDLibError, match="finite"):
        style.cmap_for(np.array([np.nan, np.inf]))


def test_mask_colour_is_in_neither_colour_map():
    samples = np.concatenate([matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3]
                              for name in (style.SEQUENTIAL, style.DIVERGING)])
    colour = np.array(matplotlib.colors.to_rgb(style.MASK_COLOUR))
    assert np.linalg.norm(samples - colour, axis=1).min() > 0.35


def test_draw_mask_contour_outlines_the_mask():
    mask = np.zeros((16, 16), bool)
    mask[4:12, 2:10] = True
    fig, ax = plt.subplots()
    ax.imshow(mask, **style.cmap_for(mask))
    cs = style.draw_mask_contour(ax, torch.as_tensor(mask))
    assert isinstance(cs, ContourSet) and cs in ax.collections
    assert list(cs.levels) == [0.5]
    vertices = np.concatenate([p.vertices for p in cs.get_paths() if len(p.vertices)])
    # the line runs half a pixel outside the mask's pixel centres: columns 2..9, rows 4..11
    assert vertices[:, 0].min() == pytest.approx(1.5) and vertices[:, 0].max() == pytest.approx(9.5)
    assert vertices[:, 1].min() == pytest.approx(3.5) and vertices[:, 1].max() == pytest.approx(11.5)
    with pytest.raises(KDLibError, match="H×W"):
        style.draw_mask_contour(ax, np.zeros((2, 4, 4)))


# ---------------------------------------------------------------------------------------------
# legends and labels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["right", "below"])
def test_legend_outside_covers_no_data_and_stays_in_the_figure(where):
    with style.book_style():
        fig, ax = plt.subplots(figsize=style.figsize())
        for k in range(6):
            ax.plot(np.arange(10), k * np.arange(10), label=f"curve {k}")
        ax.set_xlabel("epoch")
        legend = style.legend_outside(ax, where)
        fig.canvas.draw()
    box, frame = legend.get_window_extent(), ax.get_window_extent()
    assert not box.overlaps(frame)
    assert not box.overlaps(ax.xaxis.get_tightbbox())  # nor the tick labels and the x label
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
    with pytest.raises(KDLibError, match="right"):
        style.legend_outside(ax, "inside")


def crowded_scatter():
    rng = np.random.default_rng(0)
    xs = 70 + rng.normal(0, 0.05, 12)
    ys = 1.0 + rng.normal(0, 0.004, 12)
    labels = ["fitnets", "at", "kd", "vanilla", "afd", "sakd", "aftkd", "sam_kd", "lakd", "at+kd", "fitnets+kd",
              "teacher"]
    return xs, ys, labels


def label_boxes(ax, xs, ys, labels):
    ax.scatter(xs, ys)
    anns = style.label_points(ax, xs, ys, labels)
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    return [Text.get_window_extent(a, renderer) for a in anns]


def test_label_points_leaves_no_two_labels_overlapping():
    xs, ys, labels = crowded_scatter()
    with style.book_style():
        fig, ax = plt.subplots(figsize=style.figsize(0.6))
        # without avoidance the labels do collide: all at the same offset
        naive = [ax.annotate(t, (x, y), xytext=(5, 5), textcoords="offset points") for x, y, t in zip(xs, ys, labels)]
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        nb = [a.get_window_extent(r) for a in naive]
        assert any(nb[i].overlaps(nb[j]) for i in range(len(nb)) for j in range(i))
        for a in naive:
            a.remove()
        boxes = label_boxes(ax, xs, ys, labels)
    assert [a.get_text() for a in ax.texts] == labels
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]
    frame = ax.get_window_extent()
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    # deterministic: the same scatter gets the same labels
    with style.book_style():
        _, ax2 = plt.subplots(figsize=style.figsize(0.6))
        again = label_boxes(ax2, xs, ys, labels)
    assert np.allclose([b.bounds for b in again], [b.bounds for b in boxes])
    with pytest.raises(KDLibError, match="labels"):
        style.label_points(ax, xs, ys, labels[:-1])


# ---------------------------------------------------------------------------------------------
# kdlib's own figures use the style
# ---------------------------------------------------------------------------------------------


def test_plot_explanations_has_a_contour_on_every_map_panel_and_no_jet(tiny_pair, batch, monkeypatch):
    student, teacher = tiny_pair
    x = batch[0][:2].clamp(-2, 2) / 4 + 0.5  # images in [0, 1]
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 3:9, 5:12] = True
    used = []
    real_overlay = E.figures.overlay
    monkeypatch.setattr(E.figures, "overlay", lambda *a, **k: used.append(k.get("cmap")) or real_overlay(*a, **k))
    fig = E.plot_explanations({"teacher": teacher, "student": student}, x, torch.tensor([1, 2]), masks=masks)
    grid = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    panels = [ax for ax in grid if ax.get_visible() and ax.axison]
    assert len(panels) == 2 + 2 * 2 * (1 + len(student.stage_names))  # inputs + (stage maps + CAM) per row
    for ax in panels:
        assert any(isinstance(c, ContourSet) for c in ax.collections), ax.get_title()
    cmaps = {im.get_cmap().name for ax in grid for im in ax.images if im.get_array().ndim == 2}
    cmaps |= {c.get_cmap().name for cax in fig.axes if cax.get_label() == "<colorbar>" for c in cax.collections
              if hasattr(c, "get_cmap")}
    assert cmaps == {style.SEQUENTIAL} and used == [style.SEQUENTIAL] * 4
    assert fig.get_size_inches()[0] * fig.dpi >= 1400
    plain = E.plot_explanations({"student": student}, x, torch.tensor([1, 2]), stages=False)
    assert not any(isinstance(c, ContourSet) for ax in plain.axes for c in ax.collections)  # no mask, no contour


def fake_records(n_seeds=2, epochs=4):
    return [{"config": {"method": "kd"},
             "history": [{"test_acc": 50.0 + e + s, "losses": {"ce": 2.0 / (e + 1), "kd": 1.0 / (e + 1)}}
                         for e in range(epochs)]} for s in range(n_seeds)]


@pytest.mark.parametrize("plot", ["curves", "loss_terms"])
def test_report_plots_are_full_width_with_the_legend_outside(plot):
    if plot == "curves":
        ax = report.plot_curves({"kd": fake_records(), "vanilla": fake_records(1)})
    else:
        ax = report.plot_loss_terms(fake_records())
    fig = ax.figure
    assert fig.get_size_inches()[0] * fig.dpi >= 1400
    fig.canvas.draw()
    assert not ax.get_legend().get_window_extent().overlaps(ax.get_window_extent())
    if plot == "curves":  # each min–max band has its line's colour
        bands = [c for c in ax.collections if len(c.get_paths())]
        assert len(bands) == 1  # the one-seed group has no band
        assert matplotlib.colors.same_color(bands[0].get_facecolor()[0][:3], ax.lines[0].get_color())
    below = report.plot_curves({"kd": fake_records()}, legend="below")
    below.figure.canvas.draw()
    assert below.get_legend().get_window_extent().y1 < below.get_window_extent().y0
    assert report.plot_curves({"kd": fake_records()}, legend=None).get_legend() is None
