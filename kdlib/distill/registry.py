"""Distillers by name, timm-style: ``create_distiller("kd", student, teacher, tau=4)``."""

from __future__ import annotations

import inspect

from kdlib import KDLibError

_DISTILLERS: dict[str, type] = {}


def register_distiller(name: str):
    """Class decorator: make a Distiller subclass available under ``name``."""

    def wrap(cls):
        if name in _DISTILLERS:
            raise ValueError(f"distiller {name!r} registered twice")
        cls.method_name = name
        _DISTILLERS[name] = cls
        return cls

    return wrap


def list_distillers() -> list[str]:
    return sorted(_DISTILLERS)


def distiller_class(name: str) -> type:
    try:
        return _DISTILLERS[name]
    except KeyError:
        raise KDLibError(f"unknown method {name!r}; available: {', '.join(list_distillers())}") from None


def distiller_options(name: str) -> dict[str, object]:
    """The keyword options of a method with their defaults (everything after student, teacher)."""
    sig = inspect.signature(distiller_class(name).__init__)
    return {
        k: p.default
        for k, p in sig.parameters.items()
        if k not in ("self", "student", "teacher") and p.kind is p.KEYWORD_ONLY
    }


def create_distiller(name: str, student, teacher=None, **options):
    """Build the distiller ``name`` around ``student`` (and ``teacher``) with method options."""
    cls = distiller_class(name)
    known = distiller_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise KDLibError(
            f"unknown option(s) {unknown} for method {name!r}; options are {sorted(known)}"
        )
    if cls.needs_teacher and teacher is None:
        raise KDLibError(f"method {name!r} needs a teacher")
    return cls(student, teacher, **options)
