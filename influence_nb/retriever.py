"""Search at scale: sketch candidates, then exact rescoring — to a recall target or a budget.

    ret = inf.retriever("runs/demo-search")             # sketches + index, once per corpus
    res = ret.search([("The capital city of Astrobia is", " Velmora")], recall=0.95)
    res.top(0, k=10); res.rescored_fraction; res.estimated_recall

**A recall target** (the default, ``recall=0.95``, ``k=10``): each query is searched in rounds
(:class:`Hunt`). The first rescores the 1 % largest and 1 % most negative sketch estimates ŝ
(at least 2k each) and any ``probe``; then, per sign, with τ the k-th best exact score found,
every unrescored sequence i has a chance p_i that its exact score beats τ, from ŝ_i and the
scale of the sketch's error on it, H_i = Σ_ℓ ‖query rest_ℓ‖ · ‖sequence rest_ℓ‖ (whitened norms
of what the sketch does not hold exactly: stored per sequence and layer beside the sketch,
computed per query; for the eigen sketch a Cauchy–Schwarz bound, for a random one its scale
times ~1/√m) and the distribution of z = (s − ŝ) / H measured by the store's calibration
(:class:`~influence_nb.search.NoiseModel`). Any of the exhaustive top-k left out beats τ, so
Σ p_i over the unrescored bounds the expected number missed: the next round rescores the
fewest, largest p_i that bring it to k · (1 − recall) (τ only rises, so one more round usually
ends it), or all that is left when that is most of it. Each query stops on its own bound;
``budget=`` caps the share of the corpus a query may rescore (then ``met`` is False and a
warning says so). The result says what it did: ``rescored_fraction``, ``estimated_recall``
(per query and sign, from the same bound) and ``rounds``. A store that keeps exact token
factors (:mod:`influence_nb.tokens`, a corpus within ``SketchArgs.exact_bytes``) hunts the
same way with the sketch's bound, but its rounds read the rows' exact scores from the factors
instead of rescoring them through the model (``read_fraction``); the model then rescores only
the best max(2k, 1 % of N) of each sign among them — a sketch that settles a query early saves
the reading, one that cannot pays it at a fraction of a scan's cost.

**A fixed budget** (``candidates=K``): each query gets K training sequences: half for positive
influence — the largest sketch inner products, and (``lexical`` share of that half) the best
BM25 matches of the query's text — and half for negative influence, the most negative sketch
inner products. By default BM25 joins only where the store's calibration says the sketch alone
falls short. Either way the union over the queries is rescored exactly with the streaming
scorer (:meth:`Influence.scan` with ``ids``), so the result is an
:class:`~influence_nb.results.InfluenceResult` like an exhaustive scan's, over fewer sequences.
BM25 has no place in the bound (it cannot say what it leaves out); a targeted search uses the
sketch alone. With exact token factors the fixed budget's candidates are the best estimates of
each sign, not the index's.

Why both filters: the sketch finds what the gradients share (arithmetic, themes, paraphrases
in another language), BM25 what the words share (a binary-search query and the code that
spells the same identifiers); on the demo corpus each misses what the other finds, and
together they recover the exhaustive top-10 (benchmarks/retrieval.py). BM25 cannot see the
sign of an influence, so the negative half is the sketch's alone.

What a fixed search cannot promise it says: each result carries ``estimated_recall``, the
sketch's recall@10 at this K estimated from the store's calibration (:mod:`influence_nb.calibration`,
one exact scan of a sample per store), and ``search_size``, the paper's power-law estimate of
how many sequences must be scanned to find as many at least as influential as the top-10
found, from ``probe`` random sequences rescored with the candidates.

BM25, the power-law search-size estimate and recall@k live in :mod:`influence_nb.search`.
"""
from __future__ import annotations

import os
import time
import warnings
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
from .search import BM25, NoiseModel, misses, search_size, to_rescore
from .sketch import Sketches, build_sketches

TRUST = 0.99  # lexical=None: BM25 joins when the sketch's calibrated recall is below this
RECALL = 0.95  # search()'s default target: the expected share of the exhaustive top-k found
START = 0.01   # a targeted search's first round: this share of N per sign, in sketch order
FALLBACK = 0.95  # a round that needs this share of what is left rescores all that is left
# (a round's own cost is that of ~2 % of a small corpus: measured, docs/results.md #29)

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
    rescored_fraction: per query, the share of the sketched sequences it had rescored (a
                      search with a recall target; None for a fixed one)
    read_fraction:    per query, the share whose exact token factors its hunt read (a search
                      with a recall target on a store that keeps them; else None)
    met:              per query, whether the recall target was met within ``budget`` (a
                      search with a recall target; else empty)
    rounds:           the hunt's rounds: rescoring passes, or reads of the exact factors (a
                      search with a recall target; else 1)
    """
    candidates: list[np.ndarray] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    estimated_recall: dict = field(default_factory=dict)
    search_size: list[dict | None] = field(default_factory=list)
    rescored_fraction: list[float] | None = None
    read_fraction: list[float] | None = None
    met: list[bool] = field(default_factory=list)
    rounds: int = 1


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
        model, factors, ids = self.inf.model, self.inf.factors, self.sketches.ids
        if self.sketches.exact is None:
            x = self.sketches.query_sketches(model, factors, queries)
        else:   # the scores themselves: the best of each sign, no index
            order = np.argsort(-self.sketches.exact_scores(model, factors, queries)[0], 1,
                               kind="stable")
        t1 = time.perf_counter()
        n_lexical, n_top, n_bottom = self.split(candidates)
        if self.sketches.exact is None:
            _, top = self.index.search(x, n_top)
            _, bottom = self.index.search(-x, n_bottom)
        else:
            top, bottom = ids[order[:, :n_top]], ids[order[:, ::-1][:, :n_bottom]]
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

    @checked(minimum={"candidates": 1, "probe": 0, "k": 1},
             within={"recall": "(0, 1)", "budget": "(0, 1]"})
    def search(self, queries: QueryLike, candidates: int | None = None,
               probe: int | None = None, recall: float | None = None, k: int = 10,
               budget: float = 1.0) -> SearchResult:
        """Exact scores of each query's candidates, found one of two ways:

        - ``recall`` (default 0.95 when ``candidates`` is None): rounds of rescoring until, per
          query and sign, the expected share of the exhaustive top-``k`` left unrescored is
          at most 1 − ``recall``, or ``budget`` of the sketched sequences are rescored
          (:meth:`targeted`);
        - ``candidates``: a fixed budget, half per sign (:meth:`fixed`).

        ``probe`` random sequences are rescored too, for the power-law search-size estimate
        (None: 128 for a fixed budget, none for a recall target, whose bound says more)."""
        if candidates is not None and recall is not None:
            raise ValueError(f"search(candidates={candidates}, recall={recall}): give one, a "
                             "fixed budget or a recall target")
        if candidates is not None:
            return self.fixed(queries, candidates, 128 if probe is None else probe)
        return self.targeted(queries, RECALL if recall is None else recall, k, probe or 0,
                             budget)

    def fixed(self, queries: QueryLike, candidates: int, probe: int = 128) -> SearchResult:
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
        sample = self.probe_rows(probe)
        res = self.inf.scan(queries, ids=np.union1d(np.unique(np.concatenate(found)),
                                                    self.sketches.ids[sample]))
        timings |= dict(queries=t1 - t0, rescore=time.perf_counter() - t2)
        _, n_top, n_bottom = self.split(candidates)
        return self.result(res, found, self.sketches.ids[sample], timings,
                           self.calibration.recall(n_top, n_bottom))

    def probe_rows(self, probe: int) -> np.ndarray:
        """``probe`` random rows of the store (seed 0, sorted)."""
        n = len(self.sketches)
        return np.sort(np.random.default_rng(0).choice(n, min(probe, n), replace=False))

    def result(self, res: InfluenceResult, found: list[np.ndarray], sample: np.ndarray,
               timings: dict, estimated: dict, **extra) -> SearchResult:
        """The :class:`SearchResult` of a rescoring ``res`` of the candidates ``found`` and the
        probe ``sample`` (corpus ids): the search-size estimates from the probe, which is then
        left out unless a query's candidates hold it."""
        at = {int(i): c for c, i in enumerate(res.ids)}
        sizes: list[dict | None] = [None] * len(found)
        for q in range(len(found) if len(sample) else 0):
            top = np.sort(res.scores[q, [at[int(i)] for i in found[q]]])[::-1][:10]
            try:
                sizes[q] = search_size(res.scores[q, [at[int(i)] for i in sample]], top)
            except ValueError:    # the probe's tail holds no positive score
                pass
        keep = np.isin(res.ids, np.unique(np.concatenate(found)))
        res = replace(res, scores=res.scores[:, keep], ids=res.ids[keep],
                      layer_scores=None if res.layer_scores is None
                      else res.layer_scores[..., keep])
        return SearchResult(**{f.name: getattr(res, f.name) for f in fields(InfluenceResult)
                               if f.init},
                            candidates=found, timings=timings, estimated_recall=estimated,
                            search_size=sizes, **extra)

    def targeted(self, queries: QueryLike, recall: float = RECALL, k: int = 10,
                 probe: int = 0, budget: float = 1.0) -> SearchResult:
        """Rescore in rounds until each query's own bound is met (:class:`Hunt`): per sign,
        the expected number of its exhaustive top-``k`` among the unrescored sequences is at
        most k · (1 − ``recall``). A query that would pass ``budget`` (a share of the sketched
        sequences) stops there, unmet: ``met`` says so, and a warning names the queries. Each
        round scans every query on the rows asked for that no earlier round scanned."""
        t0 = time.perf_counter()
        queries = self.inf.queries(queries)
        t1 = time.perf_counter()
        model, factors, sk = self.inf.model, self.inf.factors, self.sketches
        A, H = sk.estimates(model, factors, queries)
        noise = self.calibration.noise
        t2 = time.perf_counter()
        sample = self.probe_rows(probe)
        hunts = [Hunt(a, h, noise, k, recall, budget) for a, h in zip(A, H)]
        exact, parts, rounds = np.zeros(A.shape), [], 0
        scanned = np.zeros(A.shape[1], bool)
        todo = [h.first(sample) for h in hunts]
        while any(len(t) for t in todo):
            rows = np.setdiff1d(np.concatenate(todo), np.flatnonzero(scanned))
            if len(rows):
                rounds += 1
                if sk.exact is not None:        # the exact factors answer, not the model
                    exact[:, rows] = sk.exact_scores(model, factors, queries, rows)[0]
                else:
                    parts.append(self.inf.scan(queries, ids=sk.ids[rows]))
                    exact[:, sk.rows_of(parts[-1].ids)] = parts[-1].scores
                scanned[rows] = True
            todo = [h.next(t, exact[q, t]) for q, (h, t) in enumerate(zip(hunts, todo))]
        own, read = [h.own for h in hunts], None
        if sk.exact is not None:
            # the rows read hold each top-k as the bound says, and their exact scores rank
            # them: the model rescores each sign's best max(2k, START · N) of them (and the probe)
            read = [float(o.mean()) for o in own]
            best = [extremes(exact[q], np.flatnonzero(o), first_round(k, len(o)))
                    for q, o in enumerate(own)]
            own = [np.isin(np.arange(A.shape[1]), b) for b in best]
            rows = np.union1d(np.concatenate(best), sample)
            parts = [self.inf.scan(queries, ids=sk.ids[rows])]
        t3 = time.perf_counter()
        res = replace(parts[0], **{name: np.concatenate([getattr(p, name) for p in parts], -1)
                                   for name in ("scores", "ids", "layer_scores")
                                   if getattr(parts[0], name) is not None})
        met = [h.met for h in hunts]
        if not all(met):
            warnings.warn(f"search: {met.count(False)} of {len(met)} queries stopped at "
                          f"budget={budget} below recall={recall} (estimated "
                          f"{min(min(h.estimate.values()) for h in hunts):.3f} at worst); "
                          "raise budget= or lower recall=", stacklevel=2)
        timings = dict(queries=t1 - t0, sketch=t2 - t1, rescore=t3 - t2)
        estimated = dict(positive=[h.estimate[1] for h in hunts],
                         negative=[h.estimate[-1] for h in hunts], target=recall, k=k)
        return self.result(res, [sk.ids[np.flatnonzero(o)] for o in own], sk.ids[sample],
                           timings, estimated, rescored_fraction=[float(o.mean()) for o in own],
                           read_fraction=read, met=met, rounds=rounds)


def first_round(k: int, n: int) -> int:
    """Rows of each sign a targeted search's first round takes of n: max(2k, START · n)."""
    return max(2 * k, int(np.ceil(START * n)))


def extremes(scores: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """Of ``rows``, the n with the largest and the n with the most negative ``scores`` (a
    stable order among ties) -> sorted rows."""
    order = rows[np.argsort(-scores[rows], kind="stable")]
    return np.union1d(order[:n], order[::-1][:n])


class Hunt:
    """One query's search for its exhaustive top-k of both signs, round by round.

    s_hat (N,): the sketch estimates ŝ; H (N,): their error scale (the stored norms times the
    query's, :meth:`Sketches.noise_scale`); noise: z = (s − ŝ) / H as calibrated. After each
    round, per sign, τ is the k-th best exact score found and p_i = P(s_i beats τ) for every
    unrescored i (:func:`~influence_nb.search.misses`); Σ p bounds the expected number of the
    top-k missed (each of them beats τ). The next round rescores the fewest largest p that
    bring Σ p to k · (1 − recall) (:func:`~influence_nb.search.to_rescore`) — τ only rises,
    so one round usually settles it — or, when that is ``FALLBACK`` of what is left, all of it
    (an exhaustive scan of the rest).
    """

    def __init__(self, s_hat: np.ndarray, H: np.ndarray, noise: NoiseModel, k: int,
                 recall: float, budget: float):
        self.s_hat, self.H, self.noise, self.k = s_hat, H, noise, k
        self.allowed_misses, self.allowed_rows = k * (1 - recall), int(budget * len(s_hat))
        self.own = np.zeros(len(s_hat), bool)         # rows rescored for this query
        self.exact = np.zeros(len(s_hat))
        self.estimate = {1: 0.0, -1: 0.0}              # estimated recall per sign
        self.met = True

    def first(self, sample: np.ndarray) -> np.ndarray:
        """The first round: the max(2k, START · N) largest and most negative estimates (half the
        budget at most) and the probe ``sample`` (rows) — or every row when even an optimistic
        τ (per sign the k-th best of ŝ moved by the largest calibrated error) leaves
        ``FALLBACK`` of them to rescore: a hopeless sketch costs one exhaustive pass, not a
        first round more."""
        rows, need = np.arange(len(self.own)), []
        for sign in (1, -1):
            z_max = self.noise.z[-1] if sign > 0 else -self.noise.z[0]
            upper = np.sort(sign * self.s_hat + self.H * z_max)[::-1]   # sign · s at most
            need.append(self.plan(rows, sign * upper[min(self.k, len(rows)) - 1], sign)[0])
        if len(np.union1d(*need)) >= FALLBACK * len(rows) and len(rows) <= self.allowed_rows:
            return rows
        n = min(self.allowed_rows // 2, first_round(self.k, len(self.own)))
        return np.union1d(extremes(self.s_hat, rows, n), sample)

    def plan(self, left: np.ndarray, tau: float, sign: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``left`` unrescored, τ the k-th best score of ``sign`` -> (positions in
        ``left`` to rescore, P(each beats τ))."""
        p = misses(self.s_hat[left], self.H[left], tau, sign, self.noise)
        return to_rescore(p, self.allowed_misses), p

    def next(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Take the exact ``scores`` of ``rows``; -> the rows of the next round (empty: done)."""
        self.own[rows], self.exact[rows] = True, scores
        left = np.flatnonzero(~self.own)
        p, need = {}, []
        for sign in (1, -1):
            found = np.sort(sign * self.exact[self.own])[::-1]
            tau = sign * found[self.k - 1] if len(found) >= self.k else -sign * np.inf
            rescore, p[sign] = self.plan(left, tau, sign)
            self.estimate[sign] = float(max(0.0, 1 - p[sign].sum() / self.k))
            need.append(rescore)
        need = np.union1d(*need)
        if len(need) >= FALLBACK * len(left):
            need = np.arange(len(left))
        room = self.allowed_rows - int(self.own.sum())
        if len(need) > room:                    # the budget ends the hunt, unmet
            self.met = False
            need = np.argsort(-np.maximum(p[1], p[-1]), kind="stable")[:max(room, 0)]
        return np.sort(left[need])
