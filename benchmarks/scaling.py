"""Throughput of fitting, sketching and exhaustive scoring on 1 and on 2 processes (torchrun,
gloo, CPU, one thread each) over the same demo-world sequences.

Prints JSON: per stage the sequences/s of each run and the ratio 2 processes ÷ 1 process (2.0 is
perfect scaling; on a machine with fewer free cores than processes it cannot reach that), with
the machine's core count and load average, as other work shares it.

With ``--knobs``: instead, the accuracy cost of the knobs that make large corpora affordable,
each against the reference (EK-FAC fitted on ``--fit`` sequences, full-rank queries, float32):
query rank, block-diagonal factors, K-FAC, a bfloat16 model and a smaller fitting sample; per
knob the mean over queries of the Spearman and Pearson correlation of the scores of
``--sequences`` sequences, and of the top-10 overlap.

    python benchmarks/scaling.py [--sequences 512] [--queries 8] [--knobs [--fit 1024]]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common import (ChildFailed, encode, fact_pairs, one_thread_env, report, run_child,
                    sample_ids, set_threads, top_overlap)
from influence_nb import demo, distributed
from influence_nb.curvature import FactorArgs, fit_factors
from influence_nb.queries import make_queries
from influence_nb.scoring import ScoreArgs, scan
from influence_nb.sketch import SketchArgs, build_sketches
from influence_nb.validate import pearson, spearman


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=512, help="sequences per stage")
    p.add_argument("--queries", type=int, default=8, help="queries scored at once")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--knobs", action="store_true", help="measure the knobs' accuracy cost instead")
    p.add_argument("--fit", type=int, default=1024, help="sequences the reference factors see")
    p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    return p


def worker(out: Path, a: argparse.Namespace) -> None:
    """One rank: time each stage between barriers; rank 0 writes the figures."""
    set_threads(1)
    created = distributed.init()
    rank, _ = distributed.rank_world()
    model, tokenizer, corpus = demo.load()
    ids = np.arange(a.sequences)
    timings = {}

    def timed(stage, fn):
        distributed.barrier()
        t0 = time.perf_counter()
        result = fn()
        distributed.barrier()
        timings[stage] = time.perf_counter() - t0
        return result

    factors = timed("fit", lambda: fit_factors(model, corpus.subset(ids), FactorArgs(
        batch_size=a.batch_size, progress=False)))
    queries = make_queries(model, factors,
                           *encode(tokenizer, fact_pairs(demo.facts()[:a.queries])))
    args = ScoreArgs(batch_size=a.batch_size, chunk_size=8 * a.batch_size, progress=False)
    timed("score", lambda: scan(model, queries, corpus, args, out / "scan", ids))
    timed("sketch", lambda: build_sketches(
        model, factors, corpus, out / "sketches", SketchArgs(
            batch_size=a.batch_size, chunk_size=8 * a.batch_size, progress=False), ids))
    if rank == 0:
        (out / "timings.json").write_text(json.dumps(timings))
    if created:
        distributed.finish()


def agreement(x: np.ndarray, ref: np.ndarray) -> dict:
    """Mean over queries of the Spearman and Pearson correlation of (Q, N) scores with the
    reference's, and of their top-10 overlap."""
    return dict(spearman=round(float(np.mean([spearman(a, b) for a, b in zip(x, ref)])), 4),
                pearson=round(float(np.mean([pearson(a, b) for a, b in zip(x, ref)])), 4),
                top10_overlap=round(float(np.mean([top_overlap(a, b)
                                                   for a, b in zip(x, ref)])), 3))


def knobs(a: argparse.Namespace) -> dict:
    """Scores under each knob against the reference; see the module docstring."""
    set_threads(1)
    model, tokenizer, corpus = demo.load()
    facts = demo.facts()[::len(demo.facts()) // a.queries][:a.queries]
    prompts, completions = encode(tokenizer, fact_pairs(facts))
    ids = sample_ids(len(corpus), a.sequences)
    args = ScoreArgs(batch_size=a.batch_size, rank=None, progress=False)

    def scores(model, fit=a.fit, rank=None, **factor_args):
        factors = fit_factors(model, corpus, FactorArgs(batch_size=a.batch_size, max_examples=fit,
                                                        progress=False, **factor_args))
        queries = make_queries(model, factors, prompts, completions, rank)
        return scan(model, queries, corpus, replace(args, rank=rank), ids=ids)[0]

    ref = scores(model)
    bf16 = demo.load(dtype=torch.bfloat16)[0]
    return {"rank 32": agreement(scores(model, rank=32), ref),
            "rank 8": agreement(scores(model, rank=8), ref),
            "blocks 4": agreement(scores(model, blocks=4), ref),
            "kfac": agreement(scores(model, strategy="kfac"), ref),
            "bfloat16 model": agreement(scores(bf16), ref),
            f"fit on {a.fit // 4} sequences": agreement(scores(model, fit=a.fit // 4), ref)}


def run(processes: int, a: argparse.Namespace) -> dict:
    """{stage: seconds} of the workers on ``processes`` processes (torchrun, one thread each)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run_child(["-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", str(processes), __file__, "--worker", tmp,
                       "--sequences", str(a.sequences), "--queries", str(a.queries),
                       "--batch-size", str(a.batch_size)], env=one_thread_env())
        except ChildFailed as e:
            sys.exit(f"the {processes}-process run failed:\n{e}")
        return json.loads((Path(tmp) / "timings.json").read_text())


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    if a.worker:
        worker(Path(a.worker), a)
        return
    if a.knobs:
        report(dict(sequences=a.sequences, queries=a.queries, reference_fit=a.fit,
                    knobs=knobs(a)))
        return
    load = os.getloadavg()[0]
    one, two = run(1, a), run(2, a)
    stages = {}
    for stage in one:
        rate1, rate2 = a.sequences / one[stage], a.sequences / two[stage]
        stages[stage] = dict(seq_per_s_1proc=round(rate1, 1), seq_per_s_2proc=round(rate2, 1),
                             ratio=round(rate2 / rate1, 3))
    report(dict(
        sequences=a.sequences, queries=a.queries, batch_size=a.batch_size, threads_per_process=1,
        cpu_count=os.cpu_count(), load_average_1min=[round(load, 2), round(os.getloadavg()[0], 2)],
        note="fit = covariance + eigenvalue passes (EK-FAC); score = exhaustive scan, resumable "
             "chunks; sketch = per-rank part stores merged into one",
        stages=stages))


if __name__ == "__main__":
    main()
