"""Influence scores of identity, K-FAC, EK-FAC and LiSSA against the exact damped Fisher on a
tiny GPT-2 (:func:`influence_nb.validate.toy_problem`): Spearman and Pearson correlations,
averaged over 12 queries, for a randomly initialised and a trained model. Prints JSON.

References: "layerwise" keeps the exact per-layer blocks G_ℓℓ (the structure every factored
strategy assumes); "full" keeps the cross-layer blocks too. LiSSA iterates on the full G.

    python benchmarks/curvature_accuracy.py [--sequences 2048] [--lissa-depth 5000]
"""
from __future__ import annotations

import argparse
import time

from common import report, set_threads
from influence_nb import validate
from influence_nb.curvature import FactorArgs, fit_factors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=2048)
    parser.add_argument("--lissa-depth", type=int, default=5000)
    parser.add_argument("--lissa-batch", type=int, default=32)
    opts = parser.parse_args(argv)
    set_threads(1)  # tiny matrices

    figures = {}
    for label, steps in (("random_init", 0), ("trained", 200)):
        model, data, prompts, completions = validate.toy_problem(opts.sequences, steps)
        r = validate.compare(model, data, prompts, completions, lissa_depth=opts.lissa_depth,
                             lissa_batch=opts.lissa_batch)
        start = time.perf_counter()
        fit_factors(model, data, FactorArgs(progress=False))
        figures[label] = {
            "train_steps": steps, "sequences": len(data) * 16, "queries": len(prompts),
            "parameters": r["n_params"],
            "spearman": r["spearman"], "pearson": r["pearson"],
            "ekfac_fit_seconds": time.perf_counter() - start,
            "lissa_seconds": r["lissa"]["seconds"], "lissa_depth": r["lissa"]["depth"],
            "lissa_batch": r["lissa"]["batch_size"],
            "lissa_data_passes": r["lissa"]["passes"], "ekfac_data_passes": 2,
        }
    report(figures)


if __name__ == "__main__":
    main()
