"""One pass over training sequences, many consumers: the only forward + backward loop.

Everything influence_nb computes over a corpus is the same sweep::

    for each batch (length-bucketed, on the model's device, within the model's context):
        losses = loss(model(batch))                       # (B,) log-likelihood, Fisher or f
        for each tracked layer ℓ, as the backward reaches it:
            consumer.update_layer(ℓ, ā, δ, batch)         # ā (B, T, in+1), δ (B, T, out)
        consumer.update(batch)                            # once the batch is complete
    results = [consumer.finish() for each consumer]

A :class:`Consumer` reduces a layer as soon as its δ is known (:class:`~influence_nb.hooks.
Capture` hands them over one layer at a time), so no float32 copy of every layer's ā and δ is
held at once. Several consumers that need the gradient of the same loss share one sweep (e.g.
sketches and self-influence). The covariance and eigenvalue-correction passes of a fit, the
scorer (total, per layer, per token), self-influence, the sketcher and the query gradients are
all consumers (in :mod:`~influence_nb.curvature`, :mod:`~influence_nb.scoring`,
:mod:`~influence_nb.sketch`).

The pass runs over a :class:`~influence_nb.batching.Source` (batching, device placement, the
context check, ``max_examples`` and the sharding of batches over torch.distributed ranks are
:mod:`~influence_nb.batching`'s) and owns the rest: Fisher-label sampling (batch k draws from a
generator seeded with (seed, k): the same labels in every pass and on every rank), the sharding
of chunks over ranks, eval mode and progress.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import einsum
from torch import Tensor, nn

from . import distributed
from .batching import Source, prepared
from .hooks import Capture, eval_mode
from .layers import TrackedLayer, stat_dtype
from .progress import tqdm
from .task import Task

LOSSES = ("loglik", "fisher", "measurement")
GROUP_BYTES = 64 << 20  # per-sequence tensors a consumer forms at once (see PassBatch.groups)
RECORD_BYTES = 1 << 30  # ā and δ a Recording keeps for a replay (see Recording)


@dataclass
class PassBatch:
    """What a consumer sees of one batch.

    k:      global index of the batch in the pass (seeds its Fisher labels)
    rows:   (B,) positions of the batch's sequences in the pass's order (the ``ids`` asked
            for, or a running count for plain batches): where a consumer writes its outputs
    data:   the batch on the model's device (Mapping or object, see :func:`~influence_nb.task.get`)
    mask:   (B, T) bool, the positions whose ā and δ count (:meth:`Task.token_mask`)
    tokens: (n,) int64 indices of those positions in the flattened (B·T) batch, n of them
            (found once per batch: the pass's one host synchronisation before the backward)
    counts: (B,) scored positions per sequence, on the host
    losses: (B,) the values whose gradient δ is, detached (set before :meth:`Consumer.update`)
    draw:   which of the pass's Fisher draws of this batch the consumers are fed (0, 1, ...;
            each draw is fed as a batch of its own, see :func:`corpus_pass`)
    """
    k: int
    rows: np.ndarray
    data: object
    mask: Tensor
    tokens: Tensor
    counts: np.ndarray
    losses: Tensor | None = None
    draw: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def groups(self, bytes_per_sequence: int, budget: int | None = None
               ) -> Iterator[tuple[slice, Tensor]]:
        """The batch cut into groups of sequences whose per-sequence tensors (e.g. DW, out·in
        values) take at most ``budget`` bytes together (default :data:`GROUP_BYTES`) ->
        (slice of the batch, flat indices of the group's scored positions within the group).
        Bounds a consumer's memory on wide layers at no cost in arithmetic."""
        B, T = self.mask.shape
        budget = GROUP_BYTES if budget is None else budget
        step = max(1, budget // max(1, bytes_per_sequence))
        if step >= B:  # one group, the usual case: no index arithmetic
            yield slice(0, B), self.tokens
            return
        start = np.concatenate([[0], np.cumsum(self.counts)])
        for s in range(0, B, step):
            e = min(B, s + step)
            yield slice(s, e), self.tokens[int(start[s]):int(start[e])] - s * T

    def __len__(self) -> int:
        return len(self.rows)


class Consumer:
    """Something computed from one pass: override :meth:`update_layer` (and :meth:`update`,
    :meth:`finish`). A consumer sees every tracked layer of every batch, in backward order
    (last layer first).

    ``checks_finite``: True for a consumer whose :meth:`update` itself raises
    FloatingPointError on non-finite results (a NaN or inf in ā or δ at a counted position
    reaches every product δ_t ā_tᵀ); when every consumer of a pass does, the pass skips the
    per-layer finiteness reductions, and only a failing batch runs again with them, so that
    the error names the layer."""

    checks_finite: bool = False

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        """ā (B, T, in+1) and δ (B, T, out) of ``layer``, float32 (float64 for a float64
        model), read-only: no one modifies them, so a consumer may keep them (a
        :class:`Recording` does). At unscored positions the narrower of the two is zero, so
        each δ_t ā_tᵀ is (Σ_t δ_t ā_tᵀ counts the scored positions only); ā or δ alone is
        summed over ``batch.tokens``."""

    def update(self, batch: PassBatch) -> None:
        """The batch is complete (every layer seen; ā and δ checked finite unless every
        consumer ``checks_finite``)."""

    def finish(self) -> Any:
        """The pass is over: the result (collectives over ranks happen here)."""


class Gradients(Consumer):
    """Per-sequence gradients DW_b = Σ_t δ_bt ā_btᵀ of every layer, kept whole:
    -> ({name: (N, out, in+1)}, loss values (N,)) in the pass's row order. For a few sequences
    (queries, tests): N · Σ out·(in+1) values."""

    def __init__(self, layers: Sequence[TrackedLayer]) -> None:
        self.parts: dict[str, list[Tensor]] = {t.name: [] for t in layers}  # module order
        self.batch: dict[str, Tensor] = {}
        self.rows: list[np.ndarray] = []
        self.losses: list[Tensor] = []

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        self.batch[layer.name] = einsum(delta, a, "b t o, b t i -> b o i")

    def update(self, batch: PassBatch) -> None:
        for name, DW in self.batch.items():
            self.parts[name].append(DW)
        self.rows.append(batch.rows)
        self.losses.append(batch.losses)
        self.batch = {}

    def finish(self) -> tuple[dict[str, Tensor], Tensor]:
        order = torch.from_numpy(np.argsort(np.concatenate(self.rows), kind="stable"))
        DW = {n: torch.cat(p)[order.to(p[0].device)] for n, p in self.parts.items()}
        losses = torch.cat(self.losses)
        return DW, losses[order.to(losses.device)]


class Recording(Consumer):
    """The pass itself, kept: every layer's ā and δ of every batch (of its first Fisher draw,
    when the pass draws several), while they fit in
    ``budget`` bytes (default :data:`RECORD_BYTES`, or a quarter of the memory the machine has
    left if less); past it, everything is dropped and
    ``complete`` is False. A complete recording is replayed to other consumers (:meth:`replay`)
    as the pass would have fed them — the same tensors, so the same numbers as a second pass
    over the model with the same Fisher labels, without its forward and backward."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget     # None: RECORD_BYTES, within a quarter of the memory left
        self.batches: list[tuple[PassBatch, list[tuple[TrackedLayer, Tensor, Tensor]]]] = []
        self.layers: list[tuple[TrackedLayer, Tensor, Tensor]] = []
        self.bytes, self.complete = 0, True

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        if self.budget is None:
            self.budget = min(RECORD_BYTES, available_memory(a.device) // 4)
        if self.complete and batch.draw == 0:
            self.layers.append((layer, a, delta))
            self.bytes += a.nbytes + delta.nbytes
            if self.bytes > self.budget:
                self.batches, self.layers, self.complete = [], [], False

    def update(self, batch: PassBatch) -> None:
        if self.complete and batch.draw == 0:
            self.batches.append((batch, self.layers))
        self.layers = []

    def finish(self) -> "Recording":
        return self

    def replay(self, consumers: Sequence[Consumer]) -> list[Any]:
        """Feed the recorded pass to ``consumers`` (layers and batches in the pass's order)
        -> their ``finish()`` values, as :func:`corpus_pass` returns them. Once: each batch is
        let go as soon as it is fed, so the memory comes back during the replay."""
        if not self.complete:
            raise RuntimeError("the recording outgrew its budget; run the pass again")
        self.batches.reverse()
        while self.batches:
            batch, layers = self.batches.pop()
            for layer, a, delta in layers:
                for c in consumers:
                    c.update_layer(layer, a, delta, batch)
            for c in consumers:
                c.update(batch)
        self.complete = False   # emptied
        return [c.finish() for c in consumers]


def available_memory(device: torch.device) -> int:
    """Bytes this process may still take: free accelerator memory, or the host's
    MemAvailable (Linux) — what the kernel can hand out without swapping."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62   # unknown: nothing is refused


def label_generator(seed: int, k: int, device: torch.device, draw: int = 0) -> torch.Generator:
    """The generator of batch k's Fisher labels (its ``draw``-th draw), seeded from (seed, k,
    draw): a batch draws the same labels in every pass and on whichever rank runs it, and its
    first draw is the same however many follow."""
    hi, lo = np.random.SeedSequence([seed, k] + ([draw] if draw else [])).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(hi) << 32 | int(lo))


def loss_values(task: Task, loss: str | Callable[[Tensor, object], Tensor], logits: Tensor,
                batch: object, seed: int, k: int, draw: int = 0) -> Tensor:
    """(B,) the values a pass differentiates: ``"loglik"`` Σ_t log p (the training
    log-likelihood, whose gradient the scores use), ``"fisher"`` the pseudo-loss with labels
    from :func:`label_generator`, ``"measurement"`` f = log p(completion | prompt), or a
    callable (logits, batch) -> (B,)."""
    if callable(loss):
        return loss(logits, batch)
    if loss == "loglik":
        return -task.training_loss(logits, batch)
    if loss == "fisher":
        return task.fisher_loss(logits, batch, label_generator(seed, k, logits.device, draw))
    if loss == "measurement":
        return task.measurement(logits, batch)
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES} or a callable")


def _step(model: nn.Module, cap: Capture, task: Task, loss: str | Callable, pb: PassBatch,
          seed: int, draws: range, consumers: Sequence[Consumer]) -> None:
    """One forward of a batch, then a backward per draw: each tracked layer's ā and δ to the
    consumers, then :meth:`Consumer.update`, with a PassBatch of the draw's own (``draw``,
    ``losses``)."""
    cap.start(pb.mask)
    with torch.enable_grad():
        logits = task.forward(model, pb.data)
        for j in draws:
            drawn = replace(pb, draw=j)
            losses = loss_values(task, loss, logits, pb.data, seed, pb.k, j)
            cap.backward(losses, lambda layer, a, d: [c.update_layer(layer, a, d, drawn)
                                                      for c in consumers],
                         retain=j + 1 < draws.stop)
            drawn.losses = losses.detach()
            for c in consumers:
                c.update(drawn)


def corpus_pass(model: nn.Module, layers: Sequence[TrackedLayer], src: Source,
                consumers: Sequence[Consumer], loss: str | Callable = "loglik",
                task: Task | None = None, seed: int = 0, max_examples: int | None = None,
                shard: bool = False, progress: bool | tqdm = True, desc: str = "pass",
                draws: int = 1, first_draw: int = 0) -> list[Any]:
    """Run the model over ``src`` once and feed every consumer; -> their ``finish()`` values.

    ``loss``: see :func:`loss_values`. ``max_examples``, ``shard``: see
    :func:`~influence_nb.batching.prepared` (consumers reduce over the ranks in ``finish``).
    ``progress``: a bar of its own, none, or a tqdm bar to advance. ``draws``: each batch's
    forward is followed by that many backwards of independent Fisher draws (generators
    seeded with (seed, k, draw)), each fed to the consumers as a batch of its own (the same
    rows, ``PassBatch.draw`` 0, 1, ...): the forward is shared, and the first draw is the
    one a single-draw pass makes. ``first_draw``: number the draws from there (more draws
    after a pass that made the first ones).
    """
    drawn = range(first_draw, first_draw + draws)
    task = task or Task()
    world = distributed.rank_world()[1] if shard else 1
    known = [x for x in (src.total, max_examples) if x is not None]
    bar = progress if isinstance(progress, tqdm) else tqdm(
        total=-(-min(known) // world) if known else None, desc=desc, unit="seq",
        disable=not progress)
    try:
        check = not all(c.checks_finite for c in consumers)
        with eval_mode(model), Capture(model, layers, stat_dtype(model), check) as cap:
            for k, rows, batch in prepared(model, src, max_examples, shard):
                mask = task.token_mask(batch)
                pb = PassBatch(k, rows, batch, mask,
                               mask.flatten().nonzero().squeeze(1), mask.sum(1).cpu().numpy())
                try:
                    _step(model, cap, task, loss, pb, seed, drawn, consumers)
                except FloatingPointError:
                    if cap.check_finite:
                        raise
                    # the consumers found NaN/inf; run the batch again with the per-layer
                    # checks, whose error names the layer where it entered
                    cap.check_finite = True
                    _step(model, cap, task, loss, pb, seed, drawn, [])
                    raise
                bar.update(len(rows))
    finally:
        if bar is not progress:
            bar.close()
    return [c.finish() for c in consumers]


def chunks(n: int, chunk_size: int, shard: bool = True) -> list[int]:
    """Start positions of the chunks of ``chunk_size`` out of n that this rank computes
    (chunk c on rank c mod W); all of them outside torch.distributed or without ``shard``."""
    rank, world = distributed.rank_world() if shard else (0, 1)
    return [s for c, s in enumerate(range(0, n, chunk_size)) if c % world == rank]
