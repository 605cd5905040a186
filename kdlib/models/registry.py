"""Model names -> builders, so configs, the CLI and notebooks can name a model with a string.

Builders register themselves with :func:`register_model` when their module is imported;
``kdlib.models`` imports every zoo module, so importing the package fills the registry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from kdlib import KDLibError
from kdlib.models.base import StagedNet

Builder = Callable[..., StagedNet]

_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(num_classes=..., **options)`` available as ``create_model(name)``."""

    def decorate(builder: Builder) -> Builder:
        if name in _MODELS:
            raise KDLibError(f"model name {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 100, **options) -> StagedNet:
    """Build the zoo model ``name`` with a ``num_classes``-way classifier.

    ``options`` are the builder's keyword arguments (e.g. ``drop_rate`` for the WRNs); they are
    checked against its signature first so a typo is a one-line :class:`KDLibError`, not a
    ``TypeError`` from deep inside a constructor.
    """
    if name not in _MODELS:
        raise KDLibError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise KDLibError(f"num_classes must be a positive integer, got {num_classes!r}")
    builder = _MODELS[name]
    try:
        inspect.signature(builder).bind(num_classes=num_classes, **options)
    except TypeError as err:
        raise KDLibError(f"model {name!r} does not accept options {sorted(options)}: {err}") from None
    return builder(num_classes=num_classes, **options)
