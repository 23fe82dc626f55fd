"""Rank-r query factorisation vs full rank (paper §3.2.2: rank 32 ≈ full rank, r = 0.995).

Prints JSON: mean Spearman of rank-r scores against full-rank scores over planted-fact
queries of the demo world, on a sample of the corpus that holds every fact statement.

    python benchmarks/query_batching.py [--queries 24] [--sample 3000]
"""
import argparse
import time

import numpy as np

from common import fact_pairs, report, sample_ids
from influence_nb import demo
from influence_nb.queries import Queries
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.validate import spearman

RANKS = [8, 16, 32, 64, None]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--sample", type=int, default=3000)
    a = p.parse_args(argv)
    t0 = time.time()
    inf = Influence.demo()
    pairs = fact_pairs(demo.spread_facts(a.queries))
    batch = Queries.concat([inf.queries(pairs, rank=r) for r in RANKS])
    df = inf.corpus.df
    ids = np.union1d(df.index[df["kind"] == "fact"],
                     sample_ids(len(df), a.sample))[:max(a.sample, 1)]
    res = inf.scan(batch, ids=ids, args=ScoreArgs(per_layer=False, batch_size=32))
    S = res.scores.reshape(len(RANKS), len(pairs), -1)
    full = S[-1]
    out = {f"rank_{r}": float(np.mean([spearman(S[k, q], full[q]) for q in range(len(pairs))]))
           for k, r in enumerate(RANKS[:-1])}
    report(dict(mean_spearman_vs_full_rank=out, n_queries=len(pairs), n_sequences=len(ids),
                goal_rank_32=0.98, seconds=round(time.time() - t0, 1)))


if __name__ == "__main__":
    main()
