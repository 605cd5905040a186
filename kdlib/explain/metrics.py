"""Metrics of where models look: on ``B×H×W`` maps and masks, and over a whole test split.

- per image: :func:`energy_in_mask` (share of map mass in the mask), :func:`pointing_game` (is the
  maximum inside), :func:`chance_level` (what a uniform map scores), :func:`map_agreement` (cosine
  and top-k IoU of two models' maps);
- over a split: :func:`where_models_look`, one row of means per model, computed from the maps of
  :mod:`kdlib.explain.cam`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from kdlib import KDLibError
from kdlib.attention import align_spatial
from kdlib.explain.cam import _cam_class, _check_batch_size, attention_maps, cam_maps, predictions

# --------------------------------------------------------------------------------------------
# Metrics on maps (B×H×W, non-negative) and masks (B×H×W, bool)
# --------------------------------------------------------------------------------------------


def _as_maps(maps, what: str = "maps") -> torch.Tensor:
    maps = torch.as_tensor(maps).detach().cpu().float()
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.dim() != 3:
        raise KDLibError(f"{what} must be B×H×W, got shape {tuple(maps.shape)}")
    if maps.numel() and maps.min() < 0:
        raise KDLibError(f"{what} must be non-negative (min–max scaled maps are), got min {maps.min():.3g}")
    return maps


def _as_masks(masks, like: torch.Tensor | None = None) -> torch.Tensor:
    masks = torch.as_tensor(masks).detach().cpu()
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise KDLibError(f"masks must be B×H×W, got shape {tuple(masks.shape)}")
    if like is not None and masks.shape != like.shape:
        raise KDLibError(f"masks {tuple(masks.shape)} and maps {tuple(like.shape)} differ in shape; "
                         "upsample the maps to the image size first")
    return masks > 0.5 if masks.is_floating_point() else masks.bool()


def chance_level(masks) -> torch.Tensor:
    """Share of the image covered by the mask, per image: what a uniform map scores."""
    return _as_masks(masks).flatten(1).float().mean(1)


def energy_in_mask(maps, masks) -> torch.Tensor:
    """Share of each map's mass that lies inside the mask, per image, in [0, 1].

    A map with no mass at all carries no evidence and scores the chance level.
    """
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    total = maps.flatten(1).sum(1)
    inside = (maps * masks).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-12), chance_level(masks))


def pointing_game(maps, masks) -> torch.Tensor:
    """1.0 where the map's maximum (first in row-major order) lies inside the mask, else 0.0.

    A constant map points nowhere and scores 0.
    """
    maps = _as_maps(maps)
    masks = _as_masks(masks, maps)
    flat = maps.flatten(1)
    hit = masks.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0]
    flat_map = flat.max(1).values == flat.min(1).values
    return (hit & ~flat_map).float()


def map_agreement(maps_a, maps_b, top_k: float = 0.2) -> dict[str, torch.Tensor]:
    """Per-image agreement of two sets of maps: ``{"cosine": B, "iou": B}``.

    ``cosine`` compares the whole maps; ``iou`` compares their top ``top_k`` share of pixels
    (ties broken by ``torch.topk``). Maps of different sizes are average-pooled to the smaller.
    """
    if not 0 < top_k <= 1:
        raise KDLibError(f"top_k is a share of pixels in (0, 1], got {top_k}")
    a, b = _as_maps(maps_a, "maps_a"), _as_maps(maps_b, "maps_b")
    if a.shape[0] != b.shape[0]:
        raise KDLibError(f"maps_a has {a.shape[0]} maps and maps_b {b.shape[0]}")
    a, b = (t[:, 0] for t in align_spatial(a[:, None], b[:, None]))
    a, b = a.flatten(1), b.flatten(1)
    cosine = F.cosine_similarity(a, b, dim=1)
    k = max(1, round(top_k * a.shape[1]))
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    iou = (top_a & top_b).sum(1).float() / (top_a | top_b).sum(1).float()
    return {"cosine": cosine, "iou": iou}


# --------------------------------------------------------------------------------------------
# Metrics over a whole split
# --------------------------------------------------------------------------------------------


def _last_stage(model: nn.Module) -> str:
    """The layer both maps explain in :func:`where_models_look`: the last stage's output module."""
    name = getattr(model, "last_stage_name", None)
    if name is None:
        raise KDLibError(f"{type(model).__name__} has no last_stage_name; use a kdlib zoo model")
    return name


def _loader(data, batch_size: int, need_order: bool) -> DataLoader:
    if isinstance(data, DataLoader):
        if need_order and not isinstance(data.sampler, SequentialSampler):
            raise KDLibError("masks match images by position: pass a dataset or an unshuffled loader")
        return data
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    raise KDLibError(f"expected a Dataset or DataLoader, got {type(data).__name__}")


def _batches(loader: DataLoader, masks, max_images: int | None):
    """Yield ``(x, y, mask or None)``; masks come from the batch (3rd item) or the ``masks`` tensor."""
    seen = 0
    for batch in loader:
        if not isinstance(batch, list | tuple) or len(batch) < 2:
            raise KDLibError("each batch must be (images, labels) or (images, labels, masks)")
        x, y = batch[0], torch.as_tensor(batch[1])
        if max_images is not None:
            x, y = x[: max_images - seen], y[: max_images - seen]
        m = batch[2][: len(x)] if len(batch) > 2 else None
        if masks is not None:
            if seen + len(x) > len(masks):
                raise KDLibError(f"masks has {len(masks)} entries, fewer than the images in the data")
            m = masks[seen : seen + len(x)]
        seen += len(x)
        if len(x):
            yield x, y, m
        if max_images is not None and seen >= max_images:
            return


def where_models_look(
    models: Mapping[str, nn.Module],
    data,
    masks=None,
    teacher_name: str | None = None,
    batch_size: int = 64,
    max_images: int | None = None,
    method: str = "gradcam++",
    cam_target: str = "label",
    top_k: float = 0.2,
    progress: bool = False,
) -> list[dict]:
    """Localisation and agreement metrics over a split, one row (dict) per model.

    ``data`` is a dataset or an unshuffled loader yielding ``(x, y)`` or ``(x, y, mask)``;
    ``masks`` (``N×H×W``, in dataset order) overrides the third item. Without masks only the
    accuracy and the agreement columns are filled. ``cam_target="label"`` explains the true class
    (the pointing-game protocol, and teacher and student then explain the same class);
    ``"pred"`` explains each model's own prediction. The attention map is the last stage's.

    Columns (means over images): ``top1``; ``cam_energy``/``att_energy`` (share of map mass in
    the mask), ``cam_pointing``/``att_pointing`` (hit rate), ``chance`` (mask area share);
    ``cam_cosine``/``cam_iou``/``att_cosine``/``att_iou`` against the teacher's maps.
    """
    if not models:
        raise KDLibError("models is empty")
    if teacher_name is not None and teacher_name not in models:
        raise KDLibError(f"teacher_name {teacher_name!r} is not one of the models {list(models)}")
    if cam_target not in ("label", "pred"):
        raise KDLibError(f"cam_target must be 'label' or 'pred', got {cam_target!r}")
    _cam_class(method)  # fail fast on a bad method
    batch_size = _check_batch_size(batch_size)
    if masks is not None:
        masks = _as_masks(masks)
    loader = _loader(data, batch_size, need_order=masks is not None)
    names = list(models)
    sums: dict[str, dict[str, float]] = {n: {} for n in names}
    count, has_masks = 0, None

    batches = _batches(loader, masks, max_images)
    if progress:
        from tqdm import tqdm  # plain: tqdm.auto warns in notebooks without ipywidgets

        batches = tqdm(batches, desc="where models look", unit="batch", file=sys.stdout)
    for x, y, m in batches:
        has_masks = m is not None if has_masks is None else has_masks
        if has_masks != (m is not None):
            raise KDLibError("some batches carry masks and others do not")
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for n, model in models.items():
            maps[n], per_image = _look_at_batch(model, x, y, m, cam_target, method, batch_size)
            _accumulate(sums[n], per_image)
        if teacher_name is not None:
            _accumulate_agreement(sums, maps, teacher_name, top_k)
        count += len(x)
    if count == 0:
        raise KDLibError("the data holds no images")
    return _rows(names, sums, count, teacher_name)


def _look_at_batch(model: nn.Module, x, y, m, cam_target: str, method: str, batch_size: int):
    """One model on one batch: ``({"cam": maps, "att": maps}, {column: per-image scores})``."""
    pred = predictions(model, x, batch_size)
    target = y if cam_target == "label" else pred
    last = _last_stage(model)
    maps = {
        "cam": cam_maps(model, x, last, targets=target, method=method, batch_size=batch_size),
        "att": attention_maps(model, x, [last], batch_size)[last],
    }
    per_image = {"top1": (pred == y.cpu()).float()}
    if m is not None:
        mk = _as_masks(m, maps["cam"])
        per_image["chance"] = chance_level(mk)
        for kind in ("cam", "att"):
            per_image[f"{kind}_energy"] = energy_in_mask(maps[kind], mk)
            per_image[f"{kind}_pointing"] = pointing_game(maps[kind], mk)
    return maps, per_image


def _accumulate_agreement(sums: dict[str, dict[str, float]], maps: dict[str, dict[str, torch.Tensor]],
                          teacher_name: str, top_k: float) -> None:
    """Add each student's per-image agreement with the teacher's maps (both kinds) to its sums."""
    for n in sums:
        if n == teacher_name:
            continue
        for kind in ("cam", "att"):
            agree = map_agreement(maps[n][kind], maps[teacher_name][kind], top_k)
            _accumulate(sums[n], {f"{kind}_{k}": v for k, v in agree.items()})


def _rows(names: list[str], sums: dict[str, dict[str, float]], count: int, teacher_name: str | None) -> list[dict]:
    """One row per model: its name, the image count, the teacher flag, then the means of its sums."""
    rows = []
    for n in names:
        row: dict = {"model": n, "images": count}
        if teacher_name is not None:
            row["teacher"] = "yes" if n == teacher_name else ""
        row.update({k: v / count for k, v in sums[n].items()})
        rows.append(row)
    return rows


def _accumulate(sums: dict[str, float], per_image: dict[str, torch.Tensor]) -> None:
    for k, v in per_image.items():
        sums[k] = sums.get(k, 0.0) + float(v.sum())
