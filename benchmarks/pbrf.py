"""Influence estimators against the proximal Bregman response function (the paper's §5.1) on a
tiny GPT-2 (:func:`influence_nb.validate.toy_problem`, trained on its Markov chain).

For each of ``--train`` training sequences the PBRF is solved (L-BFGS, float64, ±ε central
difference) and each query's response compared with the estimators' scores: identity (gradient
dot product), K-FAC, EK-FAC, LiSSA and the exact damped (sampled) Fisher. Pearson and Spearman
per query over the training sequences, averaged over queries. Prints JSON.

    python benchmarks/pbrf.py [--sequences 1024] [--train 32] [--queries 6]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from common import report, set_threads
from influence_nb.curvature import FactorArgs
from influence_nb.validate import pbrf, toy_problem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=1024)
    parser.add_argument("--train", type=int, default=32)
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--lissa-depth", type=int, default=5000)
    parser.add_argument("--max-iter", type=int, default=50)
    opts = parser.parse_args(argv)
    set_threads(1)  # tiny matrices
    t0 = time.time()
    model, batches, prompts, completions = toy_problem(opts.sequences, opts.train_steps,
                                                       n_queries=opts.queries)
    ids = np.linspace(0, opts.sequences - 1, opts.train).astype(int)
    out = pbrf(model, batches, prompts, completions, ids, FactorArgs(batch_size=16,
                                                                     progress=False),
               lissa_depth=opts.lissa_depth, max_iter=opts.max_iter)
    corr = out.attrs["correlations"]
    report(dict(
        sequences=opts.sequences, train_sequences=opts.train, queries=opts.queries,
        train_steps=opts.train_steps, lissa_depth=opts.lissa_depth,
        pearson=corr["pearson"].round(4).to_dict(), spearman=corr["spearman"].round(4).to_dict(),
        solver_residual_max=float(out["residual"].max()),
        seconds=round(time.time() - t0, 1)))


if __name__ == "__main__":
    main()
