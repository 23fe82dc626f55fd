"""LDS and leave-top-k-out on a world built independently of the demo generator
(``benchmarks/markov_world.py``). Same strategies and same machinery as ``benchmarks/lds.py``.

    python benchmarks/lds_markov.py [--subsets 50] [--seeds 2] [--leave-out-queries 12]
"""
import argparse
import time

import numpy as np

from common import report, set_threads
from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.validate import leave_out, lds
from lds import (ekfac_above_identity, lds_summary, leave_out_summary, rankings,
                 retraining_options)
from markov_world import build


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=1000)
    p.add_argument("--queries", type=int, default=20)
    retraining_options(p, leave_out_queries=12, work="bench-lds-markov")
    a = p.parse_args(argv)
    set_threads(a.threads)
    t0 = time.time()
    world = build(a.sequences, a.queries)
    corpus, retrain, model, pairs = world.corpus, world.retrain, world.model, world.pairs
    t1 = time.time()
    inf = Influence(model, world.tokenizer, corpus,
                    score_args=ScoreArgs(progress=False, batch_size=32))
    inf.fit(FactorArgs(batch_size=32, progress=False))
    scores = inf.strategy_scores(pairs)
    prompts, completions = inf.encode(pairs)
    t_scores = time.time() - t1

    t2 = time.time()
    table = lds(retrain, prompts, completions, scores, a.subsets, 0.5, range(a.seeds),
                a.work / "lds")
    t_lds = time.time() - t2
    t3 = time.time()
    N, Q = len(corpus), len(pairs)
    q_ids = np.arange(min(a.leave_out_queries, Q))
    removed = leave_out(retrain, [prompts[q] for q in q_ids], [completions[q] for q in q_ids],
                        rankings(scores, q_ids, 10, N), N, (10,), out_dir=a.work / "leave-out")
    t_leave = time.time() - t3
    report(dict(
        world="markov (independent of the demo generator)", n_sequences=N,
        n_tokens=int(len(corpus.tokens)), n_params=sum(p.numel() for p in model.parameters()),
        train_seconds=round(world.train_seconds, 1), queries=Q, subsets=a.subsets,
        seeds=a.seeds, lds=lds_summary(table), ekfac_above_identity=ekfac_above_identity(table),
        leave_out=leave_out_summary(removed), leave_out_queries=len(q_ids),
        seconds=dict(scores=round(t_scores, 1), lds=round(t_lds, 1), leave_out=round(t_leave, 1),
                     total=round(time.time() - t0, 1))))


if __name__ == "__main__":
    main()
