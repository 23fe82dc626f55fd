"""The same answer twice? Agreement between EK-FAC fits that differ only in what should not
matter: the Fisher label seed, the batch size (the default token budget and half of it), and
the half of the corpus fitted on; each fit at the defaults otherwise.

For each pair of fits: per query, the Spearman correlation of the full-rank scores over every
training sequence, and the overlap of the top-10 (most positive) sequences; mean and worst
over the queries of the world's query set. Worlds: ``validation`` (the demo generator at 1,500
sequences), ``demo`` (the committed 20,000-sequence world), ``markov`` (independent of the
demo generator: ``benchmarks/markov_world.py``), ``short`` (3,150 sentences of ≈ 10 tokens,
200 fact queries: ``benchmarks/short_world.py``) and ``memorized`` (3,150 short facts learned
to near-certainty without label smoothing: ``benchmarks/memorized_world.py``).

    python benchmarks/reproducibility.py [--world validation|demo|markov|short|memorized]
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
    """{name: what differs from the reference fit (the defaults: seed 0, batches of
    ``FactorArgs().batch_tokens`` tokens, every sequence)}."""
    half = np.sort(np.random.default_rng(0).permutation(n)[:n // 2])
    out = {"seed 0": dict(seed=0), "seed 1": dict(seed=1), "half batch": dict(batch_tokens=FactorArgs.batch_tokens // 2),
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
    p.add_argument("--draws", type=int, default=FactorArgs.draws,
                   help="FactorArgs(draws=...); default: the package's (None: chosen per fit)")
    a = p.parse_args(argv)
    set_threads(a.threads)
    model, tokenizer, corpus, pairs = load_world(a.world)
    scores, seconds, drawn = {}, {}, {}
    for name, v in variants(len(corpus), a.only_seeds).items():
        args = FactorArgs(batch_tokens=v.get("batch_tokens", FactorArgs.batch_tokens),
                          seed=v.get("seed", 0), draws=a.draws, progress=False)
        t0 = time.perf_counter()
        data = corpus.subset(v["sample"]) if "sample" in v else corpus
        factors = fit_factors(model, data, args, Task(fisher_probe=a.probe))
        seconds[name] = round(time.perf_counter() - t0, 2)
        drawn[name] = factors.args.draws
        inf = Influence(model, tokenizer, corpus, factors, ScoreArgs(rank=None, progress=False))
        scores[name] = inf.scan(pairs).scores
    report(dict(
        world=a.world, probe=a.probe, draws=a.draws, sequences=len(corpus), queries=len(pairs),
        fit_seconds=seconds, draws_chosen=drawn,
        label_seed=agreement(scores["seed 0"], scores["seed 1"]),
        **({} if a.only_seeds else dict(
            batch_vs_half_batch=agreement(scores["seed 0"], scores["half batch"]),
            corpus_halves=agreement(scores["half A"], scores["half B"])))))


if __name__ == "__main__":
    main()
