"""Search at scale: sketch candidates (or BM25 candidates), then exact rescoring.

    ret = inf.retriever("runs/demo-search")             # sketches + index, once per corpus
    res = ret.search([("The capital city of Astrobia is", " Velmora")], candidates=400)
    res.top(0, k=10); res.timings                        # exact scores of the candidates

Each query gets ``candidates`` training sequences: half for positive influence — the largest
sketch inner products, and (``lexical`` share of that half) the best BM25 matches of the
query's text — and half for negative influence, the most negative sketch inner products.
By default BM25 joins only where the store's calibration says the sketch alone falls short. The
union over the queries is rescored exactly with the streaming scorer (:meth:`Influence.scan`
with ``ids``), in one pass for all queries, so the result is an
:class:`~influence_nb.results.InfluenceResult` like an exhaustive scan's, over fewer sequences.

Why both filters: the sketch finds what the gradients share (arithmetic, themes, paraphrases
in another language), BM25 what the words share (a binary-search query and the code that
spells the same identifiers); on the demo corpus each misses what the other finds, and
together they recover the exhaustive top-10 (benchmarks/retrieval.py). BM25 cannot see the
sign of an influence, so the negative half is the sketch's alone.

What a search cannot promise it says: each result carries ``estimated_recall``, the sketch's
recall@10 at this K estimated from the store's calibration (:mod:`influence_nb.calibration`,
one exact scan of a sample per store), and ``search_size``, the paper's power-law estimate of
how many sequences must be scanned to find as many at least as influential as the top-10
found, from ``probe`` random sequences rescored with the candidates.

BM25, the power-law search-size estimate and recall@k live in :mod:`influence_nb.search`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .calibration import Calibration, CalibrationArgs, calibrate
from .checks import checked
from .index import IndexArgs, SketchIndex
from .projection import SketchArgs
from .queries import Queries
from .results import InfluenceResult
from .search import BM25, search_size
from .sketch import Sketches, build_sketches

TRUST = 0.99  # lexical=None: BM25 joins when the sketch's calibrated recall is below this

if TYPE_CHECKING:  # annotations only: the session opens retrievers, not the other way round
    from .session import Influence, QueryLike


@dataclass
class SearchResult(InfluenceResult):
    """An :class:`InfluenceResult` over the rescored candidates, with the search's bookkeeping.

    candidates:       per query, the corpus ids its own search proposed (both signs); recall
                      of query q counts these only (:func:`~influence_nb.search.recall_at_k`),
                      never the union over the queries that was rescored
    timings:          seconds per stage: queries, sketch, search, bm25, rescore
    estimated_recall: the sketch's recall@10 at this K, positive and negative, from the
                      store's calibration (BM25 candidates not counted: a lower bound)
    search_size:      per query, the power-law estimate of the sequences to scan to find 10 at
                      least as influential as the top-10 found (None: the probe was too small)
    """
    candidates: list[np.ndarray] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    estimated_recall: dict = field(default_factory=dict)
    search_size: list[dict | None] = field(default_factory=list)


def session(inf: object) -> "Influence":
    """``inf`` itself when it is an influence session (duck-typed: the session module imports
    this one), else a one-line TypeError."""
    if not all(callable(getattr(inf, name, None)) for name in ("fitted", "scan", "queries")):
        raise TypeError(f"inf={type(inf).__name__} object, not an influence session: pass "
                        "an Influence(model, tokenizer, corpus) after its fit")
    return inf


class Retriever:
    """Sketch + index (+ BM25) search over an :class:`Influence` session's corpus.

    lexical:     share of each query's positive-side candidates taken from BM25 (0: sketch only);
                 None (default): 0 when the calibration says the sketch alone finds ≥ ``TRUST``
                 of the positive top-10 with all of the positive half, else 0.5
    calibration: how the store's recall estimate is made (once per store, on first search), or
                 a :class:`Calibration` to use as it is
    """

    @checked(within={"lexical": "[0, 1]"})
    def __init__(self, inf: Influence, sketches: Sketches, index: SketchIndex,
                 lexical: float | None = None,
                 calibration: CalibrationArgs | Calibration | None = None):
        corpus = session(inf).fitted()[0]
        sketches.check_corpus(corpus)
        self.inf, self.sketches, self.index, self.lexical = inf, sketches, index, lexical
        self.calibration_args = (calibration if isinstance(calibration, CalibrationArgs)
                                 else CalibrationArgs())
        self._bm25: BM25 | None = None
        self._calibration = calibration if isinstance(calibration, Calibration) else None

    @property
    def calibration(self) -> Calibration:
        """The store's calibration (the one given, else read from the store, else one exact scan
        of a sample)."""
        if self._calibration is None:
            self._calibration = calibrate(self.inf, self.sketches, self.calibration_args)
        return self._calibration

    @checked(minimum={"candidates": 1})
    def split(self, candidates: int) -> tuple[int, int, int]:
        """-> (BM25, largest-sketch, most-negative-sketch) candidates per query."""
        half = max(1, candidates // 2)
        lexical = self.lexical
        if lexical is None:   # BM25 only where the sketch alone falls short
            lexical = 0.0 if self.calibration.recall(half, 0)["positive"] >= TRUST else 0.5
        n_lexical = round(lexical * half)
        return n_lexical, half - n_lexical, candidates - half

    @property
    def bm25(self) -> "BM25":
        """BM25 over the texts of the sketched sequences, row r = ``sketches.ids[r]`` (built on
        first use, a few seconds per 100k sequences)."""
        if self._bm25 is None:
            self._bm25 = BM25(self.inf.fitted()[0].df["text"].iloc[self.sketches.ids].tolist())
        return self._bm25

    @classmethod
    @checked(within={"lexical": "[0, 1]"})
    def build(cls, inf: Influence, path: str | os.PathLike,
              sketch_args: SketchArgs | None = None,
              index_args: IndexArgs | None = None, lexical: float | None = None
              ) -> "Retriever":
        """Sketch the session's corpus into ``path/sketches`` (resuming or appending) and index
        it into ``path/index`` (rebuilt when the sketches changed)."""
        corpus, factors = session(inf).fitted()
        path = Path(path)
        sketches = build_sketches(inf.model, factors, corpus, path / "sketches", sketch_args,
                                  task=inf.task)
        try:
            index = SketchIndex.load(path / "index", sketches)
        except ValueError:
            index = SketchIndex.build(sketches, path / "index", index_args)
        return cls(inf, sketches, index, lexical)

    @classmethod
    @checked(within={"lexical": "[0, 1]"})
    def open(cls, inf: Influence, path: str | os.PathLike, lexical: float | None = None
             ) -> "Retriever":
        """Open what :meth:`build` wrote (checked against the session's model and factors)."""
        factors = session(inf).fitted()[1]
        sketches = Sketches.open(Path(path) / "sketches", inf.model, factors)
        return cls(inf, sketches, SketchIndex.load(Path(path) / "index", sketches), lexical)

    def candidates(self, queries: Queries, candidates: int) -> tuple[list[np.ndarray], dict]:
        """Per query at most ``candidates`` corpus ids: the top sketch inner products and the
        best BM25 matches (``lexical`` share) for the positive half, the most negative sketch
        inner products for the other half -> (list of id arrays, seconds per stage)."""
        t0 = time.perf_counter()
        x = self.sketches.query_sketches(self.inf.model, self.inf.factors, queries)
        t1 = time.perf_counter()
        n_lexical, n_top, n_bottom = self.split(candidates)
        _, top = self.index.search(x, n_top)
        _, bottom = self.index.search(-x, n_bottom)
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

    @checked(minimum={"candidates": 1, "probe": 0})
    def search(self, queries: QueryLike, candidates: int = 400, probe: int = 128
               ) -> SearchResult:
        """Exact scores of each query's ``candidates``: one rescoring pass over their union and
        ``probe`` random sequences (these serve the search-size estimate and are left out of
        the result). More candidates than twice the sketched sequences (each sign's half holding
        all of them) are that many: the search never holds more than the corpus."""
        candidates = min(int(candidates), 2 * len(self.sketches))
        t0 = time.perf_counter()
        queries = self.inf.queries(queries)
        t1 = time.perf_counter()
        found, timings = self.candidates(queries, candidates)
        t2 = time.perf_counter()
        rng = np.random.default_rng(0)
        sample = self.sketches.ids[rng.choice(len(self.sketches), min(probe, len(self.sketches)),
                                              replace=False)]
        union = np.unique(np.concatenate(found))
        res = self.inf.scan(queries, ids=np.union1d(union, sample))
        timings |= dict(queries=t1 - t0, rescore=time.perf_counter() - t2)
        at = {int(i): c for c, i in enumerate(res.ids)}
        sizes: list[dict | None] = [None] * len(queries)
        for q in range(len(queries) if probe else 0):
            top = np.sort(res.scores[q, [at[int(i)] for i in found[q]]])[::-1][:10]
            try:
                sizes[q] = search_size(res.scores[q, [at[int(i)] for i in sample]], top)
            except ValueError:    # the probe's tail holds no positive score
                pass
        keep = np.isin(res.ids, union)               # the probe only served the estimate
        res = replace(res, scores=res.scores[:, keep], ids=res.ids[keep],
                      layer_scores=None if res.layer_scores is None
                      else res.layer_scores[..., keep])
        _, n_top, n_bottom = self.split(candidates)
        return SearchResult(**{f.name: getattr(res, f.name) for f in fields(InfluenceResult)
                               if f.init},
                            candidates=found, timings=timings,
                            estimated_recall=self.calibration.recall(n_top, n_bottom),
                            search_size=sizes)
