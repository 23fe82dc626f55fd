"""The sketch index at N = 1M: build time, bytes per sequence, ANN recall vs Flat, latency.

Sketches are random with the real dimension and the real moments: a Gaussian with the mean and
covariance of the demo corpus's sketches, each row's deviation from the mean rescaled by a
factor drawn from the real rows' (gradient norms are heavy-tailed, and inner-product search
depends on it; benchmarks/retrieval.py writes the real sketches). With ``--isotropic``, or when
they are missing, an isotropic Gaussian — the hardest case for ANN.
Queries are the real query sketches of benchmarks/retrieval.py when present. The store is a
float16 memory map on disk, the index is the kind "auto" picks at this N (override: --kind).

    python benchmarks/index_scale.py [--n 1000000] [--kind auto]
"""
import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from influence_nb.index import IndexArgs, SketchIndex
from influence_nb.session import cache_dir
from influence_nb.sketch import FORMAT, ROW, Sketches

p = argparse.ArgumentParser()
p.add_argument("--n", type=int, default=1_000_000)
p.add_argument("--kind", default="auto")
p.add_argument("--work", type=Path, default=cache_dir() / "bench-index-scale")
p.add_argument("--real", type=Path, default=cache_dir() / "bench-retrieval",
               help="where benchmarks/retrieval.py left its sketches")
p.add_argument("--isotropic", action="store_true")
p.add_argument("--queries", type=int, default=100)
p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
p.add_argument("--ef-search", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
p.add_argument("--reuse", action="store_true",
               help="keep the sketches and index of an earlier run in --work (sweep again)")
a = p.parse_args()
rng = np.random.default_rng(0)

# -- random sketches with the real dimension and moments ----------------------------------------
real = None if a.isotropic else a.real / "sketches-whitened"
if real is not None and (real / "sketches.json").exists():
    X = np.asarray(Sketches.open(real, verify=False).data, np.float64)
    mean, L = X.mean(0), np.linalg.cholesky(np.cov(X, rowvar=False) + 1e-8 * np.eye(X.shape[1]))
    scale = np.linalg.norm(X - mean, axis=1)
    scale /= np.sqrt((scale ** 2).mean())                    # E[scale²] = 1: covariance kept
    dim, source = X.shape[1], ("gaussian with the demo sketches' mean and covariance, row "
                               "norms resampled from theirs")
    del X
else:
    dim, source = 8 * 16 * 16, "isotropic gaussian"
    mean, L, scale = np.zeros(dim), np.eye(dim), np.ones(1)
file = a.work / "sketches" / "sketches.f16"
reuse = a.reuse and file.exists() and file.stat().st_size == 2 * a.n * dim
t0 = time.perf_counter()
if not reuse:
    shutil.rmtree(a.work, ignore_errors=True)
    (a.work / "sketches").mkdir(parents=True)
    with open(file, "wb") as fh:
        for s in range(0, a.n, 65536):
            z = rng.standard_normal((min(a.n, s + 65536) - s, dim))
            fh.write((mean + (z @ L.T) * rng.choice(scale, (len(z), 1))).astype(np.float16)
                     .tobytes())
rows = np.zeros(a.n, ROW)
rows["id"] = np.arange(a.n)
manifest = dict(format=FORMAT, dim=dim, projection={}, layers={}, chunks=[[a.n, 0, 0]],
                model_fingerprint="synthetic", factors_id="synthetic")
data = np.memmap(a.work / "sketches" / "sketches.f16", np.float16, "r", shape=(a.n, dim))
store = Sketches(a.work / "sketches", manifest, rows, data)
t_generate = time.perf_counter() - t0

queries_file = a.real / "query_sketches.npy"
if not a.isotropic and queries_file.exists():
    x = np.load(queries_file).astype(np.float32)
    x = np.concatenate([x, -x])                              # both signs, as a search runs
    query_source = "real query sketches (both signs)"
else:
    x = (mean + (rng.standard_normal((a.queries, dim)) @ L.T)
         * rng.choice(scale, (a.queries, 1))).astype(np.float32)
    query_source = "random, same distribution"

# -- exact top-k (Flat over the memory map, in blocks) ------------------------------------------
K = 400
t0 = time.perf_counter()
best_s = np.full((len(x), K), -np.inf, np.float32)
best_i = np.zeros((len(x), K), np.int64)
for s in range(0, a.n, 65536):
    d = x @ np.asarray(data[s:s + 65536], np.float32).T
    cat_s, cat_i = np.concatenate([best_s, d], 1), np.concatenate(
        [best_i, np.broadcast_to(np.arange(s, s + d.shape[1]), d.shape)], 1)
    keep = np.argpartition(-cat_s, K, axis=1)[:, :K]
    best_s, best_i = np.take_along_axis(cat_s, keep, 1), np.take_along_axis(cat_i, keep, 1)
order = np.argsort(-best_s, 1)
truth = np.take_along_axis(best_i, order, 1)                 # (Q, K) ids, best first
t_exact = (time.perf_counter() - t0) / len(x)

# -- the index ----------------------------------------------------------------------------------
t0 = time.perf_counter()
if reuse and (a.work / "index" / "index.json").exists():
    index, t_build = SketchIndex.load(a.work / "index", store), None     # timed by the first run
else:
    index = SketchIndex.build(store, a.work / "index", IndexArgs(kind=a.kind, progress=False))
    t_build = time.perf_counter() - t0
index_bytes = sum((a.work / "index" / s["file"]).stat().st_size for s in index.manifest["shards"])


def recall(found: np.ndarray, k: int) -> float:
    return float(np.mean([np.isin(t[:k], f[:k]).mean() for t, f in zip(truth, found)]))


sweep = []
settings = ([dict(nprobe=v) for v in a.nprobe] if index.kind.startswith("ivf") else
            [dict(ef_search=v) for v in a.ef_search] if index.kind == "hnsw" else [{}])
for setting in settings:
    index.set_params(**setting)
    row = dict(setting)
    for k in (10, K):
        index.search(x[:2], k)  # warm-up
        t0 = time.perf_counter()
        found = np.concatenate([index.search(x[q:q + 1], k)[1] for q in range(len(x))])
        row |= {f"recall@{k}": round(recall(found, k), 4),
                f"latency_ms@{k}": round(1000 * (time.perf_counter() - t0) / len(x), 2)}
    sweep.append(row)
print(json.dumps(dict(
    n=a.n, dim=dim, source=source, queries=len(x), query_source=query_source,
    kind=index.kind, factory=index.manifest["factory"], refine=index.manifest["args"]["refine"],
    build_seconds=t_build and round(t_build, 1), reused=reuse,
    generate_seconds=None if reuse else round(t_generate, 1),
    index_bytes_per_sequence=round(index_bytes / a.n, 1),
    sketch_bytes_per_sequence=2 * dim, sweep=sweep,
    goals={"recall@10": 0.95, "latency_ms": 50}, index_rss_gib=round(index_bytes / 2 ** 30, 2),
    flat_exact_latency_ms=round(1000 * t_exact, 1),
    peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
    threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))))
