"""EK-FAC fit time ÷ one plain forward + backward over the same sequences (same batch size),
measured in the same run on the demo model. Goal: ≤ 3.0. Prints JSON.

    python benchmarks/curvature_speed.py [--examples 512] [--batch-size 16] [--layers mlp]
                                         [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from influence_nb import demo
from influence_nb.curvature import FactorArgs, fit_factors
from influence_nb.batching import source
from influence_nb.task import Task


def plain_pass(model: torch.nn.Module, corpus, args: FactorArgs, task: Task) -> float:
    """Seconds for one forward + backward of the summed training loss over the sequences."""
    src = source(corpus, args.batch_size, max_examples=args.max_examples)  # the fit's batches
    start, seen = time.perf_counter(), 0
    for _, batch in src.batches():
        if seen >= args.max_examples:
            break
        task.training_loss(task.forward(model, batch), batch).sum().backward()
        seen += len(batch)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", default="mlp")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    model, _, corpus = demo.load()
    task = Task()
    args = FactorArgs(layers=opts.layers, batch_size=opts.batch_size,
                      max_examples=min(opts.examples, len(corpus)), progress=False)
    plain_pass(model, corpus, FactorArgs(batch_size=args.batch_size, max_examples=args.batch_size),
               task)  # warm-up
    plain, fit = [], []
    for _ in range(opts.repeats):  # interleaved, so that machine load hits both alike
        plain.append(plain_pass(model, corpus, args, task))
        start = time.perf_counter()
        factors = fit_factors(model, corpus, args, task)
        fit.append(time.perf_counter() - start)
    n_factor_values = sum(t.numel() for f in factors.layers.values()
                          for t in (*f.Q_A, *f.Q_S, f.Lambda))
    print(json.dumps({
        "model": f"demo ({type(model).__name__}, {sum(p.numel() for p in model.parameters())} "
                 "parameters)",
        "layers": factors.layer_names, "examples": factors.n_examples, "tokens": factors.n_tokens,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "plain_fwd_bwd_s": min(plain), "ekfac_fit_s": min(fit),
        "ratio": min(fit) / min(plain), "goal": 3.0,
        "factor_mb": n_factor_values * 4 / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, indent=1))


if __name__ == "__main__":
    main()
