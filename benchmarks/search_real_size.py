"""The recall-targeted search at real widths: a GPT-2 small shape (random init, vocabulary
50,257) over short random sequences, its store with exact token factors — build time and
bytes, each query searched alone at a recall target (its recall of the exhaustive top-k, both
signs; rescored and read fractions; wall time ÷ an exhaustive one-query scan), peak RSS. Prints
JSON; one torch thread.

    python benchmarks/search_real_size.py --shape gpt2-4 --tokens 16 --sequences 400 --queries 6

The sequences and queries are random tokens (real_size.py's world), so the influence structure
is not a trained model's: the figure is the cost at real widths, recall the check that the
hunt holds there too.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np

from common import reset_peak, set_threads, status_mib
from influence_nb import FactorArgs, Influence, ScoreArgs
from influence_nb.index import IndexArgs
from influence_nb.projection import SketchArgs
from influence_nb.retriever import Retriever
from real_size import SHAPES, world


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="gpt2-4")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--sequences", type=int, default=400)
    p.add_argument("--queries", type=int, default=6)
    p.add_argument("--recall", type=float, default=0.95)
    p.add_argument("--k", type=int, default=10)
    a = p.parse_args(argv)
    set_threads(1)
    w = world(a.shape, a.tokens, a.sequences, a.queries)
    inf = Influence(w.model, w.tokenizer, w.corpus,
                    score_args=ScoreArgs(batch_size=32, progress=False))
    out: dict = dict(shape=a.shape, tokens=a.tokens, sequences=a.sequences, k=a.k,
                     recall_target=a.recall)
    t0 = time.perf_counter()
    inf.fit(FactorArgs(layers="mlp", progress=False))
    out["fit_seconds"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        reset_peak()
        t0 = time.perf_counter()
        ret = Retriever.build(inf, tmp, SketchArgs(progress=False), IndexArgs(progress=False))
        out |= dict(build_seconds=round(time.perf_counter() - t0, 1), exact=ret.sketches.exact
                    is not None, store_bytes_per_sequence=round(sum(
                        f.stat().st_size for f in (ret.sketches.path).iterdir()
                        if f.suffix in (".f16", ".f32", ".i32", ".bin")) / a.sequences))
        t0 = time.perf_counter()
        ret.calibration                                  # once per store
        out["calibration_seconds"] = round(time.perf_counter() - t0, 1)
        rows = []
        for pair in w.pairs:
            t0 = time.perf_counter()
            exhaustive = inf.scan([pair]).scores[0]
            t1 = time.perf_counter()
            res = ret.search([pair], recall=a.recall, k=a.k)
            t2 = time.perf_counter()
            have = np.isin(np.arange(a.sequences), res.candidates[0])
            found = [have[np.argsort(-sign * exhaustive)[:a.k]].mean() for sign in (1, -1)]
            rows.append([*found, res.rescored_fraction[0], res.read_fraction[0]
                         if res.read_fraction else np.nan, (t2 - t1) / (t1 - t0), t1 - t0])
        rows = np.array(rows)
        r = lambda x: round(float(x), 3)  # noqa: E731
        out |= dict(recall=[r(rows[:, 0].mean()), r(rows[:, 1].mean())],
                    recall_min=[r(rows[:, 0].min()), r(rows[:, 1].min())],
                    rescored_fraction=r(rows[:, 2].mean()), read_fraction=r(rows[:, 3].mean()),
                    time_over_exhaustive=r(rows[:, 4].mean()),
                    time_over_exhaustive_max=r(rows[:, 4].max()),
                    exhaustive_seconds=[round(x, 1) for x in rows[:, 5]],
                    peak_rss_gb=round(status_mib("VmHWM") / 1024, 2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
