"""Candidate retrieval on three worlds: sketches + Flat index (+ BM25) + exact rescoring,
against an exhaustive scan, one query per search call.

Worlds (benchmarks/retrieval_worlds.py): ``demo`` (a random subset of the demo corpus),
``markov`` (built independently of the demo: Markov chain, word tokenizer, GPT-2) and
``memorized`` (short invented facts learned to near-certainty, GPT-NeoX), each with queries of
several kinds. Per world and per query kind:

- the search with a recall target (``Retriever.search(pair, recall=r)``, each query alone,
  at the defaults, r in ``--recall``): measured recall of the exhaustive top-10, positive and
  negative, its own estimate, mean rescored fraction, rounds, and wall time ÷ an exhaustive
  one-query scan (measured in the same run);

and with ``--fixed`` (the study behind the fixed-K defaults):

- recall@10 of the exhaustive top-10, positive and negative, at K = 1 %, 2 %, 5 % of N, for
  every sketch variant studied (the package's, and benchmarks/sketch_variants.py's that it no
  longer draws; candidates: the K/2 largest and K/2 most negative sketch inner
  products of that query, Flat index), with Pearson and bytes per sequence (RAM: Flat index
  4·D; disk: float16 sketch 2·D + 16 B row record) — the Pareto curve;
- the Retriever at its defaults (K/2 most negative sketch; K/2 largest sketch, or K/4 of them
  and K/4 BM25 where the calibrated sketch recall is below 0.99), each
  query searched alone: recall at each K (K = 2 %: through ``search``, rescored scores checked
  against the exhaustive ones), its calibrated recall estimate next to the observed one, the
  same without BM25 (lexical=0), and the power-law search-size estimate;
- sketch build ÷ plain fwd+bwd (same sequences), search + rescoring ÷ exhaustive scan time.

    python benchmarks/retrieval.py [--worlds demo markov memorized] [--demo-n 4000]
        [--markov-n 3000] [--memorized-n 24] [--queries 18] [--recall 0.9 0.95] [--fixed]
        [--exact-bytes B]

Exhaustive scans and sketch stores are cached (resumable) under ~/.cache/influence_nb/.
"""
import argparse
import json
import shutil
import time
from dataclasses import replace

import numpy as np
import torch

from retrieval_worlds import WORLDS, World   # benchmarks/retrieval_worlds.py
from sketch_variants import KhatriRao        # benchmarks/sketch_variants.py

from influence_nb.index import IndexArgs, SketchIndex
from influence_nb.projection import SketchArgs, resolve_variant
from influence_nb.results import InfluenceResult
from influence_nb.retriever import Retriever
from influence_nb.queries import Queries
from influence_nb.search import recall_at_k
from influence_nb.sketch import FORMAT, ROW, Sketches, build_sketches, keeps_tokens

SHARES = (0.01, 0.02, 0.05)
VARIANTS = [SketchArgs(variant="eigen", m=m) for m in (256, 961)] + [KhatriRao(m=256)] + [
    SketchArgs(variant="whitened", m=m) for m in (256, 961, 4096)]   # Kronecker


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    p.add_argument("--demo-n", type=int, default=4000)
    p.add_argument("--markov-n", type=int, default=3000)
    p.add_argument("--memorized-n", type=int, default=24, help="memorized world's queries")
    p.add_argument("--queries", type=int, default=18,
                   help="queries searched per world with a recall target (evenly spaced)")
    p.add_argument("--recall", type=float, nargs="+", default=[0.9, 0.95])
    p.add_argument("--fixed", action="store_true",
                   help="also the fixed-K study: every variant, the Retriever at K = 1, 2, 5 %%")
    p.add_argument("--exact-bytes", type=int, default=SketchArgs().exact_bytes,
                   help="SketchArgs.exact_bytes of the targeted search's store (0: sketch only)")
    p.add_argument("--timing-n", type=int, default=512, help="sequences for the speed ratios")
    p.add_argument("--timed-queries", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=None,
                   help="variant keys to study (default: all), e.g. eigen-m256")
    return p.parse_args(argv)


def key(world: World, variant: SketchArgs | KhatriRao) -> str:
    """The variant's name, "auto" resolved for the world's factors; "+exact" when its store
    keeps exact token factors."""
    if isinstance(variant, KhatriRao):
        return variant.name
    resolved = resolve_variant(world.inf.factors, variant)
    name = f"eigen-m{variant.m}" if resolved == "eigen" else f"{resolved}-kronecker-m{variant.m}"
    return name + ("+exact" if keeps_tokens(world.inf.factors.shapes, world.inf.corpus, variant)
                   else "")


def split(order: np.ndarray, k: int) -> np.ndarray:
    """The k//2 first and k - k//2 last of an order (largest and most negative)."""
    return np.concatenate([order[:k // 2], order[::-1][:k - k // 2]])


def recall(cands: list[np.ndarray], S: np.ndarray, kinds: np.ndarray) -> dict:
    """Share of each query's exhaustive top-10 (each sign) among its own candidates, mean over
    the queries and per kind."""
    pos = np.array([np.isin(np.argsort(-s)[:10], c).mean() for s, c in zip(S, cands)])
    neg = np.array([np.isin(np.argsort(s)[:10], c).mean() for s, c in zip(S, cands)])
    r = lambda x: round(float(x), 3)  # noqa: E731
    return dict(positive=r(pos.mean()), negative=r(neg.mean()),
                by_kind={k: [r(pos[kinds == k].mean()), r(neg[kinds == k].mean())]
                         for k in dict.fromkeys(kinds)})


def sketch_store(world: World, args: SketchArgs) -> tuple[Sketches, float | None]:
    """The world's sketch store of ``args`` (cached) and its build seconds when built now."""
    path = world.work / f"sketches-{key(world, args)}"
    if (path / "sketches.json").exists():
        try:
            sk = Sketches.open(path, world.inf.model, world.inf.factors)
            if sk.manifest["format"] == FORMAT and "tokens" in sk.manifest:  # else: older
                return sk, None
        except ValueError:
            pass
        shutil.rmtree(path)
    t0 = time.perf_counter()
    inf = world.inf
    sk = build_sketches(inf.model, inf.factors, inf.corpus, path, replace(args, progress=False))
    return sk, time.perf_counter() - t0


def sketched(world: World, variant: SketchArgs | KhatriRao, qs: Queries
             ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """(training sketches (N, D), query sketches (Q, D), build seconds when built now)."""
    inf = world.inf
    if isinstance(variant, KhatriRao):
        data, seconds = variant.sketch(inf, world.work / f"sketches-{variant.name}.npy")
        return data, variant.query_sketches(inf, qs), seconds
    sk, seconds = sketch_store(world, variant)
    return sk.data, sk.query_sketches(inf.model, inf.factors, qs), seconds


def study(world: World, S: np.ndarray, qs: Queries, only: list[str] | None) -> dict:
    """Recall (sketch candidates alone, Flat) per variant, K and kind; Pearson; bytes."""
    N, out = S.shape[1], {}
    for variant in VARIANTS:
        name = key(world, variant)
        if only and name not in only:
            continue
        data, xq, seconds = sketched(world, variant, qs)
        A = xq @ np.asarray(data, np.float32).T
        order, dim = np.argsort(-A, 1), data.shape[1]
        out[name] = dict(
            dim=dim, bytes_disk=2 * dim + ROW.itemsize, bytes_ram_flat=4 * dim,
            build_seconds=None if seconds is None else round(seconds, 1),
            pearson_median=round(float(np.median([np.corrcoef(x, s)[0, 1]
                                                  for x, s in zip(A, S)])), 3),
            **{f"K={s:.0%}": recall([split(o, int(s * N)) for o in order], S, world.kinds)
               for s in SHARES})
        print(world.name, name, json.dumps(out[name]["K=2%"]), flush=True)
    return out


def speed(world: World, ret: Retriever, K: int, a: argparse.Namespace) -> dict:
    """Sketch build ÷ plain fwd+bwd on the same sequences; search ÷ exhaustive one-query scan."""
    inf, N, pairs = world.inf, len(world.inf.corpus), world.pairs
    ids = np.sort(np.random.default_rng(0).choice(N, min(N, a.timing_n), replace=False))
    batches = list(inf.corpus.batches(32, ids=ids))
    work = world.work / "timing"

    def plain() -> float:
        t = time.perf_counter()
        for b in batches:
            inf.task.training_loss(inf.model(input_ids=b.input_ids,
                                             attention_mask=b.attention_mask).logits,
                                   b).sum().backward()
        inf.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def sketching() -> float:
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        build_sketches(inf.model, inf.factors, inf.corpus, work,
                       replace(ret.sketches.args, progress=False), ids=ids)
        return time.perf_counter() - t

    def exhaustive_one() -> float:
        t = time.perf_counter()
        inf.scan(inf.queries([pairs[0]]), ids=ids)
        return time.perf_counter() - t

    plain()  # warm-up
    runs = [(plain(), sketching(), exhaustive_one()) for _ in range(2)]   # interleaved
    t_plain, t_sketch, t_one = (min(r[i] for r in runs) / len(ids) for i in range(3))
    shutil.rmtree(work, ignore_errors=True)
    searches = [ret.search([pairs[q]], candidates=K, probe=0).timings
                for q in np.linspace(0, len(pairs) - 1, a.timed_queries).astype(int)]
    stages = {k: float(np.mean([t[k] for t in searches])) for k in searches[0]}
    t_search = sum(stages.values())
    return dict(sketch_build_over_fwd_bwd=round(t_sketch / t_plain, 3),
                measured_on=len(ids), plain_fwd_bwd_seq_per_s=round(1 / t_plain, 1),
                search_stages_seconds={k: round(v, 3) for k, v in stages.items()},
                search_seconds=round(t_search, 3),
                exhaustive_one_query_seconds=round(t_one * N, 2),
                search_over_exhaustive=round(t_search / (t_one * N), 4))


def retriever(world: World, S: np.ndarray, exact: InfluenceResult,
              a: argparse.Namespace) -> dict:
    """The Retriever at its defaults, each query alone: recall per K (K = 2 % through search),
    calibrated estimate, search size, speed."""
    inf, N = world.inf, S.shape[1]
    path = world.work / "retriever"
    sk, _ = sketch_store(world, SketchArgs())
    index = SketchIndex.build(sk, path / "index", IndexArgs(progress=False))
    ret = Retriever(inf, sk, index)
    single = [inf.queries([pair]) for pair in world.pairs]   # one query per search call
    out = {}
    sketch_only = Retriever(inf, sk, index, lexical=0)
    for share in SHARES:
        K = int(share * N)
        cands = [ret.candidates(q, K)[0][0] for q in single]
        alone = [sketch_only.candidates(q, K)[0][0] for q in single]
        out[f"K={share:.0%}"] = dict(recall(cands, S, world.kinds),
                                     bm25_candidates=ret.split(K)[0],
                                     estimated=ret.calibration.recall(*ret.split(K)[1:]),
                                     sketch_only=recall(alone, S, world.kinds),
                                     sketch_only_estimated=sketch_only.calibration.recall(
                                         *sketch_only.split(K)[1:]))
    K, rows, sizes, deviation = int(0.02 * N), [], [], []
    for q, pair in enumerate(world.pairs):
        res = ret.search(single[q], candidates=K)
        # rescored = exhaustive, up to float32 rounding: a query prepared alone differs from
        # the same query prepared among all of them by up to ~1e-4 of its largest |score| on
        # demo v2 (the rescoring itself, same Queries, other batches: ~1e-7); the largest
        # deviation ÷ the query's largest |score| is kept
        deviation.append(float(np.abs(res.scores[0] - S[q, res.ids]).max() / np.abs(S[q]).max()))
        np.testing.assert_allclose(res.scores[0], S[q, res.ids], rtol=1e-4,
                                   atol=1e-3 * np.abs(S[q]).max())
        alone = replace(exact, queries=exact.queries[q:q + 1], scores=S[q:q + 1],
                        layer_scores=None)
        rows.append([recall_at_k(res, alone, 10, sign)[0] for sign in ("positive", "negative")])
        if res.search_size[0] and res.search_size[0]["n_sequences"]:
            sizes.append(res.search_size[0]["n_sequences"] / N)
    # through search(): the top-10 of each query's own rescored candidates (float32 rescoring
    # can swap a near-tie at rank 10 against the float64 exhaustive scan)
    out["K=2% via search"] = dict(zip(("positive", "negative"),
                                      np.round(np.array(rows).mean(0), 3).tolist()))
    out["rescored_deviation_max"] = float(f"{max(deviation):.2g}")
    out["search_size_over_N_median"] = round(float(np.median(sizes)), 2) if sizes else None
    out["speed"] = speed(world, ret, K, a)
    return out


def targeted(world: World, S: np.ndarray, a: argparse.Namespace) -> dict:
    """The search with a recall target at its defaults, each of ``a.queries`` queries alone:
    measured recall of the exhaustive top-10 per sign and kind, estimates, rescored fraction,
    wall time ÷ an exhaustive one-query scan (the mean of ``a.timed_queries`` timed here)."""
    inf, N = world.inf, S.shape[1]
    args = SketchArgs(exact_bytes=a.exact_bytes)
    sk, build = sketch_store(world, args)
    ret = Retriever(inf, sk, SketchIndex.build(sk, world.work / "retriever" / "index",
                                               IndexArgs(progress=False)))
    t0 = time.perf_counter()
    ret.calibration                                     # once per store, not per search
    files = [f for f in sk.path.iterdir() if f.suffix in (".f16", ".f32", ".i32", ".bin")]
    out = dict(calibration_seconds=round(time.perf_counter() - t0, 1), variant=key(world, args),
               n_calibration_z=len(ret.calibration.z), build_seconds=build and round(build, 1),
               store_bytes_per_sequence=round(sum(f.stat().st_size for f in files) / N))
    picked = np.unique(np.linspace(0, len(world.pairs) - 1, a.queries).round().astype(int))
    exhaustive = []                      # one-query scans of the whole corpus (any query costs
    for q in picked[:a.timed_queries]:   # the same): the mean is the unit of a search's time
        t = time.perf_counter()
        inf.scan([world.pairs[q]])
        exhaustive.append(time.perf_counter() - t)
    unit = float(np.mean(exhaustive))
    for target in a.recall:
        rows = []
        for q in picked:
            pair = world.pairs[q]
            t = time.perf_counter()
            res = ret.search([pair], recall=target)
            seconds = time.perf_counter() - t
            have = sk.rows_of(res.candidates[0])
            got = [np.isin(np.argsort(-sign * S[q, sk.ids])[:10], have).mean()
                   for sign in (1, -1)]
            rows.append(got + [res.estimated_recall["positive"][0],
                               res.estimated_recall["negative"][0], res.rescored_fraction[0],
                               res.rounds, seconds / unit, seconds,
                               np.nan if res.read_fraction is None else res.read_fraction[0]])
        rows = np.array(rows)
        kinds = world.kinds[picked]
        r = lambda x: round(float(x), 3)  # noqa: E731
        out[f"recall={target}"] = dict(
            positive=r(rows[:, 0].mean()), negative=r(rows[:, 1].mean()),
            positive_min=r(rows[:, 0].min()), negative_min=r(rows[:, 1].min()),
            estimated=[r(rows[:, 2].mean()), r(rows[:, 3].mean())],
            rescored_fraction=r(rows[:, 4].mean()), rescored_fraction_max=r(rows[:, 4].max()),
            read_fraction=r(rows[:, 8].mean()), read_fraction_max=r(rows[:, 8].max()),
            rounds=r(rows[:, 5].mean()), time_over_exhaustive=r(rows[:, 6].mean()),
            time_over_exhaustive_max=r(rows[:, 6].max()), search_seconds=r(rows[:, 7].mean()),
            by_kind={k: dict(recall=[r(rows[kinds == k, 0].mean()), r(rows[kinds == k, 1].mean())],
                             rescored_fraction=r(rows[kinds == k, 4].mean()))
                     for k in dict.fromkeys(kinds)})
        print(world.name, target, json.dumps(out[f"recall={target}"]), flush=True)
    out["exhaustive_one_query_seconds"] = [round(x, 2) for x in exhaustive]
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    results = {}
    for name in a.worlds:
        world = WORLDS[name]({"demo": a.demo_n, "markov": a.markov_n,
                              "memorized": a.memorized_n}[name])
        qs = world.inf.queries(world.pairs)
        t0 = time.perf_counter()
        exact = world.inf.scan(qs, out_dir=world.work / "exhaustive")
        S = exact.scores
        results[name] = dict(
            n_sequences=S.shape[1], n_queries=len(world.pairs),
            queries_by_kind={k: int((world.kinds == k).sum()) for k in dict.fromkeys(world.kinds)},
            n_params_tracked=sum(o * i for o, i in world.inf.factors.shapes.values()),
            exhaustive_scan_seconds=round(time.perf_counter() - t0, 1),
            default=key(world, SketchArgs()), targeted=targeted(world, S, a))
        if a.fixed:
            results[name] |= dict(variants=study(world, S, qs, a.variants),
                                  retriever=retriever(world, S, exact, a))
            print(json.dumps({name: results[name]["retriever"]}), flush=True)
    print(json.dumps(dict(results, threads=torch.get_num_threads()), default=str))


if __name__ == "__main__":
    main()
