"""Exact token factors: a short sequence's whole gradient, kept beside its sketch.

A training sequence of T scored tokens has, per tracked layer, the gradient
DW = Σ_t δ_t ā_tᵀ (out, in+1) of rank ≤ T. Its T · (out + in+1) numbers δ_t, ā_t hold it
exactly, and for short sequences (facts, a dozen tokens) they are few: on a 2-layer model of
width 128, 7 tokens hold all of DW in 4.5 K numbers a layer, where the eigen sketch's 961
coordinates hold 4 % of its whitened norm and 4,096 hold 14 % (docs/results.md, #29). A
query's score is bilinear in them — the scorer's token path without the forward and backward::

    s = Σ_ℓ Σ_t δ_tᵀ R_ℓ ā_t = Σ_ℓ Σ_t Σ_r (δ_t · U_r)(ā_t · V_r)        R_ℓ = U Vᵀ (rank r)

so a store that keeps them (``SketchArgs.exact_bytes``) gives every sequence's score to the
rounding of float16, and a search with a recall target needs to rescore only what it returns.

Stored per token as a row of W = Σ_ℓ (out_ℓ + in_ℓ+1) float16 values — per layer δ_t then
ā_t, each vector divided by its largest |entry| (kept as a float32 scale, so neither
overflows nor underflows) — the tokens of each sequence one after another (a ragged file;
``token_counts`` says how many each has), so a corpus of facts beside one long document
pays for its tokens, not for padding. Rounding to
nearest leaves each stored vector within ε_v ‖x‖ of x (ε_v = 2⁻¹¹ for the mantissa plus at
most 2⁻¹⁶ for subnormals, up to 2¹⁸ entries), so a layer's score moves by at most
(2 ε_v + ε_v²) ‖R_ℓ‖₂ Σ_t ‖δ_t‖ ‖ā_t‖ ≤ EPS · ‖R_ℓ‖₂ · norm_ℓ: the sequence's ``norm_ℓ``
(Σ_t ‖δ_t‖ ‖ā_t‖) is stored beside the factors and the query's ``EPS ‖R_ℓ‖₂`` computed per
query — the same Σ_ℓ query part · sequence part shape as a sketch's error scale.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from .passes import Consumer, PassBatch

if TYPE_CHECKING:  # annotations only
    from .layers import TrackedLayer
    from .queries import Queries

EPS = 2 ** -10 * 1.04  # a stored score's rounding, relative to ‖R‖₂ Σ_t ‖δ_t‖ ‖ā_t‖ (above)
BLOCK_VALUES = 1 << 24  # float32 values (tokens · (W + Q·r)) formed at a time


def offsets(shapes: dict[str, tuple[int, int]]) -> np.ndarray:
    """(L + 1,) where each layer's δ_t, ā_t begin in a stored token's row, and its width W."""
    return np.cumsum([0, *[o + i for o, i in shapes.values()]])


def width(shapes: dict[str, tuple[int, int]]) -> int:
    """W = Σ_ℓ (out + in+1): float16 values per stored token."""
    return int(offsets(shapes)[-1])


def token_bytes(shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes one stored token takes (its factors and their scales)."""
    return 2 * width(shapes) + 8 * len(shapes)


def row_of(counts: np.ndarray) -> np.ndarray:
    """(Σ counts,) the row each stored token belongs to, rows holding ``counts`` tokens."""
    return np.repeat(np.arange(len(counts)), counts)


def starts(counts: np.ndarray) -> np.ndarray:
    """(n + 1,) where each of n rows holding ``counts`` tokens begins in the ragged rows, and
    the end."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def positions(start: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(Σ counts,) the ragged positions of the tokens of rows beginning at ``start`` (n,) and
    holding ``counts`` (n,), row after row: where to gather them from, or scatter them to."""
    return np.repeat(start - starts(counts)[:-1], counts) + np.arange(counts.sum())


class TokenFactors(Consumer):
    """The scored tokens' ā and δ of every sequence of a pass, scaled to float16:
    ``finish`` -> ((n,) int32 tokens per sequence, (n, L) float32 Σ_t ‖δ_t‖ ‖ā_t‖, (Σ tokens,
    W) float16 factors, (Σ tokens, L·2) float32 scales (δ, ā per layer)), sequences in the
    pass's row order and each one's tokens in order, layers in the order of ``shapes``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], n: int):
        self.names = list(shapes)
        self.offsets = offsets(shapes)
        self.counts = np.zeros(n, np.int32)
        self.norms = np.zeros((n, len(shapes)), np.float32)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # rows, data, scales
        self._data = self._scales = None

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        if self._data is None:                      # the batch's first layer
            self._data = np.zeros((batch.n_tokens, self.offsets[-1]), np.float16)
            self._scales = np.zeros((batch.n_tokens, len(self.names), 2), np.float32)
        l = self.names.index(layer.name)
        start = self.offsets[l]
        norm = torch.ones(batch.n_tokens, device=a.device)
        for side, x in enumerate((delta, a)):                      # δ first, then ā
            x = x.flatten(0, 1)[batch.tokens].float()              # (n, out) or (n, in+1)
            scale = x.abs().amax(1, keepdim=True)
            self._data[:, start:start + x.shape[1]] = (
                x / scale.clamp_min(torch.finfo(torch.float32).tiny)).cpu().numpy()
            self._scales[:, l, side] = scale[:, 0].cpu().numpy()
            norm = norm * x.norm(dim=1)                           # ‖δ_t‖ ‖ā_t‖
            start += x.shape[1]
        self.norms[batch.rows, l] = np.bincount(np.repeat(np.arange(len(batch)), batch.counts),
                                                norm.cpu().numpy(), len(batch))

    def update(self, batch: PassBatch) -> None:
        self.counts[batch.rows] = batch.counts
        self.parts.append((batch.rows, self._data, self._scales.reshape(batch.n_tokens, -1)))
        self._data = self._scales = None

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        start = starts(self.counts)
        data = np.zeros((int(start[-1]), self.offsets[-1]), np.float16)
        scales = np.zeros((len(data), 2 * len(self.names)), np.float32)
        while self.parts:                   # each batch's tokens into place, then let go
            rows, x, sc = self.parts.pop()
            at = positions(start[rows], self.counts[rows])
            data[at], scales[at] = x, sc
        return self.counts, self.norms, data, scales


def query_rest(queries: Queries, names: list[str]) -> np.ndarray:
    """(Q, L) EPS · ‖R_ℓ‖₂ per query and layer: times a sequence's stored norms, the bound on
    the rounding of its score from the stored factors."""
    out = np.zeros((len(queries), len(names)))
    for l, name in enumerate(names):
        U, V = queries.R[name].U.double().cpu(), queries.R[name].V.double().cpu()
        # ‖U Vᵀ‖₂ = ‖R_U R_Vᵀ‖₂ with U = Q_U R_U, V = Q_V R_V: an r × r matrix's largest
        # singular value, without forming U Vᵀ
        R_U, R_V = torch.linalg.qr(U).R, torch.linalg.qr(V).R
        out[:, l] = torch.linalg.matrix_norm(R_U @ R_V.mT, ord=2).numpy()
    return EPS * out


def estimates(queries: Queries, shapes: dict[str, tuple[int, int]], counts: np.ndarray,
              data: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(Q, n) Σ_ℓ Σ_t (δ_t·U_r)(ā_t·V_r) of the queries on n stored sequences holding
    ``counts`` (n,) tokens each, their factors ``data`` (Σ counts, W) float16 and ``scales``
    (Σ counts, L·2) in order; blocks of tokens at a time (float32 products, float64 sums)."""
    n, L, Q = len(counts), len(shapes), len(queries)
    out = torch.zeros(n, Q, dtype=torch.float64)
    at = offsets(shapes)
    # each layer's U (out, Q·r) and V (in+1, Q·r): one product per block of tokens
    U = {name: rearrange(queries.R[name].U.float().cpu(), "q o r -> o (q r)") for name in shapes}
    V = {name: rearrange(queries.R[name].V.float().cpu(), "q i r -> i (q r)") for name in shapes}
    step = max(1, BLOCK_VALUES // max(u.shape[1] + at[-1] for u in U.values()))
    row = torch.from_numpy(row_of(counts))
    for s in range(0, len(data), step):
        x = torch.from_numpy(np.array(data[s:s + step])).float()              # (b, W)
        sc = torch.from_numpy(np.array(scales[s:s + step])).view(len(x), L, 2)
        for l, (name, (o, i)) in enumerate(shapes.items()):
            d = x[:, at[l]:at[l] + o] * sc[:, l, :1]
            a = x[:, at[l] + o:at[l + 1]] * sc[:, l, 1:]
            tok = ((d @ U[name]) * (a @ V[name])).view(len(x), Q, -1).sum(-1)  # (b, Q)
            out.index_add_(0, row[s:s + len(x)], tok.double())
    return out.T.numpy()
