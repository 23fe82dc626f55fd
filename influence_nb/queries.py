"""Preconditioned queries: the gradient of each query's measurement f = log p(completion |
prompt), preconditioned with the fitted curvature, R_ℓ = (G_ℓ + λ_ℓ I)⁻¹ ∇_ℓ f — what the
scorer (:mod:`influence_nb.scoring`) and the sketch's query side take.

Query batching (paper §3.2.2): R_ℓ is kept as a rank-r factorisation U Vᵀ (:class:`LowRank`),
(out + in+1)·r numbers per layer and query instead of out·(in+1), so that the scorer's
δ_tᵀ R ā_t = (Uᵀ δ_t) · (Vᵀ ā_t) costs (out + in)·r per token and query. Queries are prepared
in blocks, one layer at a time as the backward reaches it (:class:`QueryFactors`);
:func:`query_gradients` keeps every dense (Q, out, in+1) matrix instead, for a few queries.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from einops import einsum
from torch import Tensor, nn

from .batching import source
from .curvature import Factors
from .layers import TrackedLayer, context_length, find_layers, stat_dtype
from .passes import Consumer, Gradients, PassBatch, corpus_pass
from .spill import SPILL_BYTES, Spill
from .store import cache_dir
from .task import Task, get, query_batch, token_rows

OVERSAMPLE = 8  # extra directions of the randomized range finder (see LowRank.of)


@dataclass
class LowRank:
    """R ≈ U Vᵀ for Q queries: U (Q, out, r), V (Q, in+1, r), the best rank-r approximation;
    ``full``: R itself when the factorisation is exact (then :meth:`dense` costs nothing);
    ``spill``: the file U and V are views of, when they are (see :meth:`release`)."""
    U: Tensor
    V: Tensor
    full: Tensor | None = field(default=None, repr=False)
    spill: Spill | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, R: Tensor, rank: int | None) -> "LowRank":
        """Truncation of R (Q, out, in+1) to its top ``rank`` singular directions; ``rank`` None
        or ≥ min(out, in+1) is exact (R itself beside an identity, no factorisation).

        U = R V_r with V_r (in+1, r) orthonormal, so U Vᵀ = R V_r V_rᵀ is an exact projection
        of R whatever the rounding in V_r. V_r: the top eigenvectors of the smaller Gram matrix
        (RᵀR or RRᵀ) when min(out, in+1) < 4·(r + OVERSAMPLE) — several times cheaper than an
        SVD (a float32 Gram's rounding, ~1e-7 of the largest squared singular value, only
        touches directions that carry nothing) — and otherwise a randomized range finder with
        two power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4) on one seeded test
        matrix for every query, so a query's factors do not depend on its batch: (6k + r)·out·in
        for k = r + OVERSAMPLE instead of out·in·min(out, in) and a min(out, in)² eigh (GPT-2
        small's MLP: ≈ 6× faster)."""
        Q, o, i = R.shape
        eye = lambda n: torch.eye(n, dtype=R.dtype, device=R.device).expand(Q, n, n)  # noqa: E731
        if rank is None or rank >= min(o, i):
            return cls(R, eye(i), R) if i <= o else cls(eye(o), R.mT, R)
        k = rank + OVERSAMPLE
        if min(o, i) >= 4 * k:
            gen = torch.Generator(device=R.device).manual_seed(0)
            Y = torch.linalg.qr(R @ torch.randn(i, k, generator=gen, dtype=R.dtype,
                                                device=R.device)).Q          # (Q, out, k)
            for _ in range(2):
                Y = torch.linalg.qr(R @ torch.linalg.qr(R.mT @ Y).Q).Q
            V = torch.linalg.svd(Y.mT @ R, full_matrices=False).Vh[:, :rank].mT  # (Q, in+1, r)
            return cls(R @ V, V)
        if i <= o:
            V = torch.linalg.eigh(R.mT @ R).eigenvectors[..., -rank:]  # (Q, in+1, r)
            return cls(R @ V, V)
        U = torch.linalg.eigh(R @ R.mT).eigenvectors[..., -rank:]      # (Q, out, r)
        return cls(U, R.mT @ U)

    def dense(self) -> Tensor:
        """(Q, out, in+1)"""
        return self.full if self.full is not None else self.U @ self.V.mT

    def release(self) -> None:
        """Drop U's and V's pages from the process when they live in a :class:`Spill` (they
        are read back from the file on next use); nothing otherwise."""
        if self.spill is not None:
            self.spill.release(self.U)
            self.spill.release(self.V)

    def to(self, dtype: torch.dtype) -> "LowRank":
        """The same factors stored in ``dtype`` (itself when they already are)."""
        if self.U.dtype == dtype:
            return self
        if self.full is not None:   # exact: R beside an identity, the identity made again
            return LowRank.of(self.full.to(dtype), None)
        return LowRank(self.U.to(dtype), self.V.to(dtype))

    @classmethod
    def cat(cls, parts: Sequence["LowRank"]) -> "LowRank":
        """The queries of ``parts`` in one: exact ones stay exact (no identity is stacked);
        otherwise factors are zero-padded to the largest rank, which leaves every U Vᵀ as it
        was."""
        if all(p.full is not None for p in parts):
            return cls.of(torch.cat([p.full for p in parts]), None)
        r = max(p.U.shape[-1] for p in parts)
        pad = lambda x: torch.nn.functional.pad(x, (0, r - x.shape[-1]))  # noqa: E731
        return cls(torch.cat([pad(p.U) for p in parts]), torch.cat([pad(p.V) for p in parts]))


@dataclass
class Queries:
    """Preconditioned gradients of Q queries f_q = log p(completion_q | prompt_q).

    prompts, completions: the token ids; f: (Q,) the measurement in nats (log-probability)
    R: {layer: LowRank} the preconditioned gradients (G + λI)⁻¹ ∇f, factorised
    """
    prompts: list[list[int]]
    completions: list[list[int]]
    f: Tensor
    R: dict[str, LowRank]
    rank: int | None
    strategy: str
    factors_id: str  # identifies the curvature that preconditioned R

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def layer_names(self) -> list[str]:
        return list(self.R)

    @classmethod
    def concat(cls, parts: Sequence["Queries"]) -> "Queries":
        """One batch of the queries of ``parts`` (same layers, same factors), scored in a single
        pass. Ranks may differ: factors are zero-padded to the largest, which leaves every
        U Vᵀ unchanged (the batch's rank is then the largest, None if any is full rank).
        Strategies may differ too (e.g. EK-FAC and identity side by side in one scan): the
        batch's strategy then names them all, joined by "+"."""
        if not parts:
            raise ValueError("nothing to concatenate: pass at least one Queries")
        for key in ("factors_id", "layer_names"):
            values = {json.dumps(getattr(p, key)) for p in parts}
            if len(values) > 1:
                raise ValueError(f"cannot concatenate queries made with different {key} "
                                 f"({', '.join(sorted(values))}); make them with one session")
        R = {n: LowRank.cat([p.R[n] for p in parts]) for n in parts[0].R}
        ranks = [p.rank for p in parts]
        rank = None if None in ranks else max(ranks)
        return cls(sum((p.prompts for p in parts), []), sum((p.completions for p in parts), []),
                   torch.cat([p.f for p in parts]), R, rank,
                   "+".join(dict.fromkeys(p.strategy for p in parts)), parts[0].factors_id)

    def take(self, start: int, stop: int) -> "Queries":
        """Queries start … stop − 1 (views of the factors, no copy)."""
        return replace(self, prompts=self.prompts[start:stop],
                       completions=self.completions[start:stop], f=self.f[start:stop],
                       R={n: LowRank(lr.U[start:stop], lr.V[start:stop],
                                     None if lr.full is None else lr.full[start:stop], lr.spill)
                          for n, lr in self.R.items()})

    def select(self, layers: Sequence[str]) -> "Queries":
        """The same queries on a subset of their layers: names or fnmatch globs, e.g.
        ``["*.lora_*"]`` (a fit with ``layers="both:mlp"`` restricted to its adapters). Factors
        are per layer, so the result equals queries made from a fit on those layers alone."""
        if isinstance(layers, str):
            layers = [layers]
        names = [n for n in self.R if any(fnmatch.fnmatchcase(n, p) for p in layers)]
        if not names:
            raise ValueError(f"{list(layers)} match none of the queries' layers "
                             f"({', '.join(self.layer_names[:4])}, ...)")
        return replace(self, R={n: self.R[n] for n in names})

    @classmethod
    def random(cls, layers: Sequence[TrackedLayer], q: int, rank: int | None,
               dtype: torch.dtype = torch.float32, device: str = "cpu") -> "Queries":
        """``q`` stand-in queries of ``rank`` (None: full) on ``layers``, their factors seeded
        normals scaled by 1/√d: a scorer's cost does not depend on the values, so the plan and
        the benchmarks time scans with these; on the "meta" device they take no memory."""
        gen = torch.Generator().manual_seed(0)
        draw = (lambda *shape: torch.empty(q, *shape, dtype=dtype, device="meta")  # noqa: E731
                ) if device == "meta" else (
            lambda *shape: (torch.randn(q, *shape, generator=gen) / shape[0] ** 0.5).to(dtype))
        R = {}
        for t in layers:
            (o, i), r = t.shape, min(rank or min(t.shape), *t.shape)
            R[t.name] = (LowRank.of(draw(o, i), None) if r == min(o, i)
                         else LowRank(draw(o, r), draw(i, r)))
        return cls([[0]] * q, [[0]] * q, torch.zeros(q), R, rank, "ekfac", "random")

    def to(self, dtype: torch.dtype) -> "Queries":
        """The same queries with their factors stored in ``dtype`` (e.g. bfloat16: half the
        memory, and the scorer's products in bfloat16; see ``ScoreArgs.precision``)."""
        return replace(self, R={n: lr.to(dtype) for n, lr in self.R.items()})

    @property
    def fingerprint(self) -> str:
        """A hash of the token ids, layers, rank, strategy and factors."""
        return hashlib.sha256(json.dumps([self.prompts, self.completions, self.layer_names,
                                          self.rank, self.strategy, self.factors_id]).encode()
                              ).hexdigest()[:16]


QUERY_BYTES = 256 << 20   # dense per-query matrices make_queries forms at once (one block)


class QueryFactors(Consumer):
    """Rank-r preconditioned query gradients, one layer at a time as the backward reaches it:
    Q_Sᵀ ∇f Q_A from the tokens, ⊘ (Λ + λ), truncated to rank r in the eigenbasis, then its
    columns rotated back, (Q_S U, Q_A V); for each of ``strategies`` from the same gradients.
    Only one layer's dense (B, out, in+1) matrices of one block of queries exist at any time.
    Factors are stored in ``dtype`` (default: the statistics') as each block is made; with
    ``spilled`` ({strategy: {layer: LowRank}} views of a :class:`Spill`, see
    :func:`spilled_factors`), written into those and released instead of kept in memory.
    ``finish`` -> ({strategy: {layer: LowRank} in module order}, f (Q,) the measurements)."""

    def __init__(self, layers: Sequence[TrackedLayer], factors: Factors,
                 strategies: Sequence[str | None], rank: int | None,
                 dtype: torch.dtype | None = None,
                 spilled: dict[str, dict[str, LowRank]] | None = None) -> None:
        self.factors, self.rank, self.dtype = factors, rank, dtype
        self.strategies = list(dict.fromkeys(factors.resolve_strategy(s) for s in strategies))
        self.parts = {s: {t.name: [] for t in layers} for s in self.strategies}
        self.spilled = spilled or {}
        self.filled = {s: {t.name: 0 for t in layers} for s in self.strategies}
        self.f: list[Tensor] = []

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        for strategy in self.strategies:
            lr = self._factor(layer.name, a, delta, batch, strategy)
            lr = lr if self.dtype is None else lr.to(self.dtype)
            into = self.spilled.get(strategy, {}).get(layer.name)
            if into is None:
                self.parts[strategy][layer.name].append(lr)
                continue
            k, n = self.filled[strategy][layer.name], len(lr.U)
            into.U[k:k + n].copy_(lr.U)
            into.V[k:k + n].copy_(lr.V)
            into.release()
            self.filled[strategy][layer.name] = k + n

    def _factor(self, name: str, a: Tensor, delta: Tensor, batch: PassBatch,
                strategy: str) -> LowRank:
        F = self.factors
        if strategy == "identity":   # no eigenbasis: ∇f itself
            return LowRank.of(einsum(delta, a, "b t o, b t i -> b o i"), self.rank)
        lr = LowRank.of(F.precondition_tokens(name, a, delta, batch.tokens, strategy), self.rank)
        # the truncation of Q_S X Q_Aᵀ is Q_S (X's truncation) Q_Aᵀ: the Q are orthogonal
        return (LowRank.of(F.from_eigenbasis(name, lr.full), None) if lr.full is not None
                else LowRank(*F.columns_from_eigenbasis(name, lr.U, lr.V)))

    def update(self, batch: PassBatch) -> None:
        self.f.append(batch.losses)

    def finish(self) -> tuple[dict[str, dict[str, LowRank]], Tensor]:
        return ({s: {n: self.spilled.get(s, {}).get(n) or LowRank.cat(p)
                     for n, p in parts.items()}
                 for s, parts in self.parts.items()}, torch.cat(self.f))


def spilled_factors(shapes: dict[str, tuple[int, int]], strategies: Sequence[str], q: int,
                    rank: int | None, dtype: torch.dtype) -> dict[str, dict[str, LowRank]]:
    """Zeroed rank-r factors of ``q`` queries for each strategy and each layer of (out, in+1)
    ``shapes`` that truncation factorises, as views of one :class:`Spill` in the cache folder —
    when all of them take more than :data:`~influence_nb.spill.SPILL_BYTES`; else {} (they
    stay in memory). Exact layers (rank ≥ min(out, in+1), e.g. a LoRA matrix) stay in memory."""
    keys = [(s, n, o, i) for s in strategies for n, (o, i) in shapes.items()
            if rank is not None and rank < min(o, i)]
    specs = [spec for _, _, o, i in keys for spec in (((q, o, rank), dtype), ((q, i, rank), dtype))]
    if sum(math.prod(shape) for shape, _ in specs) * dtype.itemsize <= SPILL_BYTES:
        return {}
    cache_dir().mkdir(parents=True, exist_ok=True)
    spill = Spill(specs, cache_dir())   # a disk folder: /tmp may be memory (tmpfs)
    out: dict[str, dict[str, LowRank]] = {}
    for k, (s, n, _, _) in enumerate(keys):
        out.setdefault(s, {})[n] = LowRank(*spill.tensors[2 * k:2 * k + 2], spill=spill)
    return out


def query_block(shapes: Sequence[tuple[int, int]], element_size: int = 4,
                budget: int | None = None) -> int:
    """Queries prepared together: their dense (out, in+1) matrices of the widest layer, about
    three per query (rotated gradient, scaled, the truncation's product), within ``budget``
    bytes (default :data:`QUERY_BYTES`)."""
    widest = max(o * i for o, i in shapes)
    return max(1, (QUERY_BYTES if budget is None else budget) // (3 * widest * element_size))


def make_queries(model: nn.Module, factors: Factors, prompts: Sequence[Sequence[int]],
                 completions: Sequence[Sequence[int]], rank: int | None = 32,
                 strategy: str | None = None, task: Task | None = None,
                 dtype: torch.dtype | None = None) -> Queries:
    """Gradients of log p(completion | prompt) for each query, preconditioned with ``factors``
    (``strategy`` overrides the fitted one: "kfac" or "identity") and factorised to ``rank``,
    stored in ``dtype`` (default: the statistics', float32 or float64).

    Memory: queries are prepared in blocks (:func:`query_block`), one layer at a time, and
    only their rank-r factors are kept, (out + in+1)·r numbers per layer and query; full rank
    (``rank=None``) keeps out·(in+1)."""
    return strategy_queries(model, factors, prompts, completions, [strategy], rank, task, dtype
                            )[factors.resolve_strategy(strategy)]


def strategy_queries(model: nn.Module, factors: Factors, prompts: Sequence[Sequence[int]],
                     completions: Sequence[Sequence[int]], strategies: Sequence[str | None],
                     rank: int | None = 32, task: Task | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, Queries]:
    """:func:`make_queries` for each of ``strategies`` (None: the fitted one) from one pass
    over the queries: {strategy: Queries}. The gradients are taken once; each strategy
    preconditions and truncates them."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None (full rank), got {rank!r}")
    prompts, completions = token_rows(prompts), token_rows(completions)
    tracked = find_layers(model, factors.layer_names)
    batch = query_batch(prompts, completions, context_length(model))
    names = list(dict.fromkeys(factors.resolve_strategy(s) for s in strategies))
    device = next(model.parameters()).device
    spilled = spilled_factors(factors.shapes, names, len(prompts), rank,
                              dtype or stat_dtype(model)) if device.type == "cpu" else {}
    consumer = QueryFactors(tracked, factors, names, rank, dtype, spilled)
    size = query_block([(o * len(names), i) for o, i in factors.shapes.values()],
                       stat_dtype(model).itemsize)
    R, f = corpus_pass(model, tracked, source(list(batch.blocks(size)), size), [consumer],
                       "measurement", task, progress=False)[0]
    return {s: Queries(prompts, completions, f, R[s], rank, s, factors.factors_id())
            for s in names}


# -- dense query gradients: every (Q, out, in+1) matrix kept, for a few queries --------------------

def sequence_gradients(model: nn.Module, batch: object, layers: Sequence[TrackedLayer],
                       loss: str | Callable[[Tensor, object], Tensor], task: Task | None = None
                       ) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sequence gradients of ``loss`` (a callable (logits, batch) -> (B,), or a loss name
    of :func:`~influence_nb.passes.loss_values`) for the tracked layers, one batch.

    -> ({name: (B, out, in+1)}, loss values (B,)), in float32 (float64 for a float64 model).
    """
    return corpus_pass(model, layers, source([batch], len(get(batch, "input_ids"))),
                       [Gradients(layers)], loss, task, progress=False)[0]


class PreconditionedGradients(Gradients):
    """Per-sequence gradients DW and their preconditioning in the eigenbasis, one pass:
    ``finish`` -> ({name: DW}, {name: X}, loss values), each (N, out, in+1), where
    X = (Q_Sᵀ DW Q_A) / (Λ + λ), so that (G + λI)⁻¹ DW = Q_S X Q_Aᵀ
    (:meth:`Factors.from_eigenbasis`); for strategy "identity" X = DW.

    The rotation starts from the tokens (:func:`rotated_gradients`): for a query of n ≪ out, in
    positions, n·(out² + in²) instead of out·in·(out + in)."""

    def __init__(self, layers: Sequence[TrackedLayer], factors: Factors, strategy: str) -> None:
        super().__init__(layers)
        self.factors, self.strategy = factors, factors.resolve_strategy(strategy)
        self.X = Gradients(layers)

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        super().update_layer(layer, a, delta, batch)
        if self.strategy == "identity":
            X = self.batch[layer.name]
        else:
            X = self.factors.precondition_tokens(layer.name, a, delta, batch.tokens,
                                                 self.strategy)
        self.X.batch[layer.name] = X

    def update(self, batch: PassBatch) -> None:
        super().update(batch)
        self.X.update(batch)

    def finish(self) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        (DW, losses), (X, _) = super().finish(), self.X.finish()
        return DW, X, losses


@dataclass
class QueryGradients:
    """Gradients of f = log p(completion | prompt) for Q queries.

    f:              (Q,) the measurement, in nats
    grads:          {layer: (Q, out, in+1)} ∇f
    preconditioned: {layer: (Q, out, in+1)} (G + λI)⁻¹ ∇f, or None without factors
    """
    f: Tensor
    grads: dict[str, Tensor]
    preconditioned: dict[str, Tensor] | None


def query_gradients(model: nn.Module, prompts: Sequence[int] | Sequence[Sequence[int]],
                    completions: Sequence[int] | Sequence[Sequence[int]],
                    factors: Factors | None = None, layers: str | Sequence[str] = "mlp",
                    task: Task | None = None, pad_id: int = 0,
                    strategy: str | None = None) -> QueryGradients:
    """∇ log p(completion | prompt) per query and tracked layer, preconditioned with ``factors``
    (``strategy`` overrides the fitted one: "kfac" or "identity").

    ``prompts`` / ``completions``: token ids, one query (a list of ints) or several. With
    ``factors``, their tracked layers are used and ``layers`` is ignored. For a few queries:
    every (Q, out, in+1) matrix is kept (:func:`make_queries` keeps only rank-r factors, in
    blocks of queries).
    """
    batch = query_batch(token_rows(prompts), token_rows(completions), context_length(model),
                        pad_id)
    tracked = find_layers(model, factors.layer_names if factors is not None else layers)
    if factors is None:
        grads, f = sequence_gradients(model, batch, tracked, "measurement", task)
        return QueryGradients(f, grads, None)
    consumer = PreconditionedGradients(tracked, factors, strategy)
    grads, X, f = corpus_pass(model, tracked, source([batch], len(get(batch, "input_ids"))),
                              [consumer], "measurement", task, progress=False)[0]
    if consumer.strategy == "identity":
        return QueryGradients(f, grads, X)
    R = {name: factors.from_eigenbasis(name, x) for name, x in X.items()}
    return QueryGradients(f, grads, R)
