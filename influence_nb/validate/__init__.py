"""Do the scores hold? Influence estimates checked against ground truth.

- :mod:`.exact`: on a tiny model (:mod:`.toy`), against exact linear algebra — the exact damped
  Fisher by plain autograd, exact influence, and how close each curvature strategy (identity,
  K-FAC, EK-FAC, LiSSA) comes to it (:func:`compare`).
- :mod:`.bregman`: against the proximal Bregman response function that influence functions
  approximate (:func:`pbrf`).
- :mod:`.counterfactual`: on any model, against counterfactual truth — the linear datamodeling
  score over retrained random subsets (:func:`lds`), retraining without each query's top-k
  (:func:`leave_out`), and one-step tail-patching of the final weights (:func:`tail_patch`).
- :mod:`.replay`: exact influence of the actual training run, by reverse-mode differentiation
  through a recorded run of :func:`~influence_nb.training.train` (:func:`replay_influence`).
- :mod:`.ensemble`: scores averaged over several models, each with its own factors —
  checkpoints of one run (:func:`checkpoint_models`) or retrained seeds (:func:`ensemble_scores`).
- :mod:`.agreement`: the correlations they report (:func:`spearman`, :func:`pearson`).
"""
from .agreement import pearson, spearman
from .bregman import pbrf
from .counterfactual import (Retrain, bootstrap_interval, lds, lds_subsets, leave_out, tail_patch,
                             top_ids)
from .ensemble import checkpoint_models, ensemble_scores
from .exact import compare, exact_damping, flatten, lissa, per_example_gradients
from .replay import replay_influence
from .toy import toy_problem

__all__ = ["Retrain", "bootstrap_interval", "checkpoint_models", "compare", "ensemble_scores",
           "exact_damping", "flatten", "lds", "lds_subsets", "leave_out", "lissa", "pbrf",
           "pearson", "per_example_gradients", "replay_influence", "spearman", "tail_patch",
           "top_ids", "toy_problem"]
