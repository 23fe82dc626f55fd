"""Corpus: training sequences, tokenized once, with their text and metadata beside them.

A :class:`Corpus` is built from a list of strings, a ``.txt`` / ``.jsonl`` / ``.parquet`` file or a
Hugging Face ``datasets.Dataset``. Each document is tokenized and cut into sequences of at most
``max_len`` tokens — or from a dataset already tokenized the way a Hugging Face Trainer sees it
(``input_ids`` [, ``attention_mask``, ``labels``], :meth:`Corpus.from_tokenized`); every
sequence keeps a stable id (its row), the document it came from and
its token offset there, its text (for display) and the document's metadata.

Tokens live in one flat ``int32`` array with offsets (``tokens[offsets[i]:offsets[i+1]]`` is
sequence ``i``), so iterating in padded batches costs no Python work per token. Files are read
in streamed blocks, never whole.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .checks import as_ids, checked, first_line, whole
from .progress import tqdm

_BLOCK = 1024  # documents tokenized per call when streaming a source
RESERVED = frozenset({"text", "doc", "offset", "n_tokens", "parent_id"})  # columns of Corpus.df


class CorpusError(ValueError):
    """Bad corpus input; the message names the problem and the fix."""


@dataclass
class Batch:
    """A padded batch of sequences.

    input_ids:      (B, T) int64, right-padded with ``pad_id``
    attention_mask: (B, T) int64, 1 for real tokens, 0 for padding
    ids:            (B,) int64, the corpus ids of the rows
    labels:         (B, T) int64 training targets in Hugging Face's convention (the token,
                    or -100 where it is not trained on), or None: every real token is trained
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ids: np.ndarray
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.ids,
                     None if self.labels is None else self.labels.to(device))

    def __len__(self) -> int:
        return len(self.ids)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and rules: two corpora (or a corpus and a
    query) are compatible only if their tokenizers hash alike."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:
        spec = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


IGNORE = -100  # Hugging Face's label of a token that is not trained on


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int, ids: np.ndarray,
              labels: Sequence[np.ndarray] | None = None) -> Batch:
    """Right-pad 1-D token arrays (and their labels, padded with -100) into a :class:`Batch`."""
    T = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    padded = None if labels is None else np.full((len(seqs), T), IGNORE, dtype=np.int64)
    for b, s in enumerate(seqs):
        input_ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
        if padded is not None:
            padded[b, :len(s)] = labels[b]
    return Batch(torch.from_numpy(input_ids), torch.from_numpy(mask), np.asarray(ids, np.int64),
                 None if padded is None else torch.from_numpy(padded))


def _check_record(rec: object, text_field: str, source: str) -> None:
    """Refuse a record that is no dict, has no text in ``text_field``, or has a metadata field
    named like a column of :attr:`Corpus.df` (a field ``id`` becomes ``source_id``)."""
    if not isinstance(rec, Mapping):
        raise CorpusError(f"{source or 'a record'} holds a {type(rec).__name__}, not an "
                          "object of fields; give one dict per document")
    if text_field not in rec:
        raise CorpusError(f"{source or 'a record'} has no field {text_field!r} "
                          f"(fields: {', '.join(rec)}); pass text_field=<one of them>")
    if not isinstance(rec[text_field], str):
        raise CorpusError(f"field {text_field!r} must hold text, got "
                          f"{type(rec[text_field]).__name__} in {source or 'a record'}")
    clash = RESERVED.intersection(k for k in rec if k != text_field) | (
        {"source_id"} if "id" in rec and "source_id" in rec else set())
    if clash:
        raise CorpusError(f"{source or 'a record'} has a metadata field "
                          f"{sorted(clash)[0]!r}, a name the corpus uses for its own "
                          f"columns ({', '.join(sorted(RESERVED))}; a field 'id' "
                          "becomes 'source_id'); rename that field")


class Corpus:
    """Tokenized training sequences with text and metadata; see the module docstring.

    Build with :meth:`from_texts`, :meth:`from_file`, :meth:`from_dataset`; iterate with
    :meth:`batches`; look rows up with ``corpus.df`` (a DataFrame indexed by id with columns
    ``text``, ``doc``, ``offset``, ``n_tokens`` and the source's metadata).

    ``labels``: None (every token is a training target), or one int32 label per token in
    Hugging Face's convention — the token itself, or -100 where the model is not trained to
    predict it (e.g. the prompt of a chat fine-tune) — aligned with ``tokens``.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, df: pd.DataFrame,
                 tokenizer: Any, max_len: int, source: str = "",
                 labels: np.ndarray | None = None) -> None:
        if len(df) == 0:
            raise CorpusError(f"corpus is empty: {source or 'the input'} produced no sequences; "
                              "give at least one non-empty text")
        if labels is not None and len(labels) != len(tokens):
            raise CorpusError(f"{len(labels)} labels for {len(tokens)} tokens; give one label "
                              "per token (-100 where it is not trained on)")
        self.tokens, self.offsets, self.df, self.labels = tokens, offsets, df, labels
        self.tokenizer, self.max_len, self.source = tokenizer, max_len, source
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)
        h = hashlib.sha256(self.tokenizer_fingerprint.encode())
        h.update(np.ascontiguousarray(offsets).tobytes())
        h.update(np.ascontiguousarray(tokens).tobytes())
        if labels is not None:
            h.update(np.ascontiguousarray(labels).tobytes())
        self.fingerprint = h.hexdigest()[:16]

    # -- building ---------------------------------------------------------------------------

    @classmethod
    @checked(minimum={"max_len": 2, "total": 0})
    def from_records(cls, records: Iterable[dict], tokenizer: Any, max_len: int = 128,
                     text_field: str = "text", source: str = "",
                     total: int | None = None, progress: bool = True) -> "Corpus":
        """Tokenize an iterable of dicts (one per document); ``text_field`` holds the text and
        every other field is kept as metadata. Documents longer than ``max_len`` tokens are cut
        into consecutive chunks. ``progress``: a bar, unless the source is known to be small."""
        if total is None and hasattr(records, "__len__"):
            total = len(records)
        tokens: list[np.ndarray] = []
        rows: list[dict] = []
        doc = 0
        block: list[dict] = []

        def flush() -> None:
            nonlocal doc
            texts = [r[text_field] for r in block]
            encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
            for rec, ids in zip(block, encoded):
                # the source's own "id" is kept as source_id: ours is the row number
                meta = {("source_id" if k == "id" else k): v
                        for k, v in rec.items() if k != text_field}
                for off in range(0, len(ids), max_len):
                    chunk = np.asarray(ids[off:off + max_len], dtype=np.int32)
                    if len(chunk) == 0:
                        continue
                    whole = off == 0 and len(ids) <= max_len
                    text = rec[text_field] if whole else tokenizer.decode(chunk)
                    tokens.append(chunk)
                    rows.append(dict(text=text, doc=doc, offset=off, n_tokens=len(chunk),
                                     **meta))
                doc += 1
            block.clear()

        for rec in tqdm(records, desc="tokenizing", unit="doc", total=total,
                        disable=not progress or (total is not None and total < 50 * _BLOCK)):
            _check_record(rec, text_field, source)
            if rec[text_field].strip():
                block.append(rec)
            if len(block) == _BLOCK:
                flush()
        if block:
            flush()
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        df = pd.DataFrame(rows)
        df.index.name = "id"
        return cls(flat, offsets, df, tokenizer, max_len, source)

    @classmethod
    @checked(minimum={"max_len": 2})
    def from_texts(cls, texts: Sequence[str], tokenizer: Any, max_len: int = 128,
                   metadata: Sequence[dict] | None = None) -> "Corpus":
        """A corpus from a list of strings, with optional per-text metadata dicts."""
        if isinstance(texts, str):
            raise CorpusError("texts must be a list of strings, got one string; wrap it: [text]")
        metadata = [{} for _ in texts] if metadata is None else list(metadata)
        if len(metadata) != len(texts):
            raise CorpusError(f"{len(texts)} texts but {len(metadata)} metadata dicts; give one "
                              "dict per text (or none)")
        return cls.from_records(({"text": t, **m} for t, m in zip(texts, metadata)),
                                tokenizer, max_len, source="texts", total=len(texts))

    @classmethod
    @checked(minimum={"max_len": 2})
    def from_file(cls, path: str | os.PathLike, tokenizer: Any, max_len: int = 128,
                  text_field: str = "text", progress: bool = True) -> "Corpus":
        """A corpus from ``.txt`` (one document per non-empty line), ``.jsonl`` (one JSON object
        per line) or ``.parquet``; read in streamed blocks."""
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"corpus file not found: {path}; check the path")
        suffix = "".join(path.suffixes[-1:]).lower()
        if suffix not in (".txt", ".jsonl", ".parquet"):
            raise CorpusError(f"unsupported corpus file type {suffix!r} for {path}; "
                              "use .txt, .jsonl or .parquet")
        return cls.from_records(_read_records(path, text_field), tokenizer, max_len,
                                text_field=text_field, source=str(path), progress=progress)

    @classmethod
    @checked(minimum={"max_len": 2})
    def from_dataset(cls, dataset: Any, tokenizer: Any, max_len: int = 128,
                     text_field: str = "text", progress: bool = True) -> "Corpus":
        """A corpus from a Hugging Face ``datasets.Dataset`` (rows streamed)."""
        if text_field not in dataset.column_names:
            raise CorpusError(f"dataset has no column {text_field!r} (columns: "
                              f"{', '.join(dataset.column_names)}); pass text_field=<one of them>")
        return cls.from_records(iter(dataset), tokenizer, max_len, text_field=text_field,
                                source="dataset", total=len(dataset), progress=progress)

    @classmethod
    @checked(minimum={"max_len": 2})
    def from_tokenized(cls, dataset: Any, tokenizer: Any, max_len: int | None = None,
                       source: str = "tokenized dataset") -> "Corpus":
        """A corpus from rows already tokenized as a Hugging Face Trainer sees them: a
        ``datasets.Dataset`` (or a list of dicts) with ``input_ids``, optionally
        ``attention_mask`` (tokens where it is 0 are dropped) and ``labels`` (-100: not trained
        on, e.g. a masked prompt). One row is one sequence, as the Trainer trains it; its text
        is the decoded tokens, and scalar columns are kept as metadata. ``max_len``: the longest
        row by default; a longer row is an error (the Trainer would have cut it otherwise)."""
        columns = getattr(dataset, "column_names", None) or (list(dataset[0]) if len(dataset)
                                                             else [])
        if "input_ids" not in columns:
            raise CorpusError(f"{source} has no input_ids column (columns: "
                              f"{', '.join(columns) or 'none'}); tokenize it first, or build the "
                              "corpus from text with Corpus.from_dataset(..., text_field=...)")
        token_columns = {"input_ids", "attention_mask", "labels", "token_type_ids",
                         "position_ids", "special_tokens_mask"}
        has_labels = "labels" in columns
        tokens, labels, rows = [], [], []
        for n, rec in enumerate(tqdm(dataset, desc="reading", unit="row", total=len(dataset),
                                     disable=len(dataset) < 50 * _BLOCK)):
            ids = np.asarray(rec["input_ids"], dtype=np.int64).reshape(-1)
            keep = (np.asarray(rec["attention_mask"]).reshape(-1).astype(bool)
                    if rec.get("attention_mask") is not None else np.ones(len(ids), bool))
            lab = np.asarray(rec["labels"], dtype=np.int64).reshape(-1) if has_labels else None
            if len(keep) != len(ids) or (lab is not None and len(lab) != len(ids)):
                raise CorpusError(f"{source} row {n}: input_ids, attention_mask and labels must "
                                  "have one entry per token")
            ids = ids[keep]
            if len(ids) == 0:
                continue
            if max_len is not None and len(ids) > max_len:
                raise CorpusError(f"{source} row {n} has {len(ids)} tokens, more than max_len="
                                  f"{max_len}; truncate the dataset or raise max_len")
            tokens.append(ids.astype(np.int32))
            if lab is not None:
                labels.append(lab[keep].astype(np.int32))
            meta = {("source_id" if k == "id" else k): v for k, v in rec.items()
                    if k not in token_columns and np.ndim(v) == 0}
            rows.append(dict(text=tokenizer.decode(ids), doc=n, offset=0, n_tokens=len(ids),
                             **{k: v for k, v in meta.items() if k != "text"}))
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        df = pd.DataFrame(rows)
        df.index.name = "id"
        return cls(np.concatenate(tokens) if tokens else np.zeros(0, np.int32), offsets, df,
                   tokenizer, max_len or int(lengths.max(initial=2)), source,
                   np.concatenate(labels) if has_labels and labels else None)

    @classmethod
    @checked()
    def concat(cls, parts: "dict[str, Corpus]", column: str = "source") -> "Corpus":
        """One corpus of several, e.g. ``{"pretraining": pre, "fine-tuning": ft}``, so that one
        pass scores them all: rows keep their order, part after part; the part's name goes in
        ``column`` and its own id in ``source_row`` (metadata a part lacks is missing). Parts
        with labels keep them; a part without trains on every token."""
        if not parts:
            raise CorpusError("Corpus.concat takes a non-empty dict {name: Corpus}, e.g. "
                              "{'pretraining': pre, 'fine-tuning': ft}")
        items = list(parts.items())
        first = items[0][1]
        for name, part in items:
            if not isinstance(part, Corpus):
                raise CorpusError(f"part {name!r} is a {type(part).__name__}, not a Corpus; "
                                  "build it with Corpus.from_...(..., tokenizer)")
            if part.tokenizer_fingerprint != first.tokenizer_fingerprint:
                raise CorpusError(f"part {name!r} was tokenized with another tokenizer than "
                                  f"{items[0][0]!r}; tokenize every part with the model's one")
            if column in part.df.columns:
                raise CorpusError(f"part {name!r} already has a column {column!r}; pass "
                                  "column=<another name>")
        dfs = [p.df.reset_index().rename(columns={"id": "source_row"}).assign(**{column: n})
               for n, p in items]
        df = pd.concat(dfs, ignore_index=True)
        df = df[["text", column, "source_row"] + [c for c in df.columns
                                                  if c not in ("text", column, "source_row")]]
        df.index.name = "id"
        tokens = np.concatenate([p.tokens for _, p in items])
        lengths = np.concatenate([np.diff(p.offsets) for _, p in items])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        labels = None
        if any(p.labels is not None for _, p in items):
            labels = np.concatenate([p.tokens if p.labels is None else p.labels
                                     for _, p in items])
        return cls(tokens, offsets, df, first.tokenizer, max(p.max_len for _, p in items),
                   " + ".join(n for n, _ in items), labels)

    # -- access -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.df)

    def __repr__(self) -> str:
        return (f"Corpus({len(self)} sequences, {len(self.tokens)} tokens, max_len={self.max_len}"
                f", source={self.source!r}, fingerprint={self.fingerprint})")

    def row(self, i: int) -> int:
        """Sequence id ``i`` checked: an integer in [0, N), never a bool, a float or a negative
        id wrapped around (a one-line error naming it)."""
        return whole(i, f"id (the corpus has {len(self.offsets) - 1} sequences)", 0,
                     len(self.offsets) - 1)

    def token_ids(self, i: int) -> np.ndarray:
        """Token ids of sequence ``i``, shape (n_tokens,)."""
        i = self.row(i)
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def token_labels(self, i: int) -> np.ndarray | None:
        """Labels of sequence ``i`` (n_tokens,), -100 where not trained on; None without labels."""
        return None if self.labels is None else self._rows(self.labels, [self.row(i)])[0]

    def text(self, i: int) -> str:
        return self.df.at[self.row(i), "text"]

    def _rows(self, flat: np.ndarray, ids: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        """The slices of ``flat`` (tokens or labels) of the checked ``ids``, in their order (the
        passes' hot path: no check per sequence)."""
        ids = np.asarray(ids, dtype=np.int64)
        return [flat[a:b] for a, b in zip(self.offsets[ids].tolist(),
                                          self.offsets[ids + 1].tolist())]

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

    @checked(minimum={"batch_size": 1})
    def batches(self, batch_size: int = 32, ids: Sequence[int] | None = None,
                progress: bool = False) -> Iterator[Batch]:
        """Padded batches over ``ids`` (default: all, in id order)."""
        ids = as_ids(ids, len(self))
        starts = range(0, len(ids), batch_size)
        for s in tqdm(starts, desc="batches", disable=not progress, unit="batch"):
            chunk = ids[s:s + batch_size]
            yield pad_batch(self._rows(self.tokens, chunk), self.pad_id, chunk,
                            None if self.labels is None else self._rows(self.labels, chunk))

    def by_length(self, ids: Sequence[int], window: int) -> np.ndarray:
        """Positions into ``ids`` that order them by token count within consecutive windows of
        ``window`` ids: batches cut from that order carry little padding (padding is compute
        spent on nothing), while the stream keeps its order at the scale of a window."""
        ids = np.asarray(ids, dtype=np.int64)
        lengths = np.diff(self.offsets)[ids]
        return np.concatenate([s + np.argsort(lengths[s:s + window], kind="stable")
                               for s in range(0, len(ids), window)] or [np.zeros(0, np.int64)])

    @checked(nonempty=("ids",))
    def subset(self, ids: Sequence[int]) -> "Corpus":
        """A new corpus of the given rows (renumbered from 0; the old id is kept as
        ``parent_id``)."""
        ids = as_ids(ids, len(self))
        seqs = self._rows(self.tokens, ids)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        df = self.df.iloc[ids].reset_index().rename(columns={"id": "parent_id"})
        df.index.name = "id"
        flat = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int32)
        labels = (None if self.labels is None else
                  np.concatenate(self._rows(self.labels, ids)) if len(ids) else
                  np.zeros(0, np.int32))
        return Corpus(flat, offsets, df, self.tokenizer, self.max_len, self.source, labels)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file; a byte that is not UTF-8
    is a :class:`CorpusError` naming the file, line and column."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); re-encode the file as UTF-8") from None
            if line.strip():
                yield n, line.rstrip("\r\n")


def _read_records(path: Path, text_field: str) -> Iterator[dict]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        for _, line in _lines(path):
            yield {text_field: line}
    elif suffix == ".jsonl":
        for n, line in _lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n} is not valid JSON ({e.msg}); "
                                  "each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{path}:{n} is a JSON {type(record).__name__}, not an object; "
                                  f"each line must be one JSON object with a {text_field!r} "
                                  "field")
            yield record
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path} is not a readable parquet file ({first_line(e)}); "
                              "rewrite it, e.g. with pandas.DataFrame.to_parquet") from None
        if text_field not in pf.schema_arrow.names:
            raise CorpusError(f"{path} has no column {text_field!r} (columns: "
                              f"{', '.join(pf.schema_arrow.names)}); pass text_field=...")
        try:
            for batch in pf.iter_batches(batch_size=_BLOCK):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path} is a corrupt parquet file ({first_line(e)}); "
                              "rewrite it") from None

