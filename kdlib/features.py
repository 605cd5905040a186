"""Forward-hook feature taps (torchdistill style).

A :class:`FeatureTap` records the outputs of named submodules on every forward pass, so
distillers, figures and Grad-CAM see the same tensors, and models keep returning logits only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdlib import KDLibError


def stage_names(model: nn.Module) -> list[str]:
    """Names of the modules that output each stage's feature."""
    names = getattr(model, "stage_names", None)
    if names is None:
        raise KDLibError(f"{type(model).__name__} does not declare stage_names; use a kdlib zoo model")
    return list(names)


def block_names(model: nn.Module) -> list[str]:
    """Names of the modules that output every block's feature."""
    names = getattr(model, "block_names", None)
    if names is None:
        raise KDLibError(f"{type(model).__name__} does not declare block_names; use a kdlib zoo model")
    return list(names)


class FeatureTap:
    """Record the outputs of the named submodules of ``model`` on each forward pass.

    Use as a context manager (hooks removed on exit) or keep it alive inside a distiller and call
    :meth:`remove` when done. ``tap[name]`` is the tensor from the latest forward pass.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]):
        self.names = list(names)
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KDLibError(
                f"{type(model).__name__} has no module named {missing}; "
                f"stage modules are {getattr(model, 'stage_names', '?')}"
            )
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._make_hook(n)) for n in self.names]

    def _make_hook(self, name: str):
        def hook(_module, _inputs, output):
            self.features[name] = output

        return hook

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.features[name]

    def ordered(self) -> list[torch.Tensor]:
        """Features in the order of ``names``."""
        return [self.features[n] for n in self.names]

    def clear(self) -> None:
        self.features = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def extract_features(
    model: nn.Module, x: torch.Tensor, names: Iterable[str] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward pass; returns ``(logits, {name: feature})``. Default names: the stages."""
    names = stage_names(model) if names is None else list(names)
    with FeatureTap(model, names) as tap:
        logits = model(x)
        return logits, dict(tap.features)
