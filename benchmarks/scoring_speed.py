"""Streaming-scorer throughput against plain forward + backward on the same batches.

Prints JSON: sequences/s for 1 query and for 50 queries at rank 32, each ÷ plain forward +
backward throughput (same batches, same run); peak resident memory of a scan over N and 4N
sequences (each in a fresh subprocess), which should be flat.

    python benchmarks/scoring_speed.py [--n 1024]
"""
import argparse

import numpy as np
import torch

from common import (fact_pairs, length_batches, peak_rss_mib, plain, report, run_child,
                    sample_ids, seconds)
from influence_nb import demo
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    inf = Influence.demo(score_args=ScoreArgs(batch_size=a.batch_size, progress=False))
    pairs = fact_pairs(demo.facts())
    if a.memory_child:
        inf.scan(pairs[:8], ids=np.arange(a.memory_child) % len(inf.corpus))
        print(peak_rss_mib())
        return

    ids = sample_ids(len(inf.corpus), a.n)
    batches = length_batches(inf.corpus, ids, a.batch_size)   # a.n ≤ one scan chunk

    def rate() -> float:
        return a.n / plain(inf.model, batches, inf.task)

    def scoring(n_queries: int) -> float:
        q = inf.queries((pairs * 2)[:n_queries], rank=32)
        return a.n / seconds(lambda: inf.scan(q, ids=ids))

    rate()  # warm-up
    base = rate()
    one, fifty = scoring(1), scoring(50)
    base = (base + rate()) / 2  # bracket the scoring runs
    mem = {n: float(run_child([__file__, "--memory-child", str(n), "--batch-size",
                               str(a.batch_size)])) for n in (a.n, 4 * a.n)}
    report(dict(
        plain_fwd_bwd_seq_per_s=round(base, 1), one_query_seq_per_s=round(one, 1),
        fifty_queries_seq_per_s=round(fifty, 1), ratio_1_query=round(one / base, 3),
        ratio_50_queries=round(fifty / base, 3),
        goals=dict(ratio_1_query=0.7, ratio_50_queries=0.4),
        peak_rss_mib={str(k): round(v, 1) for k, v in mem.items()}, batch_size=a.batch_size,
        threads=torch.get_num_threads()))


if __name__ == "__main__":
    main()
