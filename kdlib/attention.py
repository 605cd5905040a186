"""Attention maps: one definition each, shared by the losses and the figures.

Notation (book, "Notation" page): a feature ``F`` has shape ``B×C×H×W``; ``norm(v) = v/‖v‖₂``
along the last dimension.

- :func:`at_map`                 ``a(F) = norm(vec(mean_c F²))``          AT, AFD, SAKD, AFT-KD
- :func:`energy_map`             ``mean_c F²`` (unnormalised, ``B×H×W``) figures
- :func:`spatial_distribution`   ``P(i | c) = softmax_i(F[c, i] / τ)``     spatial-attention-map KD
- :func:`channel_marginal`       ``M(i) = mean_c P(i | c)``               spatial-attention-map KD
- :func:`ndam_map`               ``m(F) = norm(vec(mean_c |F|²))``        LAKD (sign-agnostic NDAM)
- :func:`map_distance`           ``mean((m(F_s) − m(F_t))²)``, aligned   AT, AFT-KD, LAKD
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to(x: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Average-pool a ``B×C×H×W`` tensor down to ``size`` (no-op when already that size)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.adaptive_avg_pool2d(x, size)


def align_spatial(fs: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two maps to the smaller one's spatial size."""
    hs, ht = fs.shape[-2] * fs.shape[-1], ft.shape[-2] * ft.shape[-1]
    if hs > ht:
        return pool_to(fs, ft.shape[-2:]), ft
    if ht > hs:
        return fs, pool_to(ft, fs.shape[-2:])
    return fs, ft


def energy_map(feat: torch.Tensor) -> torch.Tensor:
    """Channel mean of the squared activation, ``mean_c F²``: ``B×H×W``."""
    return feat.pow(2).mean(dim=1)


def at_map(feat: torch.Tensor) -> torch.Tensor:
    """AT attention map ``a(F) = norm(vec(mean_c F²))``: ``B×HW``, unit L2 norm per sample.

    This is the code variant of Zagoruyko & Komodakis (also RepDistiller/mdistiller): a channel
    mean of F² rather than the paper's channel sum of |F|^p; after normalisation the two differ
    only in p (the constant 1/C cancels).
    """
    return F.normalize(energy_map(feat).flatten(1), dim=1)


def spatial_distribution(feat: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-channel distribution over positions ``P(i | c) = softmax_i(F[c, i]/τ)``: ``B×C×HW``."""
    return F.softmax(feat.flatten(2) / tau, dim=2)


def channel_marginal(feat: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Spatial attention map ``M(i) = (1/C) Σ_c P(i | c)``: ``B×HW``, a distribution per sample."""
    return spatial_distribution(feat, tau).mean(dim=1)


def position_channel_distribution(feat: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Conditional over channels at each position ``P(c | i) = softmax_c(F[c, i]/τ)``: ``B×C×HW``."""
    return F.softmax(feat.flatten(2) / tau, dim=1)


def ndam_map(feat: torch.Tensor) -> torch.Tensor:
    """LAKD's non-directional activation map, ``m(F) = norm(vec(mean_c |F|²))``: ``B×HW``.

    "Non-directional" is read as sign-agnostic: positive and negative activations count alike.
    For real tensors ``|F|² = F²``, so this equals :func:`at_map`; it is kept as its own name
    because LAKD may be given pre-activation features, and because the book derives it separately.
    """
    return F.normalize(feat.abs().pow(2).mean(dim=1).flatten(1), dim=1)


def to_image_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Min–max scale each ``B×H×W`` (or ``B×HW`` square) map to [0, 1] and upsample to ``size``."""
    if maps.dim() == 2:
        side = int(round(maps.shape[1] ** 0.5))
        maps = maps.view(maps.shape[0], side, side)
    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = maps.flatten(1).min(1).values[:, None, None]
    hi = maps.flatten(1).max(1).values[:, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-12)


def map_distance(fs: torch.Tensor, ft: torch.Tensor, map_fn=at_map) -> torch.Tensor:
    """``mean((m(F_s) − m(F_t))²)`` after pooling the larger map to the smaller one's size.

    With the default ``m = a`` (:func:`at_map`) this is the AT distance that AT, AFT-KD's ``L_att``
    and (with ``m`` = :func:`ndam_map`) LAKD's attention loss share.
    """
    fs, ft = align_spatial(fs, ft)
    return (map_fn(fs) - map_fn(ft)).pow(2).mean()

