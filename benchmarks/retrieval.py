"""Candidate retrieval on the full demo corpus: sketches + Flat index + BM25 + exact rescoring.

Over ≥ 30 mixed queries (planted facts, Velnish facts, arithmetic, binary-search code, themed),
each query gets K = 2 % of N candidates; recall@10 is the share of the exhaustive scan's
top-10 (positive, and negative) found among them, i.e. after exact rescoring. Three filters
with the same K: the Retriever's default (K/4 best BM25 matches + K/4 largest and K/2 most
negative sketch inner products), sketches alone (K/2 + K/2) and BM25 alone (paper §3.2.1).
Sketch variants and sizes are compared on the first --variant-n sequences.

Also: sketch-building time ÷ plain forward+backward on the same batches, per-query search
(sketch + search + rescore) time vs an exhaustive single-query scan, the speedup extrapolated
to N = 100k and 10M, and the paper's power-law search-size estimate (§5.2.2) checked against
the exhaustive scan.

    python benchmarks/retrieval.py [--work ~/.cache/influence_nb/bench-retrieval]

The exhaustive 36-query scan is resumable (kept in --work); sketches are rebuilt and timed.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.index import IndexArgs, SketchIndex
from influence_nb.scoring import ScoreArgs
from influence_nb.retriever import Retriever
from influence_nb.search import BM25, search_size
from influence_nb.session import Influence, cache_dir
from influence_nb.sketch import SketchArgs, Sketches, build_sketches

p = argparse.ArgumentParser()
p.add_argument("--work", type=Path, default=cache_dir() / "bench-retrieval")
p.add_argument("--candidates", type=float, default=0.02, help="K as a fraction of N")
p.add_argument("--timing-n", type=int, default=1024, help="sequences for the speed ratios")
p.add_argument("--timed-queries", type=int, default=3)
p.add_argument("--variant-n", type=int, default=4000, help="sequences for the variant study")
p.add_argument("--n", type=int, default=None, help="first n sequences only (smoke tests)")
p.add_argument("--factor-batch-size", type=int, default=32, help="as `influence-nb demo`")
a = p.parse_args()

inf = Influence.demo(FactorArgs(batch_size=a.factor_batch_size),
                     score_args=ScoreArgs(batch_size=32, per_layer=False, progress=False))
if a.n:
    inf.corpus = inf.corpus.subset(range(a.n))
corpus, N = inf.corpus, len(inf.corpus)
K = int(a.candidates * N)


# -- queries of mixed kinds, from the planted facts and held-out corpus-like sequences --------
def split_at(text: str, marker: str) -> tuple[str, str]:
    i = text.index(marker) + len(marker)
    return text[:i], text[i:]


facts = demo.facts()
keep = frozenset(w for f in facts for w in (f.subject + " " + f.obj).split()) - {"and", "engine"}
held = demo.heldout(inf.tokenizer).df
held = held[held.lang == "en"]
queries: list[tuple[str, str, str]] = []   # (kind, prompt, completion)
for f in facts[::12][:10]:
    queries.append(("fact", f.prompt(), f.completion))
velnish = [(f, demo.translate(f.statement(), keep)) for f in facts[5::7]]
for f, vel in [(f, vel) for f, vel in velnish if f.obj in vel][:6]:   # the object kept verbatim
    queries.append(("cross-lingual", vel[:vel.index(f.obj)].rstrip(), " " + f.obj))
for t in held[held.kind == "arithmetic"].text[:6]:
    prompt, rest = split_at(t, "Answer:")
    queries.append(("arithmetic", prompt, rest.split(".")[0] + "."))
for t in held[held.theme == "binary_search"].text[:6]:
    lines = t.splitlines(keepends=True)
    queries.append(("code", "".join(lines[:3]), "".join(lines[3:5]).rstrip("\n")))
for theme in ("survival", "shutdown"):
    for t in held[held.theme == theme].text[:4]:
        first, rest = split_at(t, ":" if theme == "survival" else ".")
        queries.append(("themed", first, " " + rest.strip().split(". ")[0]))
kinds = np.array([k for k, _, _ in queries])
pairs = [(p_, c) for _, p_, c in queries]
Q = len(pairs)
qs = inf.queries(pairs)

# -- ground truth: an exhaustive scan (resumable) -----------------------------------------------
t0 = time.perf_counter()
exact = inf.scan(qs, out_dir=a.work / "exhaustive")
t_exhaustive_batched = time.perf_counter() - t0
S = exact.scores                                                   # (Q, N), ids = 0..N-1


def recall(cands: list[np.ndarray], S: np.ndarray) -> dict:
    """Share of the exact top-10 (each sign) of each query among its candidates (rows of S)."""
    pos = np.array([np.isin(np.argsort(-s)[:10], c).mean() for s, c in zip(S, cands)])
    neg = np.array([np.isin(np.argsort(s)[:10], c).mean() for s, c in zip(S, cands)])
    by_kind = {k: round(float(pos[kinds == k].mean()), 3) for k in dict.fromkeys(kinds)}
    return dict(recall10_positive=round(float(pos.mean()), 3),
                recall10_negative=round(float(neg.mean()), 3),
                recall10_positive_min=round(float(pos.min()), 3), positive_by_kind=by_kind)


def evaluate(store: Sketches, n: int) -> dict:
    """Recall at K/4, K/2, K (scaled to n) and Pearson, over the first n sketches; for a
    Khatri-Rao store also of its first m/4 and m/2 coordinates per layer (smaller sketches)."""
    args = store.args
    x = store.query_sketches(inf.model, inf.factors, qs).reshape(Q, -1, args.m)
    data = np.asarray(store.data[:n], np.float32).reshape(n, -1, args.m)
    sizes = (args.m // 4, args.m // 2, args.m) if args.structure == "khatri-rao" else (args.m,)
    out = {}
    for m in sizes:
        dots = x[..., :m].reshape(Q, -1) @ data[..., :m].reshape(n, -1).T   # Flat, exact
        order = np.argsort(-dots, 1)
        kk = int(a.candidates * n)
        out[f"{args.variant}_{args.structure}_m{m}"] = dict(
            dim=x[0, :, :m].size, bytes_per_sequence=2 * x[0, :, :m].size,
            pearson_median=round(float(np.median([np.corrcoef(d, s)[0, 1]
                                                  for d, s in zip(dots, S[:, :n])])), 3),
            **{f"K={k}": recall([np.concatenate([o[:k // 2], o[::-1][:k - k // 2]])
                                 for o in order], S[:, :n]) for k in (kk // 4, kk // 2, kk)})
    return out


# -- sketches: the default on the full corpus (timed); variants compared on the first n_var ------
shutil.rmtree(a.work / "sketches-whitened", ignore_errors=True)
t0 = time.perf_counter()
sk = build_sketches(inf.model, inf.factors, corpus, a.work / "sketches-whitened",
                    SketchArgs(progress=False))
default_build_s = time.perf_counter() - t0
assert (sk.ids == np.arange(N)).all()
np.save(a.work / "query_sketches.npy", sk.query_sketches(inf.model, inf.factors, qs))
full = evaluate(sk, N)
default = f"whitened_khatri-rao_m{SketchArgs().m}"
variants = evaluate(sk, a.variant_n)
for other in (SketchArgs(variant="plain", progress=False),
              SketchArgs(structure="kronecker", progress=False),
              SketchArgs(m=1024, structure="kronecker", progress=False),
              SketchArgs(m=4096, structure="kronecker", progress=False)):
    path = a.work / f"sketches-{other.variant}-{other.structure}"
    shutil.rmtree(path, ignore_errors=True)
    variants |= evaluate(build_sketches(inf.model, inf.factors, corpus, path, other,
                                        ids=range(a.variant_n)), a.variant_n)

# -- BM25 candidates, same K ----------------------------------------------------------------------
t0 = time.perf_counter()
bm = BM25(corpus.df["text"].tolist())
bm_top = bm.top([p_ + c for p_, c in pairs], K)
t_bm25 = time.perf_counter() - t0

# -- search-size estimate (paper §5.2.2) against the exhaustive scan ----------------------------
rng = np.random.default_rng(0)
sample = rng.choice(N, min(N, 2000), replace=False)
estimates = []
for q in range(Q):
    target = np.sort(S[q, bm_top[q]])[::-1][:10]           # the 10 most influential of BM25's K
    est = search_size(S[q, sample], target)
    observed = 10 * N / max(1, int((S[q] >= est["threshold"]).sum()))
    estimates.append(dict(kind=kinds[q], alpha=round(est["alpha"], 2),
                          estimated=est["n_sequences"], observed=observed))
ratio = np.array([e["estimated"] / e["observed"] for e in estimates if e["estimated"]])

# -- speed: sketching vs plain forward+backward on the same batches; per-query search ------------
ids = np.sort(rng.choice(N, a.timing_n, replace=False))
batches = list(corpus.batches(32, ids=ids))


def plain() -> float:
    t = time.perf_counter()
    for b in batches:
        inf.task.training_loss(inf.model(input_ids=b.input_ids,
                                         attention_mask=b.attention_mask).logits, b).sum().backward()
    inf.model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def sketching() -> float:
    shutil.rmtree(a.work / "timing", ignore_errors=True)
    t = time.perf_counter()
    build_sketches(inf.model, inf.factors, corpus, a.work / "timing",
                   SketchArgs(progress=False), ids=ids)
    return time.perf_counter() - t


def exhaustive_one() -> float:
    t = time.perf_counter()
    inf.scan(inf.queries([pairs[0]]), ids=ids)
    return time.perf_counter() - t


plain()  # warm-up
t_plain, t_sketch, t_one = [], [], []
for _ in range(2):                                   # interleaved, best of two
    t_plain.append(plain())
    t_sketch.append(sketching())
    t_one.append(exhaustive_one())
t_plain, t_sketch, t_one = min(t_plain) / len(ids), min(t_sketch) / len(ids), min(t_one) / len(ids)

ret = Retriever(inf, sk, SketchIndex.build(sk, a.work / "index", IndexArgs(progress=False)))
hybrid, _ = ret.candidates(qs, K)                    # the default filter, as a search runs it
assert max(len(c) for c in hybrid) <= K
stage_times, rescored = [], []
for q in np.linspace(0, Q - 1, a.timed_queries).astype(int):
    res = ret.search([pairs[q]], candidates=K)
    stage_times.append(res.timings)
    rescored.append(len(res.ids))
    np.testing.assert_allclose(res.scores[0], S[q, res.ids], rtol=1e-4,
                               atol=1e-5 * np.abs(S[q]).max())   # rescoring = exhaustive scores (float32 sums)
stages = {k: float(np.mean([t[k] for t in stage_times])) for k in stage_times[0]}
t_search = sum(stages.values())
t_scan = t_one * N
# per query: t_search(N) = t_fixed + t_flat · N + K(N) · t_rescore;  t_scan(N) = t_one · N
t_rescore = stages["rescore"] / np.mean(rescored)
t_flat = stages["search"] / N
t_fixed = stages["queries"] + stages["sketch"]


def speedup(n: int, k: float) -> float:
    return round(t_one * n / (t_fixed + t_flat * n + k * t_rescore), 1)


print(json.dumps(dict(
    n_sequences=N, n_queries=Q, queries_by_kind={k: int((kinds == k).sum()) for k in
                                                 dict.fromkeys(kinds)},
    candidates_K=K, candidates_share=a.candidates, default_variant=default,
    retriever_default={"filter": "K/4 BM25 + K/4 top + K/2 bottom sketch", f"K={K}":
                       recall(hybrid, S), "mean_candidates": float(np.mean([len(c) for c in hybrid]))},
    sketch=full[default], sketch_sizes=full, bm25={f"K={K}": recall(bm_top, S)}, bm25_seconds=round(t_bm25, 2),
    goal_recall10=0.9, variants_on_first=a.variant_n, variants=variants,
    sketch_build=dict(full_corpus_seconds=round(default_build_s, 1),
                      ratio_to_plain_fwd_bwd=round(t_sketch / t_plain, 3), goal=1.5,
                      plain_fwd_bwd_seq_per_s=round(1 / t_plain, 1),
                      sketch_seq_per_s=round(1 / t_sketch, 1), measured_on=len(ids)),
    per_query=dict(stages_seconds={k: round(v, 3) for k, v in stages.items()},
                   search_total_seconds=round(t_search, 2), rescored=int(np.mean(rescored)),
                   exhaustive_scan_seconds=round(t_scan, 1),
                   exhaustive_measured_on=len(ids), speedup=round(t_scan / t_search, 1)),
    extrapolation=dict(
        formula="speedup(N) = t_one·N / (t_fixed + t_flat·N + K·t_rescore)",
        t_one_s=t_one, t_fixed_s=t_fixed, t_flat_s=t_flat, t_rescore_s=t_rescore,
        K_fixed=K, speedup_K_fixed={"1e5": speedup(100_000, K), "1e7": speedup(10_000_000, K)},
        speedup_K_2pct={"1e5": speedup(100_000, .02 * 1e5), "1e7": speedup(10_000_000, .02 * 1e7)}),
    exhaustive_batched_scan_seconds=round(t_exhaustive_batched, 1),
    search_size=dict(median_estimated_over_observed=round(float(np.median(ratio)), 2),
                     per_query=[{k: (round(v) if isinstance(v, float) and k != "alpha" else v)
                                 for k, v in e.items()} for e in estimates]),
    threads=torch.get_num_threads()), default=str))
