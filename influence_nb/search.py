"""Search at scale: sketch candidates (or BM25 candidates), then exact rescoring.

    ret = Retriever.build(inf, "runs/demo-search")      # sketches + index, once per corpus
    res = ret.search([("The capital city of Astrobia is", " Velmora")], candidates=400)
    res.top(0, k=10); res.timings                        # exact scores of the candidates

Each query gets ``candidates`` training sequences: half for positive influence — the largest
sketch inner products, and (``lexical`` share of that half) the best BM25 matches of the
query's text — and half for negative influence, the most negative sketch inner products. The
union over the queries is rescored exactly with the streaming scorer (:meth:`Influence.scan`
with ``ids``), in one pass for all queries, so the result is an
:class:`~influence_nb.results.InfluenceResult` like an exhaustive scan's, over fewer sequences.

Why both filters: the sketch finds what the gradients share (arithmetic, themes, paraphrases
in another language), BM25 what the words share (a binary-search query and the code that
spells the same identifiers); on the demo corpus each misses what the other finds, and
together they recover the exhaustive top-10 (benchmarks/retrieval.py). BM25 cannot see the
sign of an influence, so the negative half is the sketch's alone.

Also here: :class:`BM25`, the paper's TF-IDF candidate filter (§3.2.1), the power-law estimate
of how many sequences must be scanned (§5.2.2, :func:`search_size`), and :func:`recall_at_k`.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import CountVectorizer

from .index import IndexArgs, SketchIndex
from .results import InfluenceResult
from .scoring import Queries
from .session import Influence, QueryLike
from .sketch import SketchArgs, Sketches, build_sketches


@dataclass
class SearchResult(InfluenceResult):
    """An :class:`InfluenceResult` over the rescored candidates, with the search's bookkeeping.

    candidates: per query, the corpus ids its sketch search proposed (both signs)
    timings:    seconds per stage: queries, sketch, search, bm25, rescore
    """
    candidates: list[np.ndarray] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class Retriever:
    """Sketch + index (+ BM25) search over an :class:`Influence` session's corpus.

    lexical: share of each query's positive-side candidates taken from BM25 (0: sketch only)
    """

    def __init__(self, inf: Influence, sketches: Sketches, index: SketchIndex,
                 lexical: float = 0.5):
        corpus = inf.fitted()[0]
        sketches.check_corpus(corpus)
        if not 0 <= lexical <= 1:
            raise ValueError(f"lexical={lexical} is a share of the positive candidates; use "
                             "a number from 0 (sketch only) to 1 (BM25 only)")
        self.inf, self.sketches, self.index, self.lexical = inf, sketches, index, lexical
        self._bm25: BM25 | None = None

    @property
    def bm25(self) -> "BM25":
        """BM25 over the texts of the sketched sequences, row r = ``sketches.ids[r]`` (built on
        first use, a few seconds per 100k sequences)."""
        if self._bm25 is None:
            self._bm25 = BM25(self.inf.fitted()[0].df["text"].iloc[self.sketches.ids].tolist())
        return self._bm25

    @classmethod
    def build(cls, inf: Influence, path: str | os.PathLike,
              sketch_args: SketchArgs | None = None,
              index_args: IndexArgs | None = None, lexical: float = 0.5) -> "Retriever":
        """Sketch the session's corpus into ``path/sketches`` (resuming or appending) and index
        it into ``path/index`` (rebuilt when the sketches changed)."""
        corpus, factors = inf.fitted()
        path = Path(path)
        sketches = build_sketches(inf.model, factors, corpus, path / "sketches", sketch_args,
                                  task=inf.task)
        try:
            index = SketchIndex.load(path / "index", sketches)
        except ValueError:
            index = SketchIndex.build(sketches, path / "index", index_args)
        return cls(inf, sketches, index, lexical)

    @classmethod
    def open(cls, inf: Influence, path: str | os.PathLike, lexical: float = 0.5
             ) -> "Retriever":
        """Open what :meth:`build` wrote (checked against the session's model and factors)."""
        sketches = Sketches.open(Path(path) / "sketches", inf.model, inf.fitted()[1])
        return cls(inf, sketches, SketchIndex.load(Path(path) / "index", sketches), lexical)

    def candidates(self, queries: Queries, candidates: int) -> tuple[list[np.ndarray], dict]:
        """Per query at most ``candidates`` corpus ids: the top sketch inner products and the
        best BM25 matches (``lexical`` share) for the positive half, the most negative sketch
        inner products for the other half -> (list of id arrays, seconds per stage)."""
        t0 = time.perf_counter()
        x = self.sketches.query_sketches(self.inf.model, self.inf.factors, queries)
        t1 = time.perf_counter()
        half = max(1, candidates // 2)
        n_lexical = round(self.lexical * half)
        _, top = self.index.search(x, half - n_lexical)
        _, bottom = self.index.search(-x, candidates - half)
        t2 = time.perf_counter()
        words = [np.empty(0, np.int64)] * len(queries)
        if n_lexical:
            tok = self.inf.tokenizer
            words = [self.sketches.ids[rows] for rows in self.bm25.top(
                [tok.decode(p + c) for p, c in zip(queries.prompts, queries.completions)],
                n_lexical)]
        found = [np.unique(np.concatenate([t[t >= 0], b[b >= 0], w]))
                 for t, b, w in zip(top, bottom, words)]
        return found, dict(sketch=t1 - t0, search=t2 - t1, bm25=time.perf_counter() - t2)

    def search(self, queries: QueryLike, candidates: int = 400) -> SearchResult:
        """Exact scores of the sketch candidates of every query (union over the queries)."""
        t0 = time.perf_counter()
        queries = self.inf.queries(queries)
        t1 = time.perf_counter()
        found, timings = self.candidates(queries, candidates)
        t2 = time.perf_counter()
        res = self.inf.scan(queries, ids=np.unique(np.concatenate(found)))
        timings |= dict(queries=t1 - t0, rescore=time.perf_counter() - t2)
        return SearchResult(**{f.name: getattr(res, f.name) for f in fields(InfluenceResult)},
                            candidates=found, timings=timings)


class BM25:
    """The paper's TF-IDF filter (§3.2.1): Okapi BM25 with binary term presence, k1 = 1.5.

    score(q, d) = Σ_{t ∈ q ∩ d} idf(t) · (k1 + 1) / (1 + k1 · (1 − b + b · |d| / avg|d|)),
    idf(t) = log(1 + (N − n_t + 0.5) / (n_t + 0.5)). Terms: scikit-learn's word tokens.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.vectorizer = CountVectorizer(binary=True)
        X = self.vectorizer.fit_transform(texts).tocsr().astype(np.float32)   # (N, V) presence
        n_t = np.asarray(X.sum(0)).ravel()
        idf = np.log1p((X.shape[0] - n_t + 0.5) / (n_t + 0.5))
        length = np.asarray(X.sum(1)).ravel()                 # distinct terms per document
        norm = (k1 + 1) / (1 + k1 * (1 - b + b * length / length.mean()))
        self.weights = (sp.diags(norm.astype(np.float32)) @ X @ sp.diags(idf.astype(np.float32))
                        ).tocsc()                              # (N, V) BM25 term weights

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, N) BM25 scores of every document for each query text."""
        q = self.vectorizer.transform(texts).astype(np.float32)          # (Q, V) presence
        return (q @ self.weights.T).toarray()

    def top(self, texts: Sequence[str], k: int) -> list[np.ndarray]:
        """Per query text the ids (rows) of the k best-scoring documents."""
        return [np.argsort(-s, kind="stable")[:k] for s in self.scores(texts)]


@dataclass
class PowerLawTail:
    """P(score > x) ≈ p_tail · (x / x_min)^(−alpha) for x ≥ x_min (Hill estimate of alpha)."""
    alpha: float
    x_min: float
    p_tail: float

    @classmethod
    def fit(cls, scores: np.ndarray, tail: float = 0.05) -> "PowerLawTail":
        """Fit to the largest ``tail`` fraction of the positive scores of a scanned sample."""
        x = np.sort(np.asarray(scores, np.float64))[::-1]
        n = max(2, int(len(x) * tail))
        top = x[:n]
        if top[-1] <= 0:
            raise ValueError(f"the top {tail:.0%} of the sample holds non-positive scores; "
                             "scan a larger sample or fit a smaller tail fraction")
        alpha = (n - 1) / np.log(top / top[-1]).sum()
        return cls(float(alpha), float(top[-1]), n / len(x))

    def survival(self, x: float) -> float:
        """P(score > x)."""
        return self.p_tail * (x / self.x_min) ** -self.alpha if x > self.x_min else float("nan")


def search_size(sample_scores: np.ndarray, target_scores: np.ndarray, tail: float = 0.05
                ) -> dict:
    """How many sequences must be scanned to find as many sequences at least as influential as
    ``target_scores`` (e.g. the exact scores of the TF-IDF top-10), from the power-law tail of
    a random sample's scores (paper §5.2.2): n = len(target) / P(score ≥ min(target))."""
    law = PowerLawTail.fit(sample_scores, tail)
    threshold = float(np.min(target_scores))
    p = law.survival(threshold)
    return dict(alpha=law.alpha, x_min=law.x_min, p_tail=law.p_tail, threshold=threshold,
                n_sequences=len(target_scores) / p if p == p else None)


def recall_at_k(found: InfluenceResult, exact: InfluenceResult, k: int = 10,
                sign: str = "positive") -> np.ndarray:
    """(Q,) fraction of each query's exact top-k (of ``exact``, e.g. an exhaustive scan) that
    ``found``'s top-k holds; ``sign`` "positive" or "negative"."""
    return np.array([len(set(found.top(q, k, sign)["id"]) & set(exact.top(q, k, sign)["id"])) / k
                     for q in range(exact.n_queries)])
