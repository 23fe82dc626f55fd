"""InfluenceResult: the query × sequence score matrix, ranked tables with the training text beside
each score, per-layer and per-token views, save / load."""
from __future__ import annotations

import hashlib
import html
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from . import store
from .checks import checked, whole
from .data import Corpus

FORMAT = "influence_nb.result/2"
SIGNS = ("positive", "negative", "abs")
# what a score means, said once: the README, the docstrings, the widgets, the charts and the
# command line all print this
UNIT = ("score = d log p(completion | prompt) / dε in nats, ε the weight of the sequence added "
        "to the mean training loss (first order); one added copy among N training sequences is "
        "ε = 1/N, so Δ log p per copy = score / N")


def unit_note(n_train: int | None) -> str:
    """:data:`UNIT`, with N where it is known."""
    return UNIT + (f" (N = {n_train:,} training sequences, those the curvature was fitted on)"
                   if n_train else "")


@dataclass
class InfluenceResult:
    """Scores of N training sequences on Q queries. Positive: adding the sequence to training
    raises log p(completion | prompt). The unit (:data:`UNIT`): score = d log p(completion |
    prompt) / dε in nats, ε the weight of the sequence added to the mean training loss (first
    order); one added copy among N training sequences is ε = 1/N, so Δ log p per copy =
    score / N.

    queries:      Q dicts with ``prompt``, ``completion`` (text) and ``logprob`` (f, nats)
    scores:       (Q, N) total scores
    ids:          (N,) corpus ids of the scored sequences
    layer_names:  the L tracked layers
    layer_scores: (Q, L, N) per-layer scores, or None
    corpus:       the scored corpus (text and metadata), or None after a load without one
    n_train:      N, the training sequences the curvature was fitted on, or None: score / N is
                  the first-order change in log p (nats) for one added copy of a sequence
    """
    queries: list[dict]
    scores: np.ndarray
    ids: np.ndarray
    layer_names: list[str]
    layer_scores: np.ndarray | None = None
    corpus: Corpus | None = None
    corpus_fingerprint: str | None = None
    # recomputes per-token scores: (ids, layers=None) -> ([(Q, n_tokens)], (Q, L, len(ids))),
    # on the given layers only (names or globs) when ``layers`` is given
    token_fn: Callable | None = field(default=None, repr=False)
    n_train: int | None = None
    # (q, t, ids) -> a result for completion token t of query q alone, log p(c_t | prompt + c_<t),
    # on those ids (each completion token's log-probability is a measurement of its own)
    token_query_fn: Callable | None = field(default=None, repr=False)
    # how a result shows itself in a notebook: influence_nb.widgets registers its explorer here
    # on import (results sit below the widgets and never import them)
    view: ClassVar[Callable[["InfluenceResult"], Any] | None] = None
    _hay: pd.Series | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.corpus is not None:
            self.corpus_fingerprint = self.corpus.fingerprint

    @property
    def n_queries(self) -> int:
        return len(self.queries)

    @property
    def metadata_columns(self) -> list[str]:
        """The corpus's own metadata columns (whatever it has), without the text and the
        bookkeeping columns every corpus has (doc, offset, n_tokens)."""
        if self.corpus is None:
            return []
        return [c for c in self.corpus.df.columns if c not in ("text", "doc", "offset", "n_tokens")]

    def query_index(self, q: int) -> int:
        """Query ``q`` as a row in [0, Q) (-1 is the last); a one-line error outside [-Q, Q)."""
        return whole(q, f"query (this result has {self.n_queries})", -self.n_queries,
                     self.n_queries) % self.n_queries

    @property
    def sources(self) -> list[str]:
        """The corpora this result scored, in order (the ``source`` column of a scan over
        several, :meth:`Corpus.concat`); [] for a single corpus."""
        if self.corpus is None or "source" not in self.corpus.df.columns:
            return []
        return list(pd.unique(self.corpus.df["source"]))

    def _source_of_ids(self) -> np.ndarray:
        """(N,) the source of each scored sequence."""
        if not self.sources:
            raise ValueError("this result scored one corpus; scan several to split by source: "
                             "inf.scan(pairs, corpus={'pretraining': pre, 'fine-tuning': ft})")
        return self.corpus.df["source"].to_numpy()[self.ids]

    @checked(minimum={"k": 1}, choices={"sign": SIGNS})
    def top(self, q: int = 0, k: int = 10, sign: str = "positive", source: str | None = None,
            search: str = "", distinct: bool = False) -> pd.DataFrame:
        """The k most influential sequences on query ``q``: ``sign`` "positive" (largest
        scores), "negative" (most negative) or "abs"; ``source``: only that corpus's sequences
        (a scan over several); ``search``: only those whose text, id or metadata contains it
        (any case); ``distinct``: one row per text, the best-ranked copy, with a ``copies``
        column counting the scanned sequences of that text. The whole scan is ranked before
        the k are taken. Columns: rank, id, score, text and the corpus metadata, and one column
        per layer when per-layer scores were kept."""
        s = self.scores[self.query_index(q)]
        key = {"positive": -s, "negative": s, "abs": -np.abs(s)}[sign]
        order = np.argsort(key, kind="stable")
        order = order[self.matching(source, search)[order]]
        copies = None
        if distinct and self.corpus is not None:
            texts = self.corpus.df["text"].to_numpy()[self.ids[order]]
            first = ~pd.Series(texts).duplicated().to_numpy()
            copies = pd.Series(texts).value_counts().loc[texts[first]].to_numpy()[:k]
            order = order[first]
        order = order[:k]
        df = pd.DataFrame({"rank": np.arange(1, len(order) + 1), "id": self.ids[order],
                           "score": s[order]})
        if copies is not None:
            df["copies"] = copies
        if self.corpus is not None:
            meta = self.corpus.df.loc[self.ids[order]].reset_index(drop=True)
            df = pd.concat([df, meta.drop(columns=["n_tokens"], errors="ignore")], axis=1)
        if self.layer_scores is not None:
            for l, name in enumerate(self.layer_names):
                df[name] = self.layer_scores[self.query_index(q), l, order]
        return df.set_index("rank")

    def matching(self, source: str | None = None, search: str = "") -> np.ndarray:
        """(N,) bool: the scanned sequences from ``source`` (a scan over several corpora) whose
        id, text or metadata contains ``search`` (any case; "" matches all)."""
        keep = np.ones(len(self.ids), dtype=bool)
        if source is not None:
            if source not in self.sources:
                raise ValueError(f"unknown source {source!r}; this result has "
                                 f"{self.sources or 'one corpus and no sources'}")
            keep &= self._source_of_ids() == source
        if search.strip():
            keep &= self._haystack().str.contains(search.strip().lower(), regex=False).to_numpy()
        return keep

    def _haystack(self) -> pd.Series:
        """(N,) where ``search`` looks, lower case: each scanned sequence's id, text and
        metadata values (built once)."""
        if self._hay is None:
            hay = pd.Series(self.ids.astype(str))
            if self.corpus is not None:
                df = self.corpus.df.loc[self.ids]
                for c in ["text", *self.metadata_columns]:
                    hay = hay + "\x1f" + df[c].astype(str).to_numpy()
            self._hay = hay.str.lower()
        return self._hay

    @checked(minimum={"k": 1})
    def split(self, k: int = 10) -> pd.DataFrame:
        """How each query's influence splits between the sources of a scan over several
        corpora. One row per (query, source): ``sequences``; ``total``, ``positive`` and
        ``negative`` sums of scores; ``abs_share``, the source's share of Σ|score| over all
        sources; ``mean_abs``, the mean |score| per sequence (corpora differ in size);
        ``in_top``, how many of the query's top-k positive sequences come from the source."""
        src = self._source_of_ids()
        rows = []
        for q in range(self.n_queries):
            s = self.scores[q]
            top = set(np.argsort(-s, kind="stable")[:k])
            whole = np.abs(s).sum()
            for name in self.sources:
                m = src == name
                x = s[m]
                rows.append(dict(query=q, source=name, sequences=int(m.sum()),
                                 total=x.sum(), positive=x[x > 0].sum(), negative=x[x < 0].sum(),
                                 abs_share=np.abs(x).sum() / whole if whole > 0 else np.nan,
                                 mean_abs=np.abs(x).mean() if len(x) else np.nan,
                                 in_top=sum(i in top for i in np.flatnonzero(m))))
        return pd.DataFrame(rows).set_index(["query", "source"])

    @checked(minimum={"k": 1})
    def layer_profile(self, q: int = 0, k: int | None = None) -> pd.Series:
        """Per-layer sum of scores on query ``q`` (over the top-k positive, or all)."""
        if self.layer_scores is None:
            raise ValueError("per-layer scores were not kept; scan with ScoreArgs(per_layer=True)")
        ls = self.layer_scores[self.query_index(q)]
        if k is not None:
            ls = ls[:, np.argsort(-self.scores[self.query_index(q)])[:k]]
        return pd.Series(ls.sum(1), index=self.layer_names, name="score")

    @checked()
    def tokens(self, q: int, id: int, layers: list[str] | None = None) -> pd.DataFrame:
        """Per-token scores of sequence ``id`` on query ``q``: columns token (text), score. The
        score at token t belongs to the update at position t, which predicts token t + 1.
        ``layers``: through those layers alone (names or globs; default all)."""
        if self.token_fn is None or self.corpus is None:
            raise ValueError("per-token scores need the model: use a result from "
                             "Influence.scan / score_texts, not one loaded from disk alone")
        id = whole(id, f"sequence id (the corpus has {len(self.corpus)})", 0, len(self.corpus))
        per_seq, _ = self.token_fn([id], layers)
        ids = self.corpus.token_ids(id)
        tok = self.corpus.tokenizer
        return pd.DataFrame({"token": [tok.decode([int(t)]) for t in ids],
                             "score": per_seq[0][self.query_index(q)]})

    # -- persistence --------------------------------------------------------------------------

    @checked()
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``result.npz``, then ``result.json`` (last, sealed, with the arrays' SHA-256)
        into directory ``path``, each atomically: a reader never pairs a manifest with other
        arrays, nor trusts an edited one."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        arrays = dict(scores=self.scores, ids=self.ids)
        if self.layer_scores is not None:
            arrays["layer_scores"] = self.layer_scores
        np.savez(buf, **arrays)
        meta = dict(format=FORMAT, queries=self.queries, layer_names=self.layer_names,
                    corpus_fingerprint=self.corpus_fingerprint, n_train=self.n_train,
                    sha256=hashlib.sha256(buf.getvalue()).hexdigest())
        with store.lock(path, ValueError, wait=True):   # two saves never pair their files
            store.atomic_write(path / "result.npz", buf.getvalue())
            store.write_manifest(path / "result.json", meta)
        return path

    @classmethod
    @checked()
    def load(cls, path: str | os.PathLike, corpus: Corpus | None = None) -> "InfluenceResult":
        """Read a saved result; with ``corpus`` (checked by fingerprint) the tables show text."""
        path = Path(path)
        if not (path / "result.json").exists():
            raise FileNotFoundError(f"no saved result in {path}; save one with result.save(path)")
        fix = "save the result again with result.save(path)"
        meta = store.read_manifest(path / "result.json", FORMAT, ValueError, fix,
                                   keys=("queries", "layer_names", "corpus_fingerprint",
                                         "sha256"))
        if corpus is not None and corpus.fingerprint != meta["corpus_fingerprint"]:
            raise ValueError(f"the result in {path} was computed on another corpus (fingerprint "
                             f"{meta['corpus_fingerprint']} ≠ {corpus.fingerprint}); pass that one")
        blob = (path / "result.npz").read_bytes() if (path / "result.npz").exists() else b""
        if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
            raise ValueError(f"{path / 'result.npz'} is missing, corrupt or from another save "
                             f"(fails the manifest's SHA-256); {fix}")
        with np.load(io.BytesIO(blob)) as z:
            arrays = {k: z[k] for k in z.files}
        Q, L = len(meta["queries"]), len(meta["layer_names"])
        N = len(arrays.get("ids", []))
        layer = arrays.get("layer_scores")
        if arrays.get("scores", np.zeros(0)).shape != (Q, N) or (
                layer is not None and layer.shape != (Q, L, N)):
            raise ValueError(f"{path / 'result.npz'} holds arrays of other shapes than its "
                             f"manifest's {Q} queries and {L} layers; {fix}")
        return cls(meta["queries"], arrays["scores"], arrays["ids"], meta["layer_names"],
                   layer, corpus, meta["corpus_fingerprint"], n_train=meta.get("n_train"))

    # -- display ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"InfluenceResult({self.n_queries} queries × {len(self.ids)} sequences, "
                f"{len(self.layer_names)} layers)")

    def _ipython_display_(self) -> None:
        """In a notebook a result shows itself as the registered view (the explorer); without
        one, as :meth:`_repr_html_`."""
        from IPython.display import HTML, display
        display(HTML(self._repr_html_()) if InfluenceResult.view is None
                else InfluenceResult.view(self))

    def _repr_html_(self) -> str:
        """A plain table per query (top 5 each way), where widgets cannot render."""
        parts = []
        for q, query in enumerate(self.queries):
            parts.append(f"<h4>query {q}: {html.escape(query['prompt'])}"
                         f"<b>{html.escape(query['completion'])}</b></h4>")
            for sign in ("positive", "negative"):
                df = self.top(q, 5, sign)
                cols = [c for c in ("id", "score", "text", *self.metadata_columns)
                        if c in df.columns]
                parts.append(df[cols].to_html(escape=True, float_format="{:.4g}".format))
        return "\n".join(parts)
