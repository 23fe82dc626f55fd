"""Hostile inputs at every public door (issue #28), generated from a table: each door's
arguments, the hostile values of their kind (NaN, inf, -1, 0, 1.5, True, huge ints, wrong
types, empty lists, ids out of range, queries in odd shapes) and which of them the door must
accept. A value it accepts must give the correct result (each door says how to check it); any
other must fail in one line that names the argument. Every case is classified as

    clear error      one line, naming the argument (or its words: "query", "id")
    correct result   returned, and the door's check of the result holds
    traceback        another exception (an assertion, a library's error), several lines, or
                     a message that does not name the argument
    silent wrong     returned where an error was due, or a result that fails its check

The test asserts each case's class; the tally over all of them, for the issue's closing note:

    PYTHONPATH=. python tests/test_hostile.py
"""
from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from IPython.core.error import UsageError

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_scoring import TEXTS, tiny_model  # noqa: E402

from influence_nb import charts, demo  # noqa: E402
from influence_nb.calibration import CalibrationArgs  # noqa: E402
from influence_nb.cli import main  # noqa: E402
from influence_nb.curvature import STRATEGIES, FactorArgs, fit_factors  # noqa: E402
from influence_nb.data import Corpus  # noqa: E402
from influence_nb.demo.world import WorldConfig  # noqa: E402
from influence_nb.index import IndexArgs  # noqa: E402
from influence_nb.magics import (InfluenceMagics, MagicError, parse_paragraphs,  # noqa: E402
                                 parse_query)
from influence_nb.projection import SketchArgs  # noqa: E402
from influence_nb.queries import Queries  # noqa: E402
from influence_nb.results import SIGNS  # noqa: E402
from influence_nb.retriever import Retriever  # noqa: E402
from influence_nb.sketch import Sketches, build_sketches  # noqa: E402
from influence_nb.scoring import ScoreArgs  # noqa: E402
from influence_nb.session import Influence  # noqa: E402
from influence_nb.trainer import InfluenceCallback, factors_path  # noqa: E402
from influence_nb.training import Retrainer, TrainConfig, train  # noqa: E402
from influence_nb.validate import (lds, lds_subsets, leave_out, pbrf, tail_patch,  # noqa: E402
                                   top_ids)
from influence_nb.widgets import (InfluenceExplorer, LayerBars, SyntheticLab,  # noqa: E402
                                  TokenHighlight)

NAN, INF, HUGE = float("nan"), float("inf"), 10 ** 18
# every folder a case writes lives in here, removed when the process ends (the table's cases
# ran without pytest's tmp_path, and left some 30 folders in /tmp a run)
SCRATCH = tempfile.TemporaryDirectory(prefix="hostile-")


def scratch(prefix: str = "") -> str:
    """A new empty folder under :data:`SCRATCH`."""
    return tempfile.mkdtemp(prefix=prefix, dir=SCRATCH.name)


N = len(TEXTS)                      # the corpus: 24 sequences
PAIR = ("alpha number", " 0 is even.")
PAIRS = [PAIR, ("theta", " number 7")]

# -- hostile values by kind -------------------------------------------------------------------
COUNTS = [NAN, INF, -INF, -1, 0, 1, 1.5, 2.0, True, False, "3", None, [], (2,), HUGE,
          np.int64(2), np.float64(2), 10 ** 400, 3]
FLOATS = [NAN, INF, -INF, -1.0, 0, 0.0, 1e-300, True, "0.1", None, [0.1], 1e-3, 0.5, 1,
          np.float32(0.25), 10 ** 400]
IDS = [[-1], [N], [HUGE], [0.5], [1.0], [True, False], "01", [[0, 1]], [], {0: 1}, None, 3,
       np.array([0, 1]), [2, 0], [1, 1], range(3), np.array([N - 1], np.int32),
       np.array([-1]), pd.Series([4, 5])]
ONE_ID = [-1, N, HUGE, 1.5, 1.0, True, "0", None, [0], np.int64(3), 0, N - 1]
QUERY = [-3, -2, -1, 0, 1, 2, 1.0, True, "0", None, HUGE, np.int64(1)]
SEEDS = [(0, 0), (), (-1,), (0.5,), "01", (True,), None, 0, [0, 1], (0,), np.array([2]),
         (HUGE,)]
BOOLS = ["yes", 1, 0, None, 1.0, True, False, np.bool_(True)]
QUERIES = ["ab", [], [("", "x")], [("a", "")], [("a",)], ("alpha", 3), [("a", "b", "c")], None,
           3, [["alpha", " number"]], PAIR, [PAIR], PAIRS, ("", ""), [(PAIR, PAIR)],
           {"alpha": " number"}, [(b"alpha", b" 0")]]
TEXTS_IN = [[], [""], ["  "], ["a", 3], None, 3, [["a"]], "alpha number 0 is even.",
            ["alpha number 0 is even.", "theta"], ("beta number 1",), [b"bytes"]]


def count(low: int = 1, none: bool = False) -> Callable[[Any], bool]:
    """Accepts an integer ≥ low (never a bool, never a float), and None if ``none``."""
    return lambda v: (none and v is None) or (
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low)


def real(low: float = 0.0, high: float = INF, open_low: bool = True, open_high: bool = True,
         none: bool = False) -> Callable[[Any], bool]:
    """Accepts a finite number in the interval (an int will do, never a bool)."""
    def good(v: Any) -> bool:
        if none and v is None:
            return True
        if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
            return False
        try:
            x = float(v)
        except OverflowError:
            return False
        return math.isfinite(x) and (x > low if open_low else x >= low) and (
            x < high if open_high else x <= high)
    return good


def ids_in(n: int, empty: bool = True, none: bool = False) -> Callable[[Any], bool]:
    """Accepts a sequence (or array, or Series) of integers in [0, n)."""
    def good(v: Any) -> bool:
        if v is None:
            return none
        if isinstance(v, (str, dict, int)):
            return False
        a = np.asarray(list(v) if isinstance(v, range) else v)
        return (a.ndim == 1 and (a.size == 0 and empty or a.size > 0 and
                np.issubdtype(a.dtype, np.integer) and a.dtype != bool and
                a.min() >= 0 and a.max() < n))
    return good


def query_ok(v: Any) -> bool:
    """A (prompt, completion) pair of non-empty strings, or a non-empty list of them."""
    pair = lambda p: (isinstance(p, (tuple, list)) and len(p) == 2 and  # noqa: E731
                      all(isinstance(x, str) and x for x in p))
    if isinstance(v, tuple) and pair(v):
        return True
    return isinstance(v, list) and len(v) > 0 and all(pair(p) for p in v)


def texts_ok(v: Any) -> bool:
    items = [v] if isinstance(v, str) else v
    return isinstance(items, (list, tuple)) and len(items) > 0 and all(
        isinstance(t, str) and t.strip() for t in items)


# -- the world the doors open on --------------------------------------------------------------

@functools.cache
def world() -> SimpleNamespace:
    """A tiny float64 GPT-NeoX, its corpus (24 sequences) and factors; a session, results (one
    corpus, and two), a retriever, retrains that cost nothing."""
    torch.manual_seed(0)
    _, tokenizer, _ = demo.load()
    model = tiny_model(len(tokenizer))
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    factors = fit_factors(model, corpus, FactorArgs(batch_size=6, progress=False))
    inf = Influence(model, tokenizer, corpus, factors, ScoreArgs(progress=False))
    res = inf.scan(PAIRS)
    half = corpus.subset(range(12)), corpus.subset(range(12, N))
    res2 = inf.scan(PAIRS, corpus={"a": half[0], "b": half[1]})
    path = scratch()
    ret = Retriever.build(inf, path, SketchArgs(m=16, progress=False), IndexArgs(progress=False),
                          lexical=0)
    prompts, completions = inf.encode([PAIR])
    return SimpleNamespace(model=model, tokenizer=tokenizer, corpus=corpus, inf=inf, res=res,
                           res2=res2, ret=ret, prompts=prompts, completions=completions,
                           retrain=retrain_of(model),
                           scores={"a": np.random.default_rng(0).standard_normal((1, N))})


def retrain_of(model: torch.nn.Module) -> Callable[..., torch.nn.Module]:
    """(ids, seed) -> model: the model, its embedding scaled by the subset's ids and the seed
    (the measurements vary with the subset; nothing is trained)."""
    def retrain(ids: Any, seed: int = 0) -> torch.nn.Module:
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.gpt_neox.embed_in.weight.mul_(1 + 0.001 * (int(np.sum(ids)) % 97) +
                                             0.001 * (seed % 7))
        return m
    return retrain


# -- the checks of a correct result -----------------------------------------------------------

def _top_is_sorted(w, v, out) -> bool:
    s = np.sort(w.res.scores[0])[::-1]
    return len(out) == min(int(v), N) and np.allclose(out["score"].to_numpy(), s[:len(out)])


def _scan_ok(w, v, out) -> bool:
    q = 1 if isinstance(v, tuple) else len(v)
    return out.scores.shape == (q, N) and np.isfinite(out.scores).all()


def _scan_ids_ok(w, v, out) -> bool:
    ids = np.asarray(list(v) if isinstance(v, range) else v, dtype=np.int64)
    return (list(out.ids) == list(ids) and
            np.allclose(out.scores, w.res.scores[:1, ids], rtol=1e-8, atol=1e-12))


def _search_ok(w, v, out) -> bool:
    exact = w.res.scores[:1]
    sizes = [s for s in out.search_size if s is not None]     # None: the probe was too small
    return (set(out.ids) <= set(range(N)) and len(out.candidates[0]) <= 2 * N and
            np.allclose(out.scores, exact[:, out.ids], rtol=1e-6, atol=1e-9) and
            all(np.isfinite(s["alpha"]) and 0 < s["p_tail"] <= 1 for s in sizes))


def _lds_ok(w, v, out) -> bool:
    return list(out.index) == ["a"] and np.isfinite(out["lds"]).all()


# -- the doors ----------------------------------------------------------------------------------

@dataclass
class Door:
    """One argument of one public door: call(world, value) -> result; good(value): whether
    the door must accept it; check(world, value, result): whether that result is right;
    words: what a one-line error must contain (default: "arg=")."""
    name: str
    arg: str
    values: list
    call: Callable[[SimpleNamespace, Any], Any]
    good: Callable[[Any], bool]
    check: Callable[[SimpleNamespace, Any, Any], bool] = lambda w, v, out: out is not None
    words: tuple[str, ...] = ()


def _doors() -> list[Door]:
    d = []
    add = lambda *a, **k: d.append(Door(*a, **k))  # noqa: E731
    # results
    add("InfluenceResult.top", "q", QUERY, lambda w, v: w.res.top(v, k=3),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: len(out) == 3, ("q=", "query"))
    add("InfluenceResult.top", "k", COUNTS, lambda w, v: w.res.top(0, k=v), count(1),
        _top_is_sorted)
    add("InfluenceResult.top", "sign", ["", "POSITIVE", 1, None, *SIGNS],
        lambda w, v: w.res.top(0, k=2, sign=v), lambda v: v in SIGNS,
        lambda w, v, out: len(out) == 2)
    add("InfluenceResult.top", "source", ["x", 1, None, "a"],
        lambda w, v: w.res2.top(0, k=30, source=v), lambda v: v in (None, "a"),
        lambda w, v, out: len(out) == (12 if v == "a" else N), ("source",))
    add("InfluenceResult.layer_profile", "k", COUNTS, lambda w, v: w.res.layer_profile(0, k=v),
        count(1, none=True), lambda w, v, out: len(out) == len(w.res.layer_names))
    add("InfluenceResult.tokens", "id", ONE_ID, lambda w, v: w.res.tokens(0, v),
        lambda v: count(0)(v) and v < N,
        lambda w, v, out: len(out) == len(w.corpus.token_ids(int(v))), ("id",))
    add("InfluenceResult.tokens", "q", QUERY, lambda w, v: w.res.tokens(v, 0),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: len(out) > 0, ("q=", "query"))
    add("InfluenceResult.split", "k", COUNTS, lambda w, v: w.res2.split(k=v), count(1),
        lambda w, v, out: (out.groupby(level="query")["in_top"].sum() == min(v, N)).all())
    # the session
    add("Influence.scan", "queries", QUERIES, lambda w, v: w.inf.scan(v), query_ok, _scan_ok,
        ("quer", "prompt", "completion"))
    add("Influence.scan", "ids", IDS, lambda w, v: w.inf.scan(PAIR, ids=v),
        ids_in(N, none=True), lambda w, v, out: v is None or _scan_ids_ok(w, v, out),
        ("ids", "id "))
    add("Influence.scan", "args", [{"rank": 3}, "x", 3, ScoreArgs(rank=2, progress=False)],
        lambda w, v: w.inf.scan(PAIR, ids=[0, 1], args=v), lambda v: isinstance(v, ScoreArgs),
        lambda w, v, out: out.scores.shape == (1, 2))
    add("Influence.scan", "corpus", ["x", 3, {}, {"a": "x"}, [TEXTS], None],
        lambda w, v: w.inf.scan(PAIR, corpus=v), lambda v: v is None,
        lambda w, v, out: out.scores.shape == (1, N), ("corpus", "part", "dict"))
    add("Influence", "corpus", ["x", 3, TEXTS, None],
        lambda w, v: Influence(w.model, w.tokenizer, v), lambda v: v is None,
        lambda w, v, out: out.corpus is None)
    add("Influence.fit", "args", ["x", {"batch_size": 3}, 3],
        lambda w, v: copy.copy(w.inf).fit(v), lambda v: False)
    add("Influence.score_texts", "metadata", [[{}, {}], [1], {"a": 1}, "x", [{"a": 1}], None],
        lambda w, v: w.inf.score_texts(["alpha number 0 is even."], PAIR, metadata=v),
        lambda v: v is None or v == [{"a": 1}], lambda w, v, out: out.scores.shape == (1, 1),
        ("metadata",))
    add("InfluenceResult.load", "path", [3, None, "/nonexistent"],
        lambda w, v: type(w.res).load(v), lambda v: False, words=("path=", "no saved result"))
    add("lds", "retrain", [None, "x", 3], lambda w, v: lds(v, w.prompts, w.completions,
                                                           w.scores, subsets=3, seeds=(0,),
                                                           progress=False), lambda v: False)
    add("tail_patch", "model", [None, "x"], lambda w, v: tail_patch(
        v, w.corpus, w.prompts, w.completions, {"a": [[0]]}, progress=False), lambda v: False)
    add("train", "cfg", [None, {"epochs": 1}, "x"], lambda w, v: train(
        copy.deepcopy(w.model), w.corpus, v, [0], progress=False), lambda v: False)
    add("Influence.queries", "rank", [0, -1, 1.5, True, "x", None, 4, "default", HUGE],
        lambda w, v: w.inf.queries(PAIR, rank=v),
        lambda v: v in (None, "default") or (count(1)(v) and not isinstance(v, str)),
        lambda w, v, out: isinstance(out, Queries), ("rank",))
    add("Influence.plan", "queries", [0, -1, 1.5, True, "x", [], [0], [1, 2], 3],
        lambda w, v: w.inf.plan(queries=v, measure=False), lambda v: count(1)(v) or (
            isinstance(v, list) and len(v) > 0 and all(count(1)(x) for x in v)),
        lambda w, v, out: out is not None)
    add("Influence.self_influence", "corpus", ["x", 3, TEXTS],
        lambda w, v: w.inf.self_influence(corpus=v), lambda v: False)
    add("Corpus.from_file", "path", [3, None, "/nonexistent.txt", ["a.txt"]],
        lambda w, v: Corpus.from_file(v, w.tokenizer), lambda v: False,
        words=("path=", "not found"))
    add("SketchIndex.search", "x", ["ones 2x3", "ones 5", "x", "nan 1xD", "ones 1xD", "ones 2xD",
                                    "list 1xD"],                   # D: the sketches' dimension
        lambda w, v: w.ret.index.search(_sketch(v, w.ret.sketches.dim), 3),
        lambda v: v in ("ones 1xD", "ones 2xD", "list 1xD"),
        lambda w, v, out: out[1].shape == (1 + (v == "ones 2xD"), 3), ("x=", "x has"))
    add("Influence.self_influence", "ids", IDS, lambda w, v: w.inf.self_influence(ids=v),
        ids_in(N, none=True), lambda w, v, out: len(out) == (N if v is None else len(v)),
        ("ids", "id "))
    add("Influence.queries", "strategy", ["ekafc", "", 1, None, *STRATEGIES],
        lambda w, v: w.inf.queries(PAIR, strategy=v), lambda v: v is None or v in STRATEGIES,
        lambda w, v, out: isinstance(out, Queries))
    add("Influence.strategy_scores", "seed", [-1, 1.5, True, "0", None, HUGE, 0, np.int64(3)],
        lambda w, v: w.inf.strategy_scores(PAIR, strategies=("ekfac",), seed=v), count(0),
        lambda w, v, out: out["random"].shape == (1, N))
    add("Influence.strategy_scores", "baselines", BOOLS,
        lambda w, v: w.inf.strategy_scores(PAIR, strategies=("ekfac",), baselines=v),
        lambda v: isinstance(v, (bool, np.bool_)),
        lambda w, v, out: ("bm25" in out) == bool(v))
    add("Influence.score_texts", "texts", TEXTS_IN, lambda w, v: w.inf.score_texts(v, PAIR),
        texts_ok, lambda w, v, out: out.scores.shape == (1, 1 if isinstance(v, str) else len(v)),
        ("texts", "text "))
    add("Influence.retriever", "lexical", [NAN, -0.1, 1.5, True, "0.5", INF],
        lambda w, v: w.inf.retriever(scratch(), lexical=v), lambda v: False)
    # the retriever
    add("Retriever", "lexical", [NAN, INF, -0.1, 1.5, True, "0.5", 0, 1, 0.5, None, 1.0],
        lambda w, v: Retriever(w.inf, w.ret.sketches, w.ret.index, lexical=v),
        real(0, 1, False, False, none=True), lambda w, v, out: out.lexical == v)
    add("Retriever.search", "candidates", COUNTS,   # None: a recall target instead
        lambda w, v: w.ret.search(PAIR, candidates=v, probe=0), count(1, none=True), _search_ok)
    add("Retriever.search", "probe", COUNTS,
        lambda w, v: w.ret.search(PAIR, candidates=4, probe=v), count(0, none=True), _search_ok)
    add("Retriever.search", "recall", FLOATS,
        lambda w, v: w.ret.search(PAIR, recall=v), real(0, 1, none=True), _search_ok)
    add("Retriever.search", "queries", QUERIES[:9], lambda w, v: w.ret.search(v, candidates=4),
        query_ok, _search_ok, ("quer", "prompt", "completion"))
    add("SketchIndex.search", "k", COUNTS,
        lambda w, v: w.ret.index.search(np.ones((2, w.ret.sketches.dim), np.float32), v),
        count(0), lambda w, v, out: out[1].shape == (2, min(v, N)) and (out[1] >= 0).all())
    # the corpus
    add("Corpus.subset", "ids", IDS, lambda w, v: w.corpus.subset(v), ids_in(N, empty=False),
        lambda w, v, out: len(out) == len(v) and out.text(0) == w.corpus.text(int(list(v)[0])),
        ("ids", "id "))
    add("Corpus.batches", "batch_size", COUNTS, lambda w, v: list(w.corpus.batches(v)),
        count(1), lambda w, v, out: sum(len(b) for b in out) == N)
    add("Corpus.from_texts", "max_len", COUNTS,
        lambda w, v: Corpus.from_texts(TEXTS[:3], w.tokenizer, v), count(2),
        lambda w, v, out: np.diff(out.offsets).max() <= min(v, 64))
    add("Corpus.from_texts", "texts", TEXTS_IN[:7] + TEXTS_IN[8:],
        lambda w, v: Corpus.from_texts(v, w.tokenizer), texts_ok,
        lambda w, v, out: len(out) == len(v), ("texts", "text", "empty"))
    add("Corpus.concat", "parts", [{}, [1], None, {"a": 3}, "ab", {"a": "corpus"}],
        lambda w, v: Corpus.concat(v), lambda v: False, words=("parts", "part", "dict"))
    # argument dataclasses
    for cls, field, values, good in [
            (TrainConfig, "epochs", COUNTS, count(1)), (TrainConfig, "warmup_steps", COUNTS,
                                                        count(1)),
            (TrainConfig, "lr", FLOATS, real()), (TrainConfig, "label_smoothing", FLOATS,
                                                  real(0, 1, False, True)),
            (TrainConfig, "seed", COUNTS, count(0)), (FactorArgs, "damping", FLOATS,
                                                      real(none=True)),
            (ScoreArgs, "rank", COUNTS, count(1, none=True)), (SketchArgs, "m", COUNTS, count(1)),
            (CalibrationArgs, "sample", COUNTS, count(2))]:
        add(cls.__name__, field, values, lambda w, v, c=cls, f=field: c(**{f: v}), good,
            lambda w, v, out, f=field: getattr(out, f) is v)
    # training
    cfg = TrainConfig(epochs=1, batch_size=8, warmup_steps=1)
    add("train", "ids", IDS, lambda w, v: train(copy.deepcopy(w.model), w.corpus, cfg, v,
                                                progress=False),
        lambda v: ids_in(N, empty=False, none=True)(v),
        lambda w, v, out: np.isfinite(out).all() and len(out) > 0, ("ids", "id ", "sequences"))
    add("Retrainer.__call__", "seed", [-1, 1.5, True, "0", None, 0],
        lambda w, v: Retrainer(lambda s: tiny_model(len(w.tokenizer)), w.corpus, cfg)([0, 1], v),
        count(0), lambda w, v, out: isinstance(out, torch.nn.Module))
    add("InfluenceCallback", "steps", [(0,), (-1,), (1, 1), (1.5,), "1", None, 3, (1, 2), ()],
        lambda w, v: InfluenceCallback(steps=v), lambda v: isinstance(v, tuple) and all(
            count(1)(s) for s in v) and len(set(v)) == len(v),
        lambda w, v, out: out.steps == set(v))
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir="out"))
    add("factors_path", "step", [-1, 1.5, True, "3", None, 3],
        lambda w, v: factors_path(trainer, v), count(0, none=True),
        lambda w, v, out: str(out).endswith("influence_factors"))
    # validation
    run_lds = lambda w, **k: lds(w.retrain, w.prompts, w.completions,  # noqa: E731
                                 k.pop("scores", w.scores), **{"subsets": 3, "seeds": (0,),
                                                               "progress": False, **k})
    add("lds", "seeds", SEEDS, lambda w, v: run_lds(w, seeds=v),
        lambda v: ids_in(HUGE + 1, empty=False)(v) and len(set(np.asarray(v).tolist())) ==
        len(v), _lds_ok)
    add("lds", "alpha", FLOATS, lambda w, v: run_lds(w, alpha=v),
        lambda v: real(0, 1)(v) and 0 < round(v * N) < N, _lds_ok)
    add("lds", "subsets", [NAN, -1, 0, 1, 1.5, True, "3", None, 3], lambda w, v: run_lds(
        w, subsets=v), count(2), _lds_ok)
    bad = np.random.default_rng(0).standard_normal((1, N))
    add("lds", "scores", [{}, {"a": np.full((1, N), NAN)}, {"a": np.where(np.arange(N) == 3,
                                                                          INF, bad)},
                          {"a": bad[0]}, {"a": np.zeros((2, N))}, {"a": bad}],
        lambda w, v: run_lds(w, scores=v), lambda v: len(v) == 1 and np.ndim(v["a"]) == 2 and
        np.shape(v["a"])[0] == 1 and np.isfinite(v["a"]).all(), _lds_ok, ("scores",))
    ranking = {"a": np.argsort(-w_scores())[None]}
    run_lo = lambda w, **k: leave_out(w.retrain, w.prompts, w.completions,  # noqa: E731
                                      k.pop("rankings", ranking), k.pop("n", N),
                                      **{"ks": (2,), "progress": False, **k})
    lo_ok = lambda w, v, out: np.isfinite(out["delta"]).all() and len(out) > 0  # noqa: E731
    add("leave_out", "ks", [(-1,), (0,), (), (1, 1), (1.5,), "1", (True,), (N,), None, (1,),
                            (1, 2)], lambda w, v: run_lo(w, ks=v),
        lambda v: isinstance(v, tuple) and len(v) > 0 and all(count(1)(k) and k < N
                                                              for k in v) and len(set(v)) ==
        len(v), lo_ok, ("ks",))
    add("leave_out", "n", [NAN, -1, 0, 1.5, True, "24", None, 10, N],
        lambda w, v: run_lo(w, n=v), lambda v: count(1)(v) and v == N, lo_ok, ("n=", "corpus of"))
    add("leave_out", "rankings", [{"a": [[-1, 0]]}, {"a": [[0.5, 1.5]]}, {"a": [[N, 0]]},
                                  {"a": [0, 1]}, {"a": [[0]]}, {"a": [[0, 1]]}],
        lambda w, v: run_lo(w, rankings=v), lambda v: v == {"a": [[0, 1]]}, lo_ok,
        ("ranking", "id "))
    run_tp = lambda w, **k: tail_patch(w.model, w.corpus, w.prompts, w.completions,  # noqa: E731
                                       **{"candidates": {"a": [[0, 3]]}, "progress": False, **k})
    tp_ok = lambda w, v, out: len(out) > 0 and np.isfinite(out["delta"]).all()  # noqa: E731
    add("tail_patch", "lr", FLOATS, lambda w, v: run_tp(w, lr=v), real(), tp_ok)
    add("tail_patch", "candidates", [{}, {"a": [[-1]]}, {"a": [[N]]}, {"a": [[0.5]]},
                                     {"a": [0, 1]}, {"a": [[0], [1]]}, {"a": [[]]},
                                     {"a": [[2]]}],
        lambda w, v: run_tp(w, candidates=v), lambda v: v == {"a": [[2]]}, tp_ok,
        ("candidates", "id "))
    add("top_ids", "k", COUNTS, lambda w, v: top_ids(w.scores["a"], v), count(1),
        lambda w, v, out: out.shape == (1, min(v, N)))
    add("lds_subsets", "alpha", FLOATS, lambda w, v: lds_subsets(N, 3, v),
        lambda v: real(0, 1)(v) and 0 < round(v * N) < N,
        lambda w, v, out: out.shape == (3, N) and (out.sum(1) == round(v * N)).all())
    for arg, values in (("eps", [NAN, INF, -1, 0, True, "1", [1]]),   # refused before any
                        ("max_iter", [NAN, -1, 0, 1.5, True, "1", [1]]),  # work: no model
                        ("lissa_depth", [NAN, -1, 1.5, True, "1", [1]])):
        add("pbrf", arg, values, lambda w, v, a=arg: pbrf(w.model, None, [[1]], [[2]], [0],
                                                            **{a: v}), lambda v: False)
    # the command line: flags checked as they are parsed (one line, exit 2)
    for argv, flag in [(["validate", "tail-patch", "--model", "m", "--out", "o", "--k"], "--k"),
                       (["validate", "tail-patch", "--model", "m", "--out", "o", "--lr"], "--lr"),
                       (["validate", "lds", "--out", "o", "--alpha"], "--alpha"),
                       (["validate", "lds", "--out", "o", "--subsets"], "--subsets"),
                       (["score", "--top"], "--top")]:
        add("influence-nb " + " ".join(argv[:2]), flag,
            ["-1", "nan", "inf", "x", "1e400", "", "0", "-0"] + (["1.5"] if flag != "--lr"
                                                                  else []),
            lambda w, v, a=argv: main([*a, v]), lambda v: False, words=(flag,))
    return d


def _more_doors() -> list[Door]:
    """The doors of the second round: the corpus's rows, sketches, the Trainer and demo
    entries, the widgets, the magics, the charts and the rest of the command line."""
    d = []
    add = lambda *a, **k: d.append(Door(*a, **k))  # noqa: E731
    one_id = lambda v: count(0)(v) and v < N  # noqa: E731
    # the corpus's rows
    add("Corpus.token_ids", "i", ONE_ID, lambda w, v: w.corpus.token_ids(v), one_id,
        lambda w, v, out: list(out) == w.tokenizer(TEXTS[int(v)])["input_ids"][:64], ("id",))
    add("Corpus.text", "i", ONE_ID, lambda w, v: w.corpus.text(v), one_id,
        lambda w, v, out: out == TEXTS[int(v)], ("id",))
    add("Corpus.batches", "ids", IDS, lambda w, v: list(w.corpus.batches(4, ids=v)),
        ids_in(N, none=True), lambda w, v, out: [int(i) for b in out for i in b.ids] == (
            list(range(N)) if v is None else [int(i) for i in np.asarray(list(v) if isinstance(
                v, range) else v)]), ("ids", "id "))
    # sketches and the retriever
    sketch = lambda w, **k: build_sketches(  # noqa: E731
        *(k.pop(a, getattr(w.inf, a)) for a in ("model", "factors", "corpus")),
        k.pop("path", scratch("sk-")),
        k.pop("args", SketchArgs(m=16, progress=False)), **k)
    add("build_sketches", "ids", IDS, lambda w, v: sketch(w, ids=v),
        lambda v: ids_in(N, empty=False, none=True)(v) and (v is None or len(set(
            np.asarray(list(v)).tolist())) == len(v)),
        lambda w, v, out: sorted(out.ids.tolist()) == sorted(
            range(N) if v is None else np.asarray(list(v)).tolist()), ("ids", "id "))
    add("build_sketches", "args", ["x", 3, {"m": 16}, IndexArgs(progress=False)],
        lambda w, v: sketch(w, args=v), lambda v: False)
    add("build_sketches", "corpus", ["x", None, TEXTS], lambda w, v: sketch(w, corpus=v),
        lambda v: False)
    add("build_sketches", "factors", ["x", None, 3], lambda w, v: sketch(w, factors=v),
        lambda v: False)
    add("build_sketches", "path", [3, None, ["a"]], lambda w, v: sketch(w, path=v),
        lambda v: False)
    add("Sketches.open", "path", [3, None, "/nonexistent", "EMPTY"],
        lambda w, v: Sketches.open(scratch() if v == "EMPTY" else v), lambda v: False,
        words=("path=", "is missing"))
    for arg in ("inf", "sketches", "index"):
        add("Retriever", arg, ["x", None, 3], lambda w, v, a=arg: Retriever(**{
            "inf": w.inf, "sketches": w.ret.sketches, "index": w.ret.index, a: v}),
            lambda v: False)
    add("Retriever.open", "inf", ["x", None, SimpleNamespace(model=None)],
        lambda w, v: Retriever.open(v, scratch()), lambda v: False,
        words=("inf=", "session"))
    # the Trainer and the demo entries
    add("Influence.from_trainer", "trainer", [None, "x", 3, SimpleNamespace()],
        lambda w, v: Influence.from_trainer(v), lambda v: False,
        words=("trainer=", "Trainer"))
    add("Influence.from_trainer", "step", [-1, 1.5, True, "3", HUGE],
        lambda w, v: Influence.from_trainer(fake_trainer(w), v), lambda v: False,
        words=("step=", "no factors"))
    add("Influence.from_trainer", "model", ["x", 3, None],
        lambda w, v: Influence.from_trainer(fake_trainer(w), model=v), lambda v: v is None,
        lambda w, v, out: len(out.corpus) == N and out.factors is None)
    add("InfluenceCallback", "args", ["x", {"damping": 1}, 3, ScoreArgs()],
        lambda w, v: InfluenceCallback(args=v), lambda v: False)
    add("InfluenceCallback", "at_end", BOOLS, lambda w, v: InfluenceCallback(at_end=v),
        lambda v: isinstance(v, (bool, np.bool_)), lambda w, v, out: out.at_end == v)
    add("Influence.demo", "args", ["x", 3, {"batch_size": 3}, FactorArgs, ScoreArgs()],
        lambda w, v: Influence.demo(v), lambda v: False)
    add("Influence.demo", "score_args", ["x", 3, {}, FactorArgs()],
        lambda w, v: Influence.demo(score_args=v), lambda v: False)
    add("demo.spread_facts", "n", COUNTS, lambda w, v: demo.spread_facts(v),
        lambda v: count(1)(v) and v <= len(demo.facts()),
        lambda w, v, out: len(out) == v and len({f.id for f in out}) == v, ("n=", "facts"))
    add("demo.first_token", "paraphrase", [-1, 4, 1.5, True, "0", None, HUGE, 0, 3],
        lambda w, v: demo.first_token(demo.facts()[0], w.tokenizer, v),
        lambda v: count(0)(v) and v < 4,
        lambda w, v, out: out[0] == demo.facts()[0].prompt(v), ("paraphrase",))
    add("demo.facts", "world", [3, None, "/nonexistent", "nosuchpreset"],
        lambda w, v: demo.facts(v), lambda v: False, words=("world", "preset"))
    add("demo.translate", "text", [3, None, b"a b"], lambda w, v: demo.translate(v),
        lambda v: False)
    add("demo.translate", "keep", ["Alpha", 3, ["Alpha"], frozenset({"Alpha"})],
        lambda w, v: demo.translate("Alpha is the word.", v),
        lambda v: isinstance(v, frozenset), lambda w, v, out: "Alpha" in out)
    add("demo.word_order", "facts", ["x", [], None, [1]],
        lambda w, v: demo.word_order(w.inf, v), lambda v: False, words=("facts",))
    for field, values, good in [("n_sequences", COUNTS, count(1)),
                                ("facts_per_relation", COUNTS, count(1)),
                                ("canonical_share", FLOATS, real(0, 1, False, False)),
                                ("seed", COUNTS, count(0))]:
        add("WorldConfig", field, values, lambda w, v, f=field: WorldConfig(**{f: v}), good,
            lambda w, v, out, f=field: getattr(out, f) is v)
    # the widgets
    add("TokenHighlight.of", "q", QUERY, lambda w, v: TokenHighlight.of(w.res, v, 0),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: len(out.tokens) > 0,
        ("q=", "query"))
    add("TokenHighlight.of", "id", ONE_ID, lambda w, v: TokenHighlight.of(w.res, 0, v), one_id,
        lambda w, v, out: len(out.tokens) == len(w.corpus.token_ids(int(v))), ("id",))
    add("TokenHighlight", "scores", [[NAN, 1.0], [1.0], "ab", None, [[1.0, 2.0]], [1.0, 2.0]],
        lambda w, v: TokenHighlight(["a", "b"], v), lambda v: v == [1.0, 2.0],
        lambda w, v, out: out.scores == [1.0, 2.0], ("scores",))
    add("LayerBars.of", "k", COUNTS, lambda w, v: LayerBars.of(w.res, 0, v),
        count(1, none=True), lambda w, v, out: len(out.values) == len(w.res.layer_names))
    add("LayerBars.of", "q", QUERY, lambda w, v: LayerBars.of(w.res, v),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: len(out.values) > 0,
        ("q=", "query"))
    add("InfluenceExplorer", "k", COUNTS, lambda w, v: InfluenceExplorer(w.res, k=v),
        count(1), lambda w, v, out: 0 < len(out.rows) <= 2 * min(v, N))
    add("InfluenceExplorer", "query", QUERY, lambda w, v: InfluenceExplorer(w.res, query=v),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: out.query == int(v) % 2,
        ("query",))
    add("InfluenceExplorer", "sign", ["", "POSITIVE", 1, None, *SIGNS],
        lambda w, v: InfluenceExplorer(w.res, sign=v), lambda v: v in SIGNS,
        lambda w, v, out: len(out.rows) > 0)
    add("InfluenceExplorer", "source", ["x", 1, None, "", "a"],
        lambda w, v: InfluenceExplorer(w.res2, source=v), lambda v: v in ("", "a"),
        lambda w, v, out: len(out.rows) > 0, ("source",))
    add("SyntheticLab", "query", QUERIES[:9], lambda w, v: SyntheticLab(w.inf, v, score=False),
        lambda v: isinstance(v, tuple) and query_ok(v) or query_ok(v) and len(v) == 1,
        lambda w, v, out: out.query is not None, ("quer", "prompt", "completion"))
    add("SyntheticLab", "texts", TEXTS_IN, lambda w, v: SyntheticLab(w.inf, PAIR, v),
        lambda v: isinstance(v, (list, tuple)) and all(isinstance(t, str) for t in v),
        lambda w, v, out: len(out.scores) == sum(bool(t.strip()) for t in v), ("texts",))
    # the magics
    add("parse_query", "line", ["", "a", "a || b || c", "|| b", "a ||", 3, None, "a || b",
                                "a||b"], lambda w, v: parse_query(v),
        lambda v: v in ("a || b", "a||b"), lambda w, v, out: out[0] == "a" and out[1].strip()
        == "b", ("line", "query", "prompt", "||"))
    add("parse_paragraphs", "cell", [3, None, b"a", "", "a\n\n[x] b"],
        lambda w, v: parse_paragraphs(v), lambda v: isinstance(v, str),
        lambda w, v, out: out == (([], []) if not v else (["a", "b"], ["", "x"])), ("cell",))
    add("%influence_scan", "-k", ["-1", "0", "x", "1.5", "3"],
        lambda w, v: quietly(magics(w).influence_scan, f"-k {v}"), lambda v: v == "3",
        lambda w, v, out: True, ("-k", "k="))
    add("%influence_query", "line", ["", "a", "a || b || c", "a || "],
        lambda w, v: magics(w).influence_query(v), lambda v: False, words=("query", "||"))
    # the charts
    add("charts.distribution", "q", QUERY, lambda w, v: charts.distribution(w.res, v),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: out is not None, ("q=", "query"))
    add("charts.distribution", "tail", FLOATS, lambda w, v: charts.distribution(w.res, 0, v),
        real(0, 1), lambda w, v, out: out is not None, ("tail",))
    add("charts.distribution", "points", COUNTS,
        lambda w, v: charts.distribution(w.res, 0, points=v), lambda v: count(1)(v) and
        v <= 10 ** 5, lambda w, v, out: out is not None)
    add("charts.layer_profile", "q", QUERY, lambda w, v: charts.layer_profile(w.res, v),
        lambda v: count(-2)(v) and v < 2, lambda w, v, out: out is not None, ("q=", "query"))
    add("charts.layer_profile", "k", COUNTS, lambda w, v: charts.layer_profile(w.res, 0, v),
        count(1, none=True), lambda w, v, out: out is not None)
    queries = [[-3], [2], [0.5], "01", [], None, [0, 1], [1], (0,), [True]]
    add("charts.layer_heatmap", "queries", queries,
        lambda w, v: charts.layer_heatmap(w.res, v), lambda v: v is None or ids_in(2, False)(v),
        lambda w, v, out: out is not None, ("quer",))
    add("charts.layer_heatmap", "labels", [["a"], "ab", 3, ["a", "b", "c"], ["a", "b"]],
        lambda w, v: charts.layer_heatmap(w.res, labels=v), lambda v: v == ["a", "b"],
        lambda w, v, out: out is not None, ("labels",))
    add("charts.source_split", "queries", queries,
        lambda w, v: charts.source_split(w.res2, v), lambda v: v is None or ids_in(2, False)(v),
        lambda w, v, out: out is not None, ("quer",))
    add("charts.variants", "table", ["x", None, pd.DataFrame(), pd.DataFrame(
        {"label": ["a"], "score": [NAN]}), pd.DataFrame({"label": ["a"], "score": [1.0]})],
        lambda w, v: charts.variants(v), lambda v: isinstance(v, pd.DataFrame) and len(v) and
        np.isfinite(v["score"]).all(), lambda w, v, out: out is not None, ("table",))
    add("charts.lds_scatter", "q", QUERY, lambda w, v: charts.lds_scatter(lds_table(w), v),
        lambda v: count(-1)(v) and v < 1, lambda w, v, out: out is not None, ("q=", "query"))
    add("charts.lds_scatter", "strategies", ["b", ["x"], 3, [], ["a"]],
        lambda w, v: charts.lds_scatter(lds_table(w), 0, v), lambda v: v == ["a"],
        lambda w, v, out: out is not None, ("strategies",))
    # the command line: the verbs' other flags (checked as they are parsed, or as the options
    # become their argument dataclasses, before a model is loaded)
    io = ["--model", "m", "--corpus", "c.txt", "--out", "o"]
    search = ["--factors", "f", "--index", "i", "--query", "a", "b"]
    valid = {"--damping": ("1.5",), "--lexical": ("0",), "--facts": ("0",)}    # not hostile
    for argv, flag in [(["fit", *io, "--max-len"], "--max-len"),
                       (["fit", *io, "--limit"], "--limit"),
                       (["fit", *io, "--damping"], "--damping"),
                       (["fit", *io, "--batch-size"], "--batch-size"),
                       (["sketch", *io, "--factors", "f", "--m"], "--m"),
                       (["search", *io, *search, "--candidates"], "--candidates"),
                       (["search", *io, *search, "--lexical"], "--lexical"),
                       (["search", *io, *search, "--nprobe"], "--nprobe"),
                       (["plan", *io, "--queries"], "--queries"),
                       (["demo", "--facts"], "--facts"), (["demo", "--fit-sample"],
                                                          "--fit-sample"),
                       (["demo", "--threads"], "--threads"),
                       (["validate", "lds", "--out", "o", "--seeds"], "--seeds"),
                       (["score", *io, "--factors", "f", "--query", "a", "b", "--strategy"],
                        "--strategy")]:
        hostile = ["-1", "nan", "inf", "x", "1e400", "", "0", "1.5"]
        add("influence-nb " + argv[0], flag, [v for v in hostile if v not in valid.get(flag, ())],
            lambda w, v, a=argv: main([*a, v]), lambda v: False,
            words=(flag, flag[2:].replace("-", "_") + "="))
    return d


def fake_trainer(w: SimpleNamespace) -> SimpleNamespace:
    """What from_trainer reads of a Hugging Face Trainer: the tiny model and its corpus's rows,
    no factors saved."""
    rows = [{"input_ids": w.corpus.token_ids(i).tolist()} for i in range(N)]
    return SimpleNamespace(model=w.model, processing_class=w.tokenizer, train_dataset=rows,
                           data_collator=None, args=SimpleNamespace(
                               output_dir=scratch("tr-")))


def quietly(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) with what it displays (a widget's text form, without a notebook) dropped."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def magics(w: SimpleNamespace) -> InfluenceMagics:
    """The magics of a shell without IPython, holding the world's session and a query."""
    m = InfluenceMagics(None)
    m.session, m.query = w.inf, PAIR
    return m


def lds_table(w: SimpleNamespace) -> pd.DataFrame:
    """An LDS table of the world's scores (computed once)."""
    if not hasattr(w, "lds"):
        w.lds = lds(w.retrain, w.prompts, w.completions, w.scores, subsets=3, seeds=(0,),
                    progress=False)
    return w.lds


def _sketch(name: str, dim: int) -> Any:
    """A query sketch array named in the table ("ones 1xD": one row of D ones)."""
    fill, shape = name.split(" ") if " " in name else (name, "")
    if fill == "x":
        return "x"
    rows = shape.replace("D", str(dim)).split("x")
    arr = np.full([int(r) for r in rows], NAN if fill == "nan" else 1.0, np.float32)
    return arr.tolist() if fill == "list" else arr


def w_scores() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(N)


DOORS = _doors() + _more_doors()
CASES = [(door, v) for door in DOORS for v in door.values]


# -- running and classifying ------------------------------------------------------------------

def outcome(door: Door, value: Any) -> tuple[str, str]:
    """(class, detail) of calling ``door`` with ``value``: see the module's docstring."""
    w = world()
    good = door.good(value)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            out = door.call(w, value)
    except SystemExit as e:                         # the CLI: exit 2 and one line on stderr
        err = stderr.getvalue().strip()
        ok = e.code == 2 and "\n" not in err and any(x in err for x in door.words)
        return ("clear error" if ok else "traceback"), err
    except Exception as e:  # noqa: BLE001 — every kind is classified
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        words = door.words or (f"{door.arg}=",)
        clear = (isinstance(e, (ValueError, TypeError, LookupError, OSError, MagicError,
                                UsageError)) and
                 "\n" not in text.strip() and any(x in text for x in words))
        if good:
            return "traceback", f"refused a good value: {type(e).__name__}: {text}"
        return ("clear error" if clear else "traceback"), f"{type(e).__name__}: {text}"
    if not good:
        return "silent wrong", f"accepted {value!r}"
    try:
        right = bool(door.check(w, value, out))
    except Exception as e:  # noqa: BLE001
        right, out = False, e
    return ("correct result" if right else "silent wrong"), ""


def _id(case: tuple[Door, Any]) -> str:
    door, value = case
    return f"{door.name}-{door.arg}-{' '.join(repr(value).split())[:24]}"


@pytest.mark.parametrize("case", [  # a value the door accepts runs it (seconds in all): slow
    pytest.param(c, id=_id(c), marks=[pytest.mark.slow] if c[0].good(c[1]) else [])
    for c in CASES])
def test_hostile_input_gives_a_clear_error_or_the_right_answer(case):
    door, value = case
    kind, detail = outcome(door, value)
    want = "correct result" if door.good(value) else "clear error"
    assert kind == want, detail


def test_the_table_is_large_and_covers_every_kind_of_door():
    assert len(CASES) >= 200
    names = {d.name.split(".")[0] for d in DOORS}
    assert {"InfluenceResult", "Influence", "Retriever", "Corpus", "TrainConfig", "train", "lds",
            "leave_out", "tail_patch", "pbrf", "InfluenceCallback", "build_sketches",
            "Sketches", "WorldConfig", "TokenHighlight", "LayerBars", "InfluenceExplorer",
            "SyntheticLab", "parse_query", "%influence_scan", "charts", "demo"} <= names


def tally() -> dict:
    """{class: count} over every case, and the cases that are neither a clear error nor a
    correct result."""
    classes: Counter = Counter()
    bad = []
    for door, value in CASES:
        kind, detail = outcome(door, value)
        classes[kind] += 1
        if kind not in ("clear error", "correct result"):
            bad.append(f"{_id((door, value))}: {kind}: {detail[:160]}")
    return dict(cases=len(CASES), doors=len({(d.name, d.arg) for d in DOORS}),
                **{k: classes[k] for k in ("clear error", "correct result", "traceback",
                                           "silent wrong")}, not_clear=bad)


if __name__ == "__main__":
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore")
    print(json.dumps(tally(), indent=1))
