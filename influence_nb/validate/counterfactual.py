"""Counterfactual truth on any model: the linear datamodeling score over retrained random subsets
(:func:`lds`), retraining without each query's top-k (:func:`leave_out`), and one-step
tail-patching of the final weights (:func:`tail_patch`).

Retraining goes through a user-supplied ``(ids, seed) -> model`` function
(:class:`~influence_nb.training.Retrainer` for a Hugging Face causal LM and a recipe); with an
``out_dir`` every finished retrain is kept on disk, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data import Corpus
from ..checks import as_ids, checked
from ..hooks import eval_mode
from ..progress import tqdm
from ..store import ChunkStore
from ..task import Task, measure, to_device
from ..training import code_fingerprint
from .agreement import spearman

Retrain = Callable[[np.ndarray, int], nn.Module]   # (training ids, seed) -> trained model


class Job(NamedTuple):
    """One retrain: on training subset number ``subset`` (its ``ids``) with ``seed``."""

    subset: int         # LDS: the random subset; leave-out: 0 all, 1 + i the i-th removal
    seed: int
    ids: np.ndarray     # (kept,) training ids

    @property
    def chunk(self) -> int:
        """Its chunk number in ``out_dir`` (``chunk_{subset + 100,000 · seed}.npz``): the same
        for the same (subset, seed) whatever else a run holds, so a later run with more subsets
        or seeds finds the finished ones (subsets below 100,000)."""
        return self.subset + 100_000 * self.seed


class _Retrained:
    """Measurements of the queries under models retrained on given ids, one per :class:`Job`;
    with ``out_dir`` each finished job is a checksummed chunk, so a killed run resumes where it
    stopped and a run with other inputs is refused."""

    def __init__(self, retrain: Retrain, prompts: Sequence[Sequence[int]],
                 completions: Sequence[Sequence[int]], task: Task | None,
                 out_dir: str | os.PathLike | None, description: dict):
        self.retrain, self.prompts, self.completions = retrain, prompts, completions
        self.task = task or Task()
        queries = hashlib.sha256(json.dumps([list(map(int, p)) + [-1] + list(map(int, c)) for
                                             p, c in zip(prompts, completions)]).encode())
        self.store = ChunkStore(out_dir, dict(description, queries=queries.hexdigest()[:16],
                                              retrain=code_fingerprint(retrain)),
                                "retraining run") if out_dir else None

    def run(self, jobs: Sequence[Job], progress: bool, desc: str) -> np.ndarray:
        """(len(jobs), Q) f of every query after retraining on each job's (ids, seed)."""
        out = np.empty((len(jobs), len(self.prompts)))
        for j, job in enumerate(tqdm(jobs, desc=desc, unit="retrain", disable=not progress)):
            ids = np.asarray(job.ids, np.int64)
            key = np.append(ids, -1 - job.seed)                # ids and seed, one array
            done = self.store.read(job.chunk, key) if self.store else None
            if done is None:
                model = self.retrain(ids, job.seed)
                done = {"f": measure(model, self.prompts, self.completions, self.task)}
                if self.store:
                    self.store.write(job.chunk, key, **done)
            out[j] = done["f"]
        return out


@checked(minimum={"n": 1, "subsets": 2, "seed": 0}, within={"alpha": "(0, 1)"})
def lds_subsets(n: int, subsets: int = 50, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(subsets, n) bool: random training subsets of exactly round(alpha · n) sequences each."""
    if not 0 < round(alpha * n) < n:        # every subset empty, or all of them the corpus
        raise ValueError(f"lds_subsets(alpha={alpha}): alpha · n = {alpha * n:.3g} rounds to "
                         f"{round(alpha * n)} of the n={n} sequences; pick alpha so that a "
                         "subset holds some but not all of them")
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), dtype=bool)
    for m in range(subsets):
        masks[m, rng.choice(n, round(alpha * n), replace=False)] = True
    return masks


def bootstrap_interval(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """(low, high): the 95 % percentile bootstrap interval of the mean of ``values`` (resampled
    ``n_boot`` times with replacement, seeded)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@checked(minimum={"subsets": 2, "seeds": 0, "subset_seed": 0, "n_boot": 1},
         within={"alpha": "(0, 1)"}, distinct=("seeds",), nonempty=("seeds",))
def lds(retrain: Retrain, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
        scores: Mapping[str, np.ndarray], subsets: int = 50, alpha: float = 0.5,
        seeds: Sequence[int] = (0, 1), out_dir: str | os.PathLike | None = None,
        task: Task | None = None, subset_seed: int = 0, n_boot: int = 2000,
        progress: bool = True) -> pd.DataFrame:
    """Linear datamodeling score (Park et al. 2023) of each set of scores.

    Retrains on ``subsets`` random subsets S_m of a fraction ``alpha`` of the N training
    sequences (each with every seed of ``seeds``; the measurements are averaged over seeds),
    measures every query f_q, and correlates, per query, the predicted group effect
    Σ_{i∈S_m} τ_q(z_i) with the measured f_q(θ_{S_m}) over the subsets (Spearman).

    scores: {name: (Q, N) scores with scan's sign}; all are evaluated on the same retrains. A
        later call with the same ``out_dir`` adds strategies without retraining, and more
        subsets or seeds by retraining only the new ones.
    Returns one row per name: lds (mean over queries), ci_low / ci_high (bootstrap 95 % over
    queries), queries (those whose f varied), subsets, seeds. ``.attrs``: "per_query"
    (Q × names), "measured" (subsets, Q), "predicted" {name: (subsets, Q)}, "masks".
    """
    scores = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    shapes = {v.shape for v in scores.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or \
            next(iter(shapes))[0] != len(prompts):
        raise ValueError(f"scores must all be (Q, N) with Q = {len(prompts)} queries; got "
                         f"{sorted(shapes)}")
    for k, v in scores.items():     # a NaN would drop its query from the mean, silently
        if not np.isfinite(v).all():
            q = int(np.flatnonzero(~np.isfinite(v).all(axis=1))[0])
            raise ValueError(f"scores[{k!r}] holds NaN or inf (query {q}); pass finite scores")
    n = next(iter(shapes))[1]
    masks = lds_subsets(n, subsets, alpha, subset_seed)
    runs = _Retrained(retrain, prompts, completions, task, out_dir,
                      dict(kind="lds", n=n, alpha=alpha, subset_seed=subset_seed))
    jobs = [Job(m, s, np.flatnonzero(mask)) for m, mask in enumerate(masks) for s in seeds]
    measured = runs.run(jobs, progress, "LDS").reshape(subsets, len(seeds), -1).mean(axis=1)
    predicted = {k: masks.astype(np.float64) @ v.T for k, v in scores.items()}   # (M, Q)
    varied = measured.std(axis=0) > 0
    per_query = pd.DataFrame({k: [spearman(p[:, q], measured[:, q]) if varied[q] else np.nan
                                  for q in range(len(prompts))] for k, p in predicted.items()})
    rows = []
    for k in scores:
        v = per_query[k].dropna().to_numpy()
        low, high = bootstrap_interval(v, n_boot, subset_seed)
        rows.append(dict(strategy=k, lds=float(v.mean()), ci_low=low, ci_high=high,
                         queries=len(v), subsets=subsets, seeds=len(seeds)))
    out = pd.DataFrame(rows).set_index("strategy")
    out.attrs.update(per_query=per_query, measured=measured, predicted=predicted, masks=masks)
    return out


@checked(minimum={"k": 1})
def top_ids(scores: np.ndarray, k: int, negative: bool = False) -> np.ndarray:
    """(Q, k) ids of the k largest scores per query (smallest with ``negative``)."""
    scores = -np.asarray(scores) if negative else np.asarray(scores)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@checked(minimum={"n": 1, "ks": 1, "seeds": 0}, distinct=("ks", "seeds"),
         nonempty=("ks", "seeds"))
def leave_out(retrain: Retrain, prompts: Sequence[Sequence[int]],
              completions: Sequence[Sequence[int]], rankings: Mapping[str, np.ndarray], n: int,
              ks: Sequence[int] = (10, 50, 100), seeds: Sequence[int] = (0,),
              out_dir: str | os.PathLike | None = None, task: Task | None = None,
              progress: bool = True) -> pd.DataFrame:
    """Retrain without each query's top-k sequences of each ranking and measure the query.

    rankings: {method: (Q, ≥ max(ks)) training ids, most influential first} — e.g.
        :func:`top_ids` of EK-FAC scores, BM25's top hits, a random permutation.
    Each (method, query, k, seed) is one retrain on the other n − k sequences, compared with
    a retrain on all n with the same seed (so only the data differ). Returns one row per
    (method, query, k, seed): f_full, f_removed, delta = f_removed − f_full (nats; negative
    when the removed sequences supported the completion).
    """
    rankings = {m: np.asarray(r) for m, r in rankings.items()}
    for m, r in rankings.items():
        as_ids(r, n, f"rankings[{m!r}]")   # an id out of range would remove nothing, silently
        if max(ks) >= n:
            raise ValueError(f"leave_out(ks={tuple(ks)}): each k must be below n={n}, the "
                             "training sequences (something must remain to train on)")
        if r.ndim != 2 or r.shape[0] != len(prompts) or r.shape[1] < max(ks):
            raise ValueError(f"ranking {m!r} has shape {r.shape}; need (Q={len(prompts)}, "
                             f"≥ {max(ks)}) ids per query")
    runs = _Retrained(retrain, prompts, completions, task, out_dir,
                      dict(kind="leave_out", n=n, ks=list(ks), seeds=list(seeds),
                           rankings={m: hashlib.sha256(r.tobytes()).hexdigest()[:16]
                                     for m, r in rankings.items()}))
    everything = np.arange(n)
    removals = [(m, q, k) for m in rankings for q in range(len(prompts)) for k in ks]
    cases = [(m, q, k, s) for m, q, k in removals for s in seeds]
    jobs = [Job(0, s, everything) for s in seeds] + [
        Job(1 + i, s, np.setdiff1d(everything, rankings[m][q, :k]))
        for i, (m, q, k) in enumerate(removals) for s in seeds]
    f = runs.run(jobs, progress, "leave-k-out")
    full = dict(zip(seeds, f[:len(seeds)]))
    return pd.DataFrame([dict(method=m, query=q, k=k, seed=s, f_full=full[s][q],
                              f_removed=f[len(seeds) + j, q],
                              delta=f[len(seeds) + j, q] - full[s][q])
                         for j, (m, q, k, s) in enumerate(cases)])


@checked(minimum={"lr": 0.0})
def tail_patch(model: nn.Module, corpus: Corpus, prompts: Sequence[Sequence[int]],
               completions: Sequence[Sequence[int]], candidates: Mapping[str, np.ndarray],
               lr: float = 1e-4, task: Task | None = None, progress: bool = True
               ) -> pd.DataFrame:
    """Tail-patching (TrackStar, Chang et al. 2024): from the final weights, one SGD step of
    size ``lr`` on the training loss of one candidate sequence, then measure every query.
    No retraining, so it works on any model.

    candidates: {method: (Q, k) training ids per query}. Every distinct id is patched once and
    measured on all queries. Returns one row per (method, query, rank): id, delta = f after −
    f before (nats). In the small-step limit plain SGD's response is lr · ⟨∇f, ∇log p(z)⟩, the
    un-preconditioned gradient product: it is a local check, blind to curvature.
    """
    task = task or Task()
    candidates = {m: np.asarray(c) for m, c in candidates.items()}
    for m, c in candidates.items():
        as_ids(c, len(corpus), f"candidates[{m!r}]")
        if c.ndim != 2 or c.shape[0] != len(prompts) or not c.shape[1]:
            raise ValueError(f"candidates[{m!r}] has shape {c.shape}; need (Q={len(prompts)}, "
                             "k ≥ 1) training ids per query")
    if not candidates:
        raise ValueError("no candidates: pass {method: (Q, k) training ids per query}")
    distinct = np.unique(np.concatenate([c.ravel() for c in candidates.values()]))
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    before = measure(model, prompts, completions, task)
    delta = {}
    with eval_mode(model):
        for i in tqdm(distinct, desc="tail-patch", unit="seq", disable=not progress):
            batch = to_device(next(corpus.batches(1, ids=[int(i)])), saved[0].device)
            grads = torch.autograd.grad(
                task.training_loss(task.forward(model, batch), batch).sum(), params,
                allow_unused=True)
            try:
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(lr * g)
                delta[int(i)] = measure(model, prompts, completions, task) - before
            finally:                          # the final weights again, even on an interrupt
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
    return pd.DataFrame([dict(method=m, query=q, rank=r, id=int(i), delta=delta[int(i)][q])
                         for m, c in candidates.items() for q in range(len(c))
                         for r, i in enumerate(c[q])])
