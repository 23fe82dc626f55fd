"""Exact influence by replaying training, on the validation world: its cost ÷ one training run,
its peak memory, and how well it predicts leave-1 %-out retraining beside EK-FAC's.

One training run of the world's recipe (seed 0, every sequence) is recorded
(:class:`influence_nb.training.TrainRecord`) and replayed for ``--queries`` queries spread over
the world's query kinds (:func:`influence_nb.validate.replay.replay_influence`). EK-FAC, K-FAC
and identity scores are computed on the same trained model. Then ``--subsets`` random 1 %
removals are retrained with the same seed (same initialisation and batch order) and LDS
(Spearman, :func:`influence_nb.validate.lds`) compares each strategy's predicted group effect
with the measured f. ``--protocol``:

- ``weights``: a left-out sequence keeps loss weight ``--weight`` (0: removed) in the recorded
  batches (what the replay's derivative linearises: MAGIC's leave-out); with several weights
  the same subsets are retrained at each, and ``linearity`` is the Pearson correlation of the
  measured changes ÷ (1 − weight) between the smallest and the largest step: 1 when the run
  responds to its data linearly, so that a first-order estimate can predict a removal;
- ``removal``: the sequences are dropped and the batches re-formed (the package's
  :class:`~influence_nb.training.Retrainer`).

``--recipe KEY=VALUE`` changes the world's training recipe (e.g. ``lr=0.001``) for the recorded
run and every retrain alike. Retrains and the replay's scores are kept in ``--work`` (a killed
run resumes).

    python benchmarks/replay.py [--queries 4] [--subsets 16] [--weight 0 0.99] > replay.json
"""
import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from common import report, reset_peak, set_threads, status_mib
from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.store import cache_dir
from influence_nb.task import measure
from influence_nb.training import TrainRecord, Retrainer, fresh_model, train
from influence_nb.validate import lds, pearson
from influence_nb.validate.replay import replay_influence


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="validation")
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--every", type=int, default=20, help="checkpoint interval k (steps)")
    p.add_argument("--subsets", type=int, default=16)
    p.add_argument("--removed", type=float, default=0.01, help="fraction left out per subset")
    p.add_argument("--weight", type=float, nargs="+", default=[0.0],
                   help="the weights protocol's weight on a left-out sequence (0: removed)")
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help="changes to the world's TrainConfig, e.g. lr=0.001")
    p.add_argument("--protocol", choices=("weights", "removal"), nargs="+",
                   default=["weights"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=cache_dir() / "bench-replay")
    return p


def weighted_retrain(config, corpus, recipe, weight: float):
    """``(ids, seed) -> model``: trained on every sequence with weight 1 on ``ids``, ``weight``
    on the rest — the recorded run's batches, the left-out sequences' loss terms scaled."""
    def retrain(ids: np.ndarray, seed: int) -> torch.nn.Module:
        weights = np.full(len(corpus), weight)
        weights[ids] = 1.0
        model = fresh_model(config, seed)
        train(model, corpus, replace(recipe, seed=seed), weights=weights, progress=False)
        return model
    retrain.fingerprint = f"weight {weight} " + Retrainer(config, corpus, recipe).fingerprint
    return retrain


def recorded_replay(config, corpus, recipe, prompts, completions, every, path: Path) -> dict:
    """Record one training run and replay it: scores, seconds and peak memory (the scores are
    kept in ``path``; a later run reads them and times nothing)."""
    model = fresh_model(config, 0)
    run = TrainRecord(every=every)
    reset_peak()
    t0 = time.time()
    train(model, corpus, replace(recipe, seed=0), record=run, progress=False)
    out = dict(model=model, train_s=time.time() - t0, train_peak_mib=status_mib(),
               steps=len(run.batches), checkpoint_mib=sum(
                   t.numel() * t.element_size() for s in run.checkpoints.values()
                   for t in s.tensors) / 2 ** 20)
    if path.exists():
        out["scores"] = np.load(path)["scores"]
        return out
    reset_peak()
    t0 = time.time()
    out["scores"] = replay_influence(model, corpus, run, prompts, completions)
    out.update(replay_s=time.time() - t0, replay_peak_mib=status_mib())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, scores=out["scores"])
    return out


def agreement(table, f_full: np.ndarray, masks: np.ndarray, scores: np.ndarray,
              weight: float) -> dict:
    """How the replay's predicted change −(1 − weight) Σ_left-out τ matches the measured one
    (nats): Pearson over subsets, mean over queries, and the relative error of all pooled."""
    predicted = -(1 - weight) * (~masks).astype(np.float64) @ scores.T     # (M, Q)
    measured = table.attrs["measured"] - f_full                      # (M, Q)
    return dict(pearson=round(float(np.mean([pearson(predicted[:, q], measured[:, q])
                                             for q in range(len(f_full))])), 4),
                relative_error=round(float(np.linalg.norm(predicted - measured)
                                           / np.linalg.norm(measured)), 4),
                mean_abs_change_nats=round(float(np.abs(measured).mean()), 5))


def changed(recipe, changes: list[str]):
    """The recipe with ``KEY=VALUE`` changes (values cast to the field's type), and a tag for
    the file names of what it trains."""
    pairs = [c.split("=", 1) for c in changes]
    if any(len(p) != 2 or not hasattr(recipe, p[0]) for p in pairs):
        raise SystemExit(f"--recipe takes KEY=VALUE with KEY a TrainConfig field; got {changes}")
    new = replace(recipe, **{k: type(getattr(recipe, k))(v) for k, v in pairs})
    return new, "".join(f"-{k}{v}" for k, v in pairs)


def world(a: argparse.Namespace) -> tuple:
    """(model, tokenizer, corpus, recipe, tag, pairs, kinds): ``a.world`` with its recipe
    changed by ``a.recipe`` (and the changes' tag), its queries and their kinds."""
    set_threads(a.threads)
    model, tokenizer, corpus = demo.load(a.world)
    recipe, tag = changed(demo.recipe(a.world), a.recipe)
    return (model, tokenizer, corpus, recipe, tag, *demo.query_set(a.world, tokenizer))


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    model, tokenizer, corpus, recipe, tag, pairs, kinds = world(a)
    picked = np.linspace(0, len(pairs) - 1, a.queries).astype(int)
    pairs, kinds = [pairs[q] for q in picked], [kinds[q] for q in picked]
    run = recorded_replay(model.config, corpus, recipe, *Influence(model, tokenizer).encode(
        pairs), a.every, a.work / f"replay-{a.world}{tag}-q{a.queries}-k{a.every}.npz")
    inf = Influence(run["model"], tokenizer, corpus,
                    score_args=ScoreArgs(progress=False, batch_size=32))
    t0 = time.time()
    inf.fit(FactorArgs(batch_size=32, progress=False))
    scores = inf.strategy_scores(pairs, baselines=False)
    t_ekfac = time.time() - t0
    scores["replay"] = run["scores"]
    prompts, completions = inf.encode(pairs)
    f_full = measure(run["model"], prompts, completions)
    out = dict(world=a.world, recipe=asdict(recipe), n_sequences=len(corpus), queries=a.queries,
               query_kinds=kinds, f_full=f_full.round(3).tolist(), weights=a.weight,
               steps=run["steps"], every=a.every, threads=a.threads,
               seconds=dict(train=round(run["train_s"], 1), ekfac_fit_and_scores=round(t_ekfac, 1)),
               memory_mib=dict(train_peak=round(run["train_peak_mib"]),
                               checkpoints=round(run["checkpoint_mib"], 1)))
    if "replay_s" in run:
        out["seconds"]["replay"] = round(run["replay_s"], 1)
        out["replay_cost_per_training_run"] = round(run["replay_s"] / run["train_s"], 2)
        out["memory_mib"]["replay_peak"] = round(run["replay_peak_mib"])
    changes = {}
    for protocol in a.protocol:
        for weight in (a.weight if protocol == "weights" else [0.0]):
            key = f"{protocol}_{weight}" if protocol == "weights" else protocol
            retrain = weighted_retrain(model.config, corpus, recipe, weight) \
                if protocol == "weights" else Retrainer(model.config, corpus, recipe)
            t0 = time.time()
            table = lds(retrain, prompts, completions, scores, a.subsets, 1 - a.removed, (0,),
                        a.work / f"{protocol}-{a.world}{tag}-{weight}", progress=False)
            out[f"lds_{key}"] = {k: {c: round(float(v), 4) for c, v in row.items()} for k, row
                                 in table[["lds", "ci_low", "ci_high", "queries"]].iterrows()}
            out[f"replay_vs_{key}"] = agreement(table, f_full, table.attrs["masks"],
                                                scores["replay"], weight)
            out["seconds"][f"retrains_{key}"] = round(time.time() - t0, 1)
            if protocol == "weights":
                changes[weight] = (table.attrs["measured"] - f_full) / (1 - weight)
    if len(changes) > 1:
        lo, hi = changes[max(changes)], changes[min(changes)]
        out["linearity"] = dict(steps=[round(1 - max(changes), 4), round(1 - min(changes), 4)],
                                pearson=round(float(np.mean([pearson(lo[:, q], hi[:, q])
                                                             for q in range(lo.shape[1])])), 4))
    report(out)


if __name__ == "__main__":
    main()
