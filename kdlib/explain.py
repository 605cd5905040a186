"""Visual explanations: attention maps, Grad-CAM++ and metrics of where models look.

Three kinds of output, all computed for the same images so that models can be put side by side:

- :func:`attention_maps`  ``mean_c F²`` per stage (:func:`kdlib.attention.energy_map`), min–max
  scaled and upsampled to the image (:func:`kdlib.attention.to_image_size`);
- :func:`cam_maps`        Grad-CAM++ (or Grad-CAM) from the ``grad-cam`` package on a named layer,
  by default the last stage's output;
- metrics on ``B×H×W`` maps: :func:`energy_in_mask`, :func:`pointing_game`, :func:`chance_level`,
  :func:`map_agreement`, gathered over a whole test split by :func:`where_models_look` and printed
  by :func:`format_table`; the figure :func:`plot_explanations`.

Every map is min–max scaled to [0, 1] per image, so one colour scale serves every figure and the
metrics compare like with like. ``pytorch_grad_cam`` and ``matplotlib.pyplot`` are imported inside
the functions that need them: ``import pytorch_grad_cam`` alone takes 5–10 s.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from kdlib import KDLibError
from kdlib.attention import align_spatial, energy_map, to_image_size
from kdlib.features import extract_features, stage_names

#: ``method`` argument -> class name in ``pytorch_grad_cam``.
CAM_METHODS = {"gradcam++": "GradCAMPlusPlus", "gradcam": "GradCAM"}
CAM_LABELS = {"gradcam++": "Grad-CAM++", "gradcam": "Grad-CAM"}

# --------------------------------------------------------------------------------------------
# Model state: explanations must leave the model exactly as they found it
# --------------------------------------------------------------------------------------------


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag and every parameter's ``requires_grad`` and ``grad``.

    A CAM object calls ``model.eval()`` and ``model.zero_grad()``; a figure drawn in the middle of
    training must not switch BatchNorm to eval for the rest of the run, nor wipe gradients that
    are being accumulated. Flags are restored per module, so a mixed state (e.g. a frozen
    BatchNorm inside a training model) survives too.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no stat updates) for the duration, then restore."""
    with preserved_state(model):
        model.eval()
        yield


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_images(images) -> torch.Tensor:
    images = torch.as_tensor(images)
    if images.dim() != 4 or images.shape[0] == 0:
        raise KDLibError(f"images must be a non-empty B×C×H×W tensor, got shape {tuple(images.shape)}")
    return images


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise KDLibError(f"batch_size must be a positive integer, got {batch_size}")
    return int(batch_size)


def predictions(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class per image (eval mode, no gradient); the model's state is restored after."""
    images, batch_size = _check_images(images), _check_batch_size(batch_size)
    device = _device(model)
    with _eval_mode(model), torch.no_grad():
        preds = [model(images[i : i + batch_size].to(device)).argmax(1).cpu()
                 for i in range(0, len(images), batch_size)]
    return torch.cat(preds)


# --------------------------------------------------------------------------------------------
# Grad-CAM++ through the grad-cam package
# --------------------------------------------------------------------------------------------


def _cam_class(method: str):
    if method not in CAM_METHODS:
        raise KDLibError(f"unknown CAM method {method!r}; choose one of {sorted(CAM_METHODS)}")
    import pytorch_grad_cam  # slow import (5–10 s), so only here

    return getattr(pytorch_grad_cam, CAM_METHODS[method])


def resolve_layer(model: nn.Module, layer: str | nn.Module | None = None) -> nn.Module:
    """The module named ``layer`` in ``model``; ``None`` means the last stage's output module."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise KDLibError(f"target layer {type(layer).__name__} is not a submodule of the model")
        return layer
    if layer is None:
        layer = getattr(model, "last_stage_name", None)
        if layer is None:
            raise KDLibError(
                f"{type(model).__name__} has no last_stage_name; pass target_layer= or use a kdlib zoo model"
            )
    modules = dict(model.named_modules())
    if layer not in modules:
        raise KDLibError(
            f"{type(model).__name__} has no module named {layer!r}; "
            f"stage modules are {getattr(model, 'stage_names', '?')}"
        )
    return modules[layer]


def _class_indices(targets, n: int) -> list[int] | None:
    """``None`` (predicted class), one int for every image, or one index per image."""
    if targets is None:
        return None
    if isinstance(targets, int | np.integer):
        targets = [int(targets)] * n
    ids = [int(t) for t in torch.as_tensor(targets).reshape(-1).tolist()]
    if len(ids) != n:
        raise KDLibError(f"targets has {len(ids)} class indices for {n} images")
    if min(ids) < 0:
        raise KDLibError(f"targets must be non-negative class indices, got {min(ids)}")
    return ids


def cam_maps(
    model: nn.Module,
    images: torch.Tensor,
    target_layer: str | nn.Module | None = None,
    targets=None,
    method: str = "gradcam++",
    batch_size: int = 64,
) -> torch.Tensor:
    """Grad-CAM++ (``method="gradcam++"``) or Grad-CAM (``"gradcam"``) maps: ``B×H×W`` in [0, 1] on the CPU.

    ``target_layer`` is a module name (default ``model.last_stage_name``) or the module itself;
    ``targets`` are the classes explained: ``None`` for each image's predicted class, one int for
    all, or one index per image. The maps come from ``pytorch_grad_cam`` (min–max scaled per image
    and resized to the input). The model comes back in its original state; see
    :func:`preserved_state`.
    """
    images, batch_size = _check_images(images), _check_batch_size(batch_size)
    cam_class = _cam_class(method)
    layer = resolve_layer(model, target_layer)
    class_ids = _class_indices(targets, len(images))
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    maps = []
    # A frozen teacher or a caller inside no_grad/inference_mode gives the CAM no gradient to
    # read: switch grad on and let the *input* require it. Parameters are frozen meanwhile, so
    # backward computes no weight gradients (cheaper) and accumulates nothing into ``p.grad``.
    with preserved_state(model), torch.inference_mode(False), torch.enable_grad():
        for p in model.parameters():
            p.requires_grad_(False)
        # The context manager removes the CAM's forward hooks on exit (also on error).
        with cam_class(model=model, target_layers=[layer]) as cam:
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].detach().clone().requires_grad_(True)
                cam_targets = None
                if class_ids is not None:
                    cam_targets = [ClassifierOutputTarget(c) for c in class_ids[start : start + batch_size]]
                try:
                    maps.append(torch.from_numpy(cam(input_tensor=x, targets=cam_targets)))
                except IndexError as err:
                    # grad-cam's __exit__ swallows IndexError (prints it): re-raise as our error.
                    raise KDLibError(f"a target class is out of range for the model's outputs: {err}") \
                        from err
    return torch.cat(maps).float()


# --------------------------------------------------------------------------------------------
# Attention maps for figures
# --------------------------------------------------------------------------------------------


def attention_maps(
    model: nn.Module, images: torch.Tensor, names: Sequence[str] | None = None, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """``{name: B×H×W}``: ``mean_c F²`` of each named feature, min–max scaled, at the image size.

    Default names: the stage outputs. Computed in eval mode without gradient; the model's state is
    restored afterwards. Maps are on the CPU.
    """
    images, batch_size = _check_images(images), _check_batch_size(batch_size)
    names = stage_names(model) if names is None else list(names)
    size = tuple(images.shape[-2:])
    device = _device(model)
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            _, feats = extract_features(model, images[start : start + batch_size].to(device), names)
            for n in names:
                chunks[n].append(to_image_size(energy_map(feats[n].float()), size).cpu())
    return {n: torch.cat(c) for n, c in chunks.items()}


# --------------------------------------------------------------------------------------------
# De-normalisation and overlays
# --------------------------------------------------------------------------------------------


def denormalizer(mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse of ``Normalize(mean, std)`` for ``B×3×H×W`` or ``3×H×W`` tensors."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    if m.shape != s.shape:
        raise KDLibError(f"mean and std differ in length: {len(mean)} vs {len(std)}")

    def denormalize(x: torch.Tensor) -> torch.Tensor:
        return x.float() * s.to(x.device) + m.to(x.device)

    return denormalize


def to_rgb01(images: torch.Tensor, denormalize=None) -> torch.Tensor:
    """``B×3×H×W`` images in [0, 1]: ``denormalize`` is a callable, a ``(mean, std)`` pair or None.

    Values a rounding error outside [0, 1] are clipped; anything further out means the images are
    still normalised, which would make ``show_cam_on_image`` fail or lie.
    """
    images = _check_images(images).detach().cpu().float()
    if denormalize is not None and not callable(denormalize):
        denormalize = denormalizer(*denormalize)
    rgb = denormalize(images) if denormalize is not None else images
    if rgb.dim() != 4 or rgb.shape[1] != 3:
        raise KDLibError(f"expected RGB images B×3×H×W after de-normalisation, got {tuple(rgb.shape)}")
    lo, hi = rgb.min().item(), rgb.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise KDLibError(
            f"images span [{lo:.3g}, {hi:.3g}], not [0, 1]: pass denormalize= (a callable or (mean, std))"
        )
    return rgb.clamp(0, 1)


def overlay(rgb01, cam, image_weight: float = 0.5) -> np.ndarray:
    """A heat map of ``cam`` (H×W in [0, 1]) blended over one image: ``uint8`` H×W×3 RGB.

    ``rgb01`` is one de-normalised image, ``3×H×W`` (tensor) or ``H×W×3`` (array), values in
    [0, 1]. Uses ``pytorch_grad_cam.utils.image.show_cam_on_image`` with the JET colour map.
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    img = torch.as_tensor(rgb01).detach().cpu().float()
    if img.dim() == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
        img = img.permute(1, 2, 0)
    cam = torch.as_tensor(cam).detach().cpu().float()
    if img.dim() != 3 or img.shape[-1] != 3 or tuple(cam.shape) != tuple(img.shape[:2]):
        raise KDLibError(f"overlay needs an RGB image and an H×W map of its size, got "
                         f"{tuple(img.shape)} and {tuple(cam.shape)}")
    if img.min() < -1e-3 or img.max() > 1 + 1e-3:
        raise KDLibError("overlay needs an RGB image in [0, 1]: de-normalise it first (see denormalizer)")
    if cam.min() < -1e-3 or cam.max() > 1 + 1e-3:
        raise KDLibError("overlay needs a map in [0, 1] (cam_maps and attention_maps give one)")
    return show_cam_on_image(img.clamp(0, 1).numpy(), cam.clamp(0, 1).numpy(), use_rgb=True,
                             image_weight=image_weight)


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
            pred = predictions(model, x, batch_size)
            target = y if cam_target == "label" else pred
            last = _last_stage(model)
            maps[n] = {
                "cam": cam_maps(model, x, last, targets=target, method=method, batch_size=batch_size),
                "att": attention_maps(model, x, [last], batch_size)[last],
            }
            per_image = {"top1": (pred == y.cpu()).float()}
            if m is not None:
                mk = _as_masks(m, maps[n]["cam"])
                per_image["chance"] = chance_level(mk)
                for kind in ("cam", "att"):
                    per_image[f"{kind}_energy"] = energy_in_mask(maps[n][kind], mk)
                    per_image[f"{kind}_pointing"] = pointing_game(maps[n][kind], mk)
            _accumulate(sums[n], per_image)
        if teacher_name is not None:
            for n in names:
                if n == teacher_name:
                    continue
                for kind in ("cam", "att"):
                    agree = map_agreement(maps[n][kind], maps[teacher_name][kind], top_k)
                    _accumulate(sums[n], {f"{kind}_{k}": v for k, v in agree.items()})
        count += len(x)
    if count == 0:
        raise KDLibError("the data holds no images")

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


def format_table(rows: Sequence[Mapping], digits: int = 3) -> str:
    """A Markdown table of dict rows; columns in order of first appearance, ``—`` where a row has none."""
    if not rows:
        raise KDLibError("format_table needs at least one row")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]

    def cell(v) -> str:
        if v is None:
            return "—"
        if isinstance(v, float | np.floating):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------


def plot_explanations(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    labels,
    classes: Sequence[str] | None = None,
    denormalize=None,
    masks=None,
    stages: bool = True,
    method: str = "gradcam++",
    save=None,
    cmap: str = "jet",
):
    """Attention maps per stage and CAM overlays of several models on the same images.

    One block of rows per image, one row per model: the input (with the mask's contour when
    ``masks`` are given, titled with the true class), the model's stage attention maps (when
    ``stages``), and its CAM overlay titled ``model: predicted class`` in green when right, red
    when wrong. Every map is min–max scaled, so one colour bar ([0, 1], the JET map that
    ``show_cam_on_image`` also uses) serves all panels. ``denormalize`` is a callable, a
    ``(mean, std)`` pair, or ``None`` for images already in [0, 1]. Returns the Figure (not
    shown); writes it to ``save`` when that is a path.
    """
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if not models:
        raise KDLibError("models is empty")
    images = _check_images(images)
    labels = torch.as_tensor(labels).reshape(-1)
    if len(labels) != len(images):
        raise KDLibError(f"{len(labels)} labels for {len(images)} images")
    if masks is not None:
        masks = _as_masks(masks)
        if masks.shape[0] != len(images) or masks.shape[1:] != images.shape[-2:]:
            raise KDLibError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    rgb = to_rgb01(images, denormalize)

    def class_name(i: int) -> str:
        return classes[i] if classes is not None else str(i)

    results = {}
    for name, model in models.items():
        results[name] = {
            "pred": predictions(model, images),
            "cam": cam_maps(model, images, method=method),
            "att": attention_maps(model, images) if stages else {},
        }
    n_stage_cols = max(len(r["att"]) for r in results.values())
    n_rows, n_cols = len(images) * len(models), 2 + n_stage_cols
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols + 1.0, 1.7 * n_rows),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    title_kw = {"fontsize": 8}
    for i in range(len(images)):
        img = rgb[i].permute(1, 2, 0).numpy()
        for j, (name, res) in enumerate(results.items()):
            row = axes[i * len(models) + j]
            if j == 0:
                row[0].imshow(img)
                if masks is not None:
                    row[0].contour(masks[i].float().numpy(), levels=[0.5], colors="white", linewidths=1)
                row[0].set_title(f"input: {class_name(int(labels[i]))}", **title_kw)
            else:
                row[0].axis("off")
            for s, (stage, maps) in enumerate(res["att"].items()):
                row[1 + s].imshow(maps[i].numpy(), cmap=cmap, vmin=0, vmax=1)
                row[1 + s].set_title(f"{name}: {stage}", **title_kw)
            for s in range(len(res["att"]), n_stage_cols):
                row[1 + s].axis("off")
            pred = int(res["pred"][i])
            row[-1].imshow(overlay(rgb[i], res["cam"][i]))
            colour = "green" if pred == int(labels[i]) else "red"
            row[-1].set_title(f"{name}: {class_name(pred)}", color=colour, **title_kw)
            row[1 if n_stage_cols else -1].set_ylabel(name, fontsize=8)
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap=cmap), ax=axes.ravel().tolist(), shrink=0.5,
                 label="min–max scaled map")
    fig.suptitle(f"Attention maps (mean$_c$ F²) and {CAM_LABELS[method]} (last stage)", fontsize=9)
    if save is not None:
        fig.savefig(save, dpi=120)
    return fig
