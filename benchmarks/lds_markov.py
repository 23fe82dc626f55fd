"""LDS and leave-top-k-out on a world built independently of the demo generator
(``benchmarks/markov_world.py``). Same strategies and same machinery as ``benchmarks/lds.py``.

    python benchmarks/lds_markov.py [--subsets 50] [--seeds 2] [--leave-out-queries 12]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from markov_world import build   # benchmarks/markov_world.py

from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.store import cache_dir
from influence_nb.validate import leave_out, lds, top_ids

p = argparse.ArgumentParser()
p.add_argument("--sequences", type=int, default=1000)
p.add_argument("--queries", type=int, default=20)
p.add_argument("--subsets", type=int, default=50)
p.add_argument("--seeds", type=int, default=2)
p.add_argument("--leave-out-queries", type=int, default=12)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--work", type=Path, default=cache_dir() / "bench-lds-markov")
a = p.parse_args()
torch.set_num_threads(a.threads)
t0 = time.time()

world = build(a.sequences, a.queries)
tokenizer, corpus, retrain, model, pairs = (world.tokenizer, world.corpus, world.retrain,
                                            world.model, world.pairs)
t_train = world.train_seconds
t1 = time.time() - t_train

inf = Influence(model, tokenizer, corpus, score_args=ScoreArgs(progress=False, batch_size=32))
inf.fit(FactorArgs(batch_size=32, progress=False))
scores = inf.strategy_scores(pairs)
prompts, completions = inf.encode(pairs)
t_scores = time.time() - t1 - t_train

t2 = time.time()
table = lds(retrain, prompts, completions, scores, a.subsets, 0.5, range(a.seeds),
            a.work / "lds")
t_lds = time.time() - t2
t3 = time.time()
N, Q = len(corpus), len(pairs)
q_ids = np.arange(min(a.leave_out_queries, Q))
rankings = {"ekfac": top_ids(scores["ekfac"][q_ids], 10),
            "bm25": top_ids(scores["bm25"][q_ids], 10),
            "random": np.stack([np.random.default_rng(q).permutation(N)[:10] for q in q_ids])}
removed = leave_out(retrain, [prompts[q] for q in q_ids], [completions[q] for q in q_ids],
                    rankings, N, (10,), out_dir=a.work / "leave-out")
t_leave = time.time() - t3
print(json.dumps(dict(
    world="markov (independent of the demo generator)", n_sequences=N,
    n_tokens=int(len(corpus.tokens)), n_params=sum(p.numel() for p in model.parameters()),
    train_seconds=round(t_train, 1), queries=Q, subsets=a.subsets, seeds=a.seeds,
    lds={k: {c: round(float(v), 4) for c, v in row.items()}
         for k, row in table[["lds", "ci_low", "ci_high", "queries"]].iterrows()},
    ekfac_above_identity=bool(table.loc["ekfac", "ci_low"] > table.loc["identity", "ci_high"]),
    leave_out={f"{m} top-{k}": round(float(g["delta"].mean()), 4)
               for (m, k), g in removed.groupby(["method", "k"])},
    leave_out_queries=len(q_ids),
    seconds=dict(scores=round(t_scores, 1), lds=round(t_lds, 1), leave_out=round(t_leave, 1),
                 total=round(time.time() - t0, 1)),
), indent=1))
