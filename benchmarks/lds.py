"""Do the scores hold under retraining? LDS and leave-top-k-out on the validation world.

The validation world (``demo.load("validation")``: the demo generator and recipe at 1,500
sequences, a 0.17M-parameter GPT-NeoX that retrains from scratch in ≈ 27 s on 2 cores) is
retrained from scratch on random halves of its corpus (LDS) and without each query's top-k
(leave-k-out). Queries of four kinds: planted facts (canonical and paraphrased prompts), a
fact asked in Velnish, arithmetic and code from the held-out set.

Strategies (``estimators.py``, each with its cost ÷ one training run): EK-FAC, K-FAC, identity
(gradient dot product), BM25 and random scores, EK-FAC ensembles over seeds and over the run's
checkpoints, exact replay of the recorded run (on ``--replay-queries`` of the queries) — and
kronfluence 1.0.1's EK-FAC when it is installed (optional; same model, layers and data). Two
protocols: random halves (``--alpha``) and leave-1 %-out (``--leave-1-subsets`` random removals
of 1 % of the sequences, retrained with the same seed); ``lds_replayed`` is each protocol over
the replayed queries only. Finished retrains are kept in ``--work`` (a killed run resumes).

    python benchmarks/lds.py [--subsets 50] [--seeds 2] [--leave-out-queries 20] > lds.json
"""
import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import report, set_threads
from estimators import estimator_options, estimators, lds_over
from influence_nb import demo
from influence_nb.session import Influence
from influence_nb.store import cache_dir
from influence_nb.training import Retrainer
from influence_nb.validate import bootstrap_interval, leave_out, lds, top_ids


def retraining_options(p: argparse.ArgumentParser, leave_out_queries: int, work: str) -> None:
    """The options of a retraining benchmark (this one and lds_markov.py); retrains are kept
    in ``cache_dir() / work`` by default."""
    p.add_argument("--subsets", type=int, default=50)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--leave-out-queries", type=int, default=leave_out_queries)
    p.add_argument("--leave-1-subsets", type=int, default=0,
                   help="random 1 %% removals for the leave-1 %%-out protocol (0: skip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=cache_dir() / work)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="validation")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--k", type=int, nargs="+", default=[10])
    p.add_argument("--kronfluence", action=argparse.BooleanOptionalAction, default=True)
    retraining_options(p, leave_out_queries=20, work="bench-lds")
    estimator_options(p)
    return p


def with_kronfluence(scores: dict, model, tokenizer, corpus, pairs: list[tuple[str, str]]
                     ) -> str | None:
    """Adds kronfluence's EK-FAC to ``scores`` when it is installed; else says why not."""
    try:
        from kronfluence_scores import kronfluence_ekfac
        scores["kronfluence_ekfac"] = kronfluence_ekfac(model, tokenizer, corpus, pairs)
    except ImportError as e:
        return str(e)
    return None


def rankings(scores: dict[str, np.ndarray], q_ids: np.ndarray, k: int, N: int
             ) -> dict[str, np.ndarray]:
    """{method: (len(q_ids), k) ids} removed by leave-top-k-out: EK-FAC's and BM25's top k,
    and k random ids per query (seeded by the query)."""
    return {"ekfac": top_ids(scores["ekfac"][q_ids], k),
            "bm25": top_ids(scores["bm25"][q_ids], k),
            "random": np.stack([np.random.default_rng(q).permutation(N)[:k] for q in q_ids])}


def lds_summary(table: pd.DataFrame) -> dict:
    """{strategy: {lds, ci_low, ci_high, queries}} of :func:`influence_nb.validate.lds`."""
    return {k: {c: round(float(v), 4) for c, v in row.items()}
            for k, row in table[["lds", "ci_low", "ci_high", "queries"]].iterrows()}


def against_ekfac(table: pd.DataFrame) -> dict:
    """{strategy: {diff, ci_low, ci_high}}: its LDS minus EK-FAC's, query by query on the same
    retrains, mean and bootstrap 95 % interval (paired, so tighter than the two intervals)."""
    per_query = table.attrs["per_query"].dropna()
    out = {}
    for k in per_query.columns.drop("ekfac"):
        d = (per_query[k] - per_query["ekfac"]).to_numpy()
        low, high = bootstrap_interval(d, 2000, 0)
        out[k] = dict(diff=round(float(d.mean()), 4), ci_low=round(low, 4),
                      ci_high=round(high, 4))
    return out


def ekfac_above_identity(table: pd.DataFrame) -> bool:
    """EK-FAC's LDS interval lies above the gradient dot product's."""
    return bool(table.loc["ekfac", "ci_low"] > table.loc["identity", "ci_high"])


def leave_out_summary(removed: pd.DataFrame) -> dict:
    """{"method top-k": mean Δ log p (nats)} of :func:`influence_nb.validate.leave_out`."""
    return {f"{m} top-{k}": round(float(g["delta"].mean()), 4)
            for (m, k), g in removed.groupby(["method", "k"])}


def protocols(retrain, prompts, completions, scores: dict, q_ids: list[int], a, work: Path,
              suffix: str = "") -> tuple[pd.DataFrame, dict]:
    """(the random halves' LDS table, its summary and leave-1 %-out's): every strategy on the
    same retrains (seed 0 … ``a.seeds`` − 1, kept in ``work / "lds{suffix}"`` and
    ``"leave-1{suffix}"``), and each protocol over the replayed queries."""
    scored = {k: v for k, v in scores.items() if k != "replay"}   # replay: some queries only
    table = lds(retrain, prompts, completions, scored, a.subsets, a.alpha, range(a.seeds),
                work / f"lds{suffix}")
    out = dict(lds=lds_summary(table), lds_against_ekfac=against_ekfac(table))
    if q_ids:
        out["lds_replayed"] = lds_over(table, scores, q_ids)
    if a.leave_1_subsets:
        leave_1 = lds(retrain, prompts, completions, scored, a.leave_1_subsets, 0.99, (0,),
                      work / f"leave-1{suffix}")
        out["leave_1"] = lds_summary(leave_1)
        out["leave_1_against_ekfac"] = against_ekfac(leave_1)
        if q_ids:
            out["leave_1_replayed"] = lds_over(leave_1, scores, q_ids)
    return table, out


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    set_threads(a.threads)
    t0 = time.time()
    model, tokenizer, corpus = demo.load(a.world)
    pairs, kinds = demo.query_set(a.world, tokenizer)
    retrain = Retrainer(model.config, corpus, demo.recipe(a.world))
    scores, cost, replayed = estimators(model, tokenizer, retrain, pairs, a,
                                        a.work / f"replay-{a.world}")
    kron_missing = "not asked (--no-kronfluence)"
    if a.kronfluence:
        kron_missing = with_kronfluence(scores, model, tokenizer, corpus, pairs)
    Q, N = len(pairs), len(corpus)
    prompts, completions = Influence(model, tokenizer).encode(pairs)
    t_scores = time.time() - t0

    t1 = time.time()
    table, protocol = protocols(retrain, prompts, completions, scores, replayed, a, a.work,
                                 f"-{a.world}")
    t_lds = time.time() - t1
    per_query = table.attrs["per_query"].assign(kind=kinds)

    t1 = time.time()
    q_ids = np.linspace(0, Q - 1, min(a.leave_out_queries, Q)).astype(int)
    removed = pd.DataFrame(columns=["method", "k", "delta"])
    if len(q_ids):
        removed = leave_out(retrain, [prompts[q] for q in q_ids],
                            [completions[q] for q in q_ids], rankings(scores, q_ids, max(a.k), N),
                            N, a.k, out_dir=a.work / f"leave-out-{a.world}")
    t_leave = time.time() - t1
    report(dict(
        world=a.world, n_sequences=N, n_params=sum(p.numel() for p in model.parameters()),
        queries=Q, query_kinds={k: kinds.count(k) for k in dict.fromkeys(kinds)},
        subsets=a.subsets, seeds=a.seeds, alpha=a.alpha, leave_1_subsets=a.leave_1_subsets,
        replayed_queries=[kinds[q] for q in replayed],
        cost_per_training_run=cost, **protocol,
        lds_by_kind={s: per_query.groupby("kind")[s].mean().round(4).to_dict()
                     for s in table.index},
        ekfac_above_identity=ekfac_above_identity(table),
        kronfluence=kron_missing or "included", leave_out=leave_out_summary(removed),
        leave_out_queries=len(q_ids),
        leave_out_goal="ekfac lowers log p more than bm25 and random (mean Δ, nats)",
        seconds=dict(scores=round(t_scores, 1), lds=round(t_lds, 1), leave_out=round(t_leave, 1))))


if __name__ == "__main__":
    main()
