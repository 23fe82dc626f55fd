"""Exact references on a tiny model: the damped Fisher by plain autograd, exact influence, and
how close each curvature strategy (identity, K-FAC, EK-FAC, LiSSA) comes to it (:func:`compare`).

The exact Fisher is built from per-sequence pseudo-gradients computed with plain autograd
(independently of the hooks), with the *same* sampled labels as :func:`fit_factors` (same seed,
same batches, same order):

    G = (1/N) Σ_n g_n g_nᵀ             g_n = ∇ fisher_loss(z_n), flattened over tracked layers
    score(q, m) = ∇f_qᵀ (G + λ)⁻¹ ∇ log p(z_m)

with the sign of :func:`~influence_nb.scoring.scan`: positive when up-weighting z_m raises f_q,
and λ_ℓ = damping_factor · tr(G_ℓℓ) / P_ℓ per layer, which is exactly EK-FAC's default (mean of
its Λ_ℓ, as Λ_ℓ is the diagonal of G_ℓℓ in a rotated basis). Parameters are flattened layer by
layer, each layer's (out, in+1) gradient in row-major order. Dense matrices are P × P, so keep P
to a few thousand.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from ..batching import prepared, source
from ..checks import checked
from ..curvature import STRATEGIES, FactorArgs, Factors, fit_factors
from ..hooks import eval_mode
from ..layers import TrackedLayer, find_layers
from ..passes import loss_values
from ..queries import query_gradients
from ..task import Task
from .agreement import pearson, spearman


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


@checked(minimum={"depth": 1, "batch_size": 1, "scale_factor": 0.0, "seed": 0})
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


@checked(minimum={"lissa_depth": 0, "lissa_batch": 1})
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
              for s in STRATEGIES}
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
