"""Statistics of a fit: the Kronecker factors of each tracked layer's Fisher, their
eigendecomposition and EK-FAC's eigenvalue correction, accumulated by the two passes of
:func:`~influence_nb.curvature.fit_factors` (consumers of :func:`~influence_nb.passes.corpus_pass`).

Per tracked layer ℓ with input activations ā (in + bias) and output pseudo-gradients δ (out),
tokens treated as independent (paper §3.1, eq. 20)::

    A = E_tokens[ā āᵀ]                   (in+1, in+1)    mean over scored tokens
    S = Σ_tokens δ δᵀ / n_sequences      (out, out)      so that S ⊗ A ≈ E_seq[vec DW vec DWᵀ]
    A = Q_A diag(λ_A) Q_Aᵀ,  S = Q_S diag(λ_S) Q_Sᵀ      (float64 eigendecomposition)
    EK-FAC:  Λ_ij = E_seq[(Q_Sᵀ DW Q_A)_ij²],  DW = Σ_t δ_t ā_tᵀ per sequence

A and S may be split into diagonal blocks (a block-diagonal eigenbasis is a list of blocks).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from einops import einsum
from torch import Tensor

from . import distributed
from .layers import TrackedLayer
from .passes import Consumer, PassBatch
from .progress import tqdm


@dataclass
class LayerFactors:
    """One layer's eigenbases (a block-diagonal matrix is a list of blocks) and eigenvalues."""
    Q_A: list[Tensor]       # blocks of the (in+1, in+1) eigenvector matrix of A
    lambda_A: Tensor        # (in+1,)
    Q_S: list[Tensor]       # blocks of the (out, out) eigenvector matrix of S
    lambda_S: Tensor        # (out,)
    Lambda: Tensor | None   # (out, in+1) EK-FAC eigenvalues; None for a K-FAC fit

    def eigenvalues(self, strategy: str) -> Tensor:
        """Λ (out, in+1) of the strategy: EK-FAC's corrected ones or K-FAC's λ_S λ_Aᵀ."""
        if strategy == "kfac":
            return torch.outer(self.lambda_S, self.lambda_A)
        if self.Lambda is None:
            raise ValueError("these factors were fitted with strategy='kfac'; refit with "
                             "strategy='ekfac' to precondition with EK-FAC")
        return self.Lambda


def rotate(X: Tensor, Q: Sequence[Tensor], transpose: bool = False) -> Tensor:
    """X @ blockdiag(Q) (or X @ blockdiag(Q)ᵀ) along X's last dimension."""
    if len(Q) == 1:
        return X @ (Q[0].T if transpose else Q[0])
    parts = X.split([q.shape[0] for q in Q], dim=-1)
    return torch.cat([x @ (q.T if transpose else q) for x, q in zip(parts, Q)], dim=-1)


def block_sizes(n: int, blocks: int) -> list[int]:
    """Sizes of the (at most ``blocks``, near-equal) diagonal blocks of an n × n factor."""
    return [len(c) for c in torch.arange(n).tensor_split(min(blocks, n))]


def _eigh(blocks: list[Tensor], dtype: torch.dtype, precision: torch.dtype = torch.float64
          ) -> tuple[list[Tensor], Tensor]:
    """Eigendecomposition in ``precision`` of symmetric blocks -> (eigenvector blocks in
    ``dtype``, eigenvalues ≥ 0).

    Each eigenvector's sign is fixed (its largest-magnitude entry positive), so that two fits
    whose statistics differ by rounding (another batch order, another number of ranks) give the
    same basis, and coordinates in it (the eigen sketch) agree."""
    pairs = [torch.linalg.eigh(b.to(precision)) for b in blocks]
    signs = [torch.sign(Q.gather(0, Q.abs().argmax(0, keepdim=True))) for _, Q in pairs]
    return ([(Q * sgn).to(dtype).contiguous() for (_, Q), sgn in zip(pairs, signs)],
            torch.cat([lam for lam, _ in pairs]).clamp_min(0.0).to(dtype))


def rotated_gradients(a: Tensor, delta: Tensor, tokens: Tensor, f: LayerFactors) -> Tensor:
    """Per-sequence gradients in the Kronecker eigenbasis, Q_Sᵀ (Σ_t δ_t ā_tᵀ) Q_A.

    a: (B, T, in+1), delta: (B, T, out), tokens: (n,) flat indices of the counted positions
    -> (B, out, in+1). Rotates the counted tokens first when that is cheaper
    (n · (in² + out²) against B · out · in · (out + in)), else each sequence's summed gradient.
    """
    (B, T, i), o = a.shape, delta.shape[-1]
    if len(tokens) * (i * i + o * o) < B * o * i * (o + i):
        a_rot = a.new_zeros(B * T, i).index_copy_(
            0, tokens, rotate(a.flatten(0, 1).index_select(0, tokens), f.Q_A))
        delta_rot = delta.new_zeros(B * T, o).index_copy_(
            0, tokens, rotate(delta.flatten(0, 1).index_select(0, tokens), f.Q_S))
        return einsum(delta_rot.view(B, T, o), a_rot.view(B, T, i), "b t o, b t i -> b o i")
    DW = einsum(delta, a, "b t o, b t i -> b o i")
    return rotate(rotate(DW, f.Q_A).mT, f.Q_S).mT


DRAW_TARGET = 16   # effective positions per row of S, geometric mean over the layers
MAX_DRAWS = 8


def fisher_draws(effective: Mapping[str, float], widths: Mapping[str, int]) -> int:
    """Fisher draws for S: the fewest k with k · ρ ≥ DRAW_TARGET, where ρ is the geometric
    mean over the layers of N_eff / width (N_eff: the first draw's effective positions,
    :meth:`Covariance.effective_tokens`; width: the layer's widest S block), within
    [1, MAX_DRAWS]. A sample covariance's relative error grows as √(width / N); the target is
    measured: seed-to-seed Spearman ≥ 0.95 from ρ ≈ 10-16 on (docs/results.md, "The same
    answer twice")."""
    if not any(effective.values()):
        return 1                          # nothing to score: the fit refuses it, once
    rho = math.exp(sum(math.log(max(e, 1.0) / widths[n]) for n, e in effective.items())
                   / len(effective))
    return int(min(MAX_DRAWS, max(1, math.ceil(DRAW_TARGET / rho - 1e-9))))


# -- the two passes of a fit, as consumers of passes.corpus_pass -----------------------------------

class Covariance(Consumer):
    """Σ ā āᵀ and Σ δ δᵀ over the scored tokens, per diagonal block of each layer, over one
    pass or more (``finish`` returns the consumer itself); :meth:`factors` -> ({name:
    LayerFactors without Λ}, n_sequences, n_tokens), the same on every rank (sums all-reduced,
    rank 0's eigenbases broadcast)."""

    def __init__(self, layers: Sequence[TrackedLayer], blocks: int, dtype: torch.dtype,
                 device: torch.device, progress: bool = False,
                 precision: torch.dtype = torch.float64):
        self.dtype, self.progress, self.precision = dtype, progress, precision
        self.eigh_seconds = 0.0
        self.split = {t.name: (block_sizes(t.shape[1], blocks), block_sizes(t.d_out, blocks))
                      for t in layers}
        zeros = lambda k: torch.zeros(k, k, dtype=dtype, device=device)  # noqa: E731
        self.A = {n: [zeros(k) for k in s[0]] for n, s in self.split.items()}
        self.S = {n: [zeros(k) for k in s[1]] for n, s in self.split.items()}
        # Σ_t w_t and Σ_t w_t² of the first draw, w_t = |δ_t|²: how evenly positions fill S
        self.w = {n: torch.zeros(2, dtype=torch.float64, device=device) for n in self.split}
        self.n_seq = self.n_tok = self.n_tok_A = 0   # n_tok_A: the first draw's tokens

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        n, idx = layer.name, batch.tokens
        d = delta.flatten(0, 1).index_select(0, idx).split(self.split[n][1], dim=1)  # (tokens, out)
        for acc, x in zip(self.S[n], d):
            acc.addmm_(x.T, x)                  # Σ δ δᵀ per diagonal block
        if batch.draw == 0:   # ā does not depend on the labels: each draw's Σ ā āᵀ is the first's
            a = a.flatten(0, 1).index_select(0, idx).split(self.split[n][0], dim=1)  # (tok, in+1)
            for acc, x in zip(self.A[n], a):
                acc.addmm_(x.T, x)
            w = sum((x * x).sum(1) for x in d).double()                    # (tokens,) |δ_t|²
            self.w[n] += torch.stack([w.sum(), (w * w).sum()])

    def update(self, batch: PassBatch) -> None:
        self.n_seq, self.n_tok = self.n_seq + len(batch), self.n_tok + batch.n_tokens
        if batch.draw == 0:
            self.n_tok_A += batch.n_tokens

    def finish(self) -> "Covariance":
        """The sums so far (another pass may add to them); :meth:`factors` ends the fit."""
        return self

    def effective_tokens(self) -> dict[str, float]:
        """Per layer, how many equally weighted positions the first draw's S is worth,
        (Σ_t w_t)² / Σ_t w_t² with w_t = |δ_t|² (all-reduced): far fewer than the tokens when a
        few uncertain positions carry the Fisher (a model certain of most of its data)."""
        sums = [w.clone() for w in self.w.values()]
        distributed.all_reduce_(sums)
        return {n: float(s[0] ** 2 / s[1]) if s[1] > 0 else 0.0 for n, s in zip(self.w, sums)}

    def draws_needed(self, scale: float = 1.0) -> int:
        """:func:`fisher_draws` for the first draw seen so far, its effective positions times
        ``scale`` (the corpus's worth of a sample of it, say)."""
        return fisher_draws({n: e * scale for n, e in self.effective_tokens().items()},
                            {n: max(sizes) for n, (_, sizes) in self.split.items()})

    def factors(self) -> tuple[dict[str, LayerFactors], int, int]:
        """All-reduce the sums and eigendecompose them: ({name: LayerFactors without Λ},
        n_sequences, n_tokens), counted once per draw."""
        distributed.all_reduce_([blk for n in self.A for blk in self.A[n] + self.S[n]])
        n_seq, n_tok, n_tok_A = distributed.sum_counts(self.n_seq, self.n_tok, self.n_tok_A)
        if n_tok == 0:
            raise ValueError(f"none of the {n_seq} sequences has a token to score (each needs "
                             "at least 2 tokens, and the task's loss mask must keep one); "
                             "give longer sequences")
        layers, start = {}, time.perf_counter()
        # a fixed cost, cubic in the widths (float64 eigh of a 3,072² matrix: ≈ 9 s on one core)
        for n in tqdm(list(self.A), desc="eigendecomposition", unit="layer",
                      disable=not self.progress):
            Q_A, lambda_A = _eigh([blk / n_tok_A for blk in self.A[n]], self.dtype, self.precision)
            Q_S, lambda_S = _eigh([blk / n_seq for blk in self.S[n]], self.dtype, self.precision)
            layers[n] = LayerFactors(Q_A, lambda_A, Q_S, lambda_S, None)
        self.A = self.S = {}
        self.eigh_seconds = time.perf_counter() - start
        distributed.broadcast_([t for f in layers.values()  # one eigenbasis for every rank
                                for t in [*f.Q_A, f.lambda_A, *f.Q_S, f.lambda_S]])
        return layers, n_seq, n_tok


class EigenvalueCorrection(Consumer):
    """EK-FAC's Λ = E_seq[(Q_Sᵀ DW Q_A)²] in the eigenbases of a covariance pass;
    ``finish`` -> ({name: Λ (out, in+1)} summed over sequences, n_sequences), all-reduced."""

    def __init__(self, layers: Mapping[str, LayerFactors], shapes: Mapping[str, tuple[int, int]],
                 dtype: torch.dtype):
        self.layers = layers
        self.Lambda = {n: torch.zeros(shapes[n], dtype=dtype, device=f.lambda_A.device)
                       for n, f in layers.items()}
        self.n_seq = 0

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        f, (o, i) = self.layers[layer.name], layer.shape
        for group, tokens in batch.groups(2 * o * i * a.element_size()):  # DW and its square
            G = rotated_gradients(a[group], delta[group], tokens, f)
            self.Lambda[layer.name] += (G ** 2).sum(0)

    def update(self, batch: PassBatch) -> None:
        self.n_seq += len(batch)

    def finish(self) -> tuple[dict[str, Tensor], int]:
        distributed.all_reduce_(list(self.Lambda.values()))
        return self.Lambda, distributed.sum_counts(self.n_seq)[0]
