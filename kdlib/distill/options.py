"""A method's options as data: one frozen dataclass per distiller, declared once.

Each field carries its type (the annotation), its default, its allowed values or range and a
one-line meaning (:func:`option`). :meth:`MethodOptions.resolve` turns the options a user passed
into the complete, validated set, so that

- an unknown name, a wrong type, a value out of range and an incompatible pair are refused before
  anything is built or trained, in one line (:class:`~kdlib.KDLibError`);
- a run's identity (:mod:`kdlib.run_store`) is computed from *every* option, so passing a default
  explicitly is the same run and changing a default is a new one.

An ``int`` is accepted where a ``float`` is declared (and stored as ``float``: ``tau=4`` and
``tau=4.0`` are one run); a ``bool`` is never taken for a number.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from kdlib import KDLibError


def option(default, meaning: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False):
    """A dataclass field with its meaning, and allowed ``choices`` (strings) or a range ``[low, high]``.

    ``low_open``/``high_open`` exclude the bound itself (``tau > 0``: ``low=0, low_open=True``).
    """
    meta = {"meaning": meaning, "choices": choices, "low": low, "high": high,
            "low_open": low_open, "high_open": high_open}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def _allowed(meta: dict) -> str:
    """``'a', 'b'`` or ``(0, 1]`` — the allowed values of a field, for messages and tables."""
    if meta.get("choices"):
        return ", ".join(repr(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return "any"
    left = "(" if meta.get("low_open") or low is None else "["
    right = ")" if meta.get("high_open") or high is None else "]"
    return f"{left}{'-∞' if low is None else low}, {'∞' if high is None else high}{right}"


def _members(tp) -> tuple:
    """The member types of ``A | B`` (or ``(A,)``), with ``dict[...]`` reduced to ``dict``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(typing.get_origin(t) or t for t in typing.get_args(tp))
    return (typing.get_origin(tp) or tp,)


def _coerce(value, members: tuple):
    """``value`` as one of the declared types, or ``None`` when it is none of them."""
    if value is None:
        return None if type(None) in members else _NO
    if isinstance(value, bool):
        return value if bool in members else _NO
    if isinstance(value, int) and int in members:
        return value
    if isinstance(value, int | float) and float in members:
        return float(value)
    if isinstance(value, str) and str in members:
        return value
    if isinstance(value, dict) and dict in members:
        if all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool) for k, v in value.items()):
            return {k: float(v) for k, v in sorted(value.items())}
    return _NO


_NO = object()  # "does not fit the declared type" (None can be a legitimate value)


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's options; subclasses are frozen dataclasses of :func:`option` fields."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), _members(hints[f.name]))
            if value is _NO:
                raise KDLibError(
                    f"option {f.name}={getattr(self, f.name)!r} has the wrong type; expected {hints[f.name]}"
                )
            object.__setattr__(self, f.name, value)
            self._check_value(f, value)
        self.check()

    def _check_value(self, f: dataclasses.Field, value) -> None:
        meta = f.metadata
        if isinstance(value, str) and meta.get("choices") and value not in meta["choices"]:
            raise KDLibError(f"option {f.name}={value!r} is not allowed; choose one of {_allowed(meta)}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = meta.get("low"), meta.get("high")
            too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
            too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
            if too_low or too_high or (isinstance(value, float) and math.isnan(value)):
                raise KDLibError(f"option {f.name}={value!r} is out of range; allowed {_allowed(meta)}")

    def check(self) -> None:
        """Checks between options (an incompatible pair); subclasses override it."""

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def resolve(cls, method: str, given: dict | None = None) -> MethodOptions:
        """The complete options of ``method`` from the ones ``given``, validated."""
        given = dict(given or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise KDLibError(f"unknown option(s) {unknown} for method {method!r}; options are {sorted(known)}")
        return cls(**given)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def describe(cls) -> list[dict]:
        """One row per option: name, type, default, allowed values, meaning (for docs and ``--help``)."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append({"name": f.name, "type": str(hints[f.name]).replace("typing.", ""), "default": default,
                         "allowed": _allowed(f.metadata), "meaning": f.metadata.get("meaning", "")})
        return rows


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method without options (vanilla)."""
