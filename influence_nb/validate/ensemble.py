"""Ensembles of influence estimates: each member model scored with its own factors, the scores
averaged (TRAK's ensembling, Park et al. 2023). Members are checkpoints along the one training
run (:func:`checkpoint_models`: a trajectory, no extra training) or models retrained from
scratch with other seeds (``[retrain(ids, s) for s in seeds]``).

    def score(member):
        inf = Influence(member, tokenizer, corpus)
        inf.fit()
        return inf.strategy_scores(pairs, baselines=False)
    members = checkpoint_models(model, run, 4)           # run: the TrainRecord of its training
    scores = ensemble_scores(members, score)             # {"ekfac": (Q, N), ...}

An ensemble of one is its member's scores; the average is linear in each member's scores.
Cost: one fit and one scan per member (plus the retrains, for seeds).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..checks import checked
from ..training import TrainRecord

Scorer = Callable[[nn.Module], Mapping[str, np.ndarray]]   # model -> {name: (Q, N) scores}


@checked(minimum={"count": 1})
def checkpoint_models(model: nn.Module, run: TrainRecord, count: int) -> list[nn.Module]:
    """``count`` copies of ``model`` (eval mode) at the recorded run's checkpoints nearest to
    the fractions 1/count, 2/count, …, 1 of its steps; the last is the run's final state.
    Checkpoints are kept every ``run.every`` steps, so two fractions may meet one checkpoint:
    each is taken once (fewer than ``count`` members then)."""
    steps = sorted(run.checkpoints)
    if not run.batches or steps[-1] != len(run.batches):
        raise ValueError("the record holds no finished run; pass the TrainRecord that "
                         "train(..., record=run) filled")
    total = steps[-1]
    picked = dict.fromkeys(min(steps, key=lambda s: abs(s - total * c / count))
                           for c in range(1, count + 1))
    members = []
    for step in picked:
        member = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p, theta in zip([p for p in member.parameters() if p.requires_grad],
                                run.checkpoints[step].theta):
                p.copy_(theta)
        member.step = step          # which checkpoint it is, for reports
        members.append(member)
    return members


def ensemble_scores(members: Sequence[nn.Module], score: Scorer) -> dict[str, np.ndarray]:
    """{name: (Q, N) mean over ``members`` of ``score(member)[name]``}: every member scored on
    its own (its own factors, its own query gradients), the scores averaged. ``score`` must
    give every member the same names and shapes."""
    if not members:
        raise ValueError("no members: pass at least one model")
    total: dict[str, np.ndarray] = {}
    for member in members:
        got = {k: np.asarray(v, np.float64) for k, v in score(member).items()}
        if total and ({k: v.shape for k, v in got.items()} !=
                      {k: v.shape for k, v in total.items()}):
            raise ValueError("score gave members different names or shapes: "
                             f"{sorted((k, v.shape) for k, v in got.items())} after "
                             f"{sorted((k, v.shape) for k, v in total.items())}")
        total = {k: total.get(k, 0) + v for k, v in got.items()}
    return {k: v / len(members) for k, v in total.items()}
