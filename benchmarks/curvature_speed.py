"""EK-FAC fit time ÷ one plain forward + backward over the same sequences (same batch size),
measured in the same run on the demo model. Goal: ≤ 3.0. Prints JSON.

    python benchmarks/curvature_speed.py [--examples 512] [--batch-size 16] [--layers mlp]
                                         [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

from common import interleaved, peak_rss_mib, plain, report, seconds, set_threads
from influence_nb import demo
from influence_nb.curvature import FactorArgs, fit_factors
from influence_nb.batching import source


def fit_batches(corpus, args: FactorArgs):
    """The batches a fit runs (collated as they are consumed, as in the fit)."""
    return (b for _, b in source(corpus, args.batch_size, max_examples=args.max_examples)
            .batches())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", default="mlp")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    opts = parser.parse_args(argv)
    if opts.threads:
        set_threads(opts.threads)

    model, _, corpus = demo.load()
    args = FactorArgs(layers=opts.layers, batch_size=opts.batch_size,
                      max_examples=min(opts.examples, len(corpus)), progress=False)
    plain(model, fit_batches(corpus, FactorArgs(batch_size=args.batch_size,
                                                max_examples=args.batch_size)))  # warm-up
    fitted = []
    times = interleaved({"plain": lambda: plain(model, fit_batches(corpus, args)),
                         "fit": lambda: seconds(lambda: fitted.append(
                             fit_factors(model, corpus, args)))}, opts.repeats, warmup=False)
    factors = fitted[-1]
    n_factor_values = sum(t.numel() for f in factors.layers.values()
                          for t in (*f.Q_A, *f.Q_S, f.Lambda))
    best_plain, best_fit = min(times["plain"]), min(times["fit"])
    report({
        "model": f"demo ({type(model).__name__}, {sum(p.numel() for p in model.parameters())} "
                 "parameters)",
        "layers": factors.layer_names, "examples": factors.n_examples, "tokens": factors.n_tokens,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "plain_fwd_bwd_s": best_plain, "ekfac_fit_s": best_fit,
        "ratio": best_fit / best_plain, "goal": 3.0,
        "factor_mb": n_factor_values * 4 / 2**20,
        "peak_rss_mb": peak_rss_mib(),
    })


if __name__ == "__main__":
    main()
