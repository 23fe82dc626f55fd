"""Counterfactual checks: leave-one-out on a convex model where the influence function is exact,
the LDS machinery (group effect, resume), tail-patching where the answer is known, and the PBRF
on a tiny transformer."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from influence_nb import demo
from influence_nb.curvature import FactorArgs
from influence_nb.data import Corpus
from influence_nb.task import Task
from influence_nb.training import code_fingerprint
from influence_nb.validate import (compare, lds, lds_subsets, leave_out, pbrf, tail_patch,
                                   toy_problem, top_ids)

V, T, N, WD = 5, 8, 2000, 1e-2


class Bigram(nn.Module):
    """A bigram softmax LM: logits of z_t+1 = W onehot(z_t). Its loss is convex in W."""

    def __init__(self, W: torch.Tensor | None = None):
        super().__init__()
        self.proj = nn.Linear(V, V, bias=False, dtype=torch.float64)
        if W is not None:
            self.proj.weight.data.copy_(W)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.proj(nn.functional.one_hot(input_ids, V).double()))


def _chain(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    P = torch.softmax(2 * torch.randn(V, V, generator=gen), -1)
    x = torch.zeros(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(V, (n,), generator=gen)
    for t in range(1, T):
        x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=gen)[:, 0]
    return x


X = _chain(N, 0)
BATCHES = [{"input_ids": X[i:i + 100], "attention_mask": torch.ones(100, T, dtype=torch.long)}
           for i in range(0, N, 100)]


def _logp(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(x_t+1 | x_t) under the bigram table W (V, V)."""
    logp = torch.log_softmax(nn.functional.one_hot(x[..., :-1], V).double() @ W.T, -1)
    return logp.gather(-1, x[..., 1:, None]).sum()


def _train(ids: np.ndarray, seed: int = 0) -> Bigram:
    """The exact minimiser of (1/N) Σ_{n ∈ ids} L_n(W) + (WD/2) ‖W‖² (L-BFGS to convergence);
    the 1/N of the full corpus is kept, so leaving z_m out is up-weighting it by −1/N."""
    W = torch.zeros(V, V, dtype=torch.float64, requires_grad=True)
    x = X[torch.as_tensor(ids)]
    opt = torch.optim.LBFGS([W], max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -_logp(W, x) / N + WD / 2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Bigram(W.detach()).eval()


def test_leave_one_out_agrees_with_influence_on_a_convex_model():
    """Bigram LM with weight decay at its optimum: the exact influence −∇fᵀ H⁻¹ ∇log p(z_m) / N
    (H the Hessian of the training objective, by autograd) predicts leave-one-out retraining
    (through leave_out with k = 1) to within 2 %; the package's damped Fisher (damping = weight
    decay; its Gauss–Newton matrix is H here, sampled with one label per position) to 10 %."""
    model = _train(np.arange(N))
    W0 = model.proj.weight.detach().flatten()
    prompts, completions = [[0, 1], [3], [2, 4, 1]], [[2], [3, 3], [0]]
    H = torch.autograd.functional.hessian(
        lambda w: -_logp(w.view(V, V), X) / N + WD / 2 * (w * w).sum(), W0)
    grad = torch.func.grad(lambda w, x: _logp(w.view(V, V), x))
    L = torch.stack([grad(W0, X[m]) for m in range(N)])                   # (N, V²)
    F = torch.stack([grad(W0, torch.tensor(p + c)) - grad(W0, torch.tensor(p))
                     for p, c in zip(prompts, completions)])               # (Q, V²)
    exact = (torch.linalg.solve(H, F.T).T @ L.T).numpy()                   # (Q, N)
    args = FactorArgs(layers=["proj"], damping=WD, batch_size=100, progress=False)
    fisher = compare(model, BATCHES, prompts, completions, args, lissa_depth=0)["exact"]["full"]

    order = top_ids(exact, N)
    rankings = {r: order[:, [r]] for r in (0, 1, 2, N // 2, N - 2, N - 1)}
    out = leave_out(_train, prompts, completions, {str(r): v for r, v in rankings.items()}, N,
                    ks=(1,), progress=False)
    removed = [order[q, int(m)] for m, q in zip(out["method"], out["query"])]
    actual = out["delta"].to_numpy()
    for scores, tol in ((exact, 0.02), (fisher.numpy(), 0.1)):
        predicted = -scores[out["query"], removed] / N
        slope = (predicted @ actual) / (predicted @ predicted)
        assert np.corrcoef(predicted, actual)[0, 1] > 1 - tol / 2 and abs(slope - 1) < tol, slope
    assert (out.loc[out["method"] == "0", "delta"] < 0).all()   # the top proponent's absence

    # the PBRF of a linear model: its Bregman term's Hessian is H − λI, so the response to
    # up-weighting z_m is the exact influence itself (the solver and its sign, checked)
    ids = order[0, [0, 1, N // 2, N - 1]]
    response = pbrf(model, BATCHES, prompts, completions, ids, args, progress=False)
    expected = exact[response["query"], response["id"]]
    np.testing.assert_allclose(response["pbrf"], expected, rtol=1e-3,
                               atol=1e-3 * np.abs(exact).max())


class Linear(nn.Module):
    """A fake 'retrained model' whose measurement is exactly Σ_{i ∈ S} w_qi (+ seed noise)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value)


class Direct(Task):
    def forward(self, model, batch):
        return model.value

    def measurement(self, logits, batch):
        return logits


def test_lds_group_effect_is_the_sum_of_scores_and_a_resumed_run_equals_a_whole_one(tmp_path):
    rng = np.random.default_rng(0)
    Q, n = 4, 60
    w = rng.standard_normal((Q, n))
    calls = []

    def retrain(ids, seed):
        calls.append(seed)
        noise = 1e-3 * np.random.default_rng(seed).standard_normal(Q)
        return Linear(torch.tensor(w[:, ids].sum(1) + noise))

    prompts, completions = [[1]] * Q, [[2]] * Q
    scores = {"exact": w, "opposite": -w, "noise": rng.standard_normal((Q, n))}
    kw = dict(subsets=12, alpha=0.5, seeds=(0, 1), task=Direct(), progress=False)
    whole = lds(retrain, prompts, completions, scores, **kw)
    assert len(calls) == 24
    masks = lds_subsets(n, 12, 0.5)
    assert masks.sum(1).tolist() == [30] * 12
    np.testing.assert_allclose(whole.attrs["predicted"]["exact"], masks @ w.T)
    assert whole.loc["exact", "lds"] > 0.99 and whole.loc["opposite", "lds"] < -0.99
    assert whole.loc["exact", "ci_low"] <= whole.loc["exact", "lds"] <= whole.loc["exact",
                                                                                  "ci_high"]
    assert abs(whole.loc["noise", "lds"]) < 0.5

    def dies_after_5(ids, seed):                       # a run killed in the middle
        if len(calls) >= 24 + 5:
            raise KeyboardInterrupt
        return retrain(ids, seed)
    dies_after_5.fingerprint = code_fingerprint(retrain)   # the same recipe, resumed

    with pytest.raises(KeyboardInterrupt):
        lds(dies_after_5, prompts, completions, scores, out_dir=tmp_path, **kw)
    resumed = lds(retrain, prompts, completions, scores, out_dir=tmp_path, **kw)
    assert len(calls) == 24 + 5 + 19                   # only the unfinished retrains ran
    np.testing.assert_array_equal(resumed.to_numpy(), whole.to_numpy())
    with pytest.raises(ValueError, match="other"):     # other inputs: refused, not mixed
        lds(retrain, prompts, completions, scores, out_dir=tmp_path,
            **dict(kw, alpha=0.25))


def test_tail_patch_raises_the_stated_object_and_lowers_it_for_a_contradiction():
    model, tokenizer, _ = demo.load("micro")
    f = demo.facts("micro")[0]
    wrong = demo.facts("micro")[1].obj
    texts = [f.statement(0), f.statement(0).replace(f.obj, wrong), "It was calm in Lindby."]
    corpus = Corpus.from_texts(texts, tokenizer, 256)
    prompts = [tokenizer(f.prompt())["input_ids"]]
    completions = [tokenizer(f.completion, add_special_tokens=False)["input_ids"]]
    before = [p.detach().clone() for p in model.parameters()]
    out = tail_patch(model, corpus, prompts, completions, {"all": np.array([[0, 1, 2]])},
                     lr=1e-4, progress=False)
    delta = out.set_index("id")["delta"]
    assert delta[0] > 0 > delta[1]
    assert abs(delta[2]) < delta[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # restored


@pytest.mark.slow
def test_pbrf_on_a_tiny_transformer_is_approximated_best_by_curvature_aware_estimators():
    """The PBRF's ε → 0 response is ∇fᵀ(G + λ)⁻¹∇log p with G the Gauss–Newton Hessian; the
    damped (sampled) Fisher, K-FAC and EK-FAC approximate it, the gradient dot product less."""
    model, batches, prompts, completions = toy_problem(n_sequences=256, train_steps=200,
                                                       n_queries=3)
    out = pbrf(model, batches, prompts, completions, train_ids=range(0, 256, 32),
               args=FactorArgs(batch_size=16, progress=False), max_iter=30, progress=False)
    assert out["residual"].max() < 1e-3
    corr = out.attrs["correlations"]["pearson"]
    assert min(corr["exact"], corr["ekfac"], corr["kfac"]) > 0.5
    assert corr["ekfac"] > corr["identity"] + 0.2
