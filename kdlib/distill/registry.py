"""Distillers by name, timm-style: ``create_distiller("kd", student, teacher, tau=4)``.

Each distiller declares its options once, as its nested ``Options`` dataclass
(:mod:`kdlib.distill.options`); :func:`resolve_options` validates a run's options from it before
anything is built, and returns the complete set a run is identified by.
"""

from __future__ import annotations

from kdlib import KDLibError

_DISTILLERS: dict[str, type] = {}


def register_distiller(name: str):
    """Class decorator: make a Distiller subclass available under ``name``."""

    def wrap(cls):
        if name in _DISTILLERS:
            raise KDLibError(f"distiller {name!r} is registered already ({_DISTILLERS[name].__qualname__})")
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


def resolve_options(name: str, given: dict | None = None) -> dict[str, object]:
    """Every option of method ``name``: the ``given`` ones validated, the others at their defaults."""
    return distiller_class(name).Options.resolve(name, given).to_dict()


def distiller_options(name: str) -> dict[str, object]:
    """The options of a method with their declared defaults, as a user passes them.

    :func:`resolve_options` gives what a run is identified by: the same, with defaults that stand for
    a value (AFT-KD's ``lambdas=None``) resolved to it.
    """
    return {row["name"]: row["default"] for row in distiller_class(name).Options.describe()}


def method_version(name: str) -> int:
    """The version of a method's computation (part of a run's identity)."""
    return int(distiller_class(name).version)


def create_distiller(name: str, student, teacher=None, **options):
    """Build the distiller ``name`` around ``student`` (and ``teacher``) with method options."""
    cls = distiller_class(name)
    if cls.needs_teacher and teacher is None:
        raise KDLibError(f"method {name!r} needs a teacher")
    return cls(student, teacher, **options)
