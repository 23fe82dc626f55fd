"""The sketch index at N = 1M: build time, bytes per sequence, ANN recall vs Flat, latency.

Sketches are random with the real dimension and the real moments: a Gaussian with the mean and
covariance of a real sketch store's rows (``--real``, e.g. one benchmarks/retrieval.py cached
under ~/.cache/influence_nb/bench-retrieval-demo-*/sketches-whitened-kronecker-m961), each
row's deviation from the mean rescaled by a factor drawn from the real rows' (gradient norms
are heavy-tailed, and inner-product search depends on it). Without ``--real`` an isotropic
Gaussian — the hardest case for ANN. Queries are real query sketches when ``--real-queries``
names a (Q, D) .npy of them (from ``Sketches.query_sketches``), else random from the same
distribution. The store is a float16 memory map on disk, the index is the kind "auto" picks at
this N (override: --kind).

    python benchmarks/index_scale.py [--n 1000000] [--kind auto] [--real STORE]
"""
import argparse
import json
import os
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from influence_nb.index import IndexArgs, SketchIndex
from influence_nb.sketch import FORMAT, ROW, Sketches
from influence_nb.store import cache_dir

BLOCK = 65536  # rows generated or scanned at a time
K = 400        # the exact top-k kept per query (the Retriever's default candidates)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--kind", default="auto")
    p.add_argument("--work", type=Path, default=cache_dir() / "bench-index-scale")
    p.add_argument("--real", type=Path, help="a sketch store whose moments the rows take")
    p.add_argument("--real-queries", type=Path, help="(Q, D) .npy of real query sketches")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--ef-search", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--reuse", action="store_true",
                   help="keep the sketches and index of an earlier run in --work (sweep again)")
    return p.parse_args(argv)


def moments(real: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(mean (D,), Cholesky factor L (D, D) of the covariance, row-scale factors, source)."""
    if real is None:
        dim = 8 * 16 * 16
        return np.zeros(dim), np.eye(dim), np.ones(1), "isotropic gaussian"
    X = np.asarray(Sketches.open(real, verify=False).data, np.float64)
    mean, L = X.mean(0), np.linalg.cholesky(np.cov(X, rowvar=False) + 1e-8 * np.eye(X.shape[1]))
    scale = np.linalg.norm(X - mean, axis=1)
    scale /= np.sqrt((scale ** 2).mean())                    # E[scale²] = 1: covariance kept
    return mean, L, scale, ("gaussian with the real sketches' mean and covariance, row norms "
                            "resampled from theirs")


def synthetic_store(work: Path, n: int, dim: int, draw: Callable[[int], np.ndarray],
                    reuse: bool) -> Sketches:
    """A store of n rows ``draw(rows)`` (rows, dim) at ``work/sketches`` (a synthetic
    manifest, no CRCs); ``reuse``: the rows an earlier run wrote there."""
    file = work / "sketches" / "sketches.f16"
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
        file.parent.mkdir(parents=True)
        with open(file, "wb") as fh:
            for s in range(0, n, BLOCK):
                fh.write(draw(min(n, s + BLOCK) - s).astype(np.float16).tobytes())
    rows = np.zeros(n, ROW)
    rows["id"] = np.arange(n)
    manifest = dict(format=FORMAT, dim=dim, projection={}, layers={}, chunks=[[n, 0, 0]],
                    model_fingerprint="synthetic", factors_id="synthetic")
    data = np.memmap(file, np.float16, "r", shape=(n, dim))
    return Sketches(work / "sketches", manifest, rows, data)


def exact_top(x: np.ndarray, data: np.ndarray) -> np.ndarray:
    """(Q, K) ids of the K largest inner products per query, best first (Flat, in blocks)."""
    best_s = np.full((len(x), K), -np.inf, np.float32)
    best_i = np.zeros((len(x), K), np.int64)
    for s in range(0, len(data), BLOCK):
        d = x @ np.asarray(data[s:s + BLOCK], np.float32).T
        cat_s, cat_i = np.concatenate([best_s, d], 1), np.concatenate(
            [best_i, np.broadcast_to(np.arange(s, s + d.shape[1]), d.shape)], 1)
        keep = np.argpartition(-cat_s, K, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(cat_s, keep, 1), np.take_along_axis(cat_i, keep, 1)
    return np.take_along_axis(best_i, np.argsort(-best_s, 1), 1)


def sweep(index: SketchIndex, x: np.ndarray, truth: np.ndarray, a: argparse.Namespace
          ) -> list[dict]:
    """Recall@10 and @K against the exact top and latency per query, per search breadth."""
    settings = ([dict(nprobe=v) for v in a.nprobe] if index.kind.startswith("ivf") else
                [dict(ef_search=v) for v in a.ef_search] if index.kind == "hnsw" else [{}])
    rows = []
    for setting in settings:
        index.set_params(**setting)
        row = dict(setting)
        for k in (10, K):
            index.search(x[:2], k)  # warm-up
            t0 = time.perf_counter()
            found = np.concatenate([index.search(x[q:q + 1], k)[1] for q in range(len(x))])
            recall = np.mean([np.isin(t[:k], f[:k]).mean() for t, f in zip(truth, found)])
            row |= {f"recall@{k}": round(float(recall), 4),
                    f"latency_ms@{k}": round(1000 * (time.perf_counter() - t0) / len(x), 2)}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    rng = np.random.default_rng(0)
    mean, L, scale, source = moments(a.real)

    def draw(rows: int) -> np.ndarray:
        return mean + (rng.standard_normal((rows, len(mean))) @ L.T) * rng.choice(scale, (rows, 1))

    file = a.work / "sketches" / "sketches.f16"
    reuse = a.reuse and file.exists() and file.stat().st_size == 2 * a.n * len(mean)
    t0 = time.perf_counter()
    store = synthetic_store(a.work, a.n, len(mean), draw, reuse)
    t_generate = time.perf_counter() - t0
    if a.real_queries is not None:
        x = np.load(a.real_queries).astype(np.float32)
        x, query_source = np.concatenate([x, -x]), "real query sketches (both signs)"
    else:
        x, query_source = draw(a.queries).astype(np.float32), "random, same distribution"
    t0 = time.perf_counter()
    truth = exact_top(x, store.data)
    t_exact = (time.perf_counter() - t0) / len(x)
    t0 = time.perf_counter()
    if reuse and (a.work / "index" / "index.json").exists():
        index, t_build = SketchIndex.load(a.work / "index", store), None  # timed by the first run
    else:
        index = SketchIndex.build(store, a.work / "index", IndexArgs(kind=a.kind, progress=False))
        t_build = time.perf_counter() - t0
    index_bytes = sum((a.work / "index" / s["file"]).stat().st_size
                      for s in index.manifest["shards"])
    print(json.dumps(dict(
        n=a.n, dim=store.dim, source=source, queries=len(x), query_source=query_source,
        kind=index.kind, factory=index.manifest["factory"], refine=index.manifest["args"]["refine"],
        build_seconds=t_build and round(t_build, 1), reused=reuse,
        generate_seconds=None if reuse else round(t_generate, 1),
        index_bytes_per_sequence=round(index_bytes / a.n, 1),
        sketch_bytes_per_sequence=2 * store.dim, sweep=sweep(index, x, truth, a),
        goals={"recall@10": 0.95, "latency_ms": 50}, index_rss_gib=round(index_bytes / 2 ** 30, 2),
        flat_exact_latency_ms=round(1000 * t_exact, 1),
        peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
        threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))))


if __name__ == "__main__":
    main()
