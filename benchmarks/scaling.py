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
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--sequences", type=int, default=512, help="sequences per stage")
p.add_argument("--queries", type=int, default=8, help="queries scored at once")
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--knobs", action="store_true", help="measure the knobs' accuracy cost instead")
p.add_argument("--fit", type=int, default=1024, help="sequences the reference factors see")
p.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
a = p.parse_args()


def worker(out: Path) -> None:
    """One rank: time each stage between barriers; rank 0 writes the figures."""
    import numpy as np
    import torch
    from influence_nb import demo, distributed
    from influence_nb.curvature import FactorArgs, fit_factors
    from influence_nb.queries import make_queries
    from influence_nb.scoring import ScoreArgs, scan
    from influence_nb.sketch import SketchArgs, build_sketches
    torch.set_num_threads(1)
    created = distributed.init()
    rank, world = distributed.rank_world()
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
    facts = demo.facts()[:a.queries]
    queries = make_queries(model, factors, [tokenizer(f.prompt())["input_ids"] for f in facts],
                           [tokenizer(f.completion, add_special_tokens=False)["input_ids"]
                            for f in facts])
    args = ScoreArgs(batch_size=a.batch_size, chunk_size=8 * a.batch_size, progress=False)
    timed("score", lambda: scan(model, queries, corpus, args, out / "scan", ids))
    timed("sketch", lambda: build_sketches(
        model, factors, corpus, out / "sketches", SketchArgs(
            batch_size=a.batch_size, chunk_size=8 * a.batch_size, progress=False), ids))
    if rank == 0:
        (out / "timings.json").write_text(json.dumps(timings))
    if created:
        distributed.finish()


def knobs() -> dict:
    """Scores under each knob against the reference; see the module docstring."""
    import numpy as np
    import torch
    from influence_nb import demo
    from influence_nb.curvature import FactorArgs, fit_factors
    from influence_nb.queries import make_queries
    from influence_nb.scoring import ScoreArgs, scan
    from influence_nb.validate import pearson, spearman
    torch.set_num_threads(1)
    model, tokenizer, corpus = demo.load()
    facts = demo.facts()[::len(demo.facts()) // a.queries][:a.queries]
    prompts = [tokenizer(f.prompt())["input_ids"] for f in facts]
    completions = [tokenizer(f.completion, add_special_tokens=False)["input_ids"] for f in facts]
    ids = np.random.default_rng(0).choice(len(corpus), a.sequences, replace=False)
    args = ScoreArgs(batch_size=a.batch_size, rank=None, progress=False)

    def scores(model, fit=a.fit, rank=None, **factor_args):
        factors = fit_factors(model, corpus, FactorArgs(batch_size=a.batch_size, max_examples=fit,
                                                        progress=False, **factor_args))
        queries = make_queries(model, factors, prompts, completions, rank)
        return scan(model, queries, corpus, replace(args, rank=rank), ids=ids)[0]

    def agreement(x, ref):
        top = lambda s: set(np.argsort(-s)[:10])
        return dict(spearman=round(float(np.mean([spearman(a, b) for a, b in zip(x, ref)])), 4),
                    pearson=round(float(np.mean([pearson(a, b) for a, b in zip(x, ref)])), 4),
                    top10_overlap=round(float(np.mean([len(top(a) & top(b)) / 10
                                                       for a, b in zip(x, ref)])), 3))

    ref = scores(model)
    bf16 = demo.load(dtype=torch.bfloat16)[0]
    return {"rank 32": agreement(scores(model, rank=32), ref),
            "rank 8": agreement(scores(model, rank=8), ref),
            "blocks 4": agreement(scores(model, blocks=4), ref),
            "kfac": agreement(scores(model, strategy="kfac"), ref),
            "bfloat16 model": agreement(scores(bf16), ref),
            f"fit on {a.fit // 4} sequences": agreement(scores(model, fit=a.fit // 4), ref)}


def run(processes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), __file__, "--worker", tmp,
               "--sequences", str(a.sequences), "--queries", str(a.queries),
               "--batch-size", str(a.batch_size)]
        done = subprocess.run(cmd, env=os.environ | {"OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the {processes}-process run failed:\n{done.stderr[-3000:]}")
        return json.loads((Path(tmp) / "timings.json").read_text())


if a.worker:
    worker(Path(a.worker))
    sys.exit()
if a.knobs:
    print(json.dumps(dict(sequences=a.sequences, queries=a.queries, reference_fit=a.fit,
                          knobs=knobs()), indent=1))
    sys.exit()

load = os.getloadavg()[0]
one, two = run(1), run(2)
stages = {}
for stage in one:
    rate1, rate2 = a.sequences / one[stage], a.sequences / two[stage]
    stages[stage] = dict(seq_per_s_1proc=round(rate1, 1), seq_per_s_2proc=round(rate2, 1),
                         ratio=round(rate2 / rate1, 3))
print(json.dumps(dict(
    sequences=a.sequences, queries=a.queries, batch_size=a.batch_size, threads_per_process=1,
    cpu_count=os.cpu_count(), load_average_1min=[round(load, 2), round(os.getloadavg()[0], 2)],
    note="fit = covariance + eigenvalue passes (EK-FAC); score = exhaustive scan, resumable "
         "chunks; sketch = per-rank part stores merged into one",
    stages=stages), indent=1))
