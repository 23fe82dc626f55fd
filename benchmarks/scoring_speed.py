"""Streaming-scorer throughput against plain forward + backward on the same batches.

Prints JSON: sequences/s for 1 query and for 50 queries at rank 32, each ÷ plain forward +
backward throughput (same batches, same run); peak resident memory of a scan over N and 4N
sequences (each in a fresh subprocess), which should be flat.

    python benchmarks/scoring_speed.py [--n 1024]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=1024)
p.add_argument("--batch-size", type=int, default=32)
p.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
a = p.parse_args()

from influence_nb import demo  # noqa: E402
from influence_nb.scoring import ScoreArgs  # noqa: E402
from influence_nb.session import Influence  # noqa: E402

inf = Influence.demo(score_args=ScoreArgs(batch_size=a.batch_size, progress=False))
facts = demo.facts()

if a.memory_child:
    ids = np.arange(a.memory_child) % len(inf.corpus)
    inf.scan([(f.prompt(), f.completion) for f in facts[:8]], ids=ids)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sys.exit()

ids = np.random.default_rng(0).choice(len(inf.corpus), a.n, replace=False)
# the batches a scan runs: ids ordered by length within each chunk (a.n ≤ one chunk)
batches = list(inf.corpus.batches(a.batch_size, ids=ids[inf.corpus.by_length(ids, len(ids))]))


def plain() -> float:
    t = time.perf_counter()
    for b in batches:
        logits = inf.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        inf.task.training_loss(logits, b).sum().backward()
    inf.model.zero_grad(set_to_none=True)
    return a.n / (time.perf_counter() - t)


def scoring(n_queries: int) -> float:
    q = inf.queries([(f.prompt(), f.completion) for f in (facts * 2)[:n_queries]], rank=32)
    t = time.perf_counter()
    inf.scan(q, ids=ids)
    return a.n / (time.perf_counter() - t)


plain()  # warm-up
base = plain()
one, fifty = scoring(1), scoring(50)
base = (base + plain()) / 2  # bracket the scoring runs
mem = {}
for n in (a.n, 4 * a.n):
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--batch-size",
                          str(a.batch_size)], capture_output=True, text=True, check=True)
    mem[n] = float(out.stdout.strip().splitlines()[-1])
print(json.dumps(dict(
    plain_fwd_bwd_seq_per_s=round(base, 1), one_query_seq_per_s=round(one, 1),
    fifty_queries_seq_per_s=round(fifty, 1), ratio_1_query=round(one / base, 3),
    ratio_50_queries=round(fifty / base, 3), goals=dict(ratio_1_query=0.7, ratio_50_queries=0.4),
    peak_rss_mib={str(k): round(v, 1) for k, v in mem.items()}, batch_size=a.batch_size,
    threads=torch.get_num_threads())))
