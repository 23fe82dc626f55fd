"""The estimators the LDS benchmarks (lds.py, lds_markov.py) compare, each with its cost ÷ one
training run of the world's recipe (the CPU seconds of everything it needs beyond the trained
model ÷ the recorded run's, on one thread: on a shared machine wall times drift with the load):

- ``ekfac``, ``kfac``, ``identity``: one fit of the world's model and one scan (one cost);
- ``bm25``, ``random``: no model;
- ``ekfac_seeds{S}``: EK-FAC averaged over S models trained on every sequence with seeds
  0 … S−1, each with its own factors (TRAK-style; S − 1 extra trainings);
- ``ekfac_trajectory{C}``: EK-FAC averaged over C checkpoints of the recorded run (no training);
- ``replay``: exact d f / d w of the recorded run (:func:`influence_nb.validate.replay_influence`),
  for a subset of the queries (its cost grows ≈ 2 training runs per query).

The recorded run is the world's model retrained with seed 0 on every sequence (checked equal to
the world's model, so recording changes nothing).
"""
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.search import BM25
from influence_nb.session import Influence
from influence_nb.training import Retrainer, TrainRecord, train
from influence_nb.validate import (bootstrap_interval, checkpoint_models, ensemble_scores,
                                   replay_influence, spearman)


def estimator_options(p) -> None:
    """The options of :func:`estimators`."""
    p.add_argument("--ensemble-seeds", type=int, default=3, help="models in the seed ensemble")
    p.add_argument("--trajectory", type=int, default=4, help="checkpoints in the trajectory")
    p.add_argument("--replay-queries", type=int, default=0,
                   help="queries replayed exactly (0: no replay)")
    p.add_argument("--every", type=int, default=20, help="checkpoint interval of the record")


def scorer(tokenizer, corpus, pairs):
    """member -> {ekfac, kfac, identity}: (Q, N) scores with the member's own factors."""
    def score(member: torch.nn.Module) -> dict[str, np.ndarray]:
        inf = Influence(member, tokenizer, corpus,
                        score_args=ScoreArgs(progress=False, batch_size=32))
        inf.fit(FactorArgs(batch_size=32, progress=False))
        return inf.strategy_scores(pairs, baselines=False)
    return score


def recorded_run(model, retrain: Retrainer, every: int) -> tuple[TrainRecord, float]:
    """(record, seconds) of the world's training run, retrained with seed 0 on every sequence
    and recorded; a run that does not reproduce ``model`` is refused."""
    run, copy = TrainRecord(every=every), retrain.make(0)
    t0 = time.process_time()
    train(copy, retrain.corpus, replace(retrain.recipe, seed=0), record=run, progress=False)
    seconds = time.process_time() - t0
    if not all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters())):
        raise RuntimeError("the recorded run does not reproduce the world's model")
    return run, seconds


def seed_ensembles(model, retrain: Retrainer, score, seeds: int) -> tuple[dict, dict]:
    """({ekfac_seeds{S}: (Q, N)}, {ekfac_seeds{S}: seconds}) for S = 2 … ``seeds``: EK-FAC
    averaged over the models of seeds 0 … S − 1 (seed 0: ``model``), each scored once; an
    ensemble's seconds are its members' trainings and fits."""
    members, seconds, scored = [model], [0.0], {}
    for s in range(1, seeds):
        t0 = time.process_time()
        members.append(retrain(np.arange(len(retrain.corpus)), s))
        seconds.append(time.process_time() - t0)

    def once(member: torch.nn.Module) -> dict[str, np.ndarray]:
        k = next(i for i, m in enumerate(members) if m is member)
        if k not in scored:
            t0 = time.process_time()
            scored[k] = score(member)
            seconds[k] += time.process_time() - t0
        return scored[k]
    out = {f"ekfac_seeds{S}": ensemble_scores(members[:S], once)["ekfac"]
           for S in range(2, seeds + 1)}
    return out, {f"ekfac_seeds{S}": sum(seconds[:S]) for S in range(2, seeds + 1)}


def estimators(model, tokenizer, retrain: Retrainer, pairs, a, work: Path
               ) -> tuple[dict, dict, list[int]]:
    """({name: (Q, N) scores}, {name: cost ÷ one training run}, replayed query ids); replay's
    scores are (Q, N) with zeros outside the replayed queries (kept in ``work``)."""
    corpus = retrain.corpus
    score = scorer(tokenizer, corpus, pairs)
    run, t_train = recorded_run(model, retrain, a.every)
    t0 = time.process_time()
    scores = score(model)
    cost = dict.fromkeys(scores, (time.process_time() - t0) / t_train)
    t0 = time.process_time()
    scores["bm25"] = BM25(corpus.df["text"].tolist()).scores([p + c for p, c in pairs])
    cost["bm25"] = (time.process_time() - t0) / t_train
    scores["random"] = np.random.default_rng(0).standard_normal((len(pairs), len(corpus)))
    cost["random"] = 0.0

    seeds, seconds = seed_ensembles(model, retrain, score, a.ensemble_seeds)
    for name, v in seeds.items():
        scores[name], cost[name] = v, seconds[name] / t_train

    t0 = time.process_time()
    members = checkpoint_models(model, run, a.trajectory)
    name = f"ekfac_trajectory{len(members)}"
    scores[name] = ensemble_scores(members, score)["ekfac"]
    cost[name] = (time.process_time() - t0) / t_train

    q_ids = np.linspace(0, len(pairs) - 1, a.replay_queries).astype(int).tolist()
    if q_ids:
        path = work / f"replay-q{len(q_ids)}-k{a.every}.npz"
        if not path.exists():
            prompts, completions = Influence(model, tokenizer).encode([pairs[q] for q in q_ids])
            t0 = time.process_time()
            replayed = replay_influence(model, corpus, run, prompts, completions, progress=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, scores=replayed, seconds=time.process_time() - t0, t_train=t_train)
        with np.load(path) as z:
            scores["replay"] = np.zeros((len(pairs), len(corpus)))
            scores["replay"][q_ids] = z["scores"]
            cost["replay"] = float(z["seconds"] / z["t_train"])
    cost["one_training_run_s"] = t_train
    return scores, {k: round(float(v), 3) for k, v in cost.items()}, q_ids


def lds_over(table: pd.DataFrame, scores: dict, q_ids: list[int]) -> dict:
    """{strategy: {lds, ci_low, ci_high, queries}} of a :func:`influence_nb.validate.lds` table's
    retrains, over the queries ``q_ids`` only (e.g. those replayed)."""
    masks, measured = table.attrs["masks"].astype(np.float64), table.attrs["measured"]
    out = {}
    for k, v in scores.items():
        rho = np.array([spearman(masks @ v[q], measured[:, q]) for q in q_ids
                        if measured[:, q].std() > 0])
        low, high = bootstrap_interval(rho, 2000, 0)
        out[k] = dict(lds=round(float(rho.mean()), 4), ci_low=round(low, 4),
                      ci_high=round(high, 4), queries=len(rho))
    return out
