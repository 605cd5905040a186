"""Grad-CAM++ (through the ``grad-cam`` package), attention maps and predictions, model state kept.

- :func:`cam_maps`        Grad-CAM++ (or Grad-CAM) from ``pytorch_grad_cam`` on a named layer, by
  default the last stage's output (:func:`resolve_layer`);
- :func:`attention_maps`  ``mean_c F²`` per stage (:func:`kdlib.attention.energy_map`), min–max
  scaled and upsampled to the image (:func:`kdlib.attention.to_image_size`);
- :func:`predictions`     the predicted class per image.

Each leaves the model as it found it (:func:`preserved_state`). ``pytorch_grad_cam`` is imported
inside the functions that need it: ``import pytorch_grad_cam`` alone takes 5–10 s.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from kdlib import KDLibError
from kdlib.attention import energy_map, to_image_size
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
