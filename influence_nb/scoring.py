"""Streaming influence scores of training sequences on queries, total, per layer and per token.

For a tracked layer ℓ, a training sequence's log-likelihood gradient is DW = Σ_t δ_t ā_tᵀ
(δ: gradient of Σ_t log p(z_t+1 | z_≤t) at the layer's output). With the preconditioned query
gradient R_ℓ = (G_ℓ + λ_ℓ I)⁻¹ ∇_ℓ f,

    layer score  s_ℓ = ⟨R_ℓ, DW_ℓ⟩ = Σ_t δ_tᵀ R_ℓ ā_t
    token score  s_t = Σ_ℓ δ_ℓ,tᵀ R_ℓ ā_ℓ,t          (paper eq. 31: the update at position t,
                                                     which predicts token t + 1)
    total        s   = Σ_ℓ s_ℓ = Σ_t s_t

Sign: **positive means adding the sequence to training raises log p(completion | prompt)**:
s is the first-order change of f when the sequence's log-likelihood is up-weighted by one unit
in the (mean) training objective.

R_ℓ comes as a rank-r factorisation U Vᵀ (:mod:`influence_nb.queries`), so that
δ_tᵀ R ā_t = (Uᵀ δ_t) · (Vᵀ ā_t) costs (out + in)·r per token and query instead of out·in.
For totals and per-layer scores without tokens, the per-sequence gradient DW is formed instead
whenever that is cheaper (a cost model per layer picks), and either contracted with a dense R
or projected on the factors, Σ_k u_kᵀ (DW v_k): all three give the same numbers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from einops import einsum
from torch import Tensor, nn

from . import distributed, store
from .batching import source
from .checks import as_ids, check_args
from .curvature import Factors, fingerprint_of
from .data import Corpus
from .layers import TrackedLayer, find_layers, stat_dtype
from .passes import Consumer, PassBatch, chunks, corpus_pass
from .progress import tqdm
from .queries import Queries
from .task import Task, get


@dataclass
class ScoreArgs:
    """How to score.

    rank:       rank r of each preconditioned query gradient R_ℓ (paper: 32 ≈ full rank);
                None keeps full rank
    batch_size: training sequences per forward + backward; None: as many as fit in
                ``batch_tokens`` (length-bucketed)
    batch_tokens: padded tokens per batch when ``batch_size`` is None; None: 1,024, or up to
                4,096 when the scorer must form most of R again per batch (:func:`scan_tokens`)
    query_block: score at most this many queries per pass over the corpus (None: all in one
                pass): memory flat in the number of queries, at the cost of a pass per block
    per_layer:  keep per-layer scores (Q, L, N) as well as totals
    chunk_size: sequences per chunk file of a resumable scan (a multiple of batch_size)
    precision:  "float32" (default): the queries' factors and the scorer's products in the
                statistics' dtype (float32, or float64 for a float64 model); "bfloat16": both
                in bfloat16 with float32 accumulation — half the queries' memory and about
                twice the product rate where the CPU or GPU has bfloat16 arithmetic, at a
                relative error of ≈ 0.4 % per score (docs/design.md)
    progress:   show a progress bar
    """
    rank: int | None = 32
    batch_size: int | None = None
    batch_tokens: int | None = None
    query_block: int | None = None
    per_layer: bool = True
    chunk_size: int = 2048
    precision: str = "float32"
    progress: bool = True

    MINIMUM: ClassVar[dict[str, float]] = {"rank": 1, "batch_size": 1, "batch_tokens": 1,
                                           "query_block": 1, "chunk_size": 1}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"precision": ("float32", "bfloat16")}

    def __post_init__(self) -> None:
        check_args(self)


def score_dtype(model: nn.Module, precision: str) -> torch.dtype:
    """The dtype of the queries' factors and the scorer's products for ``ScoreArgs.precision``:
    bfloat16, or the statistics' dtype (float32, float64 for a float64 model)."""
    return torch.bfloat16 if precision == "bfloat16" else stat_dtype(model)


SCORE_BYTES = 512 << 20   # dense R and per-sequence gradients the scorer holds at once
SCAN_BATCH_BYTES = 256 << 20   # a scan batch's vocabulary-wide buffers and tracked ā, δ
# the token path's queries per block: their factors within about a core's cache, since each
# block's (q, out, r) is laid out again as (out, q·r) for its product (GPT-2 small's MLP
# linears, 200 queries, one thread: 0.88–0.92× the time of one block of all 200 in float32,
# 0.82–0.89× in bfloat16)
FACTOR_BLOCK_BYTES = 8 << 20


def kept_dense(queries: Queries, layers: Sequence[TrackedLayer], budget: int
               ) -> tuple[set[str], float]:
    """The layers whose dense R a scorer of ``budget`` bytes keeps for a whole scan — exact R
    always (it is held anyway); every R when they fit in three quarters of the budget (no
    block of R is formed then: the last quarter is DW's); else the smallest first within half
    of it — and the share of the other R's bytes, which it forms from their factors again for
    every batch."""
    dense = sum(len(queries) * t.shape[0] * t.shape[1] * queries.R[t.name].U.element_size()
                for t in layers if queries.R[t.name].full is None)
    if dense <= budget * 3 // 4:
        return {t.name for t in layers}, 0.0
    room, keep, formed, total = budget // 2, set(), 0, 0
    for t in sorted(layers, key=lambda t: t.shape[0] * t.shape[1]):
        lr = queries.R[t.name]
        need = len(queries) * t.shape[0] * t.shape[1] * lr.U.element_size()
        total += need
        if lr.full is not None or need <= room:
            keep.add(t.name)
            room -= 0 if lr.full is not None else need
        else:
            formed += need
    return keep, formed / max(1, total)


def scan_tokens(model: nn.Module, layers: Sequence[TrackedLayer],
                batch_tokens: int | None = None, formed: float = 1.0) -> int:
    """Padded tokens per scan batch: ``batch_tokens`` when given; 1,024 (the fit's budget)
    when the scorer keeps most of R (``formed``, the share it forms again per batch, is at most
    a half: :func:`kept_dense`); else as many as take :data:`SCAN_BATCH_BYTES` at 4 bytes for
    each of two vocabulary-wide numbers (the logits and their gradient, see
    ``task.LOGIT_BYTES``) and each tracked layer's ā and δ per token, from 1,024 to 4,096.
    Larger batches share forming R among more sequences (the short world's 200-query scan of
    every block linear: 0.67× the time at 1,024) but gain nothing else, and slow the
    per-sequence DW a little (longer streams through memory); a 32–50 K vocabulary keeps
    1,024."""
    if batch_tokens is not None:
        return batch_tokens
    if formed <= 0.5:
        return 1024
    head = model.get_output_embeddings()
    V = head.weight.shape[0] if head is not None else 0
    per_token = 4 * (2 * V + sum(o + i for o, i in (t.shape for t in layers)))
    return int(min(4096, max(1024, SCAN_BATCH_BYTES // per_token)))


# Costs in multiply-adds of a large matrix product; two kinds of work run far slower per
# operation (measured on one CPU core, GPT-2-small widths): streaming a dense R through a
# product with only a batch's few columns (memory-bound: ≈ 48 multiply-adds' time per number
# of R), and forming R from its factors (batched products only r wide: ≈ 4× each)
STREAM, REFORM = 48, 4


class Costs(NamedTuple):
    """Multiply-adds of scoring one layer and batch by each path (see :func:`scoring_cost`)."""
    tokens: float
    dense: float
    project: float

    def cheapest(self) -> str:
        """The cheapest path's name; a tie goes to "dense", then "tokens"."""
        return min(("dense", "tokens", "project"), key=self._asdict().get)


def scoring_cost(B: int, T: int, d_out: int, d_in: int, Q: int, r: int, kept: bool,
                 groups: int, blocks: int = 1) -> Costs:
    """Cost of one layer and batch by each path, in multiply-adds of a large matrix product:
    per token (Uᵀ δ_t)·(Vᵀ ā_t) costs Q·B·T·r·(out + in); forming DW (B, out, in) costs
    B·T·out·in, then its product with a dense R Q·out·in·max(columns, STREAM) per group of
    sequences ("dense"), or with the factors of its wider side B·out·in·Q·r ("project": one
    large product, then the narrower side's factors elementwise). The project path wins on
    long sequences, T > out·in / (out + in): GPT-2 small's MLP at 1,024 tokens, 0.68× the
    token path's time (one core, 200 queries). R not kept is formed from its factors in
    ``blocks`` blocks of queries (REFORM·Q·out·in·r each time), either once per group of DW or
    once per batch with each group's DW formed once per block: :func:`reform_per_group` picks
    the cheaper. An exact R (r ≥ min(out, in), e.g. a LoRA matrix) saves nothing by its
    factors: only the dense path is taken then."""
    oi, cols = d_out * d_in, -(-B // groups)
    dense = B * T * oi + groups * Q * oi * max(cols, STREAM)
    if not kept:
        form = REFORM * Q * oi * r   # each block once, then again per group or DW per block
        dense += form + ((groups - 1) * form
                         if reform_per_group(B, T, d_out, d_in, Q, r, groups, blocks)
                         else (blocks - 1) * B * T * oi)
    if r >= min(d_out, d_in):
        return Costs(math.inf, dense, math.inf)
    return Costs(Q * B * T * r * (d_out + d_in), dense, B * T * oi + B * oi * Q * r)


def reform_per_group(B: int, T: int, d_out: int, d_in: int, Q: int, r: int, groups: int,
                     blocks: int) -> bool:
    """Whether R's blocks are best formed again for each group of DW (True) rather than each
    group's DW formed again for each block of R (see :func:`scoring_cost`)."""
    return (groups - 1) * REFORM * Q * r <= (blocks - 1) * B * T


class Layout(NamedTuple):
    """How a :class:`Scorer` scores one layer for a batch: ``path`` "tokens" in blocks of
    ``step`` queries; "dense", DW in ``groups`` against R kept (``kept``) or formed in
    ``blocks``; "project", DW in ``groups`` times the factors in blocks of ``step`` queries;
    ``acc`` the dtype of its sums."""
    path: str
    kept: bool
    groups: int
    blocks: int
    step: int
    acc: torch.dtype


class Scorer(Consumer):
    """Scores the sequences of a pass against fixed :class:`Queries`, layer by layer.

    ``finish`` -> (layer scores (Q, L, n) float64 in the pass's row order, and with
    ``per_token`` the token scores of each row: (Q, T_row) summed over layers, or None).
    Per layer and batch, the cheapest of three paths (:func:`scoring_cost`; same numbers):
    R's factors per token, dense R against each sequence's DW, or DW projected on the factors.
    Memory stays within ``budget`` bytes (default :data:`SCORE_BYTES`) whatever the number of
    queries: dense R is kept for the scan (all of it when it fits in three quarters, else the
    layers that fit in half of it: :func:`kept_dense`), and otherwise formed in blocks of
    queries (a quarter) against groups of DW (a quarter); the token and project paths run in
    blocks of queries too. Non-finite scores raise (checked on the host copy, so the pass
    skips its per-layer reductions).
    """
    checks_finite = True

    def __init__(self, queries: Queries, layers: Sequence[TrackedLayer], n: int,
                 per_token: bool = False, budget: int | None = None):
        self.queries, self.per_token = queries, per_token
        self.budget = SCORE_BYTES if budget is None else budget
        self.index = {t.name: l for l, t in enumerate(layers)}
        self.layer_scores = np.zeros((len(queries), len(layers), n))
        self.tokens: list[np.ndarray | None] = [None] * n if per_token else None
        self._keep = kept_dense(queries, layers, self.budget)[0]   # dense R for the scan
        self._dense: dict[str, Tensor] = {}
        self._batch: dict[int, Tensor] = {}      # layer -> (Q, B) on the model's device
        self._tok: Tensor | None = None          # (Q, B, T) summed over the layers so far

    def _block(self, layer: TrackedLayer) -> int:
        """Queries per block of R formed from its factors: a quarter of the budget."""
        size = layer.shape[0] * layer.shape[1] * self.queries.R[layer.name].U.element_size()
        return max(1, self.budget // 4 // size)

    def _R_blocks(self, layer: TrackedLayer, dtype: torch.dtype) -> Iterator[Tensor]:
        """R flattened, (q, out·(in+1)) — or its transpose's (q, (in+1)·out) when in+1 < out
        (see :meth:`update_layer`) — whole when kept, else in blocks of q queries formed from
        the factors within a quarter of the budget."""
        (o, i), lr = layer.shape, self.queries.R[layer.name]
        wide = i < o
        if layer.name in self._keep:
            if layer.name not in self._dense:    # a copy of the transpose, once per scan
                R = lr.dense()
                self._dense[layer.name] = (R.mT if wide else R).flatten(1)
            yield self._dense[layer.name].to(dtype)
            return
        step = self._block(layer)
        for s in range(0, len(self.queries), step):
            U, V = lr.U[s:s + step].to(dtype), lr.V[s:s + step].to(dtype)
            yield (V @ U.mT if wide else U @ V.mT).flatten(1)

    def _layout(self, layer: TrackedLayer, B: int, T: int) -> Layout:
        """How a batch of B sequences of T tokens is scored on ``layer`` (see :class:`Layout`)."""
        Q, (o, i), lr = len(self.queries), layer.shape, self.queries.R[layer.name]
        acc = torch.promote_types(lr.U.dtype, torch.float32)
        r, dw, kept = lr.U.shape[-1], o * i * lr.U.element_size(), layer.name in self._keep
        groups = -(-B // max(1, self.budget // 4 // dw))
        blocks = 1 if kept else -(-Q // self._block(layer))
        cost = scoring_cost(B, T, o, i, Q, r, kept, groups, blocks)
        path = "tokens" if self.per_token else cost.cheapest()
        # the products of a block of queries within a quarter of the budget: two (B, T, r)
        # per query on the token path, two (group, min(out, in), r) on the project path
        rows = 2 * (B * T if path == "tokens" else -(-B // groups) * min(o, i))
        step = max(1, self.budget // 4 // (rows * r * acc.itemsize))
        if path == "tokens":
            step = min(step, max(1, FACTOR_BLOCK_BYTES // ((o + i) * r * lr.U.element_size())))
        return Layout(path, kept, groups, blocks, step, acc)

    def held_bytes(self, layers: Sequence[TrackedLayer], B: int, T: int) -> int:
        """The most bytes this scorer holds while scoring batches of B sequences of T tokens:
        the dense R it keeps for the layers that take the dense path, and the largest of each
        layer's transient ones — the token path's products for a block of queries, or a group
        of DW and (R not kept) a block of R formed from its factors."""
        Q, held, transient = len(self.queries), 0, 0
        for t in layers:
            (o, i), lr, way = t.shape, self.queries.R[t.name], self._layout(t, B, T)
            size, r = lr.U.element_size(), lr.U.shape[-1]
            if way.path == "tokens":
                transient = max(transient, 2 * min(way.step, Q) * B * T * r * way.acc.itemsize)
                continue
            group = -(-B // way.groups) * o * i * size
            if way.path == "project":
                transient = max(transient, group + 2 * -(-B // way.groups) * min(o, i)
                                * min(way.step, Q) * r * way.acc.itemsize)
                continue
            held += Q * o * i * size if way.kept else 0
            transient = max(transient, group + (0 if way.kept else self._block(t) * o * i * size))
        return held + transient

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        self._score_layer(layer, a, delta, batch)
        # spilled queries (queries.spilled_factors): one layer's factors in memory at a time
        self.queries.R[layer.name].release()

    def _score_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        (B, T, _), Q, (o, i) = a.shape, len(self.queries), layer.shape
        lr, way = self.queries.R[layer.name], self._layout(layer, B, T)
        # products in the factors' dtype (bfloat16: ScoreArgs.precision), sums in float32+
        a, delta, acc, step = a.to(lr.U.dtype), delta.to(lr.U.dtype), way.acc, way.step
        r, dw, kept, blocks = lr.U.shape[-1], o * i * a.element_size(), way.kept, way.blocks
        if way.path == "tokens":
            # (Uᵀ δ_t) · (Vᵀ ā_t) per token, 'q b t r', in blocks of queries
            tok = torch.cat([(einsum(delta, lr.U[s:s + step], "b t o, q o r -> q b t r").to(acc)
                              * einsum(a, lr.V[s:s + step], "b t i, q i r -> q b t r").to(acc)
                              ).sum(-1) for s in range(0, Q, step)])
            self._batch[self.index[layer.name]] = tok.sum(-1)
            if self.per_token:
                self._tok = tok if self._tok is None else self._tok + tok
            return
        # ⟨R, DW_b⟩ with DW_b = Σ_t δ_bt ā_btᵀ per group of sequences, formed with the narrower
        # side as rows (DW_bᵀ = Σ_t ā_bt δ_btᵀ when in+1 < out): the batched product the other
        # way round, or a transposed copy, runs several times slower
        rows, cols = (a, delta) if i < o else (delta, a)
        slices = [g for g, _ in batch.groups(dw, self.budget // 4)]
        if way.path == "project":
            # Σ_k u_kᵀ DW_b v_k: DW_b (narrow, wide) times the wide side's factors, one large
            # product per block of queries, then the narrow side's factors elementwise
            near, far = (lr.V, lr.U) if i < o else (lr.U, lr.V)
            out = []
            for g in slices:
                DW = rows[g].mT @ cols[g]                                    # (b, narrow, wide)
                out.append(torch.cat([
                    (einsum(DW, far[s:s + step], "b n m, q m r -> b n q r").to(acc)
                     * near[s:s + step].to(acc).permute(1, 0, 2)).sum((1, 3)).T
                    for s in range(0, Q, step)]))                            # (Q, b)
            self._batch[self.index[layer.name]] = torch.cat(out, 1)
            return
        DW = lambda g: (rows[g].mT @ cols[g]).flatten(1)  # noqa: E731
        if kept or reform_per_group(B, T, o, i, Q, r, len(slices), blocks):
            out = [torch.cat([R @ DW(g).T for R in self._R_blocks(layer, a.dtype)], 0)
                   for g in slices]                                       # [(Q, b)]
            self._batch[self.index[layer.name]] = torch.cat(out, 1)
        else:
            out = [torch.cat([R @ DW(g).T for g in slices], 1)
                   for R in self._R_blocks(layer, a.dtype)]               # [(q, B)]
            self._batch[self.index[layer.name]] = torch.cat(out, 0)
        # one host copy per batch, in update (no synchronisation per layer)

    def update(self, batch: PassBatch) -> None:
        scores = torch.stack([self._batch[l] for l in range(len(self.index))], 1)  # (Q, L, B)
        scores = scores.double().cpu().numpy()
        finite = np.isfinite(scores).all((0, 2))  # (L,): NaN/inf in ā or δ reach the scores
        if not finite.all():  # (the pass then names the layer where they entered)
            name = list(self.index)[int(np.argmin(finite))]
            raise FloatingPointError(f"non-finite scores through layer {name!r}; check the "
                                     "model's weights, inputs and loss (bfloat16 overflow?)")
        self.layer_scores[..., batch.rows] = scores
        if self.per_token:
            tok = self._tok.double().cpu().numpy()
            lengths = get(batch.data, "attention_mask").sum(1).tolist()
            for b, (row, n) in enumerate(zip(batch.rows, lengths)):
                self.tokens[row] = tok[:, b, :n]
        self._batch, self._tok = {}, None

    def finish(self) -> tuple[np.ndarray, list[np.ndarray] | None]:
        return self.layer_scores, self.tokens


def scan(model: nn.Module, queries: Queries, corpus: Corpus, args: ScoreArgs | None = None,
         out_dir: str | os.PathLike | None = None, ids: Sequence[int] | None = None,
         task: Task | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Score every sequence of ``corpus`` (or ``ids`` of it) against ``queries``.

    -> (scores (Q, N), per-layer scores (Q, L, N) or None, ids (N,)), float64.

    With ``out_dir`` the scan is resumable: chunks of ``args.chunk_size`` sequences are written
    atomically as they complete, and a restarted scan (same model, queries, corpus) skips them.
    Memory does not grow with N beyond the returned arrays.

    Under torch.distributed, chunk c is scored by rank c mod W; every rank returns all scores
    (read back from ``out_dir``, or all-reduced without one).
    """
    args = args or ScoreArgs()
    queries = queries.to(score_dtype(model, args.precision))
    block = args.query_block
    if block is not None and len(queries) > block:   # a pass per block, each resumable apart
        parts = [scan(model, queries.take(s, s + block), corpus, replace(args, query_block=None),
                      None if out_dir is None else Path(out_dir) / f"queries-{s}", ids, task)
                 for s in range(0, len(queries), block)]
        return (np.concatenate([p[0] for p in parts]),
                None if not args.per_layer else np.concatenate([p[1] for p in parts]), parts[0][2])
    layers = find_layers(model, queries.layer_names)
    ids = as_ids(ids, len(corpus))
    if args.batch_size and args.chunk_size % args.batch_size:
        raise ValueError(f"chunk_size ({args.chunk_size}) must be a multiple of batch_size "
                         f"({args.batch_size})")
    world = distributed.rank_world()[1]
    chunk_store = (_chunk_store(model, queries, corpus, ids, args, out_dir)
                   if out_dir is not None or world > 1 else None)
    Q, L = len(queries), len(layers)
    layer_scores = np.zeros((Q, L, len(ids)))
    tokens = scan_tokens(model, layers, args.batch_tokens,
                         kept_dense(queries, layers, SCORE_BYTES)[1])
    mine = chunks(len(ids), args.chunk_size)
    with tqdm(total=sum(len(ids[s:s + args.chunk_size]) for s in mine), desc="scoring",
              unit="seq", disable=not args.progress) as bar:
        for start in mine:
            chunk = ids[start:start + args.chunk_size]
            shape = {"layer_scores": (Q, L, len(chunk))}
            done = chunk_store.read(start, chunk, shape) if chunk_store else None
            if done is None:
                src = source(corpus, args.batch_size, chunk, window=len(chunk),
                             tokens=tokens)
                done = {"layer_scores": corpus_pass(model, layers, src,
                                                    [Scorer(queries, layers, len(chunk))],
                                                    task=task, progress=bar)[0][0]}
                if chunk_store:
                    chunk_store.write(start, chunk, **done)
            else:
                bar.update(len(chunk))
            layer_scores[..., start:start + len(chunk)] = done["layer_scores"]
    if world > 1:
        _gather(layer_scores, ids, args.chunk_size, mine, chunk_store)
    return layer_scores.sum(1), (layer_scores if args.per_layer else None), ids


def _chunk_store(model: nn.Module, queries: Queries, corpus: Corpus, ids: np.ndarray,
                 args: ScoreArgs, out_dir: str | os.PathLike | None) -> store.ChunkStore | None:
    """Check that every rank scans the same (model, queries, corpus, ids, args), and open the
    resumable chunk directory ``out_dir`` (None without one)."""
    description = dict(queries=queries.fingerprint, corpus=corpus.fingerprint,
                       model=fingerprint_of(model, queries.layer_names),  # samples every parameter
                       ids=hashlib.sha256(ids.tobytes()).hexdigest()[:16],
                       layers=queries.layer_names,
                       args={k: v for k, v in asdict(args).items() if k != "progress"})
    distributed.check_same(json.dumps(description, sort_keys=True), "what to scan")
    return store.ChunkStore(out_dir, description) if out_dir is not None else None


def _gather(layer_scores: np.ndarray, ids: np.ndarray, chunk_size: int, mine: Sequence[int],
            chunk_store: store.ChunkStore | None) -> None:
    """The other ranks' chunks into ``layer_scores`` (Q, L, N), in place: read back from the
    shared directory, or without one all-reduced."""
    if chunk_store is None:  # zeros where another rank scored: the sum is exact
        distributed.all_reduce_([torch.from_numpy(layer_scores)])
        return
    distributed.barrier()
    Q, L, _ = layer_scores.shape
    for start in sorted(set(range(0, len(ids), chunk_size)) - set(mine)):
        chunk = ids[start:start + chunk_size]
        done = chunk_store.read(start, chunk, {"layer_scores": (Q, L, len(chunk))})
        if done is None:
            raise FileNotFoundError(f"chunk {start} of the scan is not in {chunk_store.root}: "
                                    "out_dir must be on a filesystem that every rank sees")
        layer_scores[..., start:start + len(chunk)] = done["layer_scores"]


def token_scores(model: nn.Module, queries: Queries, corpus: Corpus, ids: Sequence[int],
                 batch_size: int | None = None, task: Task | None = None,
                 batch_tokens: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-token scores of a few sequences (e.g. a top-k), recomputed with the factorised path.

    -> (for each id an array (Q, n_tokens) summed over layers, layer scores (Q, L, len(ids))).
    """
    layers = find_layers(model, queries.layer_names)
    ids = as_ids(ids, len(corpus))
    layer_scores, tokens = corpus_pass(
        model, layers, source(corpus, batch_size, ids,
                              tokens=scan_tokens(model, layers, batch_tokens)),
        [Scorer(queries, layers, len(ids), True)],
        task=task, progress=False)[0]
    return tokens, layer_scores


class SelfInfluence(Consumer):
    """∇ log p(z)ᵀ (G + λI)⁻¹ ∇ log p(z) per sequence: ``finish`` -> (n,) float64 in the
    pass's row order."""

    def __init__(self, factors: Factors, n: int):
        self.factors, self.out = factors, np.zeros(n)
        self._sum: Tensor | None = None  # (B,) over the layers so far, on the device

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        s = []
        for g, _ in batch.groups(3 * layer.shape[0] * layer.shape[1] * a.element_size()):
            DW = einsum(delta[g], a[g], "b t o, b t i -> b o i")  # with its two rotations
            s.append((self.factors.precondition_layer(layer.name, DW).to(DW) * DW).sum((-2, -1)))
        s = torch.cat(s)
        self._sum = s if self._sum is None else self._sum + s

    def update(self, batch: PassBatch) -> None:
        self.out[batch.rows] = self._sum.double().cpu().numpy()
        self._sum = None

    def finish(self) -> np.ndarray:
        return self.out


def self_influence(model: nn.Module, factors: Factors, corpus: Corpus,
                   batch_size: int | None = None, ids: Sequence[int] | None = None,
                   task: Task | None = None, progress: bool = True,
                   batch_tokens: int | None = None) -> np.ndarray:
    """∇L(z)ᵀ (G + λI)⁻¹ ∇L(z) for each sequence z, (N,) float64: how much a sequence's own
    log-likelihood rises when it is up-weighted (large for memorised or atypical sequences)."""
    ids, layers = as_ids(ids, len(corpus)), find_layers(model, factors.layer_names)
    return corpus_pass(model, layers,
                       source(corpus, batch_size, ids,
                              tokens=scan_tokens(model, layers, batch_tokens)),
                       [SelfInfluence(factors, len(ids))],
                       task=task, progress=progress, desc="self-influence")[0]
