"""Lower precision against float64: do the scores keep their order?

For each world, one EK-FAC fit and scan with everything in float64 (the model cast to float64:
statistics, eigendecompositions, queries and products) is the reference. Against it, at the
defaults otherwise (rank 32, per-layer scores), with the empirical Fisher on every side (the
true Fisher's sampled labels or probes differ between a float64 and a float32 model, which
would measure the Fisher's sampling noise, not the precision):

- ``float32``: the package's default (float32 statistics, float64 eigendecompositions);
- ``float32, eigh float32``: ``FactorArgs(eigh_precision="float32")``;
- ``bfloat16 scan``: ``ScoreArgs(precision="bfloat16")`` on the float32 fit — the queries'
  factors and the scorer's products in bfloat16, float32 accumulation;
- ``both``: eigh in float32 and the scan in bfloat16.

Per query, over every training sequence: Spearman of the total scores, top-10 overlap (most
positive and most negative), and the relative error ‖s − s₆₄‖ / ‖s₆₄‖; mean and worst over the
queries. The goal of issue #26: Spearman ≥ 0.999. Scan seconds are reported beside (one thread,
one run each: indicative; the real-size benchmark times the precision at real widths).

    python benchmarks/precision.py [--worlds validation memorized markov] [--queries 50]
"""
import argparse
import copy
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from common import load_world, report, set_threads, top_overlap
from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.task import Task

VARIANTS = {"float32": ({}, {}),
            "float32, eigh float32": ({"eigh_precision": "float32"}, {}),
            "bfloat16 scan": ({}, {"precision": "bfloat16"}),
            "both": ({"eigh_precision": "float32"}, {"precision": "bfloat16"})}


def agreement(x: np.ndarray, ref: np.ndarray) -> dict:
    """(Q, N) scores x against the float64 reference: per-query Spearman, top-10 overlaps and
    relative error, mean and worst."""
    rho = [spearmanr(a, b)[0] for a, b in zip(x, ref)]
    pos = [top_overlap(a, b) for a, b in zip(x, ref)]
    neg = [top_overlap(-a, -b) for a, b in zip(x, ref)]
    err = np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return dict(spearman_mean=round(float(np.mean(rho)), 5), spearman_min=round(float(np.min(rho)), 5),
                top10_pos_mean=round(float(np.mean(pos)), 3), top10_pos_min=round(float(np.min(pos)), 3),
                top10_neg_mean=round(float(np.mean(neg)), 3), top10_neg_min=round(float(np.min(neg)), 3),
                rel_error_median=float(f"{np.median(err):.2e}"), rel_error_max=float(f"{np.max(err):.2e}"))


def scores(model: torch.nn.Module, tokenizer, corpus, pairs, fit: dict, score: dict
           ) -> tuple[np.ndarray, float]:
    """(Q, N) total scores of one fit and scan, and the scan's seconds."""
    inf = Influence(model, tokenizer, corpus, score_args=ScoreArgs(progress=False, **score),
                    task=Task(empirical_fisher=True))
    inf.fit(FactorArgs(progress=False, **fit))
    start = time.perf_counter()
    S = inf.scan(pairs).scores
    return S, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=["validation", "memorized", "markov"])
    p.add_argument("--queries", type=int, default=50)
    a = p.parse_args()
    set_threads(1)
    out = {}
    for world in a.worlds:
        model, tokenizer, corpus, pairs = load_world(world)
        pairs = pairs[:a.queries]
        ref, ref_s = scores(copy.deepcopy(model).double(), tokenizer, corpus, pairs, {}, {})
        row = {"sequences": len(corpus), "queries": len(pairs), "float64 scan s": round(ref_s, 2)}
        for name, (fit, score) in VARIANTS.items():
            S, s = scores(model, tokenizer, corpus, pairs, fit, score)
            row[name] = dict(agreement(S, ref), scan_s=round(s, 2))
        out[world] = row
    report(out)


if __name__ == "__main__":
    main()
