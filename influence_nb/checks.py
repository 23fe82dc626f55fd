"""Arguments checked where the user passes them, by one declared mechanism: each argument
dataclass (``FactorArgs``, ``ScoreArgs``, ``SketchArgs``, ``IndexArgs``, ``TrainConfig``, …)
calls :func:`check_args` from ``__post_init__``, and each public function or method is wrapped
in :func:`checked`. Either way a zero, negative, NaN or wrongly typed value fails at once, in
one line naming the function (or class), the argument, its value and what is allowed — not
deep inside a pass, and never as a silently wrong result.

The rules come from the annotations — ``int`` (never a bool or a float), ``float`` (finite;
an int will do), ``bool``, ``str``, a sequence of ints (``Sequence[int]``, ``tuple[int,
...]``) or of strings (``Sequence[str]``; ``str | Sequence[str]``), each optionally
``| None`` — and small declarations: ``minimum`` {name: smallest allowed value} (a float's
minimum of 0.0 means > 0), ``within`` {name: an interval such as "(0, 1]"}, ``choices``
{name: allowed strings}, ``distinct`` and ``nonempty`` (names of sequences that may not
repeat a value / be empty). A dataclass declares them as the class attributes ``MINIMUM``,
``WITHIN``, ``CHOICES``, ``DISTINCT``, ``NONEMPTY``. An annotation outside these (a model, a
corpus, ``int | str``) is the function's own business.

Ids and counts whose range is known only at run time (a corpus row, a query number) go
through :func:`as_ids` and :func:`whole`: an integer in range or a one-line error, never a
float truncated or a negative number wrapped around.
"""
from __future__ import annotations

import builtins
import dataclasses
import functools
import inspect
import math
import operator
import reprlib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

SCALARS = ("bool", "int", "float", "str")
INTS = ("Sequence[int]", "tuple[int, ...]", "list[int]", "np.ndarray")
STRS = ("Sequence[str]", "list[str]", "tuple[str, ...]")
F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class Rule:
    """What one argument may be.

    kind:     "bool", "int", "float", "str", "ints" (a sequence of integers), "strs" (of
              strings; ``| str``: one string will do too) or "object" (an instance of
              ``classes``, each element an instance of ``each`` if given)
    none:     None is allowed
    low/high: the interval's ends (None: unbounded); low_open / high_open: excluded
    choices:  the allowed strings (None: any)
    distinct: an int sequence may not repeat a value; nonempty: nor be empty
    """
    kind: str
    none: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    distinct: bool = False
    nonempty: bool = False
    alone: bool = False
    classes: tuple[type, ...] = ()
    each: type | None = None

    def allowed(self) -> str:
        """What is allowed, in words: "an integer ≥ 1 or None"."""
        if self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind == "object":
            names = [c.__name__ for c in self.classes]
            text = " or ".join(("an " if n[0] in "AEIOUaeiou" else "a ") + n for n in names)
            text += f" of {self.each.__name__}" if self.each else ""
        else:
            noun = {"int": "an integer", "float": "a finite number", "bool": "a bool",
                    "str": "a str", "ints": "a sequence of integers",
                    "strs": "a str or a list of str" if self.alone else "a list of str"
                    }[self.kind]
            text = noun + self._span() + (", each once" if self.distinct else "") + (
                ", not empty" if self.nonempty else "")
        return text + (" or None" if self.none else "")

    def _span(self) -> str:
        each = " each" if self.kind == "ints" else ""
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            return (f"{each} in {'(' if self.low_open else '['}{low}, {high}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{each} {'>' if self.low_open else '≥'} {low}"
        if self.high is not None:
            return f"{each} {'<' if self.high_open else '≤'} {high}"
        return ""

    def check(self, value: Any, owner: str, arg: str) -> None:
        """Raise a one-line TypeError (the kind) or ValueError (range, choices, repeats) that
        starts with ``owner(arg=value)`` when ``value`` breaks the rule."""
        if value is None and self.none:
            return
        if self.kind == "ints":
            error = self._ints(value)
        elif self.kind == "strs":
            error = self._strs(value)
        elif self.kind == "object":
            error = None if isinstance(value, self.classes) and (self.each is None or all(
                isinstance(v, self.each) for v in value)) else TypeError
        elif not _is(self.kind, value):
            error = TypeError
        elif (self.kind in ("int", "float") and not self._inside(value)) or (
                self.choices and value not in self.choices):
            error = ValueError
        else:
            return
        if error is not None:
            raise error(f"{owner}({arg}={shown(value)}): must be {self.allowed()}")

    def _inside(self, x: Any) -> bool:
        try:
            if self.kind == "float" and not math.isfinite(x):
                return False
        except OverflowError:      # an int too large for a float
            return False
        return not ((self.low is not None and (x <= self.low if self.low_open else x < self.low))
                    or (self.high is not None and (x >= self.high if self.high_open
                                                   else x > self.high)))

    def _strs(self, value: Any) -> type[Exception] | None:
        """The error a string or sequence of strings breaks the rule with (None: it keeps it)."""
        if isinstance(value, str):
            return None if self.alone else TypeError
        if not isinstance(value, (Sequence, set)) or not all(isinstance(v, str) for v in value):
            return TypeError
        return ValueError if self.nonempty and not len(value) else None

    def _ints(self, value: Any) -> type[Exception] | None:
        """The error a sequence of ints breaks the rule with (None: it keeps it)."""
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
            return TypeError
        try:
            arr = np.asarray(value if hasattr(value, "__array__") or isinstance(value, Sequence)
                             else list(value))
        except (ValueError, TypeError):   # ragged, or not numbers
            return TypeError
        if arr.ndim != 1 or arr.dtype == bool or (
                arr.size and not np.issubdtype(arr.dtype, np.integer)):
            return TypeError
        ends = [arr.min(), arr.max()] if arr.size else []
        if not all(self._inside(x) for x in ends) or (self.nonempty and not arr.size) or (
                self.distinct and len(np.unique(arr)) < arr.size):
            return ValueError
        return None


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def shown(value: Any) -> str:
    """``value``'s repr, shortened and on one line (an array's repr spans lines)."""
    return " ".join(reprlib.repr(value).split())


def _is(kind: str, value: Any) -> bool:
    """Whether ``value`` is of ``kind``: a bool is no number, a float no integer."""
    if kind == "bool":
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if kind == "int":
        return isinstance(value, (int, np.integer))
    if kind == "float":
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, str)


def interval(text: str) -> tuple[float | None, float | None, bool, bool]:
    """"(0, 1]" -> (low, high, low_open, high_open); ``inf`` ends are None."""
    a, b = (x.strip() for x in text.strip()[1:-1].split(","))
    low, high = float(a), float(b)
    return (None if math.isinf(low) else low, None if math.isinf(high) else high,
            text.strip()[0] == "(", text.strip()[-1] == ")")


def _parts(text: str) -> list[str]:
    """The alternatives of a union annotation, "A | B[C | D]" -> ["A", "B[C | D]"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if c == "|" and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    return parts + [text[start:].strip()]


def _resolve(name: str, namespace: Mapping[str, Any]) -> Any:
    """The object a dotted annotation name stands for in ``namespace`` (None: unknown)."""
    head, *rest = name.split(".")
    obj = namespace.get(head, getattr(builtins, head, None))
    for attr in rest:
        obj = getattr(obj, attr, None)
    return obj


def _classes(obj: Any) -> list[type] | None:
    """The classes an annotation object admits (a union's, a generic's origin); None: any
    (``Any``, ``object``, an array, something that is no class)."""
    if obj is None or obj is Any or obj is object or obj in (np.ndarray,) or (
            getattr(obj, "__name__", "") == "Tensor"):
        return None
    if isinstance(obj, types.UnionType) or typing.get_origin(obj) is typing.Union:
        out: list[type] = []
        for arg in typing.get_args(obj):
            more = [] if arg is type(None) else _classes(arg)
            if more is None:
                return None
            out += more
        return out
    obj = typing.get_origin(obj) or obj
    return [obj] if isinstance(obj, type) else None


def _object_rule(parts: list[str], namespace: Mapping[str, Any]) -> tuple[tuple[type, ...],
                                                                           type | None] | None:
    """(classes, element class) of a union's parts resolved in ``namespace``; None: any."""
    classes: list[type] = []
    each = None
    for part in parts:
        base, _, inner = part.partition("[")
        found = _classes(_resolve(base.strip(), namespace))
        if found is None:
            return None
        classes += found
        if len(parts) == 1 and inner and found[0] in (list, Sequence):
            element = _classes(_resolve(inner[:-1].strip(), namespace))
            each = element[0] if element and len(element) == 1 else None
    if Sequence in classes:          # an array serves where a sequence is asked for
        classes.append(np.ndarray)
    return tuple(classes), each


def rule(annotation: Any, minimum: float | None = None, within: str | None = None,
         choices: Sequence[str] | None = None, distinct: bool = False,
         nonempty: bool = False, namespace: Mapping[str, Any] | None = None) -> Rule | None:
    """The :class:`Rule` of an annotation (a string under ``from __future__ import
    annotations``, or a type) and its declarations; None when the annotation is not one the
    rules know. With ``namespace`` (the module's globals) other names are resolved too: the
    value must be an instance of the classes they name."""
    text = annotation if isinstance(annotation, str) else (
        annotation.__name__ if isinstance(annotation, type) else
        str(annotation).replace("collections.abc.", "").replace("typing.", ""))
    parts = _parts(text.strip("'\""))
    none = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if len(kinds) == 1 and kinds[0] in SCALARS:
        kind = kinds[0]
    elif kinds and set(kinds) <= set(INTS) and kinds != ["np.ndarray"]:
        kind = "ints"
    elif set(kinds) & set(STRS) and set(kinds) <= {"str", *STRS}:
        kind = "strs"
    elif namespace is not None and kinds and (found := _object_rule(kinds, namespace)):
        return Rule("object", none, classes=found[0], each=found[1])
    else:
        return None
    low = high = None
    low_open = high_open = False
    if within is not None:
        low, high, low_open, high_open = interval(within)
    elif minimum is not None:
        low, low_open = minimum, kind == "float" and minimum == 0
    return Rule(kind, none, low, high, low_open, high_open,
                tuple(choices) if choices else None, distinct, nonempty, "str" in kinds)


def rules(annotations: Mapping[str, Any], minimum: Mapping[str, float] | None = None,
          within: Mapping[str, str] | None = None,
          choices: Mapping[str, Sequence[str]] | None = None,
          distinct: Sequence[str] = (), nonempty: Sequence[str] = (),
          namespace: Mapping[str, Any] | None = None) -> dict[str, Rule]:
    """{name: rule} of every annotated name the rules know (classes too, given the module's
    ``namespace``); a declaration naming no such argument is a mistake in the declaration (a
    TypeError at import)."""
    minimum, within, choices = minimum or {}, within or {}, choices or {}
    out = {}
    for name, annotation in annotations.items():
        r = rule(annotation, minimum.get(name), within.get(name), choices.get(name),
                 name in distinct, name in nonempty, namespace)
        if r is not None:
            out[name] = r
    unknown = (set(minimum) | set(within) | set(choices) | set(distinct) | set(nonempty)) \
        - set(out)
    if unknown:
        raise TypeError(f"declared rules for {sorted(unknown)}, which have no int, float, bool, "
                        "str or int-sequence annotation")
    return out


@functools.cache
def _dataclass_rules(cls: type) -> dict[str, Rule]:
    return rules({f.name: f.type for f in dataclasses.fields(cls)},
                 getattr(cls, "MINIMUM", None), getattr(cls, "WITHIN", None),
                 getattr(cls, "CHOICES", None), getattr(cls, "DISTINCT", ()),
                 getattr(cls, "NONEMPTY", ()), vars(sys.modules[cls.__module__]))


def check_args(args: Any) -> None:
    """Raise a one-line ValueError (TypeError for a wrong type) for the first field of the
    dataclass ``args`` that breaks its annotation or the class's declarations."""
    owner = type(args).__name__
    for name, r in _dataclass_rules(type(args)).items():
        r.check(getattr(args, name), owner, name)


def checked(minimum: Mapping[str, float] | None = None, within: Mapping[str, str] | None = None,
            choices: Mapping[str, Sequence[str]] | None = None, distinct: Sequence[str] = (),
            nonempty: Sequence[str] = ()) -> Callable[[F], F]:
    """A decorator: check the arguments passed to a function or method against its signature's
    annotations and these declarations (see the module's docstring) before its body runs.
    Defaults are not checked (they are the author's). Costs about a microsecond per argument.

        @checked(minimum={"k": 1}, choices={"sign": SIGNS})
        def top(self, q: int = 0, k: int = 10, sign: str = "positive") -> pd.DataFrame: ...
    """
    def wrap(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        annotations = {p.name: p.annotation for p in params
                       if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        declared = (minimum, within, choices, distinct, nonempty)
        table = rules(annotations, *declared)       # a mistaken declaration fails at import
        cut = next((i for i, p in enumerate(params) if p.kind in (p.VAR_POSITIONAL,
                                                                 p.KEYWORD_ONLY)), len(params))
        order = [p.name for p in params[:cut]]
        positional: list[tuple[int, str, Rule]] = []
        name = fn.__qualname__.replace(".<locals>", "")

        @functools.wraps(fn)
        def check(*args: Any, **kwargs: Any) -> Any:
            if not check.bound:   # the first call: the classes the module defines are known
                table.update(rules(annotations, *declared, namespace=fn.__globals__))
                positional[:] = [(i, n, table[n]) for i, n in enumerate(order) if n in table]
                check.bound = True
            for i, arg, r in positional:
                if i < len(args):
                    r.check(args[i], name, arg)
            for arg, value in kwargs.items():
                if arg in table:
                    table[arg].check(value, name, arg)
            return fn(*args, **kwargs)
        check.rules, check.bound = table, False    # what is checked: the docs, the tests
        return check                  # type: ignore[return-value]
    return wrap


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


def counts(value: int | Sequence[int], what: str) -> list[int]:
    """One count or several (``plan(queries=[1, 8])``) as a sorted list of distinct ints ≥ 1;
    a bool, a fraction, a count below 1 or no count at all is a one-line error naming ``what``."""
    many = not isinstance(value, (int, np.integer))
    out = sorted({whole(v, what, low=1) for v in (value if many else [value])})
    if not out:
        raise ValueError(f"{what} is empty; give a number of queries, or several")
    return out


def as_ids(ids: Sequence[int] | np.ndarray | None, n: int, what: str = "ids") -> np.ndarray:
    """Corpus ids as int64 (default: all n), refusing booleans, fractions and ids out of range;
    ``what`` names them in the error ("rankings['ekfac']")."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.dtype == bool:
        raise TypeError(f"{what} is a boolean mask; pass the ids themselves: "
                        "np.flatnonzero(mask)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise TypeError(f"{what} must be integers, got {arr.dtype}; pass corpus row "
                            "numbers")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = arr[(arr < 0) | (arr >= n)][0]
        raise IndexError(f"id {bad} is out of range for a corpus of {n} sequences"
                         + ("" if what == "ids" else f" (in {what})"))
    return arr
