"""How every view shows a score: one number format and one diverging colour scale, written once.

:data:`RULES` is the single source. The widget views read it in the browser (:func:`esm` writes
it as the constant ``RULES`` above ``widgets/influence.js``, whose ``fmt``, ``colour`` and
``domainOf`` take the same steps as :func:`fmt`, :func:`colour` and :func:`domain` here); the
static snapshots (:mod:`influence_nb.snapshot`) apply it in Python; the charts take the signs'
and the sources' colours from it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence

RULES: dict = {
    "positive": [230, 97, 1],     # orange, #e66101: the sequence raises log p(completion | prompt)
    "negative": [33, 102, 172],   # blue, #2166ac: it lowers it
    # the sources of a scan over several corpora, in order (the explorer's stripes, the charts)
    "sources": ["#1b9e77", "#7570b3", "#d95f02", "#e7298a", "#66a61e", "#a6761d"],
    "digits": 3,                  # significant digits of every number shown
    "plain": [1e-3, 1e3],         # |v| in [lo, hi) after rounding: plain digits; else 9.77e+4
    "strong": 0.3,                # |v| / d above which a token's text turns white
    "legend": [-1, -0.5, -0.2, -0.05, 0, 0.05, 0.2, 0.5, 1],   # the legend's stops, × d
}
POS, NEG = tuple(RULES["positive"]), tuple(RULES["negative"])
SOURCE_COLOURS: list[str] = RULES["sources"]


def esm(js: str) -> str:
    """The widget views' ES module: :data:`RULES` as the constant ``RULES``, then ``js``."""
    return f"const RULES = {json.dumps(RULES)};\n{js}"


def hex_colour(rgb: Sequence[int]) -> str:
    """``#rrggbb`` of an (r, g, b) triple (for the charts)."""
    return "#" + "".join(f"{c:02x}" for c in rgb)


def fmt(v: float) -> str:
    """The one number format: ``digits`` significant digits, ``9.77e+4`` style when |v| rounds
    to ``hi`` or more or lies below ``lo``."""
    v, digits = float(v), RULES["digits"]
    lo, hi = RULES["plain"]
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    plain = f"{v:.{digits}g}"
    if abs(float(plain)) >= hi or abs(v) < lo:
        mantissa, exp = f"{v:.{digits - 1}e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    return plain


def per_copy(score: float, n_train: int) -> str:
    """score / N as text: the first-order change in log p(completion | prompt), in nats, for one
    added copy of the sequence among N training sequences ("" when N is unknown)."""
    return f"{'+' if score > 0 else ''}{fmt(score / n_train)}" if n_train > 0 else ""


def domain(values: Sequence[float], explicit: float = 0.0) -> float:
    """The colour scale's half-width d: ``explicit`` if > 0, else max |v| (1 when all are 0)."""
    if explicit > 0:
        return explicit
    m = max((abs(v) for v in values), default=0.0)
    return m if m > 0 else 1.0


def colour(v: float, d: float) -> str:
    """CSS colour of v on the diverging scale ±d: transparent at 0, orange at +d, blue at −d;
    opacity grows with sqrt(|v| / d) so that small scores beside one large one stay visible."""
    t = max(-1.0, min(1.0, v / d))
    r, g, b = POS if t >= 0 else NEG
    return f"rgba({r}, {g}, {b}, {math.sqrt(abs(t)):.3f})"


def strong(v: float, d: float) -> bool:
    """Whether v is strong enough on ±d for white text on its colour."""
    return abs(v / d) > RULES["strong"]
