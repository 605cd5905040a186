"""``shapes``: an embedded, procedurally generated 32×32 dataset whose labels come with object masks.

Why it exists: the book must run offline on a laptop CPU, and its attention chapters need ground
truth for "where does the model look". Every image shows one main object whose class is the label,
and the binary mask of that object is returned with it.

The recipe is the calibrated one from the project's CALIBRATION notes:

- 10 classes (circle, square, triangle, plus, ring, star, diamond, hexagon, L, T). None is the
  mirror image of another, so horizontal flips are label-safe; they form confusable groups
  (:data:`CONFUSABLE_GROUPS`).
- Shapes are signed distance functions (SDFs) evaluated on a 2× supersampled grid; the coverage
  of each sub-pixel is ``clamp(0.5 - distance)`` and 2×2 averaging gives the alpha that is
  composited over the background (antialiased edges, no per-pixel Python).
- Main object: radius U[9, 13] px, centre in [0.8 r, 32 − 0.8 r], any rotation, aspect jitter
  exp(U(−0.1, 0.1)), a colour resampled until it differs from the background by at least 0.4
  (RGB distance / √3), light linear shading; drawn last. Mask = its alpha > 0.5.
- Background: two close colours (c2 = c1 + 0.3 (U³ − c1)) blended by smooth noise, a sine
  grating or a checkerboard, one third each.
- 0–1 distractor of another class at 0.3–0.5× the main radius, drawn first (it may be hidden).
- Gaussian pixel noise σ ~ U[0.02, 0.05]. Each image reads its 3·32·32 standard-normal values
  at a random offset of one fixed bank of 2²⁰ draws: every pixel's noise is N(0, σ²) and
  independent of the other pixels of its image, and two images share a noise pattern only if
  their offsets coincide (about one pair in a million). Fresh draws from torch's CPU generator
  took a fifth of the generation time.

``difficulty`` (1.0 = the recipe) scales the nuisance: distractor probability 0.5·d (capped at
1), background contrast 0.3·d, noise σ·d, aspect jitter 0.1·d, and the colour-contrast threshold
0.6 − 0.2·d (clamped to [0.1, 0.6]). ``difficulty=0`` gives flat backgrounds, no distractors and
no noise.

Determinism: images are generated in fixed-size chunks of :data:`CHUNK_SIZE`; the generator of a
chunk is seeded from ``(seed, split, chunk id)`` and every chunk is always rendered whole, so image
``i`` depends only on ``(seed, split, i)`` (and on the dataset parameters), whatever set it is
generated in. Train and test are different ``split`` streams. Label ``i % num_classes`` is
assigned to index ``i``, so every prefix of the dataset is class-balanced (loaders shuffle).

Speed: every step is a tensor operation over many images (no per-pixel or per-image Python).
Object coordinates are separable (``u = a_x + a_y``), so only the SDF itself touches every
sub-pixel; SDF passes run on class-sorted sub-batches and compositing on blocks small enough for
the L2 cache. Per-pixel work uses only exactly rounded float operations (+, ×, √, min, max, abs,
floor); sines and exponentials touch per-image rows only. ``benchmarks/bench_data.py`` measures
the throughput on one core (the target is 20,000 images/s).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from kdlib import KDLibError
from kdlib.data.seeds import generator_for

SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "plus", "ring", "star", "diamond", "hexagon", "L", "T",
)
CONFUSABLE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("circle", "hexagon", "ring"),
    ("square", "diamond"),
    ("plus", "T", "L"),
    ("star", "triangle"),
)
BACKGROUNDS: tuple[str, ...] = ("smooth noise", "sine grating", "checkerboard")

IMAGE_SIZE = 32
SUPERSAMPLE = 2  # fixed: the 2×2 average in _coverage adds exactly four sub-pixels
CHUNK_SIZE = 256  # part of the dataset's definition: changing it changes every image
DATASET_VERSION = 1  # bump when the recipe changes, so old and new images never share a seed stream
SPLITS = ("train", "val", "test")  # three independent streams; "val" is for choosing settings

_COLOUR_CANDIDATES = 8  # colour draws per object; the first one with enough contrast is kept
# Farthest point of any shape from its centre, in radii (the T's corners, √2·0.75), and how far
# past the outline (px) the antialiasing ramp can reach where the half-plane SDFs underestimate.
_MAX_EXTENT = 1.07
_RAMP_MARGIN = 1.0
_SUB_BATCH = 32  # objects per SDF pass: 4 work tensors of 32×2×2×32×32 floats (2 MB) fit in L2
_COMPOSITE_BLOCK = 64  # images per compositing step (3 channels × 64 images = 768 KB)
_PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE
_NOISE_BANK = 2**20  # standard-normal values the pixel noise is read from
_NOISE_GRID = 5  # the smooth-noise background interpolates a 5×5 grid of uniforms


# --------------------------------------------------------------------------------------------
# Signed distance functions of the ten shapes.
# ``u, v`` are object-frame coordinates in units of the object's radius (the frame is already
# rotated and aspect-jittered); ``w, z`` are scratch tensors of the same shape. Each function
# works in place (no allocation: these run on every sub-pixel, and fresh large tensors cost page
# faults) and returns the one of its four arguments that holds the distance, negative inside.
# Polygons use the maximum of their edge half-planes: exact inside and along the edges, slightly
# short of the true distance near outer corners, which only affects the antialiasing ramp there.
# --------------------------------------------------------------------------------------------

_COS30 = math.sqrt(3) / 2


def _length_into(w: Tensor, u: Tensor, v: Tensor) -> Tensor:
    return torch.mul(u, u, out=w).addcmul_(v, v).sqrt_()


def sdf_circle(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Disc of radius 0.8 (area 2.0 r²)."""
    return _length_into(w, u, v).sub_(0.8)


def sdf_square(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Square of half-side 0.7 (its corners reach 0.99)."""
    return torch.maximum(u.abs_(), v.abs_(), out=u).sub_(0.7)


def sdf_triangle(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Equilateral triangle with circumradius 1 (apothem 0.5), apex on +v."""
    u.abs_().mul_(_COS30).add_(v, alpha=0.5)  # the two slanted edges
    return torch.maximum(u, v.neg_(), out=u).sub_(0.5)  # and the base


def sdf_plus(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Plus sign with arms of length 1 and half-width 0.25.

    A point is inside iff the larger of |u|, |v| is <= 1 and the smaller is <= 0.25.
    """
    u.abs_(), v.abs_()
    lo = torch.minimum(u, v, out=w)
    hi = torch.maximum(u, v, out=u).sub_(0.75)
    return torch.maximum(hi, lo, out=u).sub_(0.25)


def sdf_ring(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Annulus between radii 0.55 and 0.9."""
    return _length_into(w, u, v).sub_(0.725).abs_().sub_(0.175)


_STAR_K1 = (0.809016994375, -0.587785252292)  # (cos 36°, -sin 36°)
_STAR_TIP = 1.05
_STAR_INNER = 0.45  # inner vertices at 0.45 × the tip radius (a slightly fat pentagram)


def sdf_star(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Five-point star, tips at radius 1.05, inner vertices at 0.45 of that.

    Reflections fold the plane into the 36° wedge between a tip and its neighbouring inner
    vertex (the folding of I. Quilez's sdStar5); inside that wedge the star is the side of the
    tip-to-inner-vertex edge that holds the centre, so the distance to that edge's line is the
    SDF (exact along the edge, short of the true distance past a tip or inner vertex).
    """
    kx, ky = _STAR_K1
    u.abs_()
    m = torch.mul(u, kx, out=w).add_(v, alpha=ky).clamp_(min=0)
    u.sub_(m, alpha=2 * kx)
    v.sub_(m, alpha=2 * ky)
    m = torch.mul(u, -kx, out=w).add_(v, alpha=ky).clamp_(min=0)
    u.add_(m, alpha=2 * kx)
    v.sub_(m, alpha=2 * ky)
    return u.abs_().mul_(_STAR_NORMAL[0]).add_(v, alpha=_STAR_NORMAL[1]).sub_(_STAR_OFFSET)


def _star_edge() -> tuple[tuple[float, float], float]:
    """Outward unit normal of the edge from the tip (0, R) to the inner vertex, and its offset."""
    kx, ky = _STAR_K1
    inner = (_STAR_TIP * _STAR_INNER * -ky, _STAR_TIP * _STAR_INNER * kx)  # at 36° from the tip
    ex, ey = inner[0], inner[1] - _STAR_TIP
    length = math.hypot(ex, ey)
    normal = (-ey / length, ex / length)  # points away from the centre
    return normal, normal[1] * _STAR_TIP  # the tip lies on the line: n·p = n·tip


_STAR_NORMAL, _STAR_OFFSET = _star_edge()


_DIAMOND_A, _DIAMOND_B = 1.0, 0.65  # half-diagonals: a rhombus, so no rotation turns it into the square


def sdf_diamond(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Rhombus with half-diagonals 1 (along u) and 0.65 (along v)."""
    a, b = _DIAMOND_A, _DIAMOND_B
    norm = math.hypot(a, b)
    return u.abs_().mul_(b / norm).add_(v.abs_(), alpha=a / norm).sub_(a * b / norm)


_HEX_APOTHEM = 0.85 * _COS30


def sdf_hexagon(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """Regular hexagon with circumradius 0.85 (flat top and bottom)."""
    v.abs_()
    u.abs_().mul_(_COS30).add_(v, alpha=0.5)  # the four slanted edges
    return torch.maximum(u, v, out=u).sub_(_HEX_APOTHEM)  # and the top and bottom


def sdf_l(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """L in the box [−0.55, 0.55]×[−0.85, 0.85]: a 0.45-wide bar on the left and one at the bottom."""
    box = torch.maximum(torch.abs(u, out=w).sub_(0.55), torch.abs(v, out=z).sub_(0.85), out=w)
    bars = torch.minimum(u.add_(0.1), v.add_(0.4), out=u)  # inside the left bar or the bottom bar
    return torch.maximum(box, bars, out=u)


def sdf_t(u: Tensor, v: Tensor, w: Tensor, z: Tensor) -> Tensor:
    """T in the box [−0.75, 0.75]²: a 0.45-thick top bar and a 0.44-wide stem."""
    u.abs_()
    box = torch.maximum(u, torch.abs(v, out=w), out=w).sub_(0.75)
    bars = torch.minimum(v.neg_().add_(0.3), u.sub_(0.22), out=u)  # top bar (v >= 0.3) or stem (|u| <= 0.22)
    return torch.maximum(box, bars, out=u)


SDFS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "circle": sdf_circle, "square": sdf_square, "triangle": sdf_triangle, "plus": sdf_plus,
    "ring": sdf_ring, "star": sdf_star, "diamond": sdf_diamond, "hexagon": sdf_hexagon,
    "L": sdf_l, "T": sdf_t,
}


# --------------------------------------------------------------------------------------------
# Per-image parameters: every random number an image needs, drawn for a whole chunk in a fixed
# order from the chunk's generator.
# --------------------------------------------------------------------------------------------


@dataclass
class ShapeParams:
    """Random parameters of ``n`` images (each field has ``n`` rows). Positions are in pixels."""

    labels: Tensor  # long, main object's class
    radius: Tensor
    cx: Tensor
    cy: Tensor
    angle: Tensor
    log_aspect: Tensor
    colour: Tensor  # n×3, main object's colour before shading
    shade: Tensor  # n×2, shading gradient (direction × strength) per radius
    bg_type: Tensor  # long, index into BACKGROUNDS
    bg_c1: Tensor  # n×3
    bg_c2: Tensor  # n×3
    bg_grid: Tensor  # n×5×5, smooth-noise control points
    bg_wave: Tensor  # n×3: grating angular frequency along x, along y, phase
    bg_checker: Tensor  # n×3: checker cell size, x offset, y offset
    has_distractor: Tensor  # bool
    d_label: Tensor  # long
    d_radius: Tensor
    d_cx: Tensor
    d_cy: Tensor
    d_angle: Tensor
    d_log_aspect: Tensor
    d_colour: Tensor  # n×3
    noise_sigma: Tensor  # standard deviation of the pixel noise, in [0, 1] units
    noise_offset: Tensor  # long, where the image's noise starts in the noise bank

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: Tensor | slice) -> ShapeParams:
        """The parameters of the images at ``index``."""
        return ShapeParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _uniform(g: torch.Generator, shape, lo: float, hi: float) -> Tensor:
    return torch.rand(shape, generator=g).mul_(hi - lo).add_(lo)


def _contrasting_colour(candidates: Tensor, reference: Tensor, threshold: float) -> Tensor:
    """The first candidate colour whose RGB distance to ``reference``, divided by √3, is >= threshold.

    ``candidates`` is n×k×3 (k draws per image, fixed so the random stream never depends on the
    outcome). If no draw qualifies, take the cube corner farthest from the reference, which is
    at least √3/2 away, so the rule always holds.
    """
    dist = (candidates - reference[:, None, :]).norm(dim=2) / math.sqrt(3)
    ok = dist >= threshold
    first = ok.to(torch.uint8).argmax(dim=1)  # first True (argmax returns the first maximum)
    chosen = candidates[torch.arange(len(candidates)), first]
    corner = (reference < 0.5).to(candidates.dtype)
    return torch.where(ok.any(dim=1, keepdim=True), chosen, corner)


def _centres(g: torch.Generator, radius: Tensor) -> Tensor:
    """Centres uniform in [0.8 r, 32 − 0.8 r] (x and y), so objects stay mostly in the frame."""
    return torch.rand(2, len(radius), generator=g).mul_(IMAGE_SIZE - 1.6 * radius).add_(0.8 * radius)


def sample_params(
    g: torch.Generator, n: int, first_index: int, num_classes: int, difficulty: float
) -> ShapeParams:
    """Draw the parameters of images ``first_index .. first_index + n - 1`` from ``g``.

    The draw order is fixed and never depends on values drawn, so the same generator state
    always yields the same images.
    """
    d = float(difficulty)
    labels = (torch.arange(first_index, first_index + n) % num_classes).long()
    radius = _uniform(g, n, 9.0, 13.0)
    cx, cy = _centres(g, radius)
    angle = _uniform(g, n, 0.0, 2 * math.pi)
    log_aspect = _uniform(g, n, -0.1 * d, 0.1 * d)
    shade_dir = _uniform(g, n, 0.0, 2 * math.pi)
    shade_amp = _uniform(g, n, 0.05, 0.2)
    shade = torch.stack([shade_dir.cos(), shade_dir.sin()], 1) * shade_amp[:, None]

    bg_type = torch.randint(0, len(BACKGROUNDS), (n,), generator=g)
    bg_c1 = torch.rand(n, 3, generator=g)
    bg_c2 = bg_c1 + min(1.0, 0.3 * d) * (torch.rand(n, 3, generator=g) - bg_c1)
    bg_grid = torch.rand(n, _NOISE_GRID, _NOISE_GRID, generator=g)
    period = _uniform(g, n, 4.0, 12.0)
    wave_angle = _uniform(g, n, 0.0, math.pi)
    omega = 2 * math.pi / period
    bg_wave = torch.stack(
        [omega * wave_angle.cos(), omega * wave_angle.sin(), _uniform(g, n, 0.0, 2 * math.pi)], 1
    )
    bg_checker = torch.stack([_uniform(g, n, 3.0, 8.0), _uniform(g, n, 0.0, 16.0), _uniform(g, n, 0.0, 16.0)],
                             1)

    threshold = min(0.6, max(0.1, 0.6 - 0.2 * d))
    bg_mean = (bg_c1 + bg_c2) / 2
    colour = _contrasting_colour(torch.rand(n, _COLOUR_CANDIDATES, 3, generator=g), bg_mean, threshold)

    has_distractor = torch.rand(n, generator=g) < min(1.0, 0.5 * d)
    d_label = (labels + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
    d_radius = radius * _uniform(g, n, 0.3, 0.5)
    d_cx, d_cy = _centres(g, d_radius)
    d_angle = _uniform(g, n, 0.0, 2 * math.pi)
    d_log_aspect = _uniform(g, n, -0.1 * d, 0.1 * d)
    d_colour = _contrasting_colour(torch.rand(n, _COLOUR_CANDIDATES, 3, generator=g), bg_mean, threshold)

    noise_sigma = _uniform(g, n, 0.02, 0.05) * d
    noise_offset = torch.randint(0, _NOISE_BANK - _PIXELS + 1, (n,), generator=g)
    return ShapeParams(
        labels=labels, radius=radius, cx=cx, cy=cy, angle=angle, log_aspect=log_aspect, colour=colour,
        shade=shade, bg_type=bg_type, bg_c1=bg_c1, bg_c2=bg_c2, bg_grid=bg_grid, bg_wave=bg_wave,
        bg_checker=bg_checker, has_distractor=has_distractor, d_label=d_label, d_radius=d_radius,
        d_cx=d_cx, d_cy=d_cy, d_angle=d_angle, d_log_aspect=d_log_aspect, d_colour=d_colour,
        noise_sigma=noise_sigma, noise_offset=noise_offset,
    )


# --------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------


def _pixel_centres(n_px: int) -> Tensor:
    """Sub-pixel centres of ``n_px`` pixels on the supersampled grid, in pixel units."""
    return (torch.arange(n_px * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE


def _frame_rows(
    radius: Tensor, cx: Tensor, cy: Tensor, angle: Tensor, log_aspect: Tensor,
    x0: Tensor, y0: Tensor, window: int,
) -> tuple[Tensor, ...]:
    """Rows whose broadcast sums are the object-frame coordinates on a window's sub-pixel grid.

    The object frame is ``u = R(−angle)(p − c)_x / (a r)`` and ``v = R(−angle)(p − c)_y · a / r``
    with aspect ``a``: both are affine in x and in y separately, so ``u = ux[None, :] + uy[:, None]``
    and only the broadcast add touches every sub-pixel. The window's top-left pixel is (x0, y0).
    Returns ``ux, uy, vx, vy`` (n×2·window) and ``neg_scale`` (−sub-pixels per radius, n).
    """
    xs = _pixel_centres(window)
    dx = xs + (x0 - cx)[:, None]
    dy = xs + (y0 - cy)[:, None]
    aspect = log_aspect.exp()
    cos, sin = angle.cos(), angle.sin()
    su, sv = 1.0 / (aspect * radius), aspect / radius
    return (dx * (cos * su)[:, None], dy * (sin * su)[:, None], dx * (-sin * sv)[:, None],
            dy * (cos * sv)[:, None], radius * -SUPERSAMPLE)


def _coverage(labels: Tensor, classes: Sequence[str], rows: tuple[Tensor, ...], window: int) -> Tensor:
    """Antialiased coverage (n×window×window) of n objects; ``rows`` from :func:`_frame_rows`.

    Objects are sorted by class so that each class's SDF runs on contiguous slices, in
    sub-batches of at most :data:`_SUB_BATCH` objects: every step is a pass over the whole
    sub-batch, so the sub-batch must stay in the core's L2 cache (a 256-image pass from main
    memory is several times slower). Sub-pixels are laid out m×2×2×window×window (sub-row,
    sub-column, row, column), so 2×2 averaging is three contiguous adds. A sub-pixel's coverage
    is 1 inside, 0 outside with a one-sub-pixel linear ramp across the edge (``clamp(0.5 − d)``).
    """
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    n, ss = len(labels), SUPERSAMPLE

    def split(r: Tensor) -> Tensor:  # n×(2·window) -> n×2×window: sub-pixel offset first
        return r[order].view(n, window, ss).transpose(1, 2).contiguous()

    # Broadcast views made once: u[m, sub-row, sub-col, row, col] = ux[m, sub-col, col] + uy[m, sub-row, row].
    ux, vx = (split(r)[:, None, :, None, :] for r in (rows[0], rows[2]))
    uy, vy = (split(r)[:, :, None, :, None] for r in (rows[1], rows[3]))
    ramp = (rows[4][order] / ss**2)[:, None, None, None, None]  # the 1/4 of the 2×2 mean folded in
    work = torch.empty(4, min(_SUB_BATCH, max(counts)), ss, ss, window, window).unbind(0)
    out = torch.empty(n, window, window)
    start = 0
    for name, count in zip(classes, counts):
        for lo in range(start, start + count, _SUB_BATCH):
            s = slice(lo, min(lo + _SUB_BATCH, start + count))
            u, v, w, z = (t[: s.stop - s.start] for t in work)
            torch.add(ux[s], uy[s], out=u)
            torch.add(vx[s], vy[s], out=v)
            sub = SDFS[name](u, v, w, z).mul_(ramp[s]).add_(0.5 / ss**2).clamp_(0.0, 1.0 / ss**2)
            sub = sub.view(-1, ss * ss, window, window).unbind(1)
            torch.add(sub[0], sub[1], out=out[s]).add_(sub[2]).add_(sub[3])
        start += count
    return out.index_select(0, _inverse(order))  # back to the caller's order (faster than index_put)


def _main_alpha(p: ShapeParams, classes: Sequence[str]) -> Tensor:
    zero = torch.zeros(len(p))
    rows = _frame_rows(p.radius, p.cx, p.cy, p.angle, p.log_aspect, zero, zero, IMAGE_SIZE)
    return _coverage(p.labels, classes, rows, IMAGE_SIZE)


def _distractor_alpha(p: ShapeParams, classes: Sequence[str]) -> Tensor:
    """Distractor coverage (n×32×32); each distractor is rendered in a small window and pasted.

    The window is sized from the chunk's largest distractor so that it holds any distractor
    whole (see :data:`_MAX_EXTENT`), whatever the sub-pixel position of its centre; it is shifted
    to stay inside the image, which only drops parts of objects that lie outside anyway.
    """
    out = torch.zeros(len(p), IMAGE_SIZE, IMAGE_SIZE)
    idx = p.has_distractor.nonzero().squeeze(1)
    if len(idx):
        radius, cx, cy, log_aspect = p.d_radius[idx], p.d_cx[idx], p.d_cy[idx], p.d_log_aspect[idx]
        reach = _MAX_EXTENT * float((radius * log_aspect.abs().exp()).max()) + _RAMP_MARGIN
        w = min(IMAGE_SIZE, 2 * math.ceil(reach + 1))  # [floor(c) − w/2, floor(c) + w/2) ⊇ c ± reach
        x0 = (cx.floor() - w // 2).clamp_(0, IMAGE_SIZE - w)
        y0 = (cy.floor() - w // 2).clamp_(0, IMAGE_SIZE - w)
        rows = _frame_rows(radius, cx, cy, p.d_angle[idx], log_aspect, x0, y0, w)
        local = _coverage(p.d_label[idx], classes, rows, w)
        offsets = torch.arange(w)
        r = y0.long()[:, None] + offsets
        c = x0.long()[:, None] + offsets
        out[idx[:, None, None], r[:, :, None], c[:, None, :]] = local
    return out


def _background_pattern(p: ShapeParams) -> Tensor:
    """Blend weight t in [0, 1] (n×32×32) between the two background colours.

    Images are sorted by background type so each pattern is computed on a contiguous slice.
    """
    n, s, k = len(p), IMAGE_SIZE, _NOISE_GRID - 1
    order = torch.argsort(p.bg_type, stable=True)
    counts = torch.bincount(p.bg_type, minlength=len(BACKGROUNDS)).tolist()
    t = torch.empty(n, s, s)
    xs = torch.arange(s, dtype=torch.float32) + 0.5
    smooth, wave, checker = (slice(a, b) for a, b in zip(_cumsum([0, *counts]), _cumsum(counts)))

    # Smooth noise: bilinear interpolation of the 5×5 grid. Each of the 4 grid intervals spans
    # 8 pixels, so rows and columns are pure broadcasts over (interval, pixel within it).
    grid = p.bg_grid[order[smooth]]
    w1 = (torch.arange(s // k, dtype=torch.float32) + 0.5) / (s // k)
    w0 = 1.0 - w1
    rows = (grid[:, :-1, None, :] * w0[:, None]).addcmul_(grid[:, 1:, None, :], w1[:, None])  # m×4×8×5
    rows = rows.reshape(-1, s, _NOISE_GRID)
    torch.addcmul(rows[:, :, :-1, None] * w0, rows[:, :, 1:, None], w1, out=t[smooth].view(-1, s, k, s // k))

    # Sine grating: sin(a_x + b_y) expanded so only m×32 sines are evaluated.
    freq = p.bg_wave[order[wave]]
    a = freq[:, 0:1] * xs + freq[:, 2:3]
    b = freq[:, 1:2] * xs
    sa, ca = a.sin().mul_(0.5), a.cos().mul_(0.5)
    torch.mul(sa[:, None, :], b.cos()[:, :, None], out=t[wave]).addcmul_(ca[:, None, :], b.sin()[:, :, None])
    t[wave].add_(0.5)

    # Checkerboard: the parity of the cell index along x differs from that along y.
    cell, ox, oy = p.bg_checker[order[checker]].unbind(1)
    fx = ((xs + ox[:, None]) / cell[:, None]).floor_().remainder_(2)
    fy = ((xs + oy[:, None]) / cell[:, None]).floor_().remainder_(2)
    torch.sub(fx[:, None, :], fy[:, :, None], out=t[checker]).abs_()
    return t.index_select(0, _inverse(order))


def _cumsum(xs: Sequence[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def _inverse(order: Tensor) -> Tensor:
    """The permutation that undoes ``order``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return inverse


@functools.cache
def _noise_bank() -> Tensor:
    """A fixed bank of standard-normal values that pixel noise is read from (see the module doc)."""
    return torch.randn(_NOISE_BANK, generator=generator_for("kdlib.shapes.noise", DATASET_VERSION))


def _shading(p: ShapeParams) -> Tensor:
    """1 + a linear ramp across the object (±shade at one radius from the centre), n×32×32."""
    xs = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    gx = (xs - p.cx[:, None]) * (p.shade[:, 0] / p.radius)[:, None]
    gy = (xs - p.cy[:, None]) * (p.shade[:, 1] / p.radius)[:, None] + 1.0
    return gx[:, None, :] + gy[:, :, None]


def render(
    p: ShapeParams,
    classes: Sequence[str] = SHAPE_CLASSES,
    *,
    distractor: bool = True,
    main: bool = True,
    noise: bool = True,
) -> tuple[Tensor, Tensor]:
    """Images (uint8 n×3×32×32) and masks (bool n×32×32) for the parameters ``p``.

    The switches leave out a layer (tests and figures use this, e.g. the background alone);
    the mask is always the main object's alpha > 0.5.
    """
    alpha = _main_alpha(p, classes)
    pattern = _background_pattern(p)
    a_d = _distractor_alpha(p, classes) if distractor else None
    shading = _shading(p) if main else None
    # Work in 0..255 units: scaling the per-image colours is cheaper than scaling every pixel.
    c1, c2, cd, cm = (c[:, :, None, None] * 255.0 for c in (p.bg_c1, p.bg_c2, p.d_colour, p.colour))
    sigma = (p.noise_sigma * 255.0)[:, None, None, None]
    windows = _noise_bank().unfold(0, _PIXELS, 1)  # windows[o] = bank[o : o + 3·32·32], a view
    images = torch.empty(len(p), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    # Composite in blocks small enough to stay in the L2 cache (each step is a pass over the block).
    for lo in range(0, len(p), _COMPOSITE_BLOCK):
        b = slice(lo, lo + _COMPOSITE_BLOCK)
        img = torch.mul(pattern[b, None], c2[b] - c1[b]).add_(c1[b])
        if a_d is not None:  # drawn first, so the main object covers it
            img.addcmul_(cd[b] - img, a_d[b, None])
        if shading is not None:
            img.addcmul_(torch.mul(shading[b, None], cm[b]).sub_(img), alpha[b, None])
        if noise:
            pixels = windows.index_select(0, p.noise_offset[b]).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
            img.addcmul_(pixels, sigma[b])
        images[b] = img.add_(0.5).clamp_(0.0, 255.0)  # +0.5, then the cast's truncation rounds to nearest
    return images, alpha.round().bool()  # alpha > 0.5 (0.5 rounds to even, 0); 2.5× faster than gt


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------


def _check(split: str, num_classes: int, difficulty: float) -> None:
    if split not in SPLITS:
        raise KDLibError(f"shapes split must be one of {SPLITS}, got {split!r}")
    if not 2 <= num_classes <= len(SHAPE_CLASSES):
        raise KDLibError(f"shapes num_classes must be in 2..{len(SHAPE_CLASSES)}, got {num_classes}")
    if not (difficulty >= 0 and math.isfinite(difficulty)):
        raise KDLibError(f"shapes difficulty must be a finite number >= 0, got {difficulty}")


def chunk_params(
    seed: int, split: str, chunk: int, num_classes: int = 10, difficulty: float = 1.0
) -> ShapeParams:
    """Parameters of the :data:`CHUNK_SIZE` images of chunk ``chunk``.

    A pure function of its arguments: the chunk's generator is seeded from (seed, split, chunk).
    """
    _check(split, num_classes, difficulty)
    g = generator_for("kdlib.shapes", DATASET_VERSION, int(seed), split, int(chunk))
    return sample_params(g, CHUNK_SIZE, chunk * CHUNK_SIZE, num_classes, difficulty)


def generate_shapes(
    indices: Sequence[int] | Tensor,
    *,
    seed: int = 0,
    split: str = "train",
    num_classes: int = 10,
    difficulty: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, ShapeParams]:
    """Images (uint8), labels, masks and parameters of the images at ``indices`` of a split.

    Whole chunks are rendered and the requested rows taken, so an image is the same bytes
    whether it is generated alone or in a larger set.
    """
    _check(split, num_classes, difficulty)
    indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if len(indices) and int(indices.min()) < 0:
        raise KDLibError("shapes indices must be >= 0")
    classes = SHAPE_CLASSES[:num_classes]
    images = torch.empty(len(indices), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    masks = torch.empty(len(indices), IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    parts: list[tuple[Tensor | slice, ShapeParams]] = []
    chunk_of = indices // CHUNK_SIZE
    for chunk in chunk_of.unique().tolist():
        where = (chunk_of == chunk).nonzero().squeeze(1)
        params = chunk_params(seed, split, chunk, num_classes, difficulty)
        chunk_images, chunk_masks = render(params, classes)
        rows = indices[where] - chunk * CHUNK_SIZE
        lo, count = int(where[0]), len(where)
        if int(where[-1]) - lo + 1 == count and int(rows[-1]) - int(rows[0]) + 1 == count:
            # Contiguous run (the usual case, a range of indices): slices instead of gathers.
            where, rows = slice(lo, lo + count), slice(int(rows[0]), int(rows[0]) + count)
        images[where], masks[where] = chunk_images[rows], chunk_masks[rows]
        parts.append((where, params.select(rows)))
    return images, indices % num_classes, masks, _gather_params(parts, len(indices))


def _gather_params(parts: list[tuple[Tensor | slice, ShapeParams]], n: int) -> ShapeParams:
    """Reassemble per-chunk parameter rows into the caller's index order."""
    if not parts:
        return sample_params(torch.Generator(), 0, 0, 2, 1.0)
    out = {}
    for f in fields(ShapeParams):
        first = getattr(parts[0][1], f.name)
        buf = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
        for where, p in parts:
            buf[where] = getattr(p, f.name)
        out[f.name] = buf
    return ShapeParams(**out)


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` images of one split of ``shapes``, held in memory as tensors.

    The classes are the first ``num_classes`` of :data:`SHAPE_CLASSES`.

    Attributes: ``images`` (uint8 N×3×32×32), ``labels`` (long N), ``masks`` (bool N×32×32),
    ``classes`` (names), ``params`` (:class:`ShapeParams`, for statistics about the nuisance
    factors). ``dataset[i]`` is ``(image float in [0, 1], label, mask)``.
    """

    def __init__(
        self, size: int, *, split: str = "train", seed: int = 0, num_classes: int = 10,
        difficulty: float = 1.0,
    ):
        if size < 1:
            raise KDLibError(f"shapes {split} size must be >= 1, got {size}")
        self.split, self.seed, self.difficulty = split, seed, difficulty
        self.classes = list(SHAPE_CLASSES[:num_classes])
        self.images, self.labels, self.masks, self.params = generate_shapes(
            range(size), seed=seed, split=split, num_classes=num_classes, difficulty=difficulty
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int, Tensor]:
        return self.images[i].float() / 255.0, int(self.labels[i]), self.masks[i]

    def to(self, device: torch.device | str) -> ShapesDataset:
        """Move images, labels and masks to ``device`` (in place; returns self)."""
        self.images, self.labels, self.masks = (t.to(device) for t in (self.images, self.labels, self.masks))
        return self
