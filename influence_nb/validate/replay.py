"""Exact influence by replaying training: the derivative of a query's measurement after the
*actual* training run with respect to each training sequence's weight in it.

A run of :func:`~influence_nb.training.train` recorded in a
:class:`~influence_nb.training.TrainRecord` is a chain of steps s_{t+1} = U_t(s_t, w) over
the optimizer's state s = (θ, m, v), where w_i scales sequence i's loss term in every batch
that holds it (w = 1: the recorded run). For a query measurement f(θ_T), reverse-mode
differentiation through the chain gives

    d f / d w_i = Σ_{t: i ∈ B_t} s̄_{t+1}ᵀ ∂U_t/∂w_i          s̄_T = (∇f(θ_T), 0, 0)
    s̄_t = s̄_{t+1}ᵀ ∂U_t/∂s_t

the exact first-order effect of up-weighting z_i (the sign of
:func:`~influence_nb.scoring.scan`: positive when up-weighting z_i raises f). Each segment
between two checkpoints is replayed forward with the differentiable update
(:func:`~influence_nb.training.update` with ``create_graph``: the same loss, clip, schedule and
AdamW as training), then its adjoint is propagated back in one reverse pass per query.

Cost: one forward replay of the run with a graph (≈ 2 training runs: each step's backward is
kept differentiable) and one reverse pass per query (≈ 2 training runs: twice a backward's
matrix products); 9.6 training runs for 4 queries on the validation world
(``benchmarks/replay.py``). Memory: the checkpoints (3 × parameters each) and one segment's
graph (``every`` steps of activations and their backward).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checks import checked
from ..data import Corpus
from ..hooks import eval_mode
from ..progress import tqdm
from ..task import Task, query_batch
from ..training import OptState, TrainRecord, update

FLOOR = 1e-5   # AdamW's √v̂ below FLOOR × the step's RMS gradient entry: held constant


def query_adjoints(model: nn.Module, state: OptState, prompts: Sequence[Sequence[int]],
                   completions: Sequence[Sequence[int]], task: Task) -> list[list[Tensor]]:
    """Per query the adjoint of the final state: (∇_θ f_q, 0, 0) as a list aligned with
    ``state.tensors``, f_q measured (eval mode) as :func:`~influence_nb.task.measure` does."""
    theta = [p for p in model.parameters() if p.requires_grad]
    if not all(torch.equal(p.detach().cpu(), t) for p, t in zip(theta, state.theta)):
        raise ValueError("the model is not at the record's final state; pass the model that "
                         "train(..., record=run) trained")
    batch = query_batch(prompts, completions).to(theta[0].device)
    zeros = [torch.zeros_like(p) for p in theta]
    with eval_mode(model):
        f = task.measurement(task.forward(model, batch), batch)            # (Q,)
        return [list(torch.autograd.grad(f[q], theta, retain_graph=q < len(f) - 1,
                                         allow_unused=True)) + zeros + zeros
                for q in range(len(f))]


def reverse_segment(model: nn.Module, corpus: Corpus, run: TrainRecord, t0: int, t1: int,
                    adjoints: list[list[Tensor]], scores: np.ndarray,
                    floor: float = 0.0) -> list[list[Tensor]]:
    """Replay steps t0 … t1 − 1 from the checkpoint at t0 with a graph (AdamW's ``floor``,
    :func:`~influence_nb.training.update`), then pull each query's adjoint of the state at t1
    back to t0; each step's d f / d w of its batch's sequences is added to ``scores`` (Q, N).
    -> the adjoints at t0."""
    device = next(model.parameters()).device
    start = run.checkpoints[t0].to(device, requires_grad=True)
    state, ws = start, []
    with sdpa_kernel(SDPBackend.MATH):      # fused attention has no second derivative
        for t in range(t0, t1):
            ids = run.batches[t]
            batch = next(corpus.batches(len(ids), ids=ids)).to(device)
            w = torch.ones(len(ids), dtype=torch.float64, device=device) if run.weights is None \
                else torch.as_tensor(run.weights[ids], device=device)
            ws.append(w.requires_grad_())
            state, _ = update(model, state, batch, run.lrs[t], run.cfg, ws[-1], run.optimizer,
                              create_graph=True, floor=floor)
    inputs, outputs = start.tensors + ws, state.tensors
    pulled = []
    for q, adjoint in enumerate(adjoints):
        grads = torch.autograd.grad(outputs, inputs, [a if a is not None else torch.zeros_like(o)
                                                      for a, o in zip(adjoint, outputs)],
                                    retain_graph=q < len(adjoints) - 1, allow_unused=True)
        pulled.append(list(grads[:len(start.tensors)]))
        for t, g in zip(range(t0, t1), grads[len(start.tensors):]):
            if g is not None:
                scores[q, run.batches[t]] += g.double().cpu().numpy()   # ids unique in a batch
    return pulled


@checked(within={"floor": "[0, inf)"})
def replay_influence(model: nn.Module, corpus: Corpus, run: TrainRecord,
                     prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     task: Task | None = None, progress: bool = True,
                     floor: float = FLOOR) -> np.ndarray:
    """(Q, N) d f_q / d w_i of the recorded run: how query q's measurement (default:
    log p(completion | prompt), nats) after training moves per unit of weight on training
    sequence i's loss term, through every step that saw it (0 for sequences never trained on).

    floor: AdamW coordinates whose √v̂ at a step is below ``floor`` × the step's RMS gradient
        entry are held constant there (:func:`~influence_nb.training.update`). Adam's step
        g/(√v̂ + ε) has slope up to lr/ε where √v̂ is near 0 (a first gradient near 0 by
        chance, an attention key's bias, whose gradient is rounding): exact for changes of g
        far below ε, where reweighting one sequence moves g by ~1e-4. 0: the exact derivative
        (equal to finite differences at ε = 1e-6); the default predicts what retraining
        shows (a tiny model's removals: relative error 0.35 against 2.16 exact; at the
        validation world's widths, scores O(1) exact where finite differences at 0.05 give 0).
    model: the model ``train(model, corpus, cfg, record=run)`` trained (at the run's end).
    Cost ≈ 2 + 2 · Q training runs; memory: ``run``'s checkpoints and ``run.every`` steps'
    graph. Sequence weights: ``w`` in :func:`~influence_nb.training.batch_loss` (per batch
    mean over tokens, so a sequence's term is its summed token loss ÷ the batch's tokens).
    """
    steps = len(run.batches)
    if steps == 0 or steps not in run.checkpoints:
        raise ValueError("the record holds no finished run; pass the TrainRecord that "
                         "train(..., record=run) filled")
    config = getattr(model, "config", None)    # attention dropout is functional, not a module
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()) or any(
            getattr(config, k, 0) for k in ("attention_dropout", "attn_pdrop")):
        raise ValueError("the model has dropout; replay needs a deterministic step (train and "
                         "replay with dropout 0)")
    adjoints = query_adjoints(model, run.checkpoints[steps], prompts, completions,
                              task or Task())
    scores = np.zeros((len(prompts), len(corpus)))
    starts = sorted(s for s in run.checkpoints if s < steps)
    segments = list(zip(starts, starts[1:] + [steps]))[::-1]
    for t0, t1 in tqdm(segments, desc="replay", unit="segment", disable=not progress):
        adjoints = reverse_segment(model, corpus, run, t0, t1, adjoints, scores, floor)
    return scores
