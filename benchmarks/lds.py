"""Do the scores hold under retraining? LDS and leave-top-k-out on the validation world.

The validation world (``demo.load("validation")``: the demo generator and recipe at 1,500
sequences, a 0.17M-parameter GPT-NeoX that retrains from scratch in ≈ 27 s on 2 cores) is
retrained from scratch on random halves of its corpus (LDS) and without each query's top-k
(leave-k-out). Queries of four kinds: planted facts (canonical and paraphrased prompts), a
fact asked in Velnish, arithmetic and code from the held-out set.

Strategies: EK-FAC, K-FAC, identity (gradient dot product), BM25 and random scores — and
kronfluence 1.0.1's EK-FAC when it is installed (optional; same model, layers and data).
Finished retrains are kept in ``--work`` (a killed run resumes).

    python benchmarks/lds.py [--subsets 50] [--seeds 2] [--leave-out-queries 20] > lds.json
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.store import cache_dir
from influence_nb.training import Retrainer
from influence_nb.validate import leave_out, lds, top_ids

p = argparse.ArgumentParser()
p.add_argument("--world", default="validation")
p.add_argument("--subsets", type=int, default=50)
p.add_argument("--seeds", type=int, default=2)
p.add_argument("--alpha", type=float, default=0.5)
p.add_argument("--leave-out-queries", type=int, default=20)
p.add_argument("--k", type=int, nargs="+", default=[10])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--work", type=Path, default=cache_dir() / "bench-lds")
a = p.parse_args()
torch.set_num_threads(a.threads)


t0 = time.time()
model, tokenizer, corpus = demo.load(a.world)
inf = Influence(model, tokenizer, corpus, score_args=ScoreArgs(progress=False, batch_size=32))
inf.fit(FactorArgs(batch_size=32, progress=False), cache=True)
pairs, kinds = demo.query_set(a.world, tokenizer)
Q, N = len(pairs), len(corpus)
scores = inf.strategy_scores(pairs)
try:
    from kronfluence_scores import kronfluence_ekfac   # benchmarks/kronfluence_scores.py
    scores["kronfluence_ekfac"] = kronfluence_ekfac(model, tokenizer, corpus, pairs)
except ImportError as e:
    kron_missing = str(e)
else:
    kron_missing = None
t_scores = time.time() - t0

prompts, completions = inf.encode(pairs)
retrain = Retrainer(model.config, corpus, demo.recipe(a.world))
t1 = time.time()
table = lds(retrain, prompts, completions, scores, a.subsets, a.alpha, range(a.seeds),
            a.work / f"lds-{a.world}")
t_lds = time.time() - t1
per_query = table.attrs["per_query"].assign(kind=kinds)

t1 = time.time()
q_ids = np.linspace(0, Q - 1, min(a.leave_out_queries, Q)).astype(int)
sub = [prompts[q] for q in q_ids], [completions[q] for q in q_ids]
rankings = {"ekfac": top_ids(scores["ekfac"][q_ids], max(a.k)),
            "bm25": top_ids(scores["bm25"][q_ids], max(a.k)),
            "random": np.stack([np.random.default_rng(q).permutation(N)[:max(a.k)]
                                for q in q_ids])}
removed = leave_out(retrain, *sub, rankings, N, a.k, out_dir=a.work / f"leave-out-{a.world}")
t_leave = time.time() - t1
print(json.dumps(dict(
    world=a.world, n_sequences=N, n_params=sum(p.numel() for p in model.parameters()),
    queries=Q, query_kinds={k: kinds.count(k) for k in dict.fromkeys(kinds)},
    subsets=a.subsets, seeds=a.seeds, alpha=a.alpha,
    lds={k: {c: round(float(v), 4) for c, v in row.items()}
         for k, row in table[["lds", "ci_low", "ci_high", "queries"]].iterrows()},
    lds_by_kind={s: per_query.groupby("kind")[s].mean().round(4).to_dict() for s in scores},
    ekfac_above_identity=bool(table.loc["ekfac", "ci_low"] > table.loc["identity", "ci_high"]),
    kronfluence=kron_missing or "included",
    leave_out={f"{m} top-{k}": round(float(g["delta"].mean()), 4)
               for (m, k), g in removed.groupby(["method", "k"])},
    leave_out_queries=len(q_ids),
    leave_out_goal="ekfac lowers log p more than bm25 and random (mean Δ, nats)",
    seconds=dict(scores=round(t_scores, 1), lds=round(t_lds, 1), leave_out=round(t_leave, 1),
                 per_retrain=round((t_lds + t_leave) / (a.subsets * a.seeds + len(removed)
                                                        + 1), 1)),
), indent=1))
