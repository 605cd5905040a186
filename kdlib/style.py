"""The book's figure style: sizes for its column, legible text, honest colour maps, clean labels.

The Jupyter Book theme shows a page's content in a column about :data:`COLUMN_PX` CSS pixels wide
and shrinks wider images to fit it. A full-width figure is :data:`FULL_WIDTH_IN` inches wide and is
drawn at :data:`DPI`, so its PNG holds at least twice the column's pixels (sharp on high-density
screens) and a font of :data:`MIN_FONT_PT` points still reads as about 9 pt once shrunk
(:func:`rendered_pt`). Every figure of the book follows this:

- :func:`book_style` (a context manager) and :func:`apply` set the rcParams (:data:`RC`);
- :func:`figsize` gives ``(width, height)`` in inches for a share of the column;
- :func:`cmap_for` picks a sequential map for values that cannot be negative and a diverging one,
  centred at 0, for signed values (never ``jet``, whose bright bands invent edges);
- :func:`draw_mask_contour` outlines an object mask in a colour neither map contains;
- :func:`legend_outside` puts a legend where it covers no curve;
- :func:`label_points` labels a scatter without two labels overlapping.

``matplotlib.pyplot`` is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.colors import CenteredNorm, Normalize

from kdlib import KDLibError

#: Width of the book theme's content column in CSS pixels (sphinx-book-theme at desktop widths).
COLUMN_PX = 700
#: Width in inches of a figure that spans the column.
FULL_WIDTH_IN = 7.2
#: Dots per inch of every figure, on screen (inline backend) and saved: 7.2 in × 200 = 1440 px ≥ 2 × 700.
DPI = 200
#: The smallest font in a figure, in points of the figure.
MIN_FONT_PT = 9
#: Colour map of values that cannot be negative (attention maps, CAMs, energies).
SEQUENTIAL = "magma"
#: Colour map of signed values (differences), always with a norm centred at 0.
DIVERGING = "RdBu_r"
#: The mask contour: green is in neither map; a dark halo keeps it visible on light and dark pixels alike.
MASK_COLOUR = "#00e000"
MASK_HALO = "black"

#: rcParams of the book's figures (font sizes in points; none below MIN_FONT_PT).
RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.figsize": (FULL_WIDTH_IN, FULL_WIDTH_IN / 1.6),
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": MIN_FONT_PT,
    "ytick.labelsize": MIN_FONT_PT,
    "legend.fontsize": MIN_FONT_PT,
    "legend.title_fontsize": MIN_FONT_PT,
    "figure.titlesize": 11,
    "legend.frameon": True,
    "legend.framealpha": 0.9,
    "legend.edgecolor": "0.8",
    "image.cmap": SEQUENTIAL,
    "lines.linewidth": 1.5,
}


# --------------------------------------------------------------------------------------------
# rcParams and sizes
# --------------------------------------------------------------------------------------------


@contextmanager
def book_style() -> Iterator[None]:
    """The book's rcParams inside a ``with`` block; the caller's are restored afterwards."""
    with matplotlib.rc_context(RC):
        yield


def apply() -> None:
    """Set the book's rcParams for the rest of the session (a notebook's setup cell calls it)."""
    matplotlib.rcParams.update(RC)


def figsize(columns: float = 1.0, aspect: float = 1.6) -> tuple[float, float]:
    """``(width, height)`` in inches of a figure spanning ``columns`` of the column; ``aspect`` = width / height."""
    if not 0 < columns <= 1:
        raise KDLibError(f"columns is the share of the column a figure spans, in (0, 1], got {columns}")
    if not aspect > 0:
        raise KDLibError(f"aspect (width / height) must be positive, got {aspect}")
    width = FULL_WIDTH_IN * columns
    return width, width / aspect


def rendered_pt(font_pt: float, width_in: float = FULL_WIDTH_IN, dpi: float = DPI) -> float:
    """How large a ``font_pt`` font of a figure ``width_in`` wide at ``dpi`` looks on the page, in CSS points.

    A browser shows an image one CSS pixel per image pixel, shrunk to the column when wider
    (``max-width: 100%``); 96 CSS pixels make an inch, 72 points an inch.
    """
    shrink = min(1.0, COLUMN_PX / (width_in * dpi))
    return font_pt / 72 * dpi * shrink * 72 / 96


# --------------------------------------------------------------------------------------------
# Colour maps and the mask contour
# --------------------------------------------------------------------------------------------


def cmap_for(values, *, vmin: float | None = None, vmax: float | None = None, signed: bool | None = None,
             atol: float = 1e-6) -> dict:
    """``{"cmap", "norm"}`` for ``imshow(x, **cmap_for(x))``: sequential if ``values`` ≥ 0, else diverging.

    Values no lower than ``-atol × max|values|`` count as non-negative (rounding of a ReLU or a
    square). Non-negative: :data:`SEQUENTIAL` from ``vmin`` (default 0, the floor such maps share)
    to ``vmax`` (default the maximum). Signed: :data:`DIVERGING` with a norm centred at 0 and
    symmetric, ±``vmax`` (default ``max|values|``), so equal colours mean equal magnitudes and white
    means zero. ``signed`` overrides the test (a difference map that happens to be positive).
    """
    arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=float)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        raise KDLibError("cmap_for needs at least one finite value")
    peak = float(np.abs(finite).max())
    if signed is None:
        signed = float(finite.min()) < -atol * max(peak, np.finfo(float).tiny)
    if signed:
        half = peak if vmax is None else float(vmax)
        return {"cmap": DIVERGING, "norm": CenteredNorm(vcenter=0.0, halfrange=half if half > 0 else 1.0)}
    lo = 0.0 if vmin is None else float(vmin)
    hi = float(finite.max()) if vmax is None else float(vmax)
    return {"cmap": SEQUENTIAL, "norm": Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)}


def draw_mask_contour(ax, mask, *, color: str = MASK_COLOUR, linewidth: float = 1.2):
    """One contour line at 0.5 around an object mask (H×W, bool or 0/1) on ``ax``; returns the ContourSet.

    The line is green with a dark halo, visible over both :data:`SEQUENTIAL` and :data:`DIVERGING`.
    """
    arr = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask, dtype=float)
    if arr.ndim != 2:
        raise KDLibError(f"a mask contour needs one H×W mask, got shape {arr.shape}")
    contours = ax.contour(arr, levels=[0.5], colors=[color], linewidths=linewidth)
    contours.set_path_effects([patheffects.Stroke(linewidth=linewidth + 1.6, foreground=MASK_HALO),
                               patheffects.Normal()])
    return contours


# --------------------------------------------------------------------------------------------
# Legends and labels
# --------------------------------------------------------------------------------------------


def legend_outside(ax, where: str = "right", **kwargs):
    """A legend outside the axes (``"right"``: beside its top; ``"below"``: under the x label), so it covers no data.

    Constrained layout makes room for it. ``kwargs`` go to ``ax.legend`` (``title``, ``ncols``, ...).
    """
    if where == "right":
        kwargs = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0} | kwargs
    elif where == "below":
        from matplotlib.transforms import offset_copy

        n = max(1, len(ax.get_legend_handles_labels()[1]))
        rows = -(-n // 4)  # at most four entries a row, rows as even as they go
        below = offset_copy(ax.transAxes, fig=ax.figure, y=-_x_decoration_pt(), units="points")
        kwargs = {"loc": "upper center", "bbox_to_anchor": (0.5, 0.0), "bbox_transform": below,
                  "borderaxespad": 0.0, "ncols": -(-n // rows)} | kwargs
    else:
        raise KDLibError(f"legend_outside: where is 'right' or 'below', got {where!r}")
    return ax.legend(**kwargs)


def _x_decoration_pt() -> float:
    """Height in points of what sits under an axes: ticks, tick labels, the x label, and a gap."""
    rc = matplotlib.rcParams
    tick_font = matplotlib.font_manager.FontProperties(size=rc["xtick.labelsize"]).get_size_in_points()
    label_font = matplotlib.font_manager.FontProperties(size=rc["axes.labelsize"]).get_size_in_points()
    return rc["xtick.major.size"] + rc["xtick.major.pad"] + 1.2 * tick_font + rc["axes.labelpad"] + 1.2 * label_font + 4


#: Directions tried around a point, in order: upper right first (where a reader looks for a label).
_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (0, 1), (-1, 0), (0, -1))


def label_points(ax, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], *,
                 radii_pt: Sequence[float] = (5, 11, 18, 26, 36, 48), **text_kw) -> list:
    """Label scatter points so that no two labels (nor a label and a point) overlap; returns the annotations.

    Deterministic: points are labelled in the order given; for each, offsets at growing
    ``radii_pt`` in eight directions are tried, and the first whose text box (in display
    coordinates) is inside the axes and clear of every placed label and every point is kept; a
    label moved past the first ring gets a thin leader line. If nothing is clear, the candidate
    with the least overlap is kept. The figure is drawn first, so the boxes are those of the final
    layout; the labels are kept out of the layout so that placing them does not move the axes.
    """
    if not len(xs) == len(ys) == len(labels):
        raise KDLibError(f"label_points: {len(xs)} xs, {len(ys)} ys and {len(labels)} labels")
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 1.5 * fig.dpi / 72  # 1.5 pt of clearance around every box
    points = ax.transData.transform(np.column_stack([xs, ys]).astype(float))
    obstacles = [_point_box(p, 3.0 * fig.dpi / 72) for p in points]
    placed = []
    for x, y, label in zip(xs, ys, labels, strict=True):
        ann, box = _place_label(ax, (x, y), label, radii_pt, text_kw, obstacles, frame, pad)
        placed.append(ann)
        obstacles.append(box)
    return placed


def _place_label(ax, xy, label: str, radii_pt, text_kw: dict, obstacles: list, frame, pad: float):
    """``(annotation, its text box)``: the first candidate with nothing in the way, else the least overlapping."""
    renderer = ax.figure.canvas.get_renderer()
    best = None
    for radius in radii_pt:
        for dx, dy in _DIRECTIONS:
            ann = _annotation(ax, *xy, label, (dx * radius, dy * radius), radius > radii_pt[0], text_kw)
            box = _text_box(ann, renderer)
            cost = _overlap(box, obstacles, pad) + _outside(box, frame)
            if best is not None and cost >= best[0]:
                ann.remove()
                continue
            if best is not None:
                best[1].remove()
            best = (cost, ann, box)
            if cost == 0:
                return ann, box
    return best[1], best[2]


def _annotation(ax, x, y, label, offset, leader: bool, text_kw: dict):
    ha = "left" if offset[0] > 0 else "right" if offset[0] < 0 else "center"
    va = "bottom" if offset[1] > 0 else "top" if offset[1] < 0 else "center"
    kw = {"fontsize": matplotlib.rcParams["legend.fontsize"], "ha": ha, "va": va} | text_kw
    arrow = {"arrowstyle": "-", "lw": 0.6, "color": "0.4", "shrinkA": 0, "shrinkB": 2} if leader else None
    ann = ax.annotate(label, (x, y), xytext=offset, textcoords="offset points", arrowprops=arrow, **kw)
    ann.set_in_layout(False)
    return ann


def _text_box(ann, renderer):
    """The box of an annotation's text alone (its leader line may and must reach the point)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _point_box(p, half: float):
    from matplotlib.transforms import Bbox

    return Bbox.from_extents(p[0] - half, p[1] - half, p[0] + half, p[1] + half)


def _overlap(box, others, pad: float) -> float:
    """Total area by which ``box`` (grown by ``pad``) overlaps ``others``, in display pixels²."""
    total = 0.0
    for o in others:
        w = min(box.x1 + pad, o.x1) - max(box.x0 - pad, o.x0)
        h = min(box.y1 + pad, o.y1) - max(box.y0 - pad, o.y0)
        if w > 0 and h > 0:
            total += w * h
    return total


def _outside(box, frame) -> float:
    """Area of ``box`` outside the axes' frame (a label there would be clipped or spill into a neighbour)."""
    w = min(box.x1, frame.x1) - max(box.x0, frame.x0)
    h = min(box.y1, frame.y1) - max(box.y0, frame.y0)
    inside = max(w, 0.0) * max(h, 0.0)
    return box.width * box.height - inside
