"""Figures and tables of explanations: de-normalisation, heat-map overlays, the figure, the table.

:func:`plot_explanations` draws attention maps per stage and CAM overlays of several models on the
same images; :func:`overlay` blends one map over one image (``show_cam_on_image``);
:func:`to_rgb01` and :func:`denormalizer` undo the input normalisation first; :func:`format_table`
prints the rows of :func:`kdlib.explain.where_models_look`. ``matplotlib.pyplot`` and
``pytorch_grad_cam`` are imported inside the functions that need them (slow imports).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kdlib import KDLibError, style
from kdlib.explain.cam import CAM_LABELS, _check_images, attention_maps, cam_maps, predictions
from kdlib.explain.metrics import _as_masks

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


def overlay(rgb01, cam, image_weight: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """A heat map of ``cam`` (H×W in [0, 1]) blended over one image: ``uint8`` H×W×3 RGB.

    ``rgb01`` is one de-normalised image, ``3×H×W`` (tensor) or ``H×W×3`` (array), values in
    [0, 1]. Uses ``pytorch_grad_cam.utils.image.show_cam_on_image`` with OpenCV's colour map of
    that name (``jet``, that library's default; the book's figures pass ``magma``).
    """
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    colormap = getattr(cv2, f"COLORMAP_{cmap.upper()}", None)
    if colormap is None:
        raise KDLibError(f"overlay: OpenCV has no colour map {cmap!r} (e.g. 'magma', 'viridis', 'inferno')")

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
                             colormap=colormap, image_weight=image_weight)


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
    cmap: str | None = None,
):
    """Attention maps per stage and CAM overlays of several models on the same images.

    One block of rows per image, one row per model: the input (titled with the true class), the
    model's stage attention maps (when ``stages``), and its CAM overlay titled ``model: predicted
    class`` in green when right, red when wrong. When ``masks`` are given, every panel carries the
    object mask's contour (:func:`kdlib.style.draw_mask_contour`). Every map is min–max scaled and
    non-negative, so one sequential colour bar ([0, 1], :data:`kdlib.style.SEQUENTIAL` unless
    ``cmap`` names another) serves all panels, the overlays included. Sized for the book's column
    (:mod:`kdlib.style`). ``denormalize`` is a callable, a ``(mean, std)`` pair, or ``None`` for
    images already in [0, 1]. Returns the Figure (not shown); writes it to ``save`` when that is a
    path.
    """
    with style.book_style():
        return _plot_explanations(models, images, labels, classes, denormalize, masks, stages, method, save,
                                  cmap)


def _plot_explanations(models, images, labels, classes, denormalize, masks, stages, method, save, cmap):
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable

    images, labels, masks = _check_figure_inputs(models, images, labels, masks)
    rgb = to_rgb01(images, denormalize)
    results = _explain_each(models, images, method, stages)
    scale = _colour_scale(results, cmap)
    n_stage_cols = max(len(r["att"]) for r in results.values())
    n_rows, n_cols = len(images) * len(models), 2 + n_stage_cols
    width = style.FULL_WIDTH_IN
    panel = (width - 0.6) / n_cols  # 0.6 in for the colour bar
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, panel * n_rows * 1.12 + 0.35), squeeze=False,
                             layout="constrained", dpi=style.DPI)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(len(images)):
        img = rgb[i].permute(1, 2, 0).numpy()
        mask = masks[i] if masks is not None else None
        for j, (name, res) in enumerate(results.items()):
            row = axes[i * len(models) + j]
            if j == 0:
                row[0].imshow(img)
                if mask is not None:
                    style.draw_mask_contour(row[0], mask)
                row[0].set_title(f"input: {_class_name(classes, int(labels[i]))}", **_TITLE_KW)
            else:
                row[0].axis("off")
            _draw_model_row(row, name, res, i, rgb[i], int(labels[i]), n_stage_cols, classes, scale, mask)
    fig.colorbar(ScalarMappable(**scale), ax=axes.ravel().tolist(), shrink=min(1.0, 2.5 / n_rows),
                 label="min–max scaled map")
    fig.suptitle(f"Attention maps (mean$_c$ F²) and {CAM_LABELS[method]} (last stage)")
    if save is not None:
        fig.savefig(save, dpi=style.DPI)
    return fig


def _colour_scale(results: dict, cmap: str | None) -> dict:
    """One ``{cmap, norm}`` on [0, 1] for every panel: the maps are min–max scaled, hence non-negative."""
    maps = [m for r in results.values() for m in [r["cam"], *r["att"].values()]]
    scale = style.cmap_for(torch.cat([torch.as_tensor(m).reshape(-1) for m in maps]), vmin=0.0, vmax=1.0)
    if cmap is not None:
        scale["cmap"] = cmap
    return scale


#: Panel titles at the smallest legible size: a row holds up to six panels.
_TITLE_KW = {"fontsize": style.MIN_FONT_PT}


def _check_figure_inputs(models: Mapping[str, nn.Module], images, labels, masks):
    """``(images, labels, masks)`` as tensors, checked against each other; ``KDLibError`` if not."""
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
    return images, labels, masks


def _explain_each(models: Mapping[str, nn.Module], images: torch.Tensor, method: str, stages: bool) -> dict:
    """``{name: {"pred", "cam", "att"}}``: what each model's rows of the figure show."""
    results = {}
    for name, model in models.items():
        results[name] = {
            "pred": predictions(model, images),
            "cam": cam_maps(model, images, method=method),
            "att": attention_maps(model, images) if stages else {},
        }
    return results


def _class_name(classes: Sequence[str] | None, i: int) -> str:
    return classes[i] if classes is not None else str(i)


def _draw_model_row(row, name: str, res: dict, i: int, rgb_i: torch.Tensor, label: int, n_stage_cols: int,
                    classes: Sequence[str] | None, scale: dict, mask) -> None:
    """One model's row for image ``i``: its stage maps, then its CAM overlay titled with its prediction.

    Every map panel gets the mask's contour when there is a mask.
    """
    for s, (stage, maps) in enumerate(res["att"].items()):
        row[1 + s].imshow(maps[i].numpy(), **scale)
        row[1 + s].set_title(f"{name}: {stage}", **_TITLE_KW)
    for s in range(len(res["att"]), n_stage_cols):
        row[1 + s].axis("off")
    pred = int(res["pred"][i])
    row[-1].imshow(overlay(rgb_i, res["cam"][i], cmap=scale["cmap"]))
    colour = "green" if pred == label else "red"
    row[-1].set_title(f"{name}: {_class_name(classes, pred)}", color=colour, **_TITLE_KW)
    row[1 if n_stage_cols else -1].set_ylabel(name)
    if mask is not None:
        for ax in [*row[1 : 1 + len(res["att"])], row[-1]]:
            style.draw_mask_contour(ax, mask)
