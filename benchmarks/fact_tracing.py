"""Fact tracing on the demo world: does a planted-fact query find the sequences stating it?

For each query (a planted fact in its canonical phrasing), the fraction of queries whose top-10
holds a sequence stating that fact (either language), and the mean reciprocal rank of the first
such sequence — for EK-FAC, identity (gradient dot product) and TF-IDF, side by side.

    python benchmarks/fact_tracing.py [--queries 36]
    python benchmarks/fact_tracing.py --world memorized [--seeds 0 1]

``--world memorized`` (benchmarks/memorized_world.py: 200 fact queries, short facts learned to
near-certainty): influence_nb at its defaults against kronfluence 1.0.1 (EK-FAC, MLP, batch
64), each fitted with every seed given (the Fisher draw's seed), the figures averaged over them.
"""
import argparse
import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from common import fact_pairs, report, set_threads
from influence_nb import demo
from influence_nb.queries import Queries
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence


def summary(S: np.ndarray, states: list[np.ndarray]) -> dict:
    """Top-10 hit rate and mean reciprocal rank of (Q, N) scores, ``states[q]`` (N,) marking
    the sequences that state query q's fact."""
    top10, rr = [], []
    for q, hit in enumerate(states):
        order = np.argsort(-S[q], kind="stable")
        first = int(np.argmax(hit[order]))  # rank - 1 of the first sequence stating the fact
        top10.append(first < 10)
        rr.append(1.0 / (first + 1))
    return dict(top10_hit_rate=float(np.mean(top10)), mrr=float(np.mean(rr)))


def memorized(seeds: list[int]) -> dict:
    """Fact recall and MRR on the memorized world, influence_nb at its defaults against
    kronfluence, per seed and averaged over the seeds."""
    import memorized_world
    from kronfluence_scores import KronfluenceEKFAC   # optional: imported when needed
    from influence_nb.curvature import FactorArgs
    w = memorized_world.build()
    runs: dict[str, list[dict]] = {"influence_nb": [], "kronfluence": []}
    for seed in seeds:
        inf = Influence(w.model, w.tokenizer, w.corpus, score_args=ScoreArgs(progress=False))
        inf.fit(FactorArgs(seed=seed, progress=False))
        runs["influence_nb"].append(summary(inf.scan(w.pairs).scores, w.states)
                                    | {"draws": inf.factors.args.draws})
        with KronfluenceEKFAC(w.model, w.tokenizer, w.corpus, 64, seed=seed) as kron:
            kron.fit()
            runs["kronfluence"].append(summary(kron.scores(w.pairs), w.states))
    mean = {lib: {k: round(float(np.mean([r[k] for r in rs])), 4)
                  for k in ("top10_hit_rate", "mrr")} for lib, rs in runs.items()}
    return dict(world="memorized", seeds=seeds, n_queries=len(w.pairs),
                n_sequences=len(w.corpus), mean=mean, per_seed=runs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=36)
    p.add_argument("--world", default="demo", choices=["demo", "memorized"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = p.parse_args(argv)
    if a.world == "memorized":
        set_threads(1)
        report(memorized(a.seeds))
        return
    t0 = time.time()
    inf = Influence.demo()
    picked = demo.spread_facts(a.queries)
    pairs = fact_pairs(picked)
    batch = Queries.concat([inf.queries(pairs), inf.queries(pairs, strategy="identity")])
    res = inf.scan(batch, args=ScoreArgs(per_layer=False, batch_size=32))
    t_scan = time.time() - t0
    states = [np.array([f.id in fids for fids in inf.corpus.df["fact_ids"]]) for f in picked]
    texts = inf.corpus.df["text"].tolist()
    vec = TfidfVectorizer().fit(texts)
    tfidf = (vec.transform([p + c for p, c in pairs]) @ vec.transform(texts).T).toarray()
    Q = len(pairs)
    report(dict(ekfac=summary(res.scores[:Q], states), identity=summary(res.scores[Q:], states),
                tfidf=summary(tfidf, states), n_queries=Q, n_sequences=len(texts), goal=0.8,
                scan_seconds=round(t_scan, 1)))


if __name__ == "__main__":
    main()
