"""The explorer's rows as its view draws them: metadata as chips of text, the metadata keys
that vary between the rows (the table shows those), and the rows in the order the view asks
for. Plain dicts in, plain dicts out (they are synced to the browser)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["chip", "meta_chips", "ordered", "varying"]


def varying(rows: Sequence[dict]) -> list[str]:
    """The metadata keys whose values differ between the rows (the explorer's columns); every
    key when there is a single row."""
    keys = list(dict.fromkeys(k for r in rows for k in r["meta"]))
    if len(rows) < 2:
        return keys
    return [k for k in keys if len({repr(r["meta"].get(k)) for r in rows}) > 1]


def chip(v: Any) -> str:
    """A metadata value as text: a whole number stored as a float (a pandas column with gaps)
    shows without its ".0"."""
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def meta_chips(row: Any, columns: Sequence[str]) -> dict:
    """The row's metadata (the corpus's own columns, whatever they are) as chips: text, or a
    list of texts; missing values are left out."""
    out = {}
    for key in columns:
        v = row.get(key)
        if isinstance(v, (list, tuple, np.ndarray)):
            out[key] = [chip(x) for x in v]
        elif v is not None and not (isinstance(v, float) and np.isnan(v)):
            out[key] = chip(v)
    return out


def ordered(rows: list[dict], key: str, descending: bool) -> list[dict]:
    """The rows in the ``sort`` trait's order: by rank, id, score or a metadata key (numbers as
    numbers); rows without that key last either way."""
    def value(row: dict) -> tuple | None:
        v = row[key] if key in ("rank", "id", "score") else row["meta"].get(key)
        if v is None:
            return None
        v = ", ".join(v) if isinstance(v, list) else v
        try:
            return (0, float(v), "")
        except ValueError:
            return (1, 0.0, str(v))
    present = [r for r in rows if value(r) is not None]
    return (sorted(present, key=value, reverse=descending)
            + [r for r in rows if value(r) is None])
