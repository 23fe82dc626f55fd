"""Arguments checked where the user passes them: each argument dataclass (``FactorArgs``,
``ScoreArgs``, ``SketchArgs``, ``IndexArgs``) calls :func:`check_args` from ``__post_init__``,
so a zero, negative, NaN or wrongly typed size fails at once, in one line naming the argument,
its value and what is allowed — not deep inside a pass, and never as a silently wrong result.

Ids and counts given to a method (a corpus row, a query number, how many rows) go through
:func:`as_ids` and :func:`whole`: an integer in range or a one-line error, never a float
truncated or a negative number wrapped around.

The rules come from the field annotations (``int``, ``float``, ``bool``, ``str``, ``| None``)
and two class attributes: ``MINIMUM`` {field: smallest allowed value} and ``CHOICES``
{field: allowed strings}. Floats must be finite; ``MINIMUM`` of 0.0 for a float means > 0.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np


def _describe(kind: str, minimum: float | None, choices: tuple[str, ...] | None,
              none: bool) -> str:
    if choices:
        text = "one of " + ", ".join(repr(c) for c in choices)
    elif kind == "int":
        text = "an integer" + (f" ≥ {minimum}" if minimum is not None else "")
    elif kind == "float":
        text = "a finite number" + (" > 0" if minimum is not None else "")
    else:
        text = f"a {kind}"
    return text + (" or None" if none else "")


def check_args(args: Any) -> None:
    """Raise a one-line ValueError (TypeError for a wrong type) for the first field of the
    dataclass ``args`` that breaks its annotation, ``MINIMUM`` or ``CHOICES``."""
    minimums: dict[str, float] = getattr(args, "MINIMUM", {})
    all_choices: dict[str, tuple[str, ...]] = getattr(args, "CHOICES", {})
    owner = type(args).__name__
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        parts = [p.strip() for p in str(field.type).split("|")]
        none = "None" in parts
        kinds = [p for p in parts if p != "None"]
        kind = kinds[0] if len(kinds) == 1 and kinds[0] in ("bool", "int", "float", "str") \
            else None
        if kind is None or (value is None and none):
            continue
        minimum, choices = minimums.get(field.name), all_choices.get(field.name)
        allowed = _describe(kind, minimum, choices, none)
        where = f"{owner}({field.name}={value!r})"
        if kind == "bool":
            ok_type = isinstance(value, bool)
        elif kind == "int":
            ok_type = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok_type = isinstance(value, str)
        if not ok_type:
            raise TypeError(f"{where}: must be {allowed}")
        if kind == "float" and not math.isfinite(value):
            raise ValueError(f"{where}: must be {allowed}")
        if minimum is not None and kind in ("int", "float") and (
                value < minimum or (kind == "float" and minimum == 0 and value <= 0)):
            raise ValueError(f"{where}: must be {allowed}")
        if choices and value not in choices:
            raise ValueError(f"{where}: must be {allowed}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: ours are one line, a library's may not be
    (a KeyError's message is its argument, not its quoted repr)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0]


def whole(value: Any, what: str, low: int = 0, high: int | None = None) -> int:
    """``value`` as an int in [low, high): a Python or NumPy integer, never a bool or a float
    (1.5 would be truncated); else a one-line error naming ``what`` — TypeError for the kind,
    IndexError outside an index's range (``high`` given), ValueError below a count's ``low``."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {value!r}") from None
    if n < low or (high is not None and n >= high):
        span = f"from {low} to {high - 1}" if high is not None else f"≥ {low}"
        raise (IndexError if high is not None else ValueError)(
            f"{what} must be an integer {span}, got {n}")
    return n


def as_ids(ids: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Corpus ids as int64 (default: all n), refusing booleans, fractions and ids out of range."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.dtype == bool:
        raise TypeError("ids is a boolean mask; pass the ids themselves: np.flatnonzero(mask)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise TypeError(f"ids must be integers, got {arr.dtype}; pass corpus row numbers")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = arr[(arr < 0) | (arr >= n)][0]
        raise IndexError(f"id {bad} is out of range for a corpus of {n} sequences")
    return arr
