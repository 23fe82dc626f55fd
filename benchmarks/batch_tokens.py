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
import os
from pathlib import Path

from common import (fact_pairs, interleaved, load_world, one_thread_env, report, run_child,
                    sample_ids, seconds, set_threads, spread)

HERE = Path(__file__).resolve().parent


def worker(world: str, q: int, n: int, fixed: bool) -> float:
    """Seconds of one scan of ``q`` prepared queries in this process (the package on
    PYTHONPATH): ``fixed`` at ScoreArgs(batch_size=16), else at the defaults."""
    from influence_nb import FactorArgs, Influence, ScoreArgs, demo
    set_threads(1)
    if world == "short":
        model, tokenizer, corpus, pairs = load_world("short")
    else:
        model, tokenizer, corpus = demo.load()
        corpus = corpus.subset(sample_ids(len(corpus), n))
        pairs = fact_pairs(demo.facts()) * 4
    inf = Influence(model, tokenizer, corpus)
    inf.fit(FactorArgs(batch_size=32, max_examples=512, progress=False), cache=True)
    queries = inf.queries(pairs[:q])
    args = ScoreArgs(batch_size=16, progress=False) if fixed else ScoreArgs(progress=False)
    return seconds(lambda: inf.scan(queries, args=args))


def scan_in_child(a: argparse.Namespace, world: str, q: int, kind: str) -> float:
    """:func:`worker` in a fresh one-thread process: ``fixed`` runs the package of ``--before``
    at its defaults when given, else today's at batch 16; ``tokens`` today's at its defaults."""
    root = a.before if kind == "fixed" and a.before else str(HERE.parent)
    fixed = "1" if kind == "fixed" and not a.before else "0"
    return float(run_child([__file__, "--worker", world, str(q), str(a.sequences), fixed],
                           env=one_thread_env(PYTHONPATH=root), cwd=root))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=["demo", "short"])
    p.add_argument("--queries", type=int, nargs="+", default=[1, 50])
    p.add_argument("--sequences", type=int, default=1024, help="demo-world sequences scanned")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", help="package root of an earlier commit for the fixed runs")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        world, q, n, fixed = a.worker
        print(worker(world, int(q), int(n), fixed == "1"))
        return
    out = {}
    for world in a.worlds:
        for q in a.queries:
            times = interleaved({kind: (lambda kind=kind: scan_in_child(a, world, q, kind))
                                 for kind in ("fixed", "tokens")}, a.repeats, warmup=False)
            ratios = [t / f for t, f in zip(times["tokens"], times["fixed"])]
            out[f"{world} {q}q"] = {k: spread(v, 2) for k, v in times.items()} | {
                "tokens_over_fixed": spread(ratios, 3)}
    report(dict(before=a.before, load=os.getloadavg()[0], **out))


if __name__ == "__main__":
    main()
