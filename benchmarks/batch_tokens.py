"""Batches by tokens against the old fixed 16 sequences, side by side on the project's small
worlds: the demo corpus (sequences up to 128 tokens) and the short world (3,150 sentences of
≈ 10 tokens). Times `inf.scan(queries)` (prepared queries, so only the pass differs) with
ScoreArgs(batch_size=16) and with the defaults (batch_tokens), alternating, one torch thread;
median [min, max] over repeats and the ratio tokens ÷ fixed (< 1: the default is faster).

With ``--before DIR`` the fixed-16 runs use the package in DIR instead (a worktree of an earlier
commit, e.g. ``git worktree add /tmp/before ee0ed37``): today's code at its defaults against
the code before the real-size work at its defaults.

    python benchmarks/batch_tokens.py [--queries 1 50] [--repeats 3] [--sequences 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(world: str, q: int, n: int, fixed: bool) -> float:
    import time

    import numpy as np
    import torch
    from influence_nb import FactorArgs, Influence, ScoreArgs, demo
    torch.set_num_threads(1)
    if world == "short":
        sys.path.insert(0, str(HERE))
        from short_world import build
        model, tokenizer, corpus, pairs = build()
    else:
        model, tokenizer, corpus = demo.load()
        corpus = corpus.subset(np.random.default_rng(0).choice(len(corpus), n, replace=False))
        facts = demo.facts()
        pairs = [(f.prompt(), f.completion) for f in facts] * 4
    inf = Influence(model, tokenizer, corpus)
    inf.fit(FactorArgs(batch_size=32, max_examples=512, progress=False), cache=True)
    queries = inf.queries(pairs[:q])
    args = ScoreArgs(batch_size=16, progress=False) if fixed else ScoreArgs(progress=False)
    start = time.perf_counter()
    inf.scan(queries, args=args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=["demo", "short"])
    p.add_argument("--queries", type=int, nargs="+", default=[1, 50])
    p.add_argument("--sequences", type=int, default=1024, help="demo-world sequences scanned")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", help="package root of an earlier commit for the fixed runs")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        world, q, n, fixed = a.worker
        print(worker(world, int(q), int(n), fixed == "1"))
        return
    out = {}
    for world in a.worlds:
        for q in a.queries:
            times = {"fixed": [], "tokens": []}
            for _ in range(a.repeats):
                for kind in times:
                    root = a.before if kind == "fixed" and a.before else str(HERE.parent)
                    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": root}
                    fixed = "1" if kind == "fixed" and not a.before else "0"
                    r = subprocess.run([sys.executable, __file__, "--worker", world, str(q),
                                        str(a.sequences), fixed], env=env, capture_output=True,
                                       text=True, check=True, cwd=root)
                    times[kind].append(float(r.stdout.strip().splitlines()[-1]))
            ratios = [t / f for t, f in zip(times["tokens"], times["fixed"])]
            out[f"{world} {q}q"] = {k: [round(statistics.median(v), 2), round(min(v), 2),
                                        round(max(v), 2)] for k, v in times.items()} | {
                "tokens_over_fixed": [round(statistics.median(ratios), 3), round(min(ratios), 3),
                                      round(max(ratios), 3)]}
    print(json.dumps(dict(before=a.before, load=os.getloadavg()[0], **out), indent=1))


if __name__ == "__main__":
    main()
