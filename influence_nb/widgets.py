"""Notebook widgets (anywidget): token highlighting, layer bars, the explorer over a result and
the synthetic-sequence lab. The JavaScript and CSS live in ``widgets/`` (plain DOM, no CDN).

    TokenHighlight(tokens, scores)             a sequence, every token coloured by its score
    LayerBars(names, values)                   one diverging bar per layer
    InfluenceExplorer(result)                  query, ranked sequences, their tokens and layers
    SyntheticLab(session, query, texts)        edit sequences, press Score, see bars and tokens

Colours: orange raises log p(completion | prompt), blue lowers it, on a scale symmetric about 0.
A token's score belongs to the update at its position, which predicts the next token.
"""
from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anywidget
import numpy as np
import pandas as pd
import traitlets as t

from .results import InfluenceResult

if TYPE_CHECKING:
    from .scoring import Queries
    from .session import Influence

__all__ = ["InfluenceExplorer", "LayerBars", "SyntheticLab", "TokenHighlight", "short_layer_names"]


def _asset(name: str) -> Path:
    """A widget file: ``influence_nb/_static`` when installed, ``widgets/`` in a source tree."""
    try:
        return Path(str(importlib.resources.files("influence_nb._static") / name))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "widgets" / name


class _Widget(anywidget.AnyWidget):
    _esm = _asset("influence.js")
    _css = _asset("influence.css")
    _view = t.Unicode().tag(sync=True)


def short_layer_names(names: Sequence[str]) -> list[str]:
    """Layer names without their common dotted prefix ("gpt_neox.layers.0.mlp.dense_4h_to_h"
    → "0.mlp.dense_4h_to_h")."""
    parts = [n.split(".") for n in names]
    k = 0
    while len(parts) > 1 and all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return [".".join(p[k:]) for p in parts]


def _floats(x: Any) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]


class TokenHighlight(_Widget):
    """A sequence's tokens coloured by signed score; click (or Enter) selects a token and syncs
    its index to ``selected``. ``domain`` > 0 fixes the colour scale at ±domain (default: the
    largest |score|)."""
    _view = t.Unicode("tokens").tag(sync=True)
    tokens = t.List(t.Unicode()).tag(sync=True)
    scores = t.List(t.Float()).tag(sync=True)
    selected = t.Int(-1).tag(sync=True)
    domain = t.Float(0.0).tag(sync=True)
    title = t.Unicode("").tag(sync=True)

    def __init__(self, tokens: Sequence[str], scores: Sequence[float], **kw: Any):
        if len(tokens) != len(scores):
            raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
        super().__init__(tokens=list(tokens), scores=_floats(scores), **kw)

    @classmethod
    def of(cls, result: "InfluenceResult", q: int, id: int, **kw: Any) -> "TokenHighlight":
        """Token view of training sequence ``id`` on query ``q`` of a result."""
        df = result.tokens(q, id)
        kw.setdefault("title", f"sequence {id} on query {q}")
        return cls(df["token"].tolist(), df["score"].to_numpy(), **kw)


class LayerBars(_Widget):
    """Per-layer influence as diverging bars, the exact value on hover."""
    _view = t.Unicode("layers").tag(sync=True)
    names = t.List(t.Unicode()).tag(sync=True)
    values = t.List(t.Float()).tag(sync=True)
    title = t.Unicode("").tag(sync=True)

    def __init__(self, names: Sequence[str], values: Sequence[float], **kw: Any):
        if len(names) != len(values):
            raise ValueError(f"{len(names)} layer names but {len(values)} values")
        super().__init__(names=short_layer_names(names), values=_floats(values), **kw)

    @classmethod
    def of(cls, result: "InfluenceResult", q: int = 0, k: int | None = None,
           **kw: Any) -> "LayerBars":
        """Layer profile of query ``q`` (summed over the top-k positive, or all sequences)."""
        prof = result.layer_profile(q, k)
        kw.setdefault("title", f"influence per layer, query {q}"
                      + (f", top {k}" if k else ", all sequences"))
        return cls(list(prof.index), prof.to_numpy(), **kw)


def _query_view(query: dict, tokenizer: Any) -> dict:
    """The query as prompt and completion tokens, for the header of the explorer and lab."""
    def toks(text: str, special: bool) -> list[str]:
        if tokenizer is None:
            return [text]
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        return [tokenizer.decode([i]) for i in ids]
    return dict(prompt=query["prompt"], completion=query["completion"],
                logprob=float(query.get("logprob", float("nan"))),
                prompt_tokens=toks(query["prompt"], False),
                completion_tokens=toks(query["completion"], False))


def _meta(row: Any, columns: Sequence[str]) -> dict:
    """The row's metadata (the corpus's own columns, whatever they are) as chips: text, or a
    list of texts; missing values are left out."""
    out = {}
    for key in columns:
        v = row.get(key)
        if isinstance(v, (list, tuple, np.ndarray)):
            out[key] = [str(x) for x in v]
        elif v is not None and not (isinstance(v, float) and np.isnan(v)):
            out[key] = str(v)
    return out


class InfluenceExplorer(_Widget):
    """The ranked training sequences of a result: pick the query and the sign, click a sequence
    to see its per-token highlighting and per-layer bars (recomputed for that sequence). A scan
    over several corpora colours each row by its source and can show one source only
    (``source``: "" for all)."""
    _view = t.Unicode("explorer").tag(sync=True)
    queries = t.List(t.Dict()).tag(sync=True)
    query = t.Int(0).tag(sync=True)
    sign = t.Unicode("positive").tag(sync=True)
    sources = t.List(t.Unicode()).tag(sync=True)
    source = t.Unicode("").tag(sync=True)
    rows = t.List(t.Dict()).tag(sync=True)
    selected = t.Int(-1).tag(sync=True)
    detail = t.Dict().tag(sync=True)
    token = t.Int(-1).tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, result: "InfluenceResult", k: int = 20, query: int = 0,
                 sign: str = "positive", source: str = "", **kw: Any):
        self.result, self.k = result, k
        tok = result.corpus.tokenizer if result.corpus is not None else None
        super().__init__(queries=[_query_view(q, tok) for q in result.queries],
                         sources=result.sources, **kw)
        if source and source not in result.sources:
            raise ValueError(f"unknown source {source!r}; this result has "
                             f"{result.sources or 'no sources'}")
        # observers rank on a change
        self.query, self.sign, self.source = result._q(query), sign, source
        if not self.rows:
            self._rank()

    @t.observe("query", "sign", "source")
    def _rank(self, _: Any = None) -> None:
        df = self.result.top(self.query, self.k, self.sign, self.source or None)
        with self.hold_sync():
            self.rows = [dict(rank=int(rank), id=int(r["id"]), score=float(r["score"]),
                              text=str(r.get("text", "")), source=str(r.get("source", "")),
                              meta=_meta(r, self.result.metadata_columns))
                         for rank, r in df.iterrows()]
            first = self.rows[0]["id"] if self.rows else -1
            if first == self.selected:
                self._detail()
            self.selected = first

    @t.observe("selected")
    def _detail(self, _: Any = None) -> None:
        """Per-token and per-layer scores of the selected sequence."""
        res, q, id = self.result, self.query, self.selected
        if id < 0:
            return
        col = int(np.flatnonzero(res.ids == id)[0])
        det = dict(id=id, score=float(res.scores[q, col]),
                   meta=next((r["meta"] for r in self.rows if r["id"] == id), {}))
        if res.layer_scores is not None:
            det.update(layer_names=short_layer_names(res.layer_names),
                       layer_values=_floats(res.layer_scores[q, :, col]))
        try:
            df = res.tokens(q, id)
        except ValueError as e:
            self.error = str(e)
        else:
            det.update(tokens=df["token"].tolist(), token_scores=_floats(df["score"]))
            self.error = ""
        self.token, self.detail = -1, det


class SyntheticLab(_Widget):
    """Synthetic training sequences scored against one query without rescanning the corpus: edit
    them in the widget (or set ``texts``), press Score (or call :meth:`score`)."""
    _view = t.Unicode("lab").tag(sync=True)
    query = t.Dict().tag(sync=True)
    texts = t.List(t.Unicode()).tag(sync=True)
    labels = t.List(t.Unicode()).tag(sync=True)
    scored_texts = t.List(t.Unicode()).tag(sync=True)
    scores = t.List(t.Float()).tag(sync=True)
    tokens = t.List(t.List(t.Unicode())).tag(sync=True)
    token_scores = t.List(t.List(t.Float())).tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    def __init__(self, session: "Influence", query: "tuple[str, str] | Queries",
                 texts: Sequence[str] = (), labels: Sequence[str] = (), score: bool = True,
                 **kw: Any):
        self.session = session
        self._queries = session.queries(query)
        if len(self._queries) != 1:
            raise ValueError(f"the lab scores against one query, got {len(self._queries)}")
        tok, q = session.tokenizer, self._queries
        desc = dict(prompt=tok.decode(q.prompts[0]), completion=tok.decode(q.completions[0]),
                    logprob=float(q.f[0]))
        super().__init__(query=_query_view(desc, tok), texts=list(texts), labels=list(labels),
                         **kw)
        self.on_msg(self._on_msg)
        if score and self.texts:
            self.score()

    def _on_msg(self, _: Any, content: dict, buffers: Any) -> None:
        if content.get("type") == "score":
            self.score()

    def score(self) -> np.ndarray:
        """Score the non-empty texts; returns their (n,) totals and updates the view."""
        keep = [i for i, x in enumerate(self.texts) if x.strip()]
        texts = [self.texts[i] for i in keep]
        labels = [self.labels[i] if i < len(self.labels) else "" for i in keep]
        self.busy = True
        try:
            if not texts:
                raise ValueError("no sequences to score: write at least one")
            res = self.session.score_texts(texts, self._queries)
            per_tok = [res.tokens(0, int(i)) for i in res.ids]
        except ValueError as e:
            self.error, self.busy = str(e), False
            return np.zeros(0)
        with self.hold_sync():
            self.texts, self.labels, self.scored_texts = texts, labels, texts
            self.scores = _floats(res.scores[0])
            self.tokens = [df["token"].tolist() for df in per_tok]
            self.token_scores = [_floats(df["score"]) for df in per_tok]
            self.error, self.busy = "", False
        return res.scores[0]

    @property
    def table(self) -> pd.DataFrame:
        """The last scores: label, text, score (one row per scored sequence)."""
        labels = [lab or f"#{i + 1}" for i, lab in enumerate(self.labels[:len(self.scores)])]
        return pd.DataFrame(dict(label=labels, text=self.scored_texts, score=self.scores))


InfluenceResult.view = InfluenceExplorer  # a result in a notebook shows itself as the explorer
