"""The same answer twice? Agreement between EK-FAC fits that differ only in what should not
matter: the Fisher label seed, the batch size, and the half of the corpus fitted on.

For each pair of fits: per query, the Spearman correlation of the full-rank scores over every
training sequence, and the overlap of the top-10 (most positive) sequences; mean and worst
over the queries of the world's query set. Worlds: ``validation`` (the demo generator at 1,500
sequences), ``demo`` (the committed 20,000-sequence world), ``markov`` (independent of the
demo generator: ``benchmarks/markov_world.py``) and ``short`` (3,150 sentences of ≈ 10 tokens,
200 fact queries: ``benchmarks/short_world.py``).

    python benchmarks/reproducibility.py [--world validation|demo|markov|short]
        [--probe gaussian|label] [--draws 1] [--only-seeds] > out.json
"""
import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from common import load_world, report, set_threads, top_overlap
from influence_nb.curvature import FactorArgs, fit_factors
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.task import Task


def variants(n: int, only_seeds: bool) -> dict[str, dict]:
    """{name: what differs from the reference fit (seed 0, batch 32, every sequence)}."""
    half = np.sort(np.random.default_rng(0).permutation(n)[:n // 2])
    out = {"seed 0": dict(seed=0), "seed 1": dict(seed=1), "batch 16": dict(batch_size=16),
           "half A": dict(sample=half), "half B": dict(sample=np.setdiff1d(np.arange(n), half))}
    return {k: v for k, v in out.items() if k.startswith("seed")} if only_seeds else out


def agreement(x: np.ndarray, y: np.ndarray) -> dict:
    """Per query: Spearman of (Q, N) scores x and y, and their top-10 overlap; mean and worst."""
    rho = [spearmanr(a, b)[0] for a, b in zip(x, y)]
    top = [top_overlap(a, b) for a, b in zip(x, y)]
    return dict(spearman_mean=round(float(np.mean(rho)), 4),
                spearman_min=round(float(np.min(rho)), 4),
                top10_overlap_mean=round(float(np.mean(top)), 3),
                top10_overlap_min=round(float(np.min(top)), 3))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="validation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only-seeds", action="store_true", help="fit only the two label seeds")
    p.add_argument("--probe", default="gaussian", choices=Task.PROBES,
                   help="Task(fisher_probe=...)")
    p.add_argument("--draws", type=int, default=1, help="FactorArgs(draws=...)")
    a = p.parse_args(argv)
    set_threads(a.threads)
    model, tokenizer, corpus, pairs = load_world(a.world)
    scores, seconds = {}, {}
    for name, v in variants(len(corpus), a.only_seeds).items():
        args = FactorArgs(batch_size=v.get("batch_size", 32), seed=v.get("seed", 0),
                          draws=a.draws, progress=False)
        t0 = time.perf_counter()
        data = corpus.subset(v["sample"]) if "sample" in v else corpus
        factors = fit_factors(model, data, args, Task(fisher_probe=a.probe))
        seconds[name] = round(time.perf_counter() - t0, 2)
        inf = Influence(model, tokenizer, corpus, factors, ScoreArgs(rank=None, progress=False,
                                                                    batch_size=32))
        scores[name] = inf.scan(pairs).scores
    report(dict(
        world=a.world, probe=a.probe, draws=a.draws, sequences=len(corpus), queries=len(pairs),
        fit_seconds=seconds,
        label_seed=agreement(scores["seed 0"], scores["seed 1"]),
        **({} if a.only_seeds else dict(
            batch_size_32_vs_16=agreement(scores["seed 0"], scores["batch 16"]),
            corpus_halves=agreement(scores["half A"], scores["half B"])))))


if __name__ == "__main__":
    main()
