"""Notebook parameters as a person or papermill sets them.

A parameters cell holds Python values (``SEEDS = [0]``), but ``papermill -p SEEDS 7`` injects an int
and ``papermill -p SEEDS '[7, 8]'`` the *text* ``"[7, 8]"``: papermill's ``-p`` only turns plain
numbers into numbers. The setup cell of each chapter passes its list parameters through here, so every
form means the same list.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from numbers import Integral

from kdlib import KDLibError

# Between the integers of a text form: commas and/or spaces.
_SEPARATORS = re.compile(r"[,\s]+")


def int_tuple(value, *, name: str = "value") -> tuple[int, ...]:
    """``value`` (an int, a list or tuple of ints, or their text) as a tuple of non-negative ints.

    Text forms: ``"7"``, ``"[7]"``, ``"7,8"``, ``"[7, 8]"``, ``"(7, 8)"``, ``"7 8"``. Anything else (a
    float, a bool, a negative number, a word, an empty list, a repeated entry) raises :class:`KDLibError`.
    """
    if isinstance(value, str):
        items = _parse_text(value, name)
    elif _is_int(value):
        items = [value]
    elif isinstance(value, Sequence) and all(_is_int(v) for v in value):
        items = list(value)
    else:
        raise KDLibError(_message(name, value))
    if not items or any(v < 0 for v in items):
        raise KDLibError(_message(name, value))
    if len(set(items)) != len(items):
        raise KDLibError(f"{name} lists an entry twice: {value!r}")
    return tuple(int(v) for v in items)


def parse_seeds(value, default: Sequence[int]) -> tuple[int, ...]:
    """The seeds a chapter runs: ``SEEDS`` in any form :func:`int_tuple` reads; None (or ``"None"``) means
    ``default``, the profile's seeds."""
    if value is None or (isinstance(value, str) and value.strip() == "None"):
        return int_tuple(tuple(default), name="the profile's seeds")
    return int_tuple(value, name="SEEDS")


def _is_int(v) -> bool:
    # bool is an Integral too, but SEEDS = True is a mistake, not seed 1.
    return isinstance(v, Integral) and not isinstance(v, bool)


def _parse_text(text: str, name: str) -> list[int]:
    body = text.strip()
    if body[:1] + body[-1:] in ("[]", "()"):  # a list or tuple as Python writes it
        body = body[1:-1]
    tokens = [t for t in _SEPARATORS.split(body) if t]
    if not tokens or not all(t.isdigit() and t.isascii() for t in tokens):
        raise KDLibError(_message(name, text))
    return [int(t) for t in tokens]


def _message(name: str, value) -> str:
    return (f"{name} must be a non-negative integer or a non-empty list of them "
            f"(7, [7, 8], or the text '7', '[7]', '7,8', '[7, 8]'), got {value!r}")
