"""The one seam where a user says how to run the model, what its loss is and what is measured.

Defaults fit a Hugging Face causal LM (``model(input_ids, attention_mask).logits``):

- training loss of a sequence: the **sum** over its real tokens of −log p(z_t+1 | z_≤t)
  (a sum, not a mean, so that the Fisher equals the Gauss-Newton matrix);
- Fisher pseudo-loss: the same sum with labels **sampled** from the model's own predictive
  distribution (true Fisher), or the real next tokens (empirical Fisher, an option);
- measurement f = log p(completion | prompt): only completion tokens count.

Position t of a batch predicts token t + 1; every per-position mask below is in that
convention: ``loss_mask[b, t]`` says whether the prediction made at t is scored.
Subclass :class:`Task` and override :meth:`forward` and the losses for other models.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_args


def get(batch: object, key: str) -> Tensor:
    """``batch[key]`` for a Mapping, ``batch.key`` otherwise."""
    value = batch.get(key) if isinstance(batch, Mapping) else getattr(batch, key, None)
    if value is None:
        raise KeyError(f"batch has no {key!r}; a batch is a Mapping or object with input_ids "
                       "(B, T) and attention_mask (B, T)")
    return value


def find(batch: object, key: str) -> Tensor | None:
    """``batch[key]`` / ``batch.key``, or None when the batch has no such field."""
    return batch.get(key) if isinstance(batch, Mapping) else getattr(batch, key, None)


def to_device(batch: object, device: torch.device | str) -> object:
    """A batch with its tensors on ``device``: a Mapping (a dict back), an object with ``.to``
    (its own), or any other object (a shallow copy with its tensor attributes moved)."""
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if callable(getattr(batch, "to", None)):
        return batch.to(device)
    moved = copy.copy(batch)
    for k, v in vars(batch).items():
        if isinstance(v, Tensor):
            setattr(moved, k, v.to(device))
    return moved


LOGIT_BYTES = 64 << 20  # (positions × vocabulary) temporaries a loss forms at once


def _row_chunks(n: int, V: int, element_size: int = 4) -> list[tuple[int, int]]:
    """(start, end) of the row chunks of an (n, V) matrix whose temporaries fit
    :data:`LOGIT_BYTES`: a 50 K vocabulary would otherwise add several (B·T, V) float32
    buffers to every batch (softmax, its draw, their products) beyond the logits."""
    step = max(1, LOGIT_BYTES // (V * element_size))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class TokenLogProb(torch.autograd.Function):
    """log p(targets[b, t] | position t) from (B, T, V) logits and (B, T) targets -> (B, T),
    in float32 or better, chunked over positions (:func:`_row_chunks`). Only the logits (held
    anyway) and the (B, T) log-normaliser are kept for the backward, which writes
    g · (onehot − softmax) chunk by chunk into one (B, T, V) gradient: two vocabulary-wide
    buffers per batch where a cross-entropy keeps four."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        x, y = logits.flatten(0, 1), targets.reshape(-1, 1)
        lse = torch.empty(len(x), dtype=dtype, device=x.device)
        for s, e in _row_chunks(len(x), x.shape[1]):
            lse[s:e] = torch.logsumexp(x[s:e].to(dtype), dim=-1)
        ctx.save_for_backward(logits, y, lse)
        return (x.gather(1, y).squeeze(1).to(dtype) - lse).view(targets.shape)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        logits, y, lse = ctx.saved_tensors
        x, g = logits.flatten(0, 1), g.reshape(-1, 1).to(lse.dtype)
        grad = torch.empty_like(x)
        for s, e in _row_chunks(len(x), x.shape[1]):
            p = (x[s:e].to(lse.dtype) - lse[s:e, None]).exp_().mul_(-g[s:e])  # −g · softmax
            grad[s:e] = p.scatter_add_(1, y[s:e], g[s:e])                     # + g · onehot
        return grad.view_as(logits), None


def next_token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(targets[b, t] | position t), in float32 or better: (B, T, V), (B, T) -> (B, T).
    A batch whose (B·T, V) float32 buffers fit :data:`LOGIT_BYTES` takes the fused
    cross-entropy (twice as fast on a 4 K vocabulary); a larger one :class:`TokenLogProb`."""
    B, T, V = logits.shape
    if B * T * V * 4 > LOGIT_BYTES:
        return TokenLogProb.apply(logits, targets)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T),
                            reduction="none").reshape(B, T)


def _shift(x: Tensor) -> Tensor:
    """x[:, t + 1] at position t, zero at the last position: (B, T) -> (B, T)."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


def sample_labels(p: Tensor, generator: torch.Generator) -> Tensor:
    """One label per row of p (N, V) (rows sum to ≈ 1) by inverse-CDF sampling in two levels:
    u ~ U(0, Σp) picks a block of ≈ √V classes on the cumulative block sums, then a class on
    the cumulative sums inside that block -> (N,) int64. The same label as one cumulative sum
    over all V classes would give for the same u, at the cost of a block sum instead of a
    length-V scan (several times faster than torch.multinomial, and reproducible)."""
    N, V = p.shape
    size = math.isqrt(V - 1) + 1                   # classes per block; the last may be short
    whole = V // size * size
    sums = p[:, :whole].reshape(N, -1, size).sum(-1)                       # (N, blocks)
    if whole < V:
        sums = torch.cat([sums, p[:, whole:].sum(-1, keepdim=True)], dim=1)
    cdf = sums.cumsum(-1)
    u = torch.rand(N, 1, generator=generator, dtype=p.dtype, device=p.device) * cdf[:, -1:]
    j = torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)  # (N, 1) block
    u = u - (cdf.gather(1, j) - sums.gather(1, j))                          # u within block j
    cols = j * size + torch.arange(size, device=p.device)                   # (N, size)
    inner = p.gather(1, cols.clamp_max(V - 1)).masked_fill_(cols >= V, 0.0).cumsum(-1)
    k = torch.searchsorted(inner, u, right=True).clamp_max(size - 1)
    return cols.gather(1, k).squeeze(1).clamp_max(V - 1)


class FisherProbe(torch.autograd.Function):
    """A pseudo-loss of the true Fisher: (B, T, V) logits, (B, T) bool mask, generator,
    probe -> (B,), whose gradient with respect to the logits is a draw r_t (zero where the
    mask is off) with E[r_t] = 0 and E[r_t r_tᵀ] = diag(p_t) − p_t p_tᵀ, p_t = softmax(logits_t):
    so E[δ δᵀ] through any layer is the Fisher's, whatever the probe.

    - ``"label"`` (the paper): y_t ~ p_t (:func:`sample_labels`), r_t = p_t − onehot(y_t); the
      value is Σ_t −log p(y_t), the training loss at the sampled labels.
    - ``"gaussian"``: r_t = diag(√p_t) ε − p_t (√p_tᵀ ε), ε ~ N(0, I_V): the same covariance
      without the label draw's heavy tail (a rare label gives a residual of ≈ 1 with
      probability p ≪ 1: its fourth moment is ≈ 1/p times the Gaussian's); the value is
      Σ_t ⟨logits_t, r_t⟩ (its gradient is r).

    One softmax serves the draw, the value and the gradient, which is kept from the forward
    (a log-softmax would pass over the logits again in the backward).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, mask: Tensor, generator: torch.Generator,
                probe: str) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        x_all = logits.flatten(0, 1)                                        # (B·T, V)
        r_all = torch.empty(x_all.shape, dtype=dtype, device=x_all.device)
        value = torch.empty(len(x_all), dtype=dtype, device=x_all.device)
        for s, e in _row_chunks(*x_all.shape):        # chunks of positions: bounded buffers
            x = x_all[s:e].to(dtype)
            m = x.amax(dim=-1, keepdim=True)
            p = (x - m).exp_()
            z = p.sum(dim=-1, keepdim=True)
            p.div_(z)                                                       # softmax
            if probe == "label":
                y = sample_labels(p, generator)[:, None]                    # (n, 1)
                value[s:e] = (m + z.log() - x.gather(-1, y)).squeeze(-1)    # −log p(y)
                r_all[s:e] = p.scatter_add_(-1, y, torch.full_like(m, -1.0))  # p − onehot(y)
            else:
                r = torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
                r.mul_(p.sqrt())
                r_all[s:e] = r.sub_(p.mul_(r.sum(dim=-1, keepdim=True)))
                value[s:e] = (x * r_all[s:e]).sum(dim=-1)
        r_all.mul_(mask.reshape(-1, 1))
        ctx.save_for_backward(r_all.view(logits.shape))
        ctx.dtype = logits.dtype
        return (value.view(mask.shape) * mask).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        r, = ctx.saved_tensors
        return (r * grad[:, None, None].to(r.dtype)).to(ctx.dtype), None, None, None

@dataclass
class Task:
    """Model call, training loss, Fisher pseudo-loss and query measurement (HF causal LM).

    empirical_fisher: use the real next tokens as Fisher labels instead of sampling them
        from the model (the paper, and the default, use the true Fisher).
    fisher_probe: how the true Fisher's output gradient is drawn at each position
        (:class:`FisherProbe`): ``"gaussian"`` (default: the same Fisher in expectation, less
        seed-to-seed noise — docs/results.md, "The same answer twice") or ``"label"`` (the
        paper's one sampled label per position).
    """
    empirical_fisher: bool = False
    fisher_probe: str = "gaussian"

    PROBES: ClassVar[tuple[str, ...]] = ("gaussian", "label")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"fisher_probe": PROBES}

    def __post_init__(self) -> None:
        check_args(self)

    def forward(self, model: nn.Module, batch: object) -> Tensor:
        """Run the model: logits (B, T, V)."""
        return model(input_ids=get(batch, "input_ids"),
                     attention_mask=get(batch, "attention_mask")).logits

    def loss_mask(self, batch: object) -> Tensor:
        """(B, T) bool: position t is scored when tokens t and t + 1 are real (and, when the
        batch has Hugging Face ``labels``, token t + 1's label is not -100)."""
        mask = self._real(batch)
        labels = find(batch, "labels")
        return mask if labels is None else mask & _shift(labels != -100)

    def token_mask(self, batch: object) -> Tensor:
        """(B, T) bool: the positions whose ā and δ enter a sequence's gradient
        DW = Σ_t δ_t ā_tᵀ (elsewhere δ = 0). For the default losses: tokens t and t + 1 real,
        whatever the labels — a prompt token that is not trained on (label -100) still shapes,
        through attention, the predictions that are, so its update counts. A subclass that
        overrides :meth:`loss_mask` gets its own mask here."""
        if type(self).loss_mask is not Task.loss_mask:
            return self.loss_mask(batch)
        return self._real(batch)

    @staticmethod
    def _real(batch: object) -> Tensor:
        """(B, T) bool: tokens t and t + 1 are both real."""
        mask = get(batch, "attention_mask").bool()
        return mask & _shift(mask)

    def targets(self, batch: object) -> Tensor:
        """(B, T) the token predicted at each position: ``labels`` (HF convention, aligned with
        ``input_ids``) where given and not -100, else the next input token."""
        ids, labels = get(batch, "input_ids"), find(batch, "labels")
        return _shift(ids if labels is None else torch.where(labels == -100, ids, labels))

    def training_loss(self, logits: Tensor, batch: object) -> Tensor:
        """(B,) Σ_t −log p(z_t+1 | z_≤t) over the scored positions, in nats."""
        logp = next_token_logprobs(logits, self.targets(batch))
        return -(logp * self.loss_mask(batch)).sum(dim=1)

    def fisher_loss(self, logits: Tensor, batch: object, generator: torch.Generator) -> Tensor:
        """(B,) a pseudo-loss whose gradient is the true Fisher's (:class:`FisherProbe`, drawn
        with ``generator``: reproducible), or the training loss when ``empirical_fisher``."""
        if self.empirical_fisher:
            return self.training_loss(logits, batch)
        return FisherProbe.apply(logits, self.loss_mask(batch), generator, self.fisher_probe)

    def measurement(self, logits: Tensor, batch: object) -> Tensor:
        """(B,) f = log p(completion | prompt): Σ over completion tokens of log p, in nats.
        ``batch`` needs ``completion_mask`` (B, T): 1 on completion tokens."""
        logp = next_token_logprobs(logits, _shift(get(batch, "input_ids")))
        return (logp * _shift(get(batch, "completion_mask")) * self.loss_mask(batch)).sum(dim=1)


def token_rows(x: Sequence[int] | Sequence[Sequence[int]] | Tensor | np.ndarray
               ) -> list[list[int]]:
    """One sequence of token ids (list, 1-D tensor or array) or several -> a list of lists.
    An empty input is one empty sequence."""
    x = list(x.tolist() if isinstance(x, (Tensor, np.ndarray)) else x)
    if not x or not isinstance(x[0], (Sequence, Tensor, np.ndarray)):
        return [[int(i) for i in x]]
    return [[int(i) for i in (r.tolist() if isinstance(r, (Tensor, np.ndarray)) else r)]
            for r in x]


@dataclass
class QueryBatch:
    """Prompt + completion sequences, right-padded.

    input_ids:       (Q, T) int64
    attention_mask:  (Q, T) int64, 1 for real tokens
    completion_mask: (Q, T) int64, 1 for completion tokens
    """
    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor

    def to(self, device: torch.device | str) -> "QueryBatch":
        return QueryBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.completion_mask.to(device))

    def blocks(self, size: int) -> list["QueryBatch"]:
        """The rows in blocks of ``size`` queries, each cut to its longest row."""
        out = []
        for s in range(0, len(self.input_ids), size):
            T = int(self.attention_mask[s:s + size].sum(1).max())
            out.append(QueryBatch(*(x[s:s + size, :T] for x in (
                self.input_ids, self.attention_mask, self.completion_mask))))
        return out


def query_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                max_len: int | None = None, pad_id: int = 0) -> QueryBatch:
    """Token ids of Q prompts and their completions -> a :class:`QueryBatch`.

    ``max_len``: the model's context; longer prompt + completion is an error.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many prompts as completions, at least one "
                         f"(got {len(prompts)} and {len(completions)})")
    rows = []
    for q, (p, c) in enumerate(zip(prompts, completions)):
        p, c = [int(i) for i in p], [int(i) for i in c]
        if not c:
            raise ValueError(f"query {q}: the completion is empty; give at least one token whose "
                             "log-probability is measured")
        if not p:
            raise ValueError(f"query {q}: the prompt is empty; the first completion token needs a "
                             "token before it (start the prompt with a BOS token)")
        if max_len is not None and len(p) + len(c) > max_len:
            raise ValueError(f"query {q}: prompt + completion has {len(p) + len(c)} tokens, more "
                             f"than the model's context of {max_len}; shorten the prompt")
        rows.append((p, c))
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for q, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[q, :n] = torch.tensor(p + c)
        attention_mask[q, :n] = 1
        completion_mask[q, len(p):n] = 1
    return QueryBatch(input_ids, attention_mask, completion_mask)


@torch.no_grad()
def measure(model: nn.Module, prompts: Sequence[Sequence[int]],
            completions: Sequence[Sequence[int]], task: Task | None = None) -> np.ndarray:
    """(Q,) float64 measurement f of each query under ``model`` (default: log p(completion |
    prompt) in nats) — the quantity every score predicts the change of."""
    task = task or Task()
    device = next(model.parameters()).device
    batch = query_batch(prompts, completions).to(device)
    was_training = model.training
    model.eval()
    try:
        return task.measurement(task.forward(model, batch), batch).double().cpu().numpy()
    finally:
        model.train(was_training)
