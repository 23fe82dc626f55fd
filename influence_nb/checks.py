"""Arguments checked where the user passes them: each argument dataclass (``FactorArgs``,
``ScoreArgs``, ``SketchArgs``, ``IndexArgs``) calls :func:`check_args` from ``__post_init__``,
so a zero, negative, NaN or wrongly typed size fails at once, in one line naming the argument,
its value and what is allowed — not deep inside a pass, and never as a silently wrong result.

The rules come from the field annotations (``int``, ``float``, ``bool``, ``str``, ``| None``)
and two class attributes: ``MINIMUM`` {field: smallest allowed value} and ``CHOICES``
{field: allowed strings}. Floats must be finite; ``MINIMUM`` of 0.0 for a float means > 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any


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
