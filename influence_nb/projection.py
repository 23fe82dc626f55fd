"""The sketch's measurement: a small vector per training sequence whose inner product with a
query's sketch approximates the influence score.

Per tracked layer ℓ a training sequence's log-likelihood gradient is DW = Σ_t δ_t ā_tᵀ
(out, in+1). Each sketch coordinate of a layer is a bilinear measurement, formed token by token
so that DW is never materialised::

    sketch_m[j] = u_jᵀ DW v_j = Σ_t (u_j · δ_t)(v_j · ā_t)
    sketch_q[j] = u'_jᵀ R v'_j = Σ_r (u'_j · U_r)(v'_j · V_r)        R = U Vᵀ ≈ (G+λI)⁻¹ ∇f

with u, v rows of the training side and u', v' of the query side, chosen so that
⟨sketch_q, sketch_m⟩ ≈ ⟨R, DW⟩, the layer's score. Variants (``SketchArgs.variant``):

- ``"eigen"``: no random measurement. The D = layers · m coordinates (i, j) of the EK-FAC
  eigenbasis with the largest Λ_ij / λ_ℓ over all layers are kept exactly, whitened per
  coordinate: sketch_m = (Q_Sᵀ DW Q_A)_ij / √(Λ_ij+λ), sketch_q = (Q_Sᵀ R Q_A)_ij · √(Λ_ij+λ),
  measured with u = column i of Q_S, v = column j of Q_A (few distinct columns: cheap).
  Biased (the other coordinates are dropped) but noiseless. Why it wins where the damping
  leaves few directions: the score's variance over the corpus comes from coordinate (i, j) in
  proportion to ≈ Λ²/(Λ+λ)², so it sits in the top of the spectrum, while a random
  measurement's noise grows with the whole whitened norm Σ Λ/(Λ+λ), paid also for the long tail
  of small eigenvalues (docs/results.md, "Retrieval on two worlds").
- ``"whitened"``: random measurements in the eigenbasis, the Kronecker sketch P_out DW P_inᵀ:
  k = √m Gaussian rows p per side (shared by all k² coordinates), u = B_out diag(s_out) p,
  u' = B_out diag(1/s_out) p (v, v' alike with B_in, s_in), B the EK-FAC eigenbases (Q_S, Q_A)
  and s_out s_inᵀ the rank-one (log-space least squares) fit of (Λ + λ)^-1/2: both sides
  whitened — the split of the score ⟨g̃ ⊘ (Λ+λ), d̃⟩ that balances the norms, so the variance
  ∝ ‖X_q‖² ‖X_m‖² / m is smallest. Since E[p pᵀ] = I and B is orthogonal the sketch is unbiased
  for any B and s. Cost k · (out + in) per token plus k² for the outer products.
  Identity factors have no eigenbasis: B = I, s = 1 (nothing to whiten).
- ``"auto"`` (default): "eigen" when its coordinates hold ≥ ``AUTO_COVERAGE`` of the effective
  dimension Σ Λ/(Λ+λ) (:func:`eigen_coverage`; a spectrum the damping cuts short), else
  "whitened" (a flat spectrum: no small set of coordinates carries the score).

Measured and dropped (benchmarks/sketch_variants.py): independent (Khatri-Rao) random pairs per
coordinate — the same recall as the Kronecker sketch at equal bytes, at ≈ √m × its cost per token —
and unwhitened ("plain") random rows.

The sketches of all layers are concatenated, so ⟨sketch_q, sketch_m⟩ ≈ the total score.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from einops import einsum, rearrange
from torch import Tensor

from .checks import check_args
from .statistics import rotate, rotated_gradients
from .passes import Consumer, PassBatch

if TYPE_CHECKING:  # annotations only
    from .curvature import Factors
    from .statistics import LayerFactors
    from .layers import TrackedLayer
    from .queries import Queries

VARIANTS = ("auto", "eigen", "whitened")
AUTO_COVERAGE = 0.02  # "auto" takes the eigen sketch when its coordinates hold this share
# (memorised facts, coverage 0.033: eigen finds the top-10 in 0.23 of N in sketch order, the
# random sketch in 0.40; the demo, 0.010, and Markov, 0.87, unchanged: docs/results.md #29)
EXACT_BYTES = 1 << 32  # SketchArgs.exact_bytes: token factors kept up to 4 GiB a corpus
# (read once per search: from the page cache on a 16 GB machine; docs/design.md)
DENSE_GATHER = 32  # eigen: form the n_u × n_v block and gather, if ≤ this × the coordinates


@dataclass
class SketchArgs:
    """How to sketch.

    m:          sketch coordinates per layer; D = layers · m (float16: 2·D bytes per sequence);
                the eigen variant spreads the D over the layers by eigenvalue; the whitened
                one needs m = k² (k Gaussian rows a side)
    variant:    "auto" (default: eigen or whitened, by :func:`eigen_coverage`), "eigen" (the
                top EK-FAC eigenbasis coordinates, exact) or "whitened" (random Kronecker
                measurements in the eigenbasis scaled by ≈ (Λ+λ)^-1/2)
    seed:       seed of the Gaussian projections (stored: queries are sketched alike)
    exact_bytes: the store also keeps every sequence's exact token factors
                (:mod:`influence_nb.tokens`: each score to float16 rounding, no sketch error)
                when the corpus's tokens take at most this many bytes, 2 · Σ_ℓ (out + in+1)
                + 8 · layers a token (0: never); decided when the store is created
    batch_size: training sequences per forward + backward; None: as many as fit in
                ``batch_tokens`` (length-bucketed): 32 sequences of 1,024 tokens would hold
                13 GB of logits and their gradient at a 50 K vocabulary
    batch_tokens: padded tokens per batch when ``batch_size`` is None (the fit's 1,024)
    batch_sequences: at most this many sequences in such a batch (a sketcher's work is per
                sequence: 3,150 twelve-token facts sketch in 5.1–5.5 s at 64 a batch, in
                5.4–5.9 s at the ~80 that 1,024 tokens hold)
    chunk_size: sequences per committed chunk (the unit of resumption; fewer when their
                token factors would pass ``sketch.CHUNK_BYTES``)
    progress:   show a progress bar
    """
    m: int = 961
    variant: str = "auto"
    seed: int = 0
    exact_bytes: int = EXACT_BYTES
    batch_size: int | None = None
    batch_tokens: int = 1024
    batch_sequences: int = 64
    chunk_size: int = 2048
    progress: bool = True

    MINIMUM: ClassVar[dict[str, float]] = {"m": 1, "batch_size": 1, "batch_tokens": 1,
                                           "batch_sequences": 1, "chunk_size": 1,
                                           "exact_bytes": 0}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"variant": VARIANTS}

    def __post_init__(self) -> None:
        check_args(self)

    @property
    def projection(self) -> dict:
        """The settings that define the projection (what a store must agree on). "structure"
        records how random coordinates pair, all k² pairs of the rows: stores written before
        the Khatri-Rao structure left the package say so too (same manifest, same fingerprint)."""
        return dict(m=self.m, variant=self.variant, structure="kronecker", seed=self.seed)


@dataclass
class LayerProjection:
    """Rows u (rows, out), v (rows, in+1) of the training side and u', v' of the query side.

    Coordinates: ``iu`` None, every pair (u row i, v row j) — the Kronecker sketch, rows² of
    them; else coordinate j pairs u row ``iu[j]`` with v row ``iv[j]`` and is multiplied by
    ``w[j]`` (query side: ``w_q[j]``; None: 1).
    """
    u: Tensor
    v: Tensor
    u_q: Tensor
    v_q: Tensor
    iu: Tensor | None = None
    iv: Tensor | None = None
    w: Tensor | None = None
    w_q: Tensor | None = None


def rank_one_scales(Lambda: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """s_out (out,), s_in (in+1,) with log(s_out s_inᵀ) the least-squares fit of
    log (Λ + λ)^-1/2: row means plus column means minus the grand mean."""
    L = -0.5 * torch.log(Lambda.double() + damping)
    return torch.exp(L.mean(1)), torch.exp(L.mean(0) - L.mean())


def whitened_rows(factors: Factors, name: str, p: Tensor, q: Tensor) -> LayerProjection:
    """Layer ``name``'s rows from Gaussian rows p (rows, out), q (rows, in+1): B diag(s) p on the
    training side, B diag(1/s) p on the query side (q alike), B the eigenbases and s the
    :func:`rank_one_scales`; identity factors: p and q as they are."""
    if not factors.layers:
        return LayerProjection(p, q, p, q)
    f = factors.layers[name]
    s_out, s_in = rank_one_scales(f.eigenvalues(factors.args.strategy), factors.damping(name))
    Q_S, Q_A = [x.double().cpu() for x in f.Q_S], [x.double().cpu() for x in f.Q_A]
    # rows of B diag(s) p: (p · s) Bᵀ = rotate(p · s, B, transpose)
    return LayerProjection(rotate(p * s_out, Q_S, True), rotate(q * s_in, Q_A, True),
                           rotate(p / s_out, Q_S, True), rotate(q / s_in, Q_A, True))


def _whitened_layers(factors: Factors, args: SketchArgs) -> dict[str, LayerProjection]:
    """The whitened variant: per layer k = √m Gaussian rows a side, drawn from ``args.seed``."""
    k = round(args.m ** .5)
    if k * k != args.m:
        raise ValueError(f"a Kronecker sketch needs m = k_out · k_in = k², got m={args.m}")
    g = torch.Generator().manual_seed(args.seed)
    layers = {}
    for name, (d_out, d_in) in factors.shapes.items():
        # a coordinate is (p·X_q·q)(p·X_m·q); its k² pairs have E = ⟨X_q, X_m⟩ each, so rows
        # scale by m^(-1/4) for ⟨sketch_q, sketch_m⟩ ≈ the score
        p = torch.randn(k, d_out, generator=g, dtype=torch.float64) / args.m ** .25
        q = torch.randn(k, d_in, generator=g, dtype=torch.float64) / args.m ** .25
        layers[name] = whitened_rows(factors, name, p, q)
    return layers


def _priority(factors: Factors) -> tuple[Tensor, Tensor]:
    """Over all layers' eigenbasis coordinates, concatenated: Λ_ij / λ_ℓ (the eigen variant's
    order) and Λ_ij / (Λ_ij + λ_ℓ) (each one's share of the effective dimension)."""
    ratio = torch.cat([f.eigenvalues(factors.args.strategy).double().flatten()
                       / factors.damping(name) for name, f in factors.layers.items()])
    return ratio, ratio / (1 + ratio)


def eigen_coverage(factors: Factors, total: int) -> float:
    """Share of the effective dimension Σ Λ/(Λ+λ) held by the ``total`` coordinates of largest
    Λ/λ: near 1, the eigen sketch keeps every direction the damping leaves (it is then nearly
    exact); small, the curvature is flat and a random sketch does better."""
    ratio, share = _priority(factors)
    return float(share[torch.topk(ratio, min(total, len(ratio))).indices].sum() / share.sum())


def _eigen_layers(factors: Factors, args: SketchArgs) -> dict[str, LayerProjection]:
    """The eigen variant: the layers · m coordinates (i, j) with the largest Λ_ij / λ_ℓ over all
    layers (ties: first in layer order), coordinate (i, j) measured by u = column i of Q_S and
    v = column j of Q_A, weighted (Λ_ij + λ)^∓1/2 (train / query)."""
    if not factors.layers:
        raise ValueError("the eigen sketch needs K-FAC or EK-FAC factors, these are 'identity'; "
                         "fit curvature or use SketchArgs(variant='whitened')")
    total = min(len(factors.shapes) * args.m, sum(o * i for o, i in factors.shapes.values()))
    top = torch.from_numpy(np.argsort(-_priority(factors)[0].numpy(), kind="stable")[:total]
                           .copy())
    starts = np.cumsum([0, *[d_out * d_in for d_out, d_in in factors.shapes.values()]])
    layers = {}
    for (name, f), a, b in zip(factors.layers.items(), starts[:-1], starts[1:]):
        flat = top[(top >= a) & (top < b)].sort().values - a    # flat indices into (out, in+1)
        d_in = factors.shapes[name][1]
        scale = (f.eigenvalues(factors.args.strategy).double().flatten()[flat]
                 + factors.damping(name)) ** -0.5
        i, iu = torch.unique(flat // d_in, return_inverse=True)
        j, iv = torch.unique(flat % d_in, return_inverse=True)
        u = torch.block_diag(*[x.double().cpu() for x in f.Q_S])[:, i].T.contiguous()
        v = torch.block_diag(*[x.double().cpu() for x in f.Q_A])[:, j].T.contiguous()
        layers[name] = LayerProjection(u, v, u, v, iu, iv, scale, 1 / scale)
    return layers


def resolve_variant(factors: Factors, args: SketchArgs) -> str:
    """The variant ``args`` means for these factors: "auto" is "eigen" when the eigen sketch's
    coordinates hold ≥ AUTO_COVERAGE of the effective dimension (:func:`eigen_coverage`), else
    "whitened" (always for identity factors)."""
    if args.variant != "auto":
        return args.variant
    if not factors.layers:
        return "whitened"
    total = len(factors.shapes) * args.m
    return "eigen" if eigen_coverage(factors, total) >= AUTO_COVERAGE else "whitened"


class Whitening:
    """Whitened norms per layer, the two halves of a score's Cauchy–Schwarz bound.

    A layer's score is ⟨R, DW⟩ = Σ_ij R̃_ij DW̃_ij in the eigenbasis (R̃ = Q_Sᵀ R Q_A), split as
    ⟨R̃ ⊙ √(Λ+λ), DW̃ ⊘ √(Λ+λ)⟩ — the split both sketch variants measure. So the error of a
    sketch estimate over any set of coordinates it does not hold exactly is at most
    ‖query part‖ · ‖training part‖ there. Identity factors: plain Frobenius norms."""

    def __init__(self, factors: Factors):
        self.factors = factors
        self._weight: dict[tuple, Tensor] = {}

    def weight(self, name: str, like: Tensor) -> tuple[Tensor, LayerFactors] | None:
        """(1 / (Λ + λ) (out, in+1), the layer's factors) on ``like``'s device and dtype (None:
        identity factors)."""
        if not self.factors.layers:
            return None
        key = (name, like.dtype, like.device)
        if key not in self._weight:
            f = self.factors.layers[name]
            inv = 1 / (f.eigenvalues(self.factors.args.strategy).double()
                       + self.factors.damping(name))
            self._weight[key] = (inv.to(like), replace(f, Q_A=[q.to(like) for q in f.Q_A],
                                                      Q_S=[q.to(like) for q in f.Q_S]))
        return self._weight[key]

    def train_sq(self, name: str, a: Tensor, delta: Tensor, tokens: Tensor) -> Tensor:
        """(B,) ‖DW̃ ⊘ √(Λ+λ)‖² of each sequence from ā (B, T, in+1), δ (B, T, out) and the
        counted positions' flat indices ``tokens``."""
        cast = self.weight(name, a)
        if cast is None:
            return einsum(delta, a, "b t o, b t i -> b o i").square().sum((1, 2))
        return (rotated_gradients(a, delta, tokens, cast[1]).square() * cast[0]).sum((1, 2))

    def query_sq(self, queries: Queries, names: list[str]) -> Tensor:
        """(Q, L) ‖R̃ ⊙ √(Λ+λ)‖² of each query and layer (L in the order of ``names``), one
        query's dense R̃ at a time, float64 on the CPU."""
        out = torch.zeros(len(queries), len(names), dtype=torch.float64)
        for l, name in enumerate(names):
            U, V = queries.R[name].U.double().cpu(), queries.R[name].V.double().cpu()
            cast = self.weight(name, U)
            if cast is not None:
                U = rotate(U.mT, cast[1].Q_S).mT                     # Q_Sᵀ U (Q, out, r)
                V = rotate(V.mT, cast[1].Q_A).mT                     # Q_Aᵀ V (Q, in+1, r)
            w = 1 if cast is None else 1 / cast[0]
            for q in range(len(queries)):
                out[q, l] = ((U[q] @ V[q].T).square() * w).sum()      # (out, in+1) summed
        return out


class Projection:
    """The per-layer measurement rows (:class:`LayerProjection`) and the measurements with them:
    :meth:`sketch_layer` (training side, token by token), :meth:`sketch_queries` (query side);
    with ``whitening`` also what the sketch leaves out (:meth:`rest_sq`)."""

    def __init__(self, layers: dict[str, LayerProjection], variant: str,
                 whitening: Whitening | None = None):
        self.layers, self.variant, self.whitening = layers, variant, whitening
        self._cast: dict[tuple, tuple] = {}
        self.dim = sum(self.width(name) for name in self.layers)

    @classmethod
    def draw(cls, factors: Factors, args: SketchArgs) -> "Projection":
        """The rows of ``args``'s variant for these factors, drawn from ``args.seed``
        (reproducible: the queries of a store are sketched alike)."""
        variant = resolve_variant(factors, args)
        build = _eigen_layers if variant == "eigen" else _whitened_layers
        return cls(build(factors, args), variant, Whitening(factors))

    def query_rest(self, queries: Queries, sketch: Tensor) -> Tensor:
        """(Q, L) what each layer's sketch does not hold exactly of each query, from the
        queries and their ``sketch`` (Q, D) (:meth:`sketch_queries`): as :meth:`rest_sq`, for
        the eigen variant from the whole whitened norm ‖R̃ ⊙ √(Λ+λ)‖. With the stored norms of
        the sequences, Σ_ℓ query_rest_ℓ · norms_ℓ bounds the eigen sketch's error
        (Cauchy–Schwarz per layer) and sets the scale of a random sketch's."""
        full = (self.whitening.query_sq(queries, list(self.layers)) if self.variant == "eigen"
                else None)
        return self.rest_sq(sketch.double(), full).sqrt()

    def rest_sq(self, sketch: Tensor, full_sq: Tensor | None = None) -> Tensor:
        """(n, L) squared norm, per layer, of what the sketches (n, D) do not hold exactly. The
        eigen sketch holds its coordinates exactly: the rest is the others', the whole squared
        whitened norm ``full_sq`` (n, L) less the sketch's. A random sketch holds none: its
        error is JL's, ∝ the product of the two sides' norms in its own (rank-one) whitening,
        which the sketch itself measures — ‖sketch_ℓ‖² (unbiased, relative noise √(2/m)), at
        no cost (the whole whitened norm would need each sequence's DW rotated)."""
        layer_sq = torch.stack([part.double().square().sum(1) for part in
                                sketch.split([self.width(n) for n in self.layers], 1)], 1)
        if self.variant != "eigen":
            return layer_sq
        return (full_sq.double() - layer_sq).clamp_min(0)

    def width(self, name: str) -> int:
        """Sketch coordinates of one layer."""
        p = self.layers[name]
        return len(p.u) * len(p.v) if p.iu is None else len(p.iu)

    def sketch_layer(self, name: str, a: Tensor, delta: Tensor) -> Tensor:
        """Training sketch of one layer from ā (B, T, in+1), δ (B, T, out) -> (B, width)."""
        key = (name, delta.dtype, delta.device)
        if key not in self._cast:
            self._cast[key] = self._cast_layer(self.layers[name], delta)
        uT, vT, iu, iv, w, flat = self._cast[key]
        du, av = delta @ uT, a @ vT
        if iu is None:                                        # P_out DW P_inᵀ
            return einsum(du, av, "b t i, b t j -> b i j").flatten(1)
        if flat is not None:                                  # the n_u × n_v block, gathered
            x = (du.mT @ av).flatten(1)[:, flat]
        else:                                                 # Σ_t (u·δ_t)(v·ā_t)
            x = einsum(du[..., iu], av[..., iv], "b t j, b t j -> b j")
        return x if w is None else x * w

    @staticmethod
    def _cast_layer(p: LayerProjection, like: Tensor) -> tuple:
        """(uᵀ, vᵀ, iu, iv, w, flat) on ``like``'s device and dtype; ``flat`` (iu·n_v + iv) when
        forming the whole n_u × n_v block of paired coordinates is the cheaper way (else None)."""
        to = lambda x: None if x is None else x.to(like.device if x.dtype == torch.int64  # noqa
                                                   else like)
        flat = None
        if p.iu is not None and len(p.u) * len(p.v) <= DENSE_GATHER * len(p.iu):
            flat = to(p.iu * len(p.v) + p.iv)
        return (to(p.u.T.contiguous()), to(p.v.T.contiguous()), to(p.iu), to(p.iv), to(p.w),
                flat)

    def sketch_queries(self, queries: Queries) -> Tensor:
        """Query sketches of the preconditioned gradients R = U Vᵀ -> (Q, D) float32."""
        parts = []
        for name, p in self.layers.items():
            U, V = queries.R[name].U.double().cpu(), queries.R[name].V.double().cpu()
            uU, vV = (rearrange(x, "q j r -> q r j") for x in (p.u_q @ U, p.v_q @ V))
            if p.iu is None:                                  # Σ_r (u'·U_r)(v'·V_r)
                parts.append(einsum(uU, vV, "q r i, q r j -> q i j").flatten(1))
                continue
            x = einsum(uU[..., p.iu], vV[..., p.iv], "q r j, q r j -> q j")
            parts.append(x if p.w_q is None else x * p.w_q)
        return torch.cat(parts, 1).float()


class Sketcher(Consumer):
    """Training sketches of the sequences of a pass: ``finish`` -> ((n, D) float16 sketches,
    (n, L) float32 norms of what each layer's sketch does not hold exactly,
    :meth:`Projection.rest_sq`) in the pass's row order (layers in the projection's order)."""

    def __init__(self, proj: Projection, n: int):
        self.proj, self.out = proj, np.zeros((n, proj.dim), np.float16)
        self.norms = np.zeros((n, len(proj.layers)), np.float32)
        self._parts: dict[str, Tensor] = {}
        self._sq: dict[str, Tensor] = {}

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        self._parts[layer.name] = self.proj.sketch_layer(layer.name, a, delta)
        if self.proj.variant == "eigen":        # the whole whitened norm: DW of each sequence,
            o, i = layer.shape                  # a group of them at a time
            self._sq[layer.name] = torch.cat([
                self.proj.whitening.train_sq(layer.name, a[group], delta[group], tokens)
                for group, tokens in batch.groups(o * i * a.element_size())])

    def update(self, batch: PassBatch) -> None:
        sketch = torch.cat([self._parts[n] for n in self.proj.layers], 1)
        full_sq = (torch.stack([self._sq[n] for n in self.proj.layers], 1) if self._sq
                   else None)
        self._parts, self._sq = {}, {}
        data = sketch.cpu().numpy().astype(np.float16)
        if not np.isfinite(data).all():
            raise FloatingPointError("a sketch overflowed float16; the gradients are huge "
                                     "(check the model)")
        self.out[batch.rows] = data
        self.norms[batch.rows] = self.proj.rest_sq(sketch, full_sq).sqrt().cpu().numpy()

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        return self.out, self.norms
