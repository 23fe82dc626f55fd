"""Notebook widgets (anywidget): token highlighting, layer bars, the explorer over a result and
the synthetic-sequence lab. The JavaScript and CSS live in ``widgets/`` (plain DOM, no CDN).

    TokenHighlight(tokens, scores)             a sequence, every token coloured by its score
    LayerBars(names, values)                   one diverging bar per layer
    InfluenceExplorer(result)                  query, ranked sequences, their tokens and layers
    SyntheticLab(session, query, texts)        edit sequences, press Score, see bars and tokens

Colours (:mod:`influence_nb.style`): orange raises log p(completion | prompt), blue lowers it,
on a scale symmetric about 0 (0 is transparent). A token's score belongs to the update at its
position, which predicts the next token. The unit (:data:`~influence_nb.results.UNIT`, shown
by every view): score = d log p(completion | prompt) / dε in nats, ε the weight of the
sequence added to the mean training loss (first order); one added copy among N training
sequences is ε = 1/N, so Δ log p per copy = score / N, shown where N (``n_train``) is known.

Displayed, every widget (a :class:`~influence_nb.view.View`) is two outputs: a static HTML
snapshot of itself (``text/html``, :mod:`influence_nb.snapshot`, kept up to date while the
kernel runs) and the widget view, whose CSS hides the snapshot wherever the view renders. So a
saved notebook reopened without a kernel (where JupyterLab shows "Loading widget…"), nbconvert
HTML (with or without widget state, offline) and a rendered .ipynb show the snapshot.
``to_html()`` returns it, ``save(path)`` writes it as a standalone page.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import traitlets as t

from . import snapshot
from .checks import checked, shown
from .results import SIGNS, InfluenceResult
from .rows import meta_chips, ordered, varying
from .view import View

if TYPE_CHECKING:
    from .queries import Queries
    from .session import Influence

__all__ = ["InfluenceExplorer", "LayerBars", "SyntheticLab", "TokenHighlight", "short_layer_names"]


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


def _paired(labels: Sequence[str], values: Sequence[float], what: tuple[str, str]) -> list[float]:
    """``values`` as finite floats, one per label; ``what`` names both for the error."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{what[1]} must be numbers, got {shown(values)}") from None
    if x.shape != (len(labels),) or not np.isfinite(x).all():
        raise ValueError(f"{len(labels)} {what[0]} but {x.size} {what[1]} {shown(values)}: give "
                         f"one finite number per entry of {what[0]}")
    return x.tolist()


class TokenHighlight(View):
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
        super().__init__(tokens=list(tokens), scores=_paired(tokens, scores, ("tokens", "scores")),
                         **kw)

    @classmethod
    def of(cls, result: "InfluenceResult", q: int, id: int, **kw: Any) -> "TokenHighlight":
        """Token view of training sequence ``id`` on query ``q`` of a result."""
        df = result.tokens(q, id)
        kw.setdefault("title", f"sequence {id} on query {q}")
        kw.setdefault("n_train", result.n_train or 0)
        return cls(df["token"].tolist(), df["score"].to_numpy(), **kw)

    def to_html(self) -> str:
        return snapshot.token_highlight(self.get_state())


class LayerBars(View):
    """Per-layer influence as diverging bars, the exact value on hover."""
    _view = t.Unicode("layers").tag(sync=True)
    names = t.List(t.Unicode()).tag(sync=True)
    values = t.List(t.Float()).tag(sync=True)
    title = t.Unicode("").tag(sync=True)

    def __init__(self, names: Sequence[str], values: Sequence[float], **kw: Any):
        super().__init__(names=short_layer_names(names),
                         values=_paired(names, values, ("layer names", "values")), **kw)

    @classmethod
    def of(cls, result: "InfluenceResult", q: int = 0, k: int | None = None,
           **kw: Any) -> "LayerBars":
        """Layer profile of query ``q`` (summed over the top-k positive, or all sequences)."""
        prof = result.layer_profile(q, k)
        kw.setdefault("title", f"influence per layer, query {q}"
                      + (f", top {k}" if k else ", all sequences"))
        kw.setdefault("n_train", result.n_train or 0)
        return cls(list(prof.index), prof.to_numpy(), **kw)

    def to_html(self) -> str:
        return snapshot.layer_bars(self.get_state())


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


class InfluenceExplorer(View):
    """The ranked training sequences of a result as a table (rank, score, a snippet centred on
    the sequence's most influential span, the metadata that varies as chips): pick the query,
    the sign and k, search, sort; click a sequence to see its per-token highlighting and
    per-layer bars. The ranking and the search cover the whole scan, not the rows shown;
    sequences of identical text are one row with a count (``copies``). Linked views: a click
    on a layer bar recolours the tokens by that layer alone (``layer``); a click on a
    completion token re-ranks the scan by its influence on that token alone (``query_token``:
    its log p given the prompt and the completion before it, rescored by the kernel over the
    scan's RERANK sequences of largest |score|); ``shared_scale`` colours every row's tokens
    on one scale. A scan over several corpora colours each row by its source and can show one
    source only (``source``)."""
    _view = t.Unicode("explorer").tag(sync=True)
    queries = t.List(t.Dict()).tag(sync=True)
    query = t.Int(0).tag(sync=True)
    query_token = t.Int(-1).tag(sync=True)   # completion token ranked alone; -1: the whole one
    sign = t.Unicode("positive").tag(sync=True)
    k = t.Int(20).tag(sync=True)              # rows shown: the k best-ranked distinct texts
    search = t.Unicode("").tag(sync=True)     # only sequences whose text, id or metadata has it
    sort = t.Unicode("rank").tag(sync=True)   # the rows' order: rank, id, score or a metadata key
    descending = t.Bool(False).tag(sync=True)
    sources = t.List(t.Unicode()).tag(sync=True)
    source = t.Unicode("").tag(sync=True)
    rows = t.List(t.Dict()).tag(sync=True)
    columns = t.List(t.Unicode()).tag(sync=True)   # metadata keys that vary between the rows
    # scanned: sequences in the scan; ranked: those the ranking covers (fewer when a completion
    # token alone ranks a scan over RERANK); matches: those ranked that pass source and search
    # (the search they were counted for)
    counts = t.Dict().tag(sync=True)
    selected = t.Int(-1).tag(sync=True)
    detail = t.Dict().tag(sync=True)
    token = t.Int(-1).tag(sync=True)
    layer = t.Int(-1).tag(sync=True)           # detail tokens by this layer alone; -1: all
    shared_scale = t.Bool(False).tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    SPAN = 8        # tokens in a snippet's highlighted span
    CONTEXT = 12    # tokens of context either side of it
    RERANK = 2000   # most sequences rescored on one completion token (those of largest |score|)

    @checked(minimum={"k": 1}, choices={"sign": SIGNS})
    def __init__(self, result: "InfluenceResult", k: int = 20, query: int = 0,
                 sign: str = "positive", source: str = "", **kw: Any):
        self.result = result
        self._active, self._q = result, 0   # the result the rows come from, and its query
        self._tokens: dict[int, np.ndarray] = {}   # per-token scores of the rows, by id
        self._alone: dict[tuple[int, int], InfluenceResult] = {}   # (query, token) rescored
        if source and source not in result.sources:
            raise ValueError(f"unknown source {source!r}; this result has "
                             f"{result.sources or 'no sources'}")
        if not -result.n_queries <= query < result.n_queries:
            raise IndexError(f"query {query} out of range: this result has "
                             f"{result.n_queries} queries")
        tok = result.corpus.tokenizer if result.corpus is not None else None
        kw.setdefault("n_train", result.n_train or 0)
        # observers rank on a change; the view indexes queries from 0 (-1 is the last)
        super().__init__(queries=[_query_view(q, tok) for q in result.queries],
                         sources=result.sources, k=k, query=query % result.n_queries, sign=sign,
                         source=source, **kw)
        if not self.rows:
            self._rank()

    @t.validate("k")
    def _k_at_least_one(self, proposal: Any) -> int:
        return max(1, int(proposal["value"]))

    @t.observe("query", "sign", "source", "query_token", "k", "search")
    def _rank(self, change: Any = None) -> None:
        if change is not None and change["name"] == "query" and self.query_token >= 0:
            self.query_token = -1          # its observer ranks again
            return
        self._active, self._q, failed = self.result, self.query, ""
        if self.query_token >= 0 and len(self.result.ids):
            try:
                self._active, self._q = self._by_token(), 0
            except ValueError as e:
                failed = str(e)
        source = self.source or None
        df = self._active.top(self._q, self.k, self.sign, source, self.search, distinct=True)
        self._tokens = self._row_tokens(df["id"].tolist())
        rows = [dict(rank=int(rank), id=int(r["id"]), score=float(r["score"]),
                     copies=int(r.get("copies", 1)), text=str(r.get("text", "")),
                     source=str(r.get("source", "")),
                     meta=meta_chips(r, self.result.metadata_columns),
                     **self._snippet(int(r["id"])))
                for rank, r in df.iterrows()]
        with self.hold_sync():
            self.counts = dict(scanned=len(self.result.ids), ranked=len(self._active.ids),
                               matches=int(self._active.matching(source, self.search).sum()),
                               search=self.search)
            self.rows = ordered(rows, self.sort, self.descending)
            self.columns = varying(self.rows)
            first = min(self.rows, key=lambda r: r["rank"])["id"] if self.rows else -1
            if first == self.selected:
                self._detail()
            self.selected = first
            if first < 0:
                self.detail = {}          # nothing matches: no sequence to detail
            if failed:
                self.error = failed

    @t.observe("sort", "descending")
    def _order(self, _: Any = None) -> None:
        self.rows = ordered(self.rows, self.sort, self.descending)

    def _by_token(self) -> "InfluenceResult":
        """The scan rescored on the chosen completion token alone (its RERANK sequences of
        largest |score| on the whole completion), computed once per (query, token)."""
        fn = self.result.token_query_fn
        n = len(self.queries[self.query]["completion_tokens"])
        if fn is None:
            raise ValueError("ranking by one completion token needs the model: use a result "
                             "from Influence.scan, not one loaded from disk alone")
        if not 0 <= self.query_token < n:
            raise ValueError(f"completion token {self.query_token} out of range: the "
                             f"completion has {n} tokens")
        key = (self.query, self.query_token)
        if key not in self._alone:
            s = np.abs(self.result.scores[self.query])
            cols = np.sort(np.argsort(-s, kind="stable")[:self.RERANK])
            self._alone[key] = fn(self.query, self.query_token,
                                  [int(i) for i in self.result.ids[cols]])
        return self._alone[key]

    def _row_tokens(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Per-token scores of every row on the active query, in one pass ({} without the
        model)."""
        if self._active.token_fn is None or self._active.corpus is None or not ids:
            return {}
        per_seq, _ = self._active.token_fn(ids)
        return {i: np.asarray(s[self._q], dtype=np.float64) for i, s in zip(ids, per_seq)}

    def _snippet(self, id: int) -> dict:
        """The row's text around its most influential span: the SPAN tokens whose scores sum
        highest (lowest for the negative tab), with CONTEXT tokens either side; {} without
        per-token scores."""
        scores = self._tokens.get(id)
        if scores is None or not len(scores):
            return {}
        corpus = self._active.corpus
        toks = [corpus.tokenizer.decode([int(x)]) for x in corpus.token_ids(id)]
        w = min(self.SPAN, len(scores))
        sums = np.convolve(scores, np.ones(w), "valid") * (-1 if self.sign == "negative" else 1)
        a = int(np.argmax(sums))
        lo, hi = max(0, a - self.CONTEXT), min(len(toks), a + w + self.CONTEXT)
        return dict(snippet=["".join(toks[lo:a]), "".join(toks[a:a + w]), "".join(toks[a + w:hi])],
                    snippet_cut=[lo > 0, hi < len(toks)],
                    peak=float(np.abs(scores).max()))

    @t.observe("selected", "layer", "shared_scale")
    def _detail(self, _: Any = None) -> None:
        """Per-token and per-layer scores of the selected sequence (tokens through one layer
        when ``layer`` >= 0; on one scale for all rows when ``shared_scale``)."""
        res, q, id = self._active, self._q, self.selected
        if id < 0 or id not in res.ids:
            return
        col = int(np.flatnonzero(res.ids == id)[0])
        det = dict(id=id, score=float(res.scores[q, col]),
                   meta=next((r["meta"] for r in self.rows if r["id"] == id), {}))
        if res.layer_scores is not None:
            det.update(layer_names=short_layer_names(res.layer_names),
                       layer_values=_floats(res.layer_scores[q, :, col]))
        if self.shared_scale and self.layer < 0:
            det["domain"] = max((r.get("peak", 0.0) for r in self.rows), default=0.0)
        layer = res.layer_names[self.layer] if 0 <= self.layer < len(res.layer_names) else None
        try:
            if layer is None and id in self._tokens:
                scores = self._tokens[id]
                toks = [res.corpus.tokenizer.decode([int(x)]) for x in res.corpus.token_ids(id)]
            else:
                df = res.tokens(q, id, [layer] if layer else None)
                toks, scores = df["token"].tolist(), df["score"].to_numpy()
        except ValueError as e:
            self.error = str(e)
        else:
            det.update(tokens=toks, token_scores=_floats(scores))
            self.error = ""
        self.token, self.detail = -1, det

    def to_html(self) -> str:
        return snapshot.explorer(self.get_state())


class SyntheticLab(View):
    """Synthetic training sequences scored against one query without rescanning the corpus: edit
    them in the widget (or set ``texts``), press Score (or call :meth:`score`)."""
    _view = t.Unicode("lab").tag(sync=True)
    query = t.Dict().tag(sync=True)
    texts = t.List(t.Unicode()).tag(sync=True)
    labels = t.List(t.Unicode()).tag(sync=True)
    # the results below belong to exactly these texts and labels (an edit makes them stale)
    scored_texts = t.List(t.Unicode()).tag(sync=True)
    scored_labels = t.List(t.Unicode()).tag(sync=True)
    scores = t.List(t.Float()).tag(sync=True)
    tokens = t.List(t.List(t.Unicode())).tag(sync=True)
    token_scores = t.List(t.List(t.Float())).tag(sync=True)
    busy = t.Bool(False).tag(sync=True)
    error = t.Unicode("").tag(sync=True)

    @checked()
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
        kw.setdefault("n_train", session.n_train)
        super().__init__(query=_query_view(desc, tok), texts=list(texts), labels=list(labels),
                         **kw)
        if score and self.texts:
            self.score()

    def _command(self, content: dict) -> None:
        if content.get("type") == "score":
            self.score()

    def score(self) -> np.ndarray:
        """Score the non-empty texts; returns their (n,) totals and updates the view. On an
        error the previous results are dropped (they belong to texts no longer asked about)."""
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
            with self.hold_sync():
                self._set_results([], [], [], [], [])
                self.error, self.busy = str(e), False
            return np.zeros(0)
        with self.hold_sync():
            self.texts, self.labels = texts, labels
            self._set_results(texts, labels, _floats(res.scores[0]),
                              [df["token"].tolist() for df in per_tok],
                              [_floats(df["score"]) for df in per_tok])
            self.error, self.busy = "", False
        return res.scores[0]

    def _set_results(self, texts: list[str], labels: list[str], scores: list[float],
                     tokens: list[list[str]], token_scores: list[list[float]]) -> None:
        """Results and the exact texts and labels they were computed for, set together."""
        self.scored_texts, self.scored_labels, self.scores = texts, labels, scores
        self.tokens, self.token_scores = tokens, token_scores

    @property
    def stale(self) -> bool:
        """Whether the texts or labels were edited after the last score."""
        return (self.texts, self.labels) != (self.scored_texts, self.scored_labels)

    @property
    def table(self) -> pd.DataFrame:
        """The last scores with the texts and labels they were computed for (not the edited
        ones): label, text, score and, where N is known, Δ log p per copy = score / N."""
        labels = [lab or f"#{i + 1}" for i, lab in enumerate(self.scored_labels)]
        df = pd.DataFrame(dict(label=labels, text=self.scored_texts,
                               score=np.asarray(self.scores, dtype=np.float64)))
        if self.n_train > 0:
            df["dlogp_per_copy"] = df["score"] / self.n_train
        return df

    def to_html(self) -> str:
        return snapshot.lab(self.get_state())


InfluenceResult.view = InfluenceExplorer  # a result in a notebook shows itself as the explorer
