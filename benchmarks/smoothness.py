"""Is a training recipe's run linear in its data? The condition for any first-order estimate —
exact replay included — to predict what removing sequences does.

The world's run (seed 0, every sequence, the recorded batches) is retrained with ``--subsets``
random 1 % subsets at loss weight 1 − ε for each ``--eps``; the change of each query's f
÷ ε is the finite-difference slope of f along that subset's weights. A run that responds
linearly has the same slope at every ε: ``pearson`` (over the world's queries, per subset)
compares the smallest ε's slopes with each larger one's. 1: removal (ε = 1) is predicted by
the derivative; near 0: the run is chaotic in its data at that size of change.

``--jitter``: each subset's removal is retrained once more with one other random sequence at
weight 1 − jitter (a change no estimate would notice). ``jitter_pearson`` correlates the two
removals' changes over the queries and ``jitter_ratio`` is the mean |difference| between them ÷
the mean |change|: a chaotic run's removal is not reproducible under such a jitter, which bounds
what any estimator's LDS can reach there.

    python benchmarks/smoothness.py [--recipe lr=0.001] [--eps 0.01 0.1 1] > smoothness.json
"""
import argparse
import time

import numpy as np

from common import report
from influence_nb.session import Influence
from influence_nb.task import measure
from influence_nb.training import fresh_model, train
from replay import weighted_retrain, world


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default="validation")
    p.add_argument("--recipe", nargs="*", default=[], metavar="KEY=VALUE",
                   help="changes to the world's TrainConfig, e.g. lr=0.001")
    p.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--subsets", type=int, default=2)
    p.add_argument("--removed", type=float, default=0.01, help="fraction of the corpus a subset")
    p.add_argument("--jitter", type=float, default=1e-4,
                   help="weight change of one other sequence in the removal's repeat (0: none)")
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    model, tokenizer, corpus, recipe, _, pairs, _ = world(a)
    prompts, completions = Influence(model, tokenizer).encode(pairs)
    everyone = np.arange(len(corpus))
    t0 = time.time()

    def f(weight: float, ids: np.ndarray, jittered: int | None = None) -> np.ndarray:
        """f after training with ``ids`` at weight 1, the rest at ``weight``, and the sequence
        ``jittered`` (one of ids) at 1 − a.jitter."""
        retrain = weighted_retrain(model.config, corpus, recipe, weight)
        if jittered is not None:
            weights = np.full(len(corpus), weight)
            weights[ids] = 1.0
            weights[jittered] = 1 - a.jitter
            trained = fresh_model(model.config, 0)
            train(trained, corpus, recipe, weights=weights, progress=False)
        else:
            trained = retrain(ids, 0)
        return measure(trained, prompts, completions)

    f_full = f(1.0, everyone)
    rng = np.random.default_rng(1)
    eps = sorted(a.eps)
    subsets = []
    for _ in range(a.subsets):
        left_out = rng.choice(len(corpus), round(a.removed * len(corpus)), replace=False)
        kept = np.setdiff1d(everyone, left_out)
        slopes = {e: (f(1 - e, kept) - f_full) / e for e in eps}
        row = dict(
            mean_abs_slope={e: round(float(np.abs(s).mean()), 4) for e, s in slopes.items()},
            pearson={e: round(float(np.corrcoef(slopes[eps[0]], slopes[e])[0, 1]), 4)
                     for e in eps[1:]})
        if a.jitter and 1.0 in slopes:
            removal = slopes[1.0]
            again = f(0.0, kept, rng.choice(kept)) - f_full
            row.update(jitter_pearson=round(float(np.corrcoef(removal, again)[0, 1]), 4),
                       jitter_ratio=round(float(np.abs(again - removal).mean()
                                                / np.abs(removal).mean()), 4))
        subsets.append(row)
    report(dict(world=a.world, recipe=str(recipe), queries=len(pairs), eps=eps,
                removed=a.removed, f_full=f_full.round(3).tolist(), subsets=subsets,
                seconds=round(time.time() - t0)))


if __name__ == "__main__":
    main()
