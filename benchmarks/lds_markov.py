"""LDS and leave-top-k-out on a world built independently of the demo generator: the Markov
world (``benchmarks/markov_world.py``), with ``--world text`` real English text
(``benchmarks/text_world.py``: Python's standard-library docstrings), or with ``--world
memorized`` short facts learned to near-certainty (``benchmarks/memorized_world.py``). Same
strategies (``estimators.py``: EK-FAC, K-FAC, identity, BM25, random, EK-FAC over seeds and over the run's
checkpoints, exact replay) and same protocols as ``benchmarks/lds.py``; no replay on the Markov
world: its GPT-2 trains with dropout, which a replay cannot repeat.

    python benchmarks/lds_markov.py [--world text] [--subsets 50] [--seeds 2] [--queries 20]
"""
import argparse
import time

import numpy as np
import pandas as pd

from common import report, set_threads
from estimators import estimator_options, estimators
from influence_nb.session import Influence
from influence_nb.validate import leave_out
from lds import (ekfac_above_identity, leave_out_summary, protocols, rankings,
                 retraining_options)
import memorized_world
import text_world
from markov_world import build


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", choices=("markov", "text", "memorized"), default="markov")
    p.add_argument("--sequences", type=int, default=1000, help="markov world only")
    p.add_argument("--queries", type=int, default=20, help="markov and memorized worlds")
    p.add_argument("--per-kind", type=int, default=6, help="text world only: queries of each "
                   "of its three kinds")
    retraining_options(p, leave_out_queries=12, work="bench-lds-markov")
    estimator_options(p)
    a = p.parse_args(argv)
    a.alpha = 0.5
    if a.world != "markov" and a.work == p.get_default("work"):
        a.work = a.work.with_name(f"bench-lds-{a.world}")
    set_threads(a.threads)
    t0 = time.time()
    world = {"markov": lambda: build(a.sequences, a.queries),
             "text": lambda: text_world.build(per_kind=a.per_kind),
             "memorized": lambda: memorized_world.build(queries=a.queries)}[a.world]()
    corpus, retrain, model, pairs = world.corpus, world.retrain, world.model, world.pairs
    t1 = time.time()
    scores, cost, replayed = estimators(model, world.tokenizer, retrain, pairs, a, a.work)
    prompts, completions = Influence(model, world.tokenizer).encode(pairs)
    t_scores = time.time() - t1

    t2 = time.time()
    table, protocol = protocols(retrain, prompts, completions, scores, replayed, a, a.work)
    t_lds = time.time() - t2
    t3 = time.time()
    N, Q = len(corpus), len(pairs)
    q_ids = np.arange(min(a.leave_out_queries, Q))
    removed = pd.DataFrame(columns=["method", "k", "delta"])
    if len(q_ids):
        removed = leave_out(retrain, [prompts[q] for q in q_ids],
                            [completions[q] for q in q_ids], rankings(scores, q_ids, 10, N), N,
                            (10,), out_dir=a.work / "leave-out")
    t_leave = time.time() - t3
    report(dict(
        world=getattr(world, "source", "markov (independent of the demo generator)"),
        query_kinds=getattr(world, "kinds", None), n_sequences=N,
        n_tokens=int(len(corpus.tokens)), n_params=sum(p.numel() for p in model.parameters()),
        train_seconds=round(world.train_seconds, 1), queries=Q, subsets=a.subsets,
        seeds=a.seeds, leave_1_subsets=a.leave_1_subsets, cost_per_training_run=cost,
        **protocol, ekfac_above_identity=ekfac_above_identity(table),
        leave_out=leave_out_summary(removed), leave_out_queries=len(q_ids),
        seconds=dict(scores=round(t_scores, 1), lds=round(t_lds, 1), leave_out=round(t_leave, 1),
                     total=round(time.time() - t0, 1))))


if __name__ == "__main__":
    main()
