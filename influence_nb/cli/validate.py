"""``influence-nb validate``: counterfactual checks that need no Python callback (see
:mod:`influence_nb.validate`): tail-patching on any model, the LDS on a built-in world
(retrained from scratch with its recipe)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .core import Group, Option, Verb, positive, share
from .inputs import io_options, queries, query_options, session


def tail_patch_options() -> list[Group]:
    return [io_options("directory for tail_patch.csv"), query_options(), Group(None, (
        Option("k", "candidates per method (default: 10)", type=positive(int), default=10),
        Option("lr", "SGD step size (default: 1e-4)", type=positive(float), default=1e-4),
        Option("batch_size", "sequences per forward + backward of the scan (default: as "
               "many as its token budget holds)", type=positive(int), default=None)))]


def tail_patch(ns: argparse.Namespace, rank: int, world: int) -> dict:
    """One SGD step on each top-k candidate of the fitted strategy, of BM25 and at random; the
    change of each query's log p -> OUT/tail_patch.csv."""
    import numpy as np

    from ..scoring import ScoreArgs
    from ..store import atomic_write
    from ..validate import tail_patch as patch
    from ..validate import top_ids
    out = _out(ns)
    pairs = queries(ns)
    inf = session(ns, ScoreArgs(batch_size=ns.batch_size, progress=ns.progress))
    strategy = inf.factors.args.strategy
    scores = inf.strategy_scores(pairs, strategies=(strategy,))
    rng = np.random.default_rng(0)
    candidates = {strategy: top_ids(scores[strategy], ns.k), "bm25": top_ids(scores["bm25"], ns.k),
                  "random": np.stack([rng.choice(len(inf.corpus), min(ns.k, len(inf.corpus)),
                                                 replace=False) for _ in pairs])}
    frame = patch(inf.model, inf.corpus, *inf.encode(pairs), candidates, ns.lr, inf.task,
                  ns.progress)
    atomic_write(out / "tail_patch.csv", frame.to_csv(index=False).encode())
    summary = frame.groupby("method")["delta"].mean()
    print("mean change of log p(completion) after one SGD step on each candidate (nats):")
    print(summary.to_string())
    return dict(k=ns.k, lr=ns.lr, mean_delta=summary.round(6).to_dict())


def lds_options() -> list[Group]:
    return [Group(None, (
        Option("config", "read options from a TOML file", metavar="FILE.toml"),
        Option("world", default="validation", choices=("validation", "micro")),
        Option("subsets", "random subsets (default: 50)", type=positive(int), default=50),
        Option("seeds", "retrains per subset, averaged (default: 1)", type=positive(int),
               default=1),
        Option("alpha", "fraction of the corpus in each subset (default: 0.5)", type=share,
               default=0.5),
        Option("out", "directory for lds.csv and the retrains (required)", metavar="DIR"),
        Option("progress", default=True, switch=True)))]


def lds(ns: argparse.Namespace, rank: int, world: int) -> dict:
    """The LDS of every strategy, BM25 and random on a built-in world, against retrains on
    random subsets -> OUT/lds.csv and OUT/lds_per_query.csv."""
    from .. import demo
    from ..curvature import FactorArgs
    from ..scoring import ScoreArgs
    from ..session import Influence
    from ..store import atomic_write
    from ..training import Retrainer
    from ..validate import lds as score_lds
    out = _out(ns)
    model, tokenizer, corpus = demo.load(ns.world)
    inf = Influence(model, tokenizer, corpus, score_args=ScoreArgs(batch_size=32,
                                                                   progress=False))
    inf.fit(FactorArgs(batch_size=32, progress=ns.progress), cache=True)
    pairs, kinds = demo.query_set(ns.world, tokenizer)
    table = score_lds(Retrainer(model.config, corpus, demo.recipe(ns.world)), *inf.encode(pairs),
                      inf.strategy_scores(pairs), ns.subsets, ns.alpha, range(ns.seeds),
                      out / "retrains", progress=ns.progress)
    atomic_write(out / "lds.csv", table.to_csv().encode())
    atomic_write(out / "lds_per_query.csv",
                 table.attrs["per_query"].assign(kind=kinds).to_csv().encode())
    print(table.round(3).to_string())
    return dict(world=ns.world, queries=len(pairs), lds=table["lds"].round(4).to_dict())


def _out(ns: argparse.Namespace) -> Path:
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


VERB = Verb("validate", "counterfactual checks: tail-patching on any model, the LDS on a "
            "built-in world (see influence_nb.validate)", checks=(
                Verb("tail-patch", "one SGD step on each top-k candidate (by influence, BM25, "
                     "random); Δ log p of each query -> OUT/tail_patch.csv", tail_patch_options,
                     tail_patch, required=("model", "corpus", "factors", "out"), config=True),
                Verb("lds", "linear datamodeling score of EK-FAC, K-FAC, identity, BM25 and "
                     "random on a built-in world, retrained from scratch (resumable) -> "
                     "OUT/lds.csv", lds_options, lds, required=("out",), config=True)))
