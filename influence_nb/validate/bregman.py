"""The proximal Bregman response function (Bae et al. 2022; the paper's §5.1): what influence
functions approximate, solved on a tiny model and set against each estimator (:func:`pbrf`).

For training sequence z_m the PBRF minimiser over the tracked weights θ is

    θ(ε) = argmin (1/N) Σ_n Σ_t KL(p_θs(·|z_n,<t) ‖ p_θ(·|z_n,<t)) + ε L(z_m, θ)
                  + Σ_ℓ (λ_ℓ / 2) ‖θ_ℓ − θs_ℓ‖²

(the Bregman divergence of the cross-entropy is this KL; λ_ℓ is the damping of the factor
arguments). Its response of a query to up-weighting z_m, (f(θ(+ε)) − f(θ(−ε))) / 2ε, is what
influence functions approximate: scan's score ∇fᵀ(G + λ)⁻¹∇log p(z_m) is its ε → 0 limit with G
the Gauss–Newton Hessian. Solved by L-BFGS in float64, in variables u whitened by the damped
sampled Fisher, θ − θs = C⁻ᵀ u with C Cᵀ = G + diag(λ), so it converges in a few dozen steps.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..batching import prepared, source
from ..checks import as_ids, checked
from ..curvature import FactorArgs
from ..hooks import eval_mode
from ..layers import TrackedLayer, find_layers
from ..progress import tqdm
from ..task import Task, get, query_batch
from .agreement import pearson, spearman
from .exact import compare


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


class Anchor(NamedTuple):
    """One (merged) training batch as the trained weights θs see it."""

    batch: object
    logp: Tensor        # (B, T, V) float64 log p_θs(·|z_<t)
    mask: Tensor        # (B, T) the positions the loss scores


def anchors(model: nn.Module, data: object, args: FactorArgs, task: Task
            ) -> tuple[list[Anchor], list[tuple[int, int]]]:
    """The training batches of ``data`` in pass order under θs, and where each sequence is:
    n -> (its anchor, its row)."""
    batches: list[Anchor] = []
    where: list[tuple[int, int]] = []
    src = source(data, args.batch_size, tokens=args.batch_tokens)
    with torch.no_grad(), eval_mode(model):
        for batch in _merged(b for _, _, b in prepared(model, src, args.max_examples)):
            logits = task.forward(model, batch)
            batches.append(Anchor(batch, torch.log_softmax(logits.double(), -1),
                                  task.loss_mask(batch)))
            where += [(len(batches) - 1, b) for b in range(len(logits))]
    return batches, where


class Proximal:
    """The PBRF objective of the tracked layers' weights around θs, in whitened variables u.

    G: (P, P) sampled Fisher and lam: (P,) damping, as :func:`compare` reports them; eps: the
    up-weighting ε of one training sequence.
    """

    def __init__(self, model: nn.Module, layers: Sequence[TrackedLayer], task: Task,
                 batches: Sequence[Anchor], where: Sequence[tuple[int, int]], G: Tensor,
                 lam: Tensor, eps: float):
        self.model, self.layers, self.task = model, layers, task
        self.batches, self.where, self.lam, self.eps = batches, where, lam, eps
        self.chol = torch.linalg.cholesky(G + torch.diag(lam))          # (P, P) lower: C
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.base = {self.names[id(p)]: p.detach().double()               # θs, float64
                     for layer in layers for p in layer.parameters()}
        self.sizes = [layer.shape[0] * layer.shape[1] for layer in layers]

    def delta(self, u: Tensor) -> Tensor:
        """(P,) θ − θs = C⁻ᵀ u."""
        return torch.linalg.solve_triangular(self.chol.T, u[:, None], upper=True)[:, 0]

    def weights(self, d: Tensor) -> dict[str, Tensor]:
        """{parameter name: θs + its part of d}, d flattened as :func:`flatten` orders it."""
        out = {}
        for layer, D in zip(self.layers, d.split(self.sizes)):
            for p, part in zip(layer.parameters(), layer.split(D.view(layer.shape))):
                out[self.names[id(p)]] = self.base[self.names[id(p)]] + part
        return out

    def logits(self, params: dict[str, Tensor], batch: object) -> Tensor:
        """The model's logits with ``params`` in place of its tracked weights."""
        call = lambda **kw: torch.func.functional_call(self.model, params, kwargs=kw)  # noqa: E731
        return self.task.forward(call, batch)

    def __call__(self, u: Tensor, m: int, sign: float) -> Tensor:
        """The objective at u with training sequence m up-weighted by sign · ε (a scalar)."""
        d = self.delta(u)
        params, total = self.weights(d), 0.5 * (self.lam * d * d).sum()
        for b, (batch, logp_s, mask) in enumerate(self.batches):
            logp = torch.log_softmax(self.logits(params, batch).double(), -1)
            kl = (logp_s.exp() * (logp_s - logp)).sum(-1)                   # (B, T)
            total = total + (kl * mask).sum() / len(self.where)
            if b == self.where[m][0]:
                nll = self.task.training_loss(logp, batch)[self.where[m][1]]
                total = total + sign * self.eps * nll
        return total

    def solve(self, m: int, sign: float, max_iter: int) -> tuple[Tensor, float]:
        """(P,) the minimiser u by L-BFGS from 0, and its gradient norm relative to the start's."""
        u = torch.zeros(len(self.lam), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([u], lr=1, max_iter=max_iter, tolerance_grad=1e-14,
                                tolerance_change=1e-16, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            value = self(u, m, sign)
            value.backward()
            return value

        g0 = torch.autograd.grad(self(u, m, sign), u)[0].norm()
        opt.step(closure)
        residual = float(torch.autograd.grad(self(u, m, sign), u)[0].norm() / g0)
        return u.detach(), residual

    def response(self, m: int, queries: object, max_iter: int) -> tuple[np.ndarray, float]:
        """(Q,) (f(θ(+ε)) − f(θ(−ε))) / 2ε of the queries for training sequence m, and the
        larger of the two solves' residuals."""
        f, residuals = [], []
        for sign in (1.0, -1.0):
            u, residual = self.solve(m, sign, max_iter)
            with torch.no_grad():
                logits = self.logits(self.weights(self.delta(u)), queries)
                f.append(self.task.measurement(logits, queries).double().cpu().numpy())
            residuals.append(residual)
        return (f[0] - f[1]) / (2 * self.eps), max(residuals)


def _correlations(out: pd.DataFrame) -> pd.DataFrame:
    """Pearson and Spearman of each estimator's column against the PBRF, mean over queries."""
    estimators = [c for c in out.columns if c not in ("query", "id", "pbrf", "residual")]
    return pd.DataFrame(
        {name: {s: float(np.mean([corr(g["pbrf"], g[s]) for _, g in out.groupby("query")]))
                for s in estimators} for name, corr in (("pearson", pearson),
                                                        ("spearman", spearman))})


@checked(minimum={"eps": 0.0, "lissa_depth": 0, "max_iter": 1})
def pbrf(model: nn.Module, data: object, prompts: Sequence[Sequence[int]],
         completions: Sequence[Sequence[int]], train_ids: Sequence[int],
         args: FactorArgs | None = None, task: Task | None = None, eps: float | None = None,
         lissa_depth: int = 0, max_iter: int = 50, progress: bool = True) -> pd.DataFrame:
    """The PBRF of the tracked layers' weights against each influence estimator, on a tiny
    model (see the module's docstring); ``eps`` defaults to 1/N, ``max_iter`` bounds L-BFGS.

    ``train_ids``: positions in the pass order of ``data`` (plain batches: their order).
    Returns one row per (query, train id): pbrf, one column per estimator (identity, kfac,
    ekfac, exact = the damped sampled Fisher, lissa when ``lissa_depth``), and the solver's
    relative gradient norm at its end (``residual``). ``.attrs["correlations"]``: Pearson and
    Spearman of each estimator against the PBRF, mean over queries.
    """
    args, task = args or FactorArgs(progress=False), task or Task()
    report = compare(model, data, prompts, completions, args, task, lissa_depth)
    batches, where = anchors(model, data, args, task)
    objective = Proximal(model, find_layers(model, args.layers), task, batches, where,
                         report["G"], report["lam"], eps if eps is not None else 1.0 / len(where))
    queries = query_batch(prompts, completions).to(next(model.parameters()).device)
    rows = []
    with eval_mode(model), torch.enable_grad():
        for m in tqdm(as_ids(train_ids, len(where)), desc="PBRF", unit="seq",
                      disable=not progress):
            value, residual = objective.response(int(m), queries, max_iter)
            for q in range(len(prompts)):
                row = dict(query=q, id=int(m), pbrf=float(value[q]), residual=residual)
                row.update({s: float(v[q, m]) for s, v in report["scores"].items()})
                row["exact"] = float(report["exact"]["full"][q, m])
                rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["correlations"] = _correlations(out)
    return out
