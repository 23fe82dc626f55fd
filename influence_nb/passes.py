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

The pass owns: batching (a :class:`Source`: a Corpus and ids, bucketed by length, or any
batches), device placement, the context-length check, ``max_examples``, Fisher-label sampling
(batch k draws from a generator seeded with (seed, k): the same labels in every pass and on
every rank), sharding of batches over torch.distributed ranks, eval mode and progress.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import einsum
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed
from .hooks import Capture, TrackedLayer, context_length, eval_mode, stat_dtype, vocab_size
from .task import Task, get, to_device

LOSSES = ("loglik", "fisher", "measurement")
GROUP_BYTES = 64 << 20  # per-sequence tensors a consumer forms at once (see PassBatch.groups)
RECORD_BYTES = 1 << 30  # ā and δ a Recording keeps for a replay (see Recording)
UNSIZED_BATCH = 8       # sequences per batch of a source whose lengths are unknown (see source)


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
    """
    k: int
    rows: np.ndarray
    data: object
    mask: Tensor
    tokens: Tensor
    counts: np.ndarray
    losses: Tensor | None = None

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
    """The pass itself, kept: every layer's ā and δ of every batch, while they fit in
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
        if self.complete:
            self.layers.append((layer, a, delta))
            self.bytes += a.nbytes + delta.nbytes
            if self.bytes > self.budget:
                self.batches, self.layers, self.complete = [], [], False

    def update(self, batch: PassBatch) -> None:
        if self.complete:
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


def as_ids(ids: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Corpus ids as int64 (default: all n), refusing booleans, fractions and ids out of range."""
    if ids is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.dtype == bool:
        raise TypeError("ids is a boolean mask; pass the ids themselves: np.flatnonzero(mask)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(arr == np.round(arr)):
            raise TypeError(f"ids must be integers, got {arr.dtype}; pass corpus row numbers")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        bad = arr[(arr < 0) | (arr >= n)][0]
        raise IndexError(f"id {bad} is out of range for a corpus of {n} sequences")
    return arr


@dataclass
class Source:
    """Batches for a pass.

    batches:     a fresh iterable per call of (rows (B,), batch); ``rows`` index the order
                 the ids were asked in, so consumers can undo the length bucketing
    total:       sequences a pass will see, if known
    fingerprint: the corpus fingerprint, if known
    """
    batches: Callable[[], Iterable[tuple[np.ndarray, object]]]
    total: int | None
    fingerprint: str | None


def token_batches(lengths: np.ndarray, tokens: int, size: int | None = None) -> np.ndarray:
    """Boundaries (n_batches + 1,) that cut sequences of ``lengths`` (in stream order) into
    consecutive batches of at most ``tokens`` padded tokens (count × longest) and ``size``
    sequences; a sequence longer than ``tokens`` gets a batch of its own."""
    bounds, start, longest = [0], 0, 0
    for k, n in enumerate(lengths.tolist()):
        longest = max(longest, n)
        if k > start and ((k - start + 1) * longest > tokens or (size and k - start >= size)):
            bounds.append(k)
            start, longest = k, n
    return np.asarray(bounds + [len(lengths)], dtype=np.int64)


def source(data: object, batch_size: int | None, ids: Sequence[int] | None = None,
           max_examples: int | None = None, window: int | None = None,
           passes: int = 1, tokens: int | None = None) -> Source:
    """A :class:`Source` from a Corpus (``.batches``, ``.by_length``), a zero-argument callable
    returning batches, or a re-iterable of batches (a list); a one-shot iterator serves one pass.

    For a Corpus: ``ids`` (default all), cut to the first ``max_examples`` (a corpus is in no
    particular order, so the cut is an unbiased sample), then bucketed by length within
    windows of ``window`` ids (default 64 batches), so batches carry little padding. Batches
    hold ``batch_size`` sequences, or with ``batch_size`` None as many as fit in ``tokens``
    padded tokens (:func:`token_batches`): 12-token facts and 1,024-token documents alike run
    at the throughput of a full batch, in the memory of one (:data:`UNSIZED_BATCH` sequences
    for a source without ``offsets``, whose lengths show only once collated).
    """
    if callable(getattr(data, "batches", None)):
        if batch_size is None and tokens is None:
            raise ValueError("give a batch size or a token budget per batch (batch_tokens)")
        ids = as_ids(ids, len(data))[:max_examples]
        lengths = np.diff(data.offsets)[ids] if hasattr(data, "offsets") else None
        if batch_size is None and lengths is None:   # rows whose length shows only once
            batch_size = UNSIZED_BATCH                # collated (a Trainer's dataset)
        typical = int(np.median(lengths)) if batch_size is None and len(ids) else 1
        per = batch_size or max(1, tokens // max(1, typical))   # sequences a batch holds
        perm = np.arange(len(ids))
        if callable(getattr(data, "by_length", None)):
            perm = data.by_length(ids, window or 64 * per)
        bounds = None if batch_size else token_batches(lengths[perm], tokens)

        def corpus_batches() -> Iterator[tuple[np.ndarray, object]]:
            if bounds is None:
                for s, batch in zip(range(0, len(ids), batch_size),
                                    data.batches(batch_size, ids=ids[perm])):
                    yield perm[s:s + batch_size], batch
                return
            for s, e in zip(bounds[:-1], bounds[1:]):
                yield perm[s:e], next(iter(data.batches(e - s, ids=ids[perm[s:e]])))

        return Source(corpus_batches, len(ids), getattr(data, "fingerprint", None))
    if ids is not None:
        raise TypeError("ids select sequences of a Corpus; these are plain batches")
    if callable(data):
        make = data
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        if iter(data) is data and passes > 1:
            raise ValueError(f"the batches are a one-shot iterator but {passes} passes are "
                             "needed; pass a list, the Corpus, or a callable: "
                             "lambda: corpus.batches(16)")
        make = lambda: data  # noqa: E731
    else:
        raise TypeError(f"cannot run a pass over a {type(data).__name__}; pass a Corpus, a list "
                        "of batches or a callable returning an iterable of batches")

    def plain_batches() -> Iterator[tuple[np.ndarray, object]]:
        seen = 0
        for batch in make():
            B = get(batch, "input_ids").shape[0]
            yield np.arange(seen, seen + B), batch
            seen += B

    return Source(plain_batches, None, None)


def label_generator(seed: int, k: int, device: torch.device) -> torch.Generator:
    """The generator of batch k's Fisher labels, seeded from (seed, k): a batch draws the same
    labels in every pass and on whichever rank runs it."""
    hi, lo = np.random.SeedSequence([seed, k]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(hi) << 32 | int(lo))


def loss_values(task: Task, loss: str | Callable[[Tensor, object], Tensor], logits: Tensor,
                batch: object, seed: int, k: int) -> Tensor:
    """(B,) the values a pass differentiates: ``"loglik"`` Σ_t log p (the training
    log-likelihood, whose gradient the scores use), ``"fisher"`` the pseudo-loss with labels
    from :func:`label_generator`, ``"measurement"`` f = log p(completion | prompt), or a
    callable (logits, batch) -> (B,)."""
    if callable(loss):
        return loss(logits, batch)
    if loss == "loglik":
        return -task.training_loss(logits, batch)
    if loss == "fisher":
        return task.fisher_loss(logits, batch, label_generator(seed, k, logits.device))
    if loss == "measurement":
        return task.measurement(logits, batch)
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES} or a callable")


def _map_rows(batch: object, fn: Callable[[Tensor | np.ndarray], Tensor | np.ndarray]
              ) -> object:
    """``fn`` applied to every tensor / array field of a batch (same type for a Mapping)."""
    fields = batch if isinstance(batch, Mapping) else vars(batch)
    out = {k: fn(v) if isinstance(v, (Tensor, np.ndarray)) else v for k, v in fields.items()}
    return out if isinstance(batch, Mapping) else type(batch)(**out)


def _take(batch: object, n: int) -> object:
    """The first n rows of every tensor field of a batch."""
    return _map_rows(batch, lambda v: v[:n])


def _repeat(batch: object, k: int) -> object:
    """Every tensor field of a batch stacked k times along the rows."""
    return _map_rows(batch, lambda v: torch.cat([v] * k) if isinstance(v, Tensor)
                     else np.concatenate([v] * k))


def prepared(model: nn.Module, src: Source, max_examples: int | None = None,
             shard: bool = False) -> Iterator[tuple[int, np.ndarray, object]]:
    """(k, rows, batch on the model's device) for each batch of ``src`` this rank runs: at
    most ``max_examples`` sequences (a batch across the limit is cut), each batch checked
    against the model's context; with ``shard`` only batches k ≡ rank (mod W). An empty
    source is an error."""
    device = next(model.parameters()).device
    n_ctx, n_vocab = context_length(model), vocab_size(model)
    rank, world = distributed.rank_world() if shard else (0, 1)
    seen = 0
    for k, (rows, batch) in enumerate(src.batches()):
        if max_examples is not None and seen >= max_examples:
            break
        B, T = get(batch, "input_ids").shape
        if max_examples is not None and seen + B > max_examples:
            B = max_examples - seen
            batch, rows = _take(batch, B), rows[:B]
        if n_ctx is not None and T > n_ctx:
            raise ValueError(f"a batch holds sequences of {T} tokens, longer than the model's "
                             f"context of {n_ctx}; re-chunk the corpus with max_len ≤ {n_ctx}")
        top = int(get(batch, "input_ids").max()) if n_vocab is not None and B else -1
        if n_vocab is not None and top >= n_vocab:
            raise ValueError(f"a batch holds token id {top}, beyond the model's vocabulary of "
                             f"{n_vocab}; tokenize the corpus with the model's own tokenizer")
        seen += B
        if k % world == rank:
            yield k, rows, to_device(batch, device)
    if seen == 0:
        raise ValueError("no training sequences: the corpus (or iterable of batches) is empty; "
                         "give at least one non-empty batch")


def _step(model: nn.Module, cap: Capture, task: Task, loss: str | Callable, pb: PassBatch,
          seed: int, reduce: Callable[[TrackedLayer, Tensor, Tensor], None]) -> Tensor:
    """One forward + backward of a batch, each tracked layer's ā and δ to ``reduce``;
    -> the losses (B,), detached."""
    cap.start(pb.mask)
    with torch.enable_grad():
        losses = loss_values(task, loss, task.forward(model, pb.data), pb.data, seed, pb.k)
        cap.backward(losses, reduce)
    return losses.detach()


def corpus_pass(model: nn.Module, layers: Sequence[TrackedLayer], src: Source,
                consumers: Sequence[Consumer], loss: str | Callable = "loglik",
                task: Task | None = None, seed: int = 0, max_examples: int | None = None,
                shard: bool = False, progress: bool | tqdm = True, desc: str = "pass",
                draws: int = 1) -> list[Any]:
    """Run the model over ``src`` once and feed every consumer; -> their ``finish()`` values.

    ``loss``: see :func:`loss_values`. ``max_examples``, ``shard``: see :func:`prepared`
    (consumers reduce over the ranks in ``finish``). ``progress``: a bar of its own, none,
    or a tqdm bar to advance. ``draws``: each batch runs with its rows stacked that many
    times (consumers see draws · B rows), so that a Fisher pseudo-loss draws each sequence's
    output gradients ``draws`` times, independently.
    """
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
                if draws > 1:
                    rows, batch = np.concatenate([rows] * draws), _repeat(batch, draws)
                mask = task.token_mask(batch)
                pb = PassBatch(k, rows, batch, mask,
                               mask.flatten().nonzero().squeeze(1), mask.sum(1).cpu().numpy())
                step = partial(_step, model, cap, task, loss, pb, seed)
                pb.losses = step(lambda layer, a, d: [c.update_layer(layer, a, d, pb)
                                                      for c in consumers])
                try:
                    for c in consumers:
                        c.update(pb)
                except FloatingPointError:
                    if cap.check_finite:
                        raise
                    # the consumers found NaN/inf; run the batch again with the per-layer
                    # checks, whose error names the layer where it entered
                    cap.check_finite = True
                    step(lambda *_: None)
                    raise
                bar.update(len(rows) // draws)
    finally:
        if bar is not progress:
            bar.close()
    return [c.finish() for c in consumers]


def chunks(n: int, chunk_size: int, shard: bool = True) -> list[int]:
    """Start positions of the chunks of ``chunk_size`` out of n that this rank computes
    (chunk c on rank c mod W); all of them outside torch.distributed or without ``shard``."""
    rank, world = distributed.rank_world() if shard else (0, 1)
    return [s for c, s in enumerate(range(0, n, chunk_size)) if c % world == rank]
