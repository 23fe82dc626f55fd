"""Do the scores hold? Influence estimates checked against ground truth.

- On a tiny model, against exact linear algebra: the exact damped Fisher, exact influence,
  and how close each curvature strategy (identity, K-FAC, EK-FAC, LiSSA) comes to it
  (:func:`compare`), and against the proximal Bregman response function that influence
  functions approximate (:func:`pbrf`).
- On any model, against counterfactual truth: the linear datamodeling score over retrained
  random subsets (:func:`lds`), retraining without each query's top-k (:func:`leave_out`), and
  one-step tail-patching of the final weights (:func:`tail_patch`). Retraining goes through a
  user-supplied ``(ids, seed) -> model`` function (:class:`~influence_nb.training.Retrainer`
  for a Hugging Face causal LM and a recipe); finished retrains are kept on disk.

Exact references. The exact Fisher is built from per-sequence pseudo-gradients computed with
plain autograd (independently of the hooks), with the *same* sampled labels as
:func:`fit_factors` (same seed, same batches, same order):

    G = (1/N) Σ_n g_n g_nᵀ             g_n = ∇ fisher_loss(z_n), flattened over tracked layers
    score(q, m) = ∇f_qᵀ (G + λ)⁻¹ ∇ log p(z_m)

with the sign of :func:`~influence_nb.scoring.scan`: positive when up-weighting z_m raises f_q.

with λ_ℓ = damping_factor · tr(G_ℓℓ) / P_ℓ per layer, which is exactly EK-FAC's default
(mean of its Λ_ℓ, as Λ_ℓ is the diagonal of G_ℓℓ in a rotated basis). Parameters are flattened
layer by layer, each layer's (out, in+1) gradient in row-major order. Dense matrices are
P × P, so keep P to a few thousand.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batching import as_ids, prepared, source
from .curvature import FactorArgs, Factors, fit_factors
from .data import Corpus
from .hooks import eval_mode
from .layers import TrackedLayer, find_layers
from .passes import loss_values
from .queries import query_gradients
from .store import ChunkStore
from .task import Task, get, measure, query_batch, to_device


def spearman(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    return pd.Series(np.asarray(x)).corr(pd.Series(np.asarray(y)), method="spearman")


def pearson(x: np.ndarray | Tensor, y: np.ndarray | Tensor) -> float:
    """Pearson correlation."""
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def flatten(grads: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    """{name: (..., out, in+1)} -> (..., P) float64, layers in ``names`` order, row-major."""
    return torch.cat([grads[n].double().flatten(-2) for n in names], dim=-1)


def per_example_gradients(model: nn.Module, data: object, layers: Sequence[TrackedLayer],
                          task: Task, args: FactorArgs, loss: str = "fisher") -> Tensor:
    """(N, P) float64 per-sequence gradients by plain autograd, one backward per sequence —
    independent of the hooks and of the pass's consumers.

    ``loss``: "fisher" (pseudo-loss, labels drawn exactly as :func:`fit_factors` draws them
    with ``args.seed``: same batches, same order) or "loglik" (Σ_t log p of the real tokens,
    the gradient every score uses).
    """
    src = source(data, args.batch_size, max_examples=args.max_examples, tokens=args.batch_tokens)
    params = [p for layer in layers for p in layer.parameters()]
    rows = []
    with eval_mode(model), torch.enable_grad():
        for k, _, batch in prepared(model, src, args.max_examples):
            values = loss_values(task, loss, task.forward(model, batch), batch, args.seed, k)
            for b in range(len(values)):
                grads = iter(torch.autograd.grad(values[b], params, retain_graph=True))
                rows.append(torch.cat([layer.as_matrix([next(grads) for _ in layer.parameters()])
                                       .double().flatten() for layer in layers]))
    return torch.stack(rows)


def exact_damping(G: Tensor, layers: Sequence[TrackedLayer], args: FactorArgs) -> Tensor:
    """(P,) λ per parameter: the absolute override, or factor · tr(G_ℓℓ)/P_ℓ per layer."""
    lam = []
    start = 0
    for layer in layers:
        P = layer.shape[0] * layer.shape[1]
        block = G.diagonal()[start:start + P]
        value = args.damping if args.damping is not None else args.damping_factor * block.mean()
        lam.append(torch.full((P,), float(value), dtype=G.dtype))
        start += P
    return torch.cat(lam)


def lissa(J: Tensor, V: Tensor, lam: Tensor, depth: int = 5000, batch_size: int = 32,
          scale_factor: float = 10.0, seed: int = 0) -> Tensor:
    """LiSSA estimate of (G + diag(lam))⁻¹ V, G = JᵀJ/N, with mini-batch Fisher-vector products.

    J: (N, P) per-sequence pseudo-gradients; V: (P, Q). Recursion (Agarwal et al. 2017):
    x ← V + x − (G_B x + λx)/scale, estimate x/scale, where scale = ``scale_factor`` × the top
    eigenvalue of G + λ (power iteration; the margin tames the mini-batch noise). On a real
    model each step costs one forward + backward over ``batch_size`` sequences.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(J.shape[1], 1, generator=gen, dtype=J.dtype)
    for _ in range(50):
        v = J.T @ (J @ v) / len(J)
        top = v.norm()
        v = v / top
    scale = scale_factor * (top.item() + lam.max().item())
    x = V.clone()
    for _ in range(depth):
        JB = J[torch.randint(len(J), (batch_size,), generator=gen)]
        x = V + x - (JB.T @ (JB @ x) / batch_size + lam[:, None] * x) / scale
    return x / scale


def compare(model: nn.Module, data: object, prompts: Sequence[Sequence[int]],
            completions: Sequence[Sequence[int]], args: FactorArgs | None = None,
            task: Task | None = None, lissa_depth: int = 5000, lissa_batch: int = 32) -> dict:
    """Influence of every training sequence on every query: exact vs each strategy.

    ``data`` as for :func:`fit_factors` (re-iterable). Two exact references:
    "layerwise" keeps the diagonal blocks G_ℓℓ (the structure every factored strategy assumes,
    so it measures the Kronecker approximation itself); "full" keeps the cross-layer blocks.
    Returns {"spearman" | "pearson": {reference: {strategy: mean over queries}},
    "exact": {reference: (Q, N)}, "scores": {strategy: (Q, N)}, "lissa": {seconds, depth,
    batch_size, passes (data passes a real model would pay)}, "factors": Factors, "n_params",
    "G": (P, P) sampled Fisher, "lam": (P,) damping}. Sequences are in pass order.
    Scores have :func:`~influence_nb.scoring.scan`'s sign and values. ``lissa_depth`` 0 leaves
    LiSSA out (no "lissa" entries).
    """
    args, task = args or FactorArgs(progress=False), task or Task()
    layers = find_layers(model, args.layers)
    names = [layer.name for layer in layers]
    factors: Factors = fit_factors(model, data, replace(args, strategy="ekfac"), task)
    J = per_example_gradients(model, data, layers, task, args, "fisher")      # (N, P)
    L = per_example_gradients(model, data, layers, task, args, "loglik")      # (N, P)
    q = query_gradients(model, prompts, completions, layers=names, task=task)
    F = flatten(q.grads, names)                                                # (Q, P)
    G = J.T @ J / len(J)
    within = torch.block_diag(*[torch.ones(o * i, o * i, dtype=G.dtype)
                                for o, i in factors.shapes.values()])
    lam = exact_damping(G, layers, args)
    exact = {ref: torch.linalg.solve(M + torch.diag(lam), F.T).T @ L.T        # (Q, N)
             for ref, M in (("layerwise", G * within), ("full", G))}
    scores = {s: flatten(factors.precondition(q.grads, s), names) @ L.T
              for s in ("identity", "kfac", "ekfac")}
    report = {"exact": exact, "scores": scores, "factors": factors, "n_params": G.shape[0],
              "G": G, "lam": lam}
    if lissa_depth:
        start = time.perf_counter()
        scores["lissa"] = lissa(J, F.T, lam, lissa_depth, lissa_batch, seed=args.seed).T @ L.T
        report["lissa"] = {"seconds": time.perf_counter() - start, "depth": lissa_depth,
                           "batch_size": lissa_batch, "passes": lissa_depth * lissa_batch / len(J)}
    for name, corr in (("spearman", spearman), ("pearson", pearson)):
        report[name] = {ref: {s: float(np.mean([corr(ex[k], v[k]) for k in range(len(ex))]))
                              for s, v in scores.items()}
                        for ref, ex in exact.items()}
    return report


def toy_problem(n_sequences: int = 2048, train_steps: int = 0, seed: int = 0,
                dtype: torch.dtype = torch.float64, n_queries: int = 12
                ) -> tuple[nn.Module, list[dict], list[list[int]], list[list[int]]]:
    """A tiny GPT-2 (d=8, 2 layers, ~1.3k parameters in its MLPs) and a Markov-chain corpus.

    -> (model, batches of 16 right-padded sequences of 6-12 tokens, prompts, completions);
    ``train_steps`` of Adam on the chain first (0: random initialisation). For validation.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    V, T = 24, 12
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=8, n_inner=16,
                                       n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    transition = torch.softmax(3 * torch.randn(V, V), dim=-1)     # (V, V) peaked next-token law
    gen = torch.Generator().manual_seed(seed + 1)

    def chain(n: int, t: int) -> Tensor:                             # (n, t) token ids
        x = torch.zeros(n, t, dtype=torch.long)
        x[:, 0] = torch.randint(V, (n,), generator=gen)
        for k in range(1, t):
            x[:, k] = torch.multinomial(transition[x[:, k - 1]], 1, generator=gen)[:, 0]
        return x

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        x = chain(32, T)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model = model.to(dtype).eval()
    batches = []
    for _ in range(n_sequences // 16):
        x = chain(16, T)
        lengths = torch.randint(T // 2, T + 1, (16, 1), generator=gen)
        mask = (torch.arange(T) < lengths).long()
        batches.append({"input_ids": x * mask, "attention_mask": mask})
    q = chain(n_queries, 8)
    return model, batches, q[:, :5].tolist(), q[:, 5:].tolist()


# -- counterfactual truth: retraining, tail-patching, the proximal Bregman response ----------

Retrain = Callable[[np.ndarray, int], nn.Module]   # (training ids, seed) -> trained model


class _Retrained:
    """Measurements of the queries under models retrained on given ids, one job per
    (key, ids, seed); with ``out_dir`` each finished job is a checksummed chunk, so a killed
    run resumes where it stopped and a run with other inputs is refused."""

    def __init__(self, retrain: Retrain, prompts: Sequence[Sequence[int]],
                 completions: Sequence[Sequence[int]], task: Task | None,
                 out_dir: str | os.PathLike | None, description: dict):
        self.retrain, self.prompts, self.completions = retrain, prompts, completions
        self.task = task or Task()
        queries = hashlib.sha256(json.dumps([list(map(int, p)) + [-1] + list(map(int, c)) for
                                             p, c in zip(prompts, completions)]).encode())
        description = dict(description, queries=queries.hexdigest()[:16],
                           retrain=getattr(retrain, "fingerprint", type(retrain).__name__))
        self.store = ChunkStore(out_dir, description, "retraining run") if out_dir else None

    def run(self, jobs: Sequence[tuple[int, np.ndarray, int]], progress: bool, desc: str
            ) -> np.ndarray:
        """(len(jobs), Q) f of every query after retraining on each job's (ids, seed); a job's
        number names its chunk, so a later run with more jobs keeps the finished ones."""
        out = np.empty((len(jobs), len(self.prompts)))
        for j, (number, ids, seed) in enumerate(tqdm(jobs, desc=desc, unit="retrain",
                                                     disable=not progress)):
            key = np.append(np.asarray(ids, np.int64), -1 - seed)   # ids and seed, one array
            done = self.store.read(number, key) if self.store else None
            if done is None:
                model = self.retrain(np.asarray(ids, np.int64), seed)
                done = {"f": measure(model, self.prompts, self.completions, self.task)}
                if self.store:
                    self.store.write(number, key, **done)
            out[j] = done["f"]
        return out


def lds_subsets(n: int, subsets: int = 50, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(subsets, n) bool: random training subsets of exactly round(alpha · n) sequences each."""
    if not 0 < alpha < 1 or subsets < 2:
        raise ValueError(f"need 0 < alpha < 1 and at least 2 subsets (got alpha={alpha}, "
                         f"subsets={subsets})")
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), dtype=bool)
    for m in range(subsets):
        masks[m, rng.choice(n, round(alpha * n), replace=False)] = True
    return masks


def _bootstrap(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (resampled with replacement)."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


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
    n = next(iter(shapes))[1]
    masks = lds_subsets(n, subsets, alpha, subset_seed)
    runs = _Retrained(retrain, prompts, completions, task, out_dir,
                      dict(kind="lds", n=n, alpha=alpha, subset_seed=subset_seed))
    # subset m retrained with seed s is job m + 100,000 s: more subsets or seeds later reuse it
    jobs = [(m + 100_000 * s, np.flatnonzero(mask), s) for m, mask in enumerate(masks)
            for s in seeds]
    measured = runs.run(jobs, progress, "LDS").reshape(subsets, len(seeds), -1).mean(axis=1)
    predicted = {k: masks.astype(np.float64) @ v.T for k, v in scores.items()}   # (M, Q)
    varied = measured.std(axis=0) > 0
    per_query = pd.DataFrame({k: [spearman(p[:, q], measured[:, q]) if varied[q] else np.nan
                                  for q in range(len(prompts))] for k, p in predicted.items()})
    rows = []
    for k in scores:
        v = per_query[k].dropna().to_numpy()
        low, high = _bootstrap(v, n_boot, subset_seed)
        rows.append(dict(strategy=k, lds=float(v.mean()), ci_low=low, ci_high=high,
                         queries=len(v), subsets=subsets, seeds=len(seeds)))
    out = pd.DataFrame(rows).set_index("strategy")
    out.attrs.update(per_query=per_query, measured=measured, predicted=predicted, masks=masks)
    return out


def top_ids(scores: np.ndarray, k: int, negative: bool = False) -> np.ndarray:
    """(Q, k) ids of the k largest scores per query (smallest with ``negative``)."""
    scores = -np.asarray(scores) if negative else np.asarray(scores)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


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
    rankings = {m: np.asarray(r, np.int64) for m, r in rankings.items()}
    for m, r in rankings.items():
        if r.ndim != 2 or r.shape[0] != len(prompts) or r.shape[1] < max(ks):
            raise ValueError(f"ranking {m!r} has shape {r.shape}; need (Q={len(prompts)}, "
                             f"≥ {max(ks)}) ids per query")
    runs = _Retrained(retrain, prompts, completions, task, out_dir,
                      dict(kind="leave_out", n=n, ks=list(ks), seeds=list(seeds),
                           rankings={m: hashlib.sha256(r.tobytes()).hexdigest()[:16]
                                     for m, r in rankings.items()}))
    everything = np.arange(n)
    cases = [(m, q, k, s) for m in rankings for q in range(len(prompts)) for k in ks
             for s in seeds]
    jobs = [(everything, s) for s in seeds] + [
        (np.setdiff1d(everything, rankings[m][q, :k]), s) for m, q, k, s in cases]
    jobs = [(j, ids, s) for j, (ids, s) in enumerate(jobs)]
    f = runs.run(jobs, progress, "leave-k-out")
    full = dict(zip(seeds, f[:len(seeds)]))
    return pd.DataFrame([dict(method=m, query=q, k=k, seed=s, f_full=full[s][q],
                              f_removed=f[len(seeds) + j, q],
                              delta=f[len(seeds) + j, q] - full[s][q])
                         for j, (m, q, k, s) in enumerate(cases)])


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
    candidates = {m: np.asarray(c, np.int64) for m, c in candidates.items()}
    distinct = np.unique(np.concatenate([c.ravel() for c in candidates.values()]))
    as_ids(distinct, len(corpus))
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


def _merged(batches: Iterable[object], max_rows: int = 4096) -> Iterator[object]:
    """Consecutive Mapping batches of one sequence length joined (up to ``max_rows`` rows):
    an objective evaluated over the whole corpus many times pays one model call per group."""
    group: list[Mapping] = []
    for batch in batches:
        if group and (not isinstance(batch, Mapping) or get(batch, "input_ids").shape[1] !=
                      get(group[0], "input_ids").shape[1] or
                      sum(len(get(g, "input_ids")) for g in group) >= max_rows):
            yield {k: torch.cat([g[k] for g in group]) for k in group[0]}
            group = []
        if isinstance(batch, Mapping):
            group.append(batch)
        else:
            yield batch
    if group:
        yield {k: torch.cat([g[k] for g in group]) for k in group[0]}


def pbrf(model: nn.Module, data: object, prompts: Sequence[Sequence[int]],
         completions: Sequence[Sequence[int]], train_ids: Sequence[int],
         args: FactorArgs | None = None, task: Task | None = None, eps: float | None = None,
         lissa_depth: int = 0, max_iter: int = 50, progress: bool = True) -> pd.DataFrame:
    """The proximal Bregman response function (Bae et al. 2022; the paper's §5.1) of the
    tracked layers' weights, against each influence estimator, on a tiny model.

    For training sequence z_m the PBRF minimiser over the tracked weights θ is

        θ(ε) = argmin (1/N) Σ_n Σ_t KL(p_θs(·|z_n,<t) ‖ p_θ(·|z_n,<t)) + ε L(z_m, θ)
                      + Σ_ℓ (λ_ℓ / 2) ‖θ_ℓ − θs_ℓ‖²

    (the Bregman divergence of the cross-entropy is this KL; λ_ℓ is the damping of ``args``).
    Its response of a query to up-weighting z_m, (f(θ(+ε)) − f(θ(−ε))) / 2ε, is what
    influence functions approximate: scan's score ∇fᵀ(G + λ)⁻¹∇log p(z_m) is its ε → 0 limit
    with G the Gauss–Newton Hessian. Solved by L-BFGS in float64, in variables whitened by the
    sampled Fisher (so it converges in a few dozen steps); ``eps`` defaults to 1/N.

    ``train_ids``: positions in the pass order of ``data`` (plain batches: their order).
    Returns one row per (query, train id): pbrf, one column per estimator (identity, kfac,
    ekfac, exact = the damped sampled Fisher, lissa when ``lissa_depth``), and the solver's
    relative gradient norm at its end (``residual``). ``.attrs["correlations"]``: Pearson and
    Spearman of each estimator against the PBRF, mean over queries.
    """
    args, task = args or FactorArgs(progress=False), task or Task()
    report = compare(model, data, prompts, completions, args, task, lissa_depth)
    layers = find_layers(model, args.layers)
    G, lam = report["G"], report["lam"]
    chol = torch.linalg.cholesky(G + torch.diag(lam))          # M = C Cᵀ, θ − θs = C⁻ᵀ u
    batches, where = [], {}
    with torch.no_grad(), eval_mode(model):
        for batch in _merged(b for _, _, b in prepared(model, source(data, args.batch_size,
                                                                        tokens=args.batch_tokens),
                                                        args.max_examples)):
            logits = task.forward(model, batch)
            batches.append((batch, torch.log_softmax(logits.double(), -1), task.loss_mask(batch)))
            for b in range(len(logits)):
                where[len(where)] = (len(batches) - 1, b)
    N = len(where)
    eps = eps if eps is not None else 1.0 / N
    names = {id(p): n for n, p in model.named_parameters()}
    base = {names[id(p)]: p.detach().double() for layer in layers for p in layer.parameters()}
    sizes = [layer.shape[0] * layer.shape[1] for layer in layers]
    queries = query_batch(prompts, completions).to(next(model.parameters()).device)

    def step(u: Tensor) -> Tensor:
        """(P,) θ − θs of whitened variables u."""
        return torch.linalg.solve_triangular(chol.T, u[:, None], upper=True)[:, 0]

    def weights(d: Tensor) -> dict[str, Tensor]:
        """{parameter name: θs + its part of d}, d flattened as :func:`flatten` orders it."""
        out = {}
        for layer, D in zip(layers, d.split(sizes)):
            for p, delta in zip(layer.parameters(), layer.split(D.view(layer.shape))):
                out[names[id(p)]] = base[names[id(p)]] + delta
        return out

    def run(params: dict[str, Tensor], batch: object) -> Tensor:
        return task.forward(lambda **kw: torch.func.functional_call(model, params, kwargs=kw),
                            batch)

    def objective(u: Tensor, m: int, sign: float) -> Tensor:
        d = step(u)
        params, total = weights(d), 0.5 * (lam * d * d).sum()
        for b, (batch, logp_s, mask) in enumerate(batches):
            logp = torch.log_softmax(run(params, batch).double(), -1)
            kl = (logp_s.exp() * (logp_s - logp)).sum(-1)                   # (B, T)
            total = total + (kl * mask).sum() / N
            if b == where[m][0]:
                nll = task.training_loss(logp, batch)[where[m][1]]
                total = total + sign * eps * nll
        return total

    def response(m: int, sign: float) -> tuple[np.ndarray, float]:
        u = torch.zeros(len(lam), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([u], lr=1, max_iter=max_iter, tolerance_grad=1e-14,
                                tolerance_change=1e-16, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            value = objective(u, m, sign)
            value.backward()
            return value

        g0 = torch.autograd.grad(objective(u, m, sign), u)[0].norm()
        opt.step(closure)
        residual = float(torch.autograd.grad(objective(u, m, sign), u)[0].norm() / g0)
        with torch.no_grad():
            f = task.measurement(run(weights(step(u.detach())), queries), queries)
        return f.double().cpu().numpy(), residual

    rows = []
    with eval_mode(model), torch.enable_grad():
        for m in tqdm(as_ids(train_ids, N), desc="PBRF", unit="seq", disable=not progress):
            (f_plus, r1), (f_minus, r2) = response(int(m), 1.0), response(int(m), -1.0)
            value = (f_plus - f_minus) / (2 * eps)
            for q in range(len(prompts)):
                row = dict(query=q, id=int(m), pbrf=float(value[q]), residual=max(r1, r2))
                row.update({s: float(v[q, m]) for s, v in report["scores"].items()})
                row["exact"] = float(report["exact"]["full"][q, m])
                rows.append(row)
    out = pd.DataFrame(rows)
    estimators = [c for c in out.columns if c not in ("query", "id", "pbrf", "residual")]
    out.attrs["correlations"] = pd.DataFrame(
        {name: {s: float(np.mean([corr(g["pbrf"], g[s]) for _, g in out.groupby("query")]))
                for s in estimators} for name, corr in (("pearson", pearson),
                                                        ("spearman", spearman))})
    return out
