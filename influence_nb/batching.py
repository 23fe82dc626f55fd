"""What a pass runs over: batches of training sequences, cut and checked for the model.

A :class:`Source` is a fresh iterable of (rows, batch) per pass, from a Corpus (ids validated
by :func:`as_ids`, bucketed by length, batches of a fixed size or of a token budget:
:func:`token_batches`) or from any batches. :func:`prepared` is what the pass itself iterates:
the source's batches on the model's device, within ``max_examples``, checked against the
model's context and vocabulary, and sharded over torch.distributed ranks.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed
from .checks import as_ids
from .layers import context_length, vocab_size
from .task import get, to_device

UNSIZED_BATCH = 8       # sequences per batch of a source whose lengths are unknown (see source)


@dataclass
class Source:
    """Batches for a pass.

    batches:     a fresh iterable per call of (rows (B,), batch); ``rows`` index the order
                 the ids were asked in, so consumers can undo the length bucketing
    total:       sequences a pass will see, if known
    fingerprint: the corpus fingerprint, if known
    repeatable:  whether more passes than asked for can run (not over a one-shot iterator)
    """
    batches: Callable[[], Iterable[tuple[np.ndarray, object]]]
    total: int | None
    fingerprint: str | None
    repeatable: bool = True


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
           passes: int = 1, tokens: int | None = None, sequences: int | None = None) -> Source:
    """A :class:`Source` from a Corpus (``.batches``, ``.by_length``), a zero-argument callable
    returning batches, or a re-iterable of batches (a list); a one-shot iterator serves one pass.

    For a Corpus: ``ids`` (default all), cut to the first ``max_examples`` (a corpus is in no
    particular order, so the cut is an unbiased sample), then bucketed by length within
    windows of ``window`` ids (default 64 batches), so batches carry little padding. Batches
    hold ``batch_size`` sequences, or with ``batch_size`` None as many as fit in ``tokens``
    padded tokens (:func:`token_batches`): 12-token facts and 1,024-token documents alike run
    at the throughput of a full batch, in the memory of one (:data:`UNSIZED_BATCH` sequences
    for a source without ``offsets``, whose lengths show only once collated); ``sequences``
    caps such a batch's count (for work that grows with the sequences, not the tokens).
    """
    if callable(getattr(data, "batches", None)):
        if batch_size is None and tokens is None:
            raise ValueError("give a batch size or a token budget per batch (batch_tokens)")
        ids = as_ids(ids, len(data))[:max_examples]
        lengths = np.diff(data.offsets)[ids] if hasattr(data, "offsets") else None
        if batch_size is None and lengths is None:   # rows whose length shows only once
            batch_size = UNSIZED_BATCH                # collated (a Trainer's dataset)
        typical = int(np.median(lengths)) if batch_size is None and len(ids) else 1
        per = batch_size or min(max(1, tokens // max(1, typical)),   # sequences a batch holds
                                sequences or len(ids) or 1)
        perm = np.arange(len(ids))
        if callable(getattr(data, "by_length", None)):
            perm = data.by_length(ids, window or 64 * per)
        bounds = None if batch_size else token_batches(lengths[perm], tokens, sequences)

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
    once = False
    if callable(data):
        make = data
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        once = iter(data) is data
        if once and passes > 1:
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

    return Source(plain_batches, None, None, repeatable=not once)


def _map_rows(batch: object, fn: Callable[[Tensor | np.ndarray], Tensor | np.ndarray]
              ) -> object:
    """``fn`` applied to every tensor / array field of a batch (same type for a Mapping)."""
    fields = batch if isinstance(batch, Mapping) else vars(batch)
    out = {k: fn(v) if isinstance(v, (Tensor, np.ndarray)) else v for k, v in fields.items()}
    return out if isinstance(batch, Mapping) else type(batch)(**out)


def _take(batch: object, n: int) -> object:
    """The first n rows of every tensor field of a batch."""
    return _map_rows(batch, lambda v: v[:n])



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
