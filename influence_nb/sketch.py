"""Gradient sketches: a small vector per training sequence whose inner product with a query's
sketch approximates the influence score, written once and searched by every later query.

Per tracked layer ℓ a training sequence's log-likelihood gradient is DW = Σ_t δ_t ā_tᵀ
(out, in+1). Each of the m sketch coordinates of a layer is a random bilinear measurement,
formed token by token so that DW is never materialised::

    sketch_m[j] = u_jᵀ DW v_j = Σ_t (u_j · δ_t)(v_j · ā_t)          j = 1 … m
    sketch_q[j] = u'_jᵀ R v'_j = Σ_r (u'_j · U_r)(v'_j · V_r)        R = U Vᵀ ≈ (G+λI)⁻¹ ∇f

    u_j = B_out diag(s_out) p_j,  u'_j = B_out diag(1/s_out) p_j     (same for v with B_in, s_in)

with p_j, q_j Gaussian, B an orthogonal basis and s positive scales. Since E[p pᵀ] = I and B is
orthogonal, E⟨sketch_q, sketch_m⟩ / m = ⟨R, DW⟩, the layer's score, for any B and s; the choice
changes only the variance, ∝ ‖X_q‖² ‖X_m‖² / m for the two sides X in the scaled basis.

Variants (``SketchArgs.variant``):

- ``"eigen"``: no random measurement. The D = layers · m coordinates (i, j) of the EK-FAC
  eigenbasis with the largest Λ_ij / λ_ℓ over all layers are kept exactly, whitened per
  coordinate: sketch_m = (Q_Sᵀ DW Q_A)_ij / √(Λ_ij+λ), sketch_q = (Q_Sᵀ R Q_A)_ij · √(Λ_ij+λ),
  measured token by token with u = column i of Q_S, v = column j of Q_A (few distinct columns:
  cheap). Biased (the other coordinates are dropped) but noiseless. Why it wins where the
  damping leaves few directions: the score's variance over the corpus comes from coordinate
  (i, j) in proportion to ≈ Λ²/(Λ+λ)², so it sits in the top of the spectrum, while a random
  measurement's noise grows with the whole whitened norm Σ Λ/(Λ+λ), paid also for the long tail
  of small eigenvalues (docs/design.md, "Retrieval on two worlds").
- ``"auto"`` (default): "eigen" when its coordinates hold ≥ ``AUTO_COVERAGE`` of the effective
  dimension Σ Λ/(Λ+λ) (:func:`eigen_coverage`; a spectrum the damping cuts short), else
  "whitened" (a flat spectrum: no small set of coordinates carries the score).
- ``"whitened"``: B = the EK-FAC eigenbases (Q_S, Q_A), s_out s_inᵀ the rank-one
  (log-space least squares) fit of (Λ + λ)^-1/2: both sides whitened,
  X_m ≈ Q_Sᵀ DW Q_A / √(Λ+λ) and X_q ≈ Q_Sᵀ ∇f Q_A / √(Λ+λ) — the split of the score
  ⟨g̃ ⊘ (Λ+λ), d̃⟩ that balances the norms. Rank one keeps the measurement bilinear.
- ``"plain"``: B = I, s = 1; all of the preconditioning sits on the query side.

Structures (``SketchArgs.structure``, of the random variants; eigen ignores it):
``"khatri-rao"`` draws independent (p_j, q_j)
per coordinate, cost m · (out + in) per token and layer; ``"kronecker"`` (default) takes all pairs of
k = √m shared rows, sketch = P_out DW P_inᵀ = Σ_t (P_out δ_t)(P_in ā_t)ᵀ, cost k · (out + in)
per token plus k² per token for the outer products — so a Kronecker sketch can be far larger
for the same time. For nearly low-rank gradients its error is a product of two k-dimensional
projections where independent rows avoid that (benchmarks/retrieval.py compares them).

The sketches of all layers are concatenated (random variants: scaled by 1/√m), so
⟨sketch_q, sketch_m⟩ ≈ the total score.

On disk (a directory): ``sketches.f16`` (N, D) float16 rows, ``rows.bin`` (N,) records of
(corpus id, hash of the sequence's tokens) and ``sketches.json``, the manifest, written last
after each chunk: it lists the committed chunks with their CRC-32, the model and factor
fingerprints and the projection's settings. A build killed at any moment resumes after the
last committed chunk; sketching more ids later appends rows and keeps the old ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from einops import einsum, rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed, store
from .batching import as_ids, source
from .checks import check_args
from .curvature import Factors, fingerprint_of
from .data import Corpus
from .layers import TrackedLayer, find_layers
from .passes import Consumer, PassBatch, corpus_pass
from .queries import Queries
from .statistics import rotate
from .task import Task

VARIANTS = ("auto", "eigen", "whitened", "plain")
AUTO_COVERAGE = 0.05  # "auto" takes the eigen sketch when its coordinates hold this share
STRUCTURES = ("khatri-rao", "kronecker")
FORMAT = "influence_nb.sketches/1"
_DENSE_GATHER = 32  # eigen: form the n_u × n_v block and gather, if ≤ this × the coordinates
ROW = np.dtype([("id", "<i8"), ("hash", "<u8")])


class SketchError(ValueError):
    """A sketch store that is missing, corrupt, truncated or made for another model/factors."""


@dataclass
class SketchArgs:
    """How to sketch.

    m:          sketch coordinates per layer; D = layers · m (float16: 2·D bytes per sequence);
                the eigen variant spreads the D over the layers by eigenvalue
    variant:    "auto" (default: eigen or whitened, by :func:`eigen_coverage`), "eigen" (the
                top EK-FAC eigenbasis coordinates, exact), "whitened" (random measurements in
                the eigenbasis scaled by ≈ (Λ+λ)^-1/2) or "plain" (random, no basis)
    structure:  of the random variants: "kronecker" (default: P_out DW P_inᵀ with
                k_out = k_in = √m) or "khatri-rao" (independent bilinear measurements)
    seed:       seed of the Gaussian projections (stored: queries are sketched alike)
    batch_size: training sequences per forward + backward
    chunk_size: sequences per committed chunk (the unit of resumption)
    progress:   show a progress bar
    """
    m: int = 961
    variant: str = "auto"
    structure: str = "kronecker"
    seed: int = 0
    batch_size: int = 32
    chunk_size: int = 2048
    progress: bool = True

    MINIMUM: ClassVar[dict[str, float]] = {"m": 1, "batch_size": 1, "chunk_size": 1}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "variant": VARIANTS, "structure": STRUCTURES}

    def __post_init__(self) -> None:
        check_args(self)

    @property
    def projection(self) -> dict:
        """The settings that define the projection (what a store must agree on)."""
        return dict(m=self.m, variant=self.variant, structure=self.structure, seed=self.seed)


@dataclass
class LayerProjection:
    """Rows u (rows, out), v (rows, in+1) of the training side and u', v' of the query side.

    Coordinate j pairs u row ``iu[j]`` with v row ``iv[j]`` and is multiplied by ``w[j]``
    (query side: ``w_q[j]``); None: row j with row j, weight 1 (the random variants).
    """
    u: Tensor
    v: Tensor
    u_q: Tensor
    v_q: Tensor
    iu: Tensor | None = None
    iv: Tensor | None = None
    w: Tensor | None = None
    w_q: Tensor | None = None


def _rank_one_scales(Lambda: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """s_out (out,), s_in (in+1,) with log(s_out s_inᵀ) the least-squares fit of
    log (Λ + λ)^-1/2: row means plus column means minus the grand mean."""
    L = -0.5 * torch.log(Lambda.double() + damping)
    return torch.exp(L.mean(1)), torch.exp(L.mean(0) - L.mean())


def _gaussian_rows(args: SketchArgs, d_out: int, d_in: int, g: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """Rows p (rows, out), q (rows, in+1), scaled so that ⟨sketch_q, sketch_m⟩ ≈ the score:
    m independent pairs (Khatri-Rao), or k = √m rows per side whose k² pairs are the sketch."""
    k = args.m
    if args.structure == "kronecker":
        k = round(args.m ** .5)
        if k * k != args.m:
            raise ValueError(f"a Kronecker sketch needs m = k_out · k_in = k², got m={args.m}")
    # a coordinate is (p·X_q·q)(p·X_m·q) / m; Khatri-Rao: E = ⟨X_q, X_m⟩ / m per row pair,
    # Kronecker: k² pairs of E = ⟨X_q, X_m⟩ — either way rows scale by m^(-1/4)
    return (torch.randn(k, d_out, generator=g, dtype=torch.float64) / args.m ** .25,
            torch.randn(k, d_in, generator=g, dtype=torch.float64) / args.m ** .25)


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


def _eigen_coordinates(factors: Factors, total: int) -> dict[str, Tensor]:
    """Per layer the flat indices (sorted) into (out, in+1) of the ``total`` eigenbasis
    coordinates with the largest Λ_ij / λ_ℓ over all layers (ties: first in layer order)."""
    top = torch.from_numpy(np.argsort(-_priority(factors)[0].numpy(), kind="stable")[:total]
                           .copy())
    sizes = [d_out * d_in for d_out, d_in in factors.shapes.values()]
    starts = np.cumsum([0, *sizes])
    return {name: top[(top >= a) & (top < b)].sort().values - a
            for name, a, b in zip(factors.layers, starts[:-1], starts[1:])}


def _eigen_layer(factors: Factors, name: str, flat: Tensor) -> LayerProjection:
    """The eigen variant's rows of one layer: coordinate (i, j) = flat index is measured by
    u = column i of Q_S and v = column j of Q_A, weighted (Λ_ij + λ)^∓1/2 (train / query)."""
    f, d_in = factors.layers[name], factors.shapes[name][1]
    scale = (f.eigenvalues(factors.args.strategy).double().flatten()[flat]
             + factors.damping(name)) ** -0.5
    i, iu = torch.unique(flat // d_in, return_inverse=True)
    j, iv = torch.unique(flat % d_in, return_inverse=True)
    u = torch.block_diag(*[x.double().cpu() for x in f.Q_S])[:, i].T.contiguous()
    v = torch.block_diag(*[x.double().cpu() for x in f.Q_A])[:, j].T.contiguous()
    return LayerProjection(u, v, u, v, iu, iv, scale, 1 / scale)


def resolve_variant(factors: Factors, args: SketchArgs) -> str:
    """The variant ``args`` means for these factors: "auto" is "eigen" when the eigen sketch's
    coordinates hold ≥ AUTO_COVERAGE of the effective dimension (:func:`eigen_coverage`), else
    "whitened" ("plain" for identity factors)."""
    if args.variant != "auto":
        return args.variant
    if not factors.layers:
        return "plain"
    total = len(factors.shapes) * args.m
    return "eigen" if eigen_coverage(factors, total) >= AUTO_COVERAGE else "whitened"


def _random_layers(factors: Factors, args: SketchArgs, variant: str
                   ) -> dict[str, LayerProjection]:
    """Gaussian rows per layer (the "whitened" and "plain" variants), drawn from ``args.seed``."""
    g = torch.Generator().manual_seed(args.seed)
    layers = {}
    for name, (d_out, d_in) in factors.shapes.items():
        p, q = _gaussian_rows(args, d_out, d_in, g)
        if variant == "plain":
            layers[name] = LayerProjection(p, q, p, q)
            continue
        f = factors.layers[name]
        s_out, s_in = _rank_one_scales(f.eigenvalues(factors.args.strategy),
                                       factors.damping(name))
        Q_S, Q_A = [x.double().cpu() for x in f.Q_S], [x.double().cpu() for x in f.Q_A]
        # rows of B diag(s) p: (p · s) Bᵀ = rotate(p · s, B, transpose)
        layers[name] = LayerProjection(
            rotate(p * s_out, Q_S, True), rotate(q * s_in, Q_A, True),
            rotate(p / s_out, Q_S, True), rotate(q / s_in, Q_A, True))
    return layers


class Projection:
    """The per-layer measurement rows of a variant, drawn from ``seed`` (reproducible)."""

    def __init__(self, factors: Factors, args: SketchArgs):
        if args.variant not in VARIANTS or args.structure not in STRUCTURES:
            raise ValueError(f"unknown sketch variant {args.variant!r} / structure "
                             f"{args.structure!r}; use one of {VARIANTS} / {STRUCTURES}")
        self.variant = resolve_variant(factors, args)
        if self.variant != "plain" and not factors.layers:
            raise ValueError(f"the {self.variant} sketch needs K-FAC or EK-FAC factors, these "
                             "are 'identity'; fit curvature or use SketchArgs(variant='plain')")
        if self.variant == "eigen":
            total = min(len(factors.shapes) * args.m,
                        sum(o * i for o, i in factors.shapes.values()))
            self.layers = {name: _eigen_layer(factors, name, flat)
                           for name, flat in _eigen_coordinates(factors, total).items()}
        else:
            self.layers = _random_layers(factors, args, self.variant)
        self._cast: dict[tuple, tuple] = {}
        # Khatri-Rao pairs row j with row j; Kronecker pairs every row i with every row j
        self.pattern = "b t j, b t j -> b j" if args.structure == "khatri-rao" or \
            self.variant == "eigen" else "b t i, b t j -> b i j"
        self.dim = sum(self.width(name) for name in self.layers)

    def width(self, name: str) -> int:
        """Sketch coordinates of one layer."""
        p = self.layers[name]
        if p.iu is not None:
            return len(p.iu)
        return len(p.u) if self.pattern.endswith("b j") else len(p.u) * len(p.v)

    def sketch_layer(self, name: str, a: Tensor, delta: Tensor) -> Tensor:
        """Training sketch of one layer from ā (B, T, in+1), δ (B, T, out) -> (B, width)."""
        key = (name, delta.dtype, delta.device)
        if key not in self._cast:
            self._cast[key] = self._cast_layer(self.layers[name], delta)
        uT, vT, iu, iv, w, flat = self._cast[key]
        du, av = delta @ uT, a @ vT
        if iu is None:
            return einsum(du, av, self.pattern).flatten(1)      # Σ_t (u·δ_t)(v·ā_t)
        if flat is not None:                                  # the n_u × n_v block, gathered
            return (du.mT @ av).flatten(1)[:, flat] * w
        return einsum(du[..., iu], av[..., iv], self.pattern).flatten(1) * w

    @staticmethod
    def _cast_layer(p: LayerProjection, like: Tensor) -> tuple:
        """(uᵀ, vᵀ, iu, iv, w, flat) on ``like``'s device and dtype; ``flat`` (iu·n_v + iv) when
        forming the eigen variant's whole n_u × n_v block is the cheaper way (else None)."""
        to = lambda x: None if x is None else x.to(like.device if x.dtype == torch.int64  # noqa
                                                   else like)
        flat = None
        if p.iu is not None and len(p.u) * len(p.v) <= _DENSE_GATHER * len(p.iu):
            flat = to(p.iu * len(p.v) + p.iv)
        return (to(p.u.T.contiguous()), to(p.v.T.contiguous()), to(p.iu), to(p.iv), to(p.w),
                flat)

    def sketch_queries(self, queries: Queries) -> Tensor:
        """Query sketches of the preconditioned gradients R = U Vᵀ -> (Q, D) float32."""
        parts = []
        for name, p in self.layers.items():
            U, V = queries.R[name].U.double().cpu(), queries.R[name].V.double().cpu()
            uU, vV = (rearrange(x, "q j r -> q r j") for x in (p.u_q @ U, p.v_q @ V))
            if p.iu is not None:
                uU, vV = uU[..., p.iu], vV[..., p.iv]
            x = einsum(uU, vV, self.pattern).flatten(1)         # Σ_r (u'·U_r)(v'·V_r)
            parts.append(x if p.w_q is None else x * p.w_q)
        return torch.cat(parts, 1).float()


def sequence_hashes(corpus: Corpus, ids: np.ndarray) -> np.ndarray:
    """(N,) uint64: a hash of each sequence's token ids (ties a stored row to its content)."""
    return np.array([int.from_bytes(hashlib.blake2b(corpus.token_ids(i).tobytes(),
                                                    digest_size=8).digest(), "little")
                     for i in ids], dtype=np.uint64)


class Sketches:
    """A sketch store on disk: ``.data`` (N, D) float16 memory map, ``.ids`` (N,) corpus ids.

    Open with :meth:`open`, create or extend with :func:`build_sketches`. Row r of ``data``
    sketches corpus sequence ``ids[r]``; rows never move, so appended sequences keep their ids.
    """

    def __init__(self, path: Path, manifest: dict, rows: np.ndarray, data: np.ndarray):
        self.path, self.manifest, self.rows, self.data = path, manifest, rows, data

    @property
    def ids(self) -> np.ndarray:
        return self.rows["id"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def args(self) -> SketchArgs:
        return SketchArgs(**self.manifest["projection"])

    @property
    def fingerprint(self) -> str:
        """A hash of the projection, the model, the factors and the rows: what an index covers."""
        m = self.manifest
        return hashlib.sha256(json.dumps([m["projection"], m["model_fingerprint"],
                                          m["factors_id"], m["chunks"]]).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"Sketches({len(self)} sequences × {self.dim} dims, "
                f"{self.manifest['projection']['variant']}, {self.path})")

    @classmethod
    def open(cls, path: str | os.PathLike, model: nn.Module | None = None,
             factors: Factors | None = None, verify: bool = True) -> "Sketches":
        """Open a store read-only. With ``model`` / ``factors``, refuse a store made for others;
        ``verify`` checks every chunk's CRC-32 (reads the whole file once)."""
        path = Path(path)
        manifest = _read_manifest(path)
        if model is not None or factors is not None:
            _check_owner(path, manifest, model, factors)
        n, dim = sum(c[0] for c in manifest["chunks"]), manifest["dim"]
        for name, size in (("rows.bin", n * ROW.itemsize), ("sketches.f16", n * dim * 2)):
            have = (path / name).stat().st_size if (path / name).exists() else -1
            if have < size:  # longer is an interrupted chunk, ignored until the next build
                raise SketchError(f"{path / name} is truncated ({max(have, 0)} of {size} bytes); "
                                  "delete the directory and rebuild with build_sketches(...)")
        rows = np.fromfile(path / "rows.bin", dtype=ROW, count=n)
        data = (np.memmap(path / "sketches.f16", np.float16, "r", shape=(n, dim)) if n
                else np.zeros((0, dim), np.float16))
        if verify:
            start = 0
            for k, (size, crc_rows, crc_data) in enumerate(manifest["chunks"]):
                stop = start + size
                if (store.crc32(rows[start:stop]) != crc_rows
                        or store.crc32(data[start:stop]) != crc_data):
                    raise SketchError(f"{path} is corrupt (chunk {k}, rows {start}–{stop}, fails "
                                      "its CRC-32); delete the directory and rebuild with "
                                      "build_sketches(...)")
                start = stop
        return cls(path, manifest, rows, data)

    def rows_of(self, ids: Sequence[int]) -> np.ndarray:
        """Row numbers of corpus ``ids`` in this store (KeyError naming a missing id)."""
        where = {int(i): r for r, i in enumerate(self.ids)}
        missing = [int(i) for i in ids if int(i) not in where]
        if missing:
            raise KeyError(f"sequence {missing[0]} is not sketched in {self.path}; extend the "
                           "store with build_sketches(..., ids=...)")
        return np.array([where[int(i)] for i in ids], dtype=np.int64)

    def check_corpus(self, corpus: Corpus) -> None:
        """Refuse a corpus whose sequence at a stored id is not the one sketched there."""
        if len(self) and self.ids.max() >= len(corpus):
            raise SketchError(f"{self.path} holds sketches of ids up to {self.ids.max()}, beyond "
                              f"this corpus of {len(corpus)} sequences; use the sketched corpus")
        bad = np.flatnonzero(sequence_hashes(corpus, self.ids) != self.rows["hash"])
        if len(bad):
            raise SketchError(f"sequence {self.ids[bad[0]]} of the corpus differs from the one "
                              f"sketched in {self.path} ({len(bad)} differ); use the sketched "
                              "corpus or rebuild the sketches")

    def query_sketches(self, model: nn.Module, factors: Factors, queries: Queries) -> np.ndarray:
        """(Q, D) float32 sketches of preconditioned query gradients, drawn like the stored ones."""
        _check_owner(self.path, self.manifest, model, factors)
        if queries.factors_id != self.manifest["factors_id"]:
            raise SketchError("the queries were preconditioned with other factors than the "
                              f"sketches in {self.path}; make them with the same factors")
        return Projection(factors, self.args).sketch_queries(queries).numpy()


def _read_manifest(path: Path) -> dict:
    return store.read_manifest(path / "sketches.json", FORMAT, SketchError,
                               f"delete {path} and rebuild with build_sketches(model, factors, "
                               "corpus, path)", keys=("dim", "projection", "layers", "chunks",
                                                      "model_fingerprint", "factors_id"))


def _owner(model: nn.Module, factors: Factors) -> dict:
    return dict(model_fingerprint=fingerprint_of(model, factors.layer_names),
                factors_id=factors.factors_id())


def _check_owner(path: Path, manifest: dict, model: nn.Module | None,
                 factors: Factors | None) -> None:
    if model is not None:
        fp = fingerprint_of(model, list(manifest["layers"]))
        if fp != manifest["model_fingerprint"]:
            raise SketchError(f"the sketches in {path} were made with another model (fingerprint "
                              f"{manifest['model_fingerprint']} ≠ {fp}); use that model or "
                              "rebuild them in a new directory")
    if factors is not None and factors.factors_id() != manifest["factors_id"]:
        raise SketchError(f"the sketches in {path} were made with other factors "
                          f"({manifest['factors_id']} ≠ {factors.factors_id()}); load those factors "
                          "or rebuild the sketches in a new directory")


class Sketcher(Consumer):
    """Training sketches of the sequences of a pass: ``finish`` -> (n, D) float16 in the
    pass's row order (layers concatenated in the projection's order)."""

    def __init__(self, proj: Projection, n: int):
        self.proj, self.out = proj, np.zeros((n, proj.dim), np.float16)
        self._parts: dict[str, Tensor] = {}

    def update_layer(self, layer: TrackedLayer, a: Tensor, delta: Tensor,
                     batch: PassBatch) -> None:
        self._parts[layer.name] = self.proj.sketch_layer(layer.name, a, delta)

    def update(self, batch: PassBatch) -> None:
        data = torch.cat([self._parts[n] for n in self.proj.layers], 1).cpu().numpy()
        self._parts = {}
        data = data.astype(np.float16)
        if not np.isfinite(data).all():
            raise FloatingPointError("a sketch overflowed float16; the gradients are huge "
                                     "(check the model)")
        self.out[batch.rows] = data

    def finish(self) -> np.ndarray:
        return self.out


def build_sketches(model: nn.Module, factors: Factors, corpus: Corpus,
                   path: str | os.PathLike, args: SketchArgs | None = None,
                   ids: Sequence[int] | None = None, task: Task | None = None) -> Sketches:
    """Sketch the sequences ``ids`` of ``corpus`` (default: all) that ``path`` does not hold yet.

    Creates the store, resumes an interrupted build, or appends new ids to an existing store
    (old rows keep their ids). An existing store must match the model, factors and projection.
    Under torch.distributed the chunks are shared out over the ranks (:func:`_build_sharded`).
    """
    if distributed.rank_world()[1] > 1:
        return _build_sharded(model, factors, corpus, path, args, ids, task)
    return _build_local(model, factors, corpus, path, args, ids, task)


def _build_local(model: nn.Module, factors: Factors, corpus: Corpus, path: str | os.PathLike,
                 args: SketchArgs | None, ids: Sequence[int] | None, task: Task | None
                 ) -> Sketches:
    """:func:`build_sketches` in this process alone (also one rank's part of a sharded build)."""
    args = args or SketchArgs()
    if args.chunk_size % args.batch_size:
        raise ValueError(f"chunk_size ({args.chunk_size}) must be a multiple of batch_size "
                         f"({args.batch_size})")
    path = Path(path)
    owner = _owner(model, factors)
    proj = Projection(factors, args)
    with store.lock(path, SketchError):
        if (path / "sketches.json").exists():
            old = Sketches.open(path, model, factors)   # verified: appending to a corrupt store
            if old.manifest["projection"] != args.projection:  # would bury the damage
                raise SketchError(f"{path} holds sketches with projection "
                                  f"{old.manifest['projection']}, not {args.projection}; pass "
                                  "those SketchArgs or a new directory")
            old.check_corpus(corpus)
            manifest, done = old.manifest, set(old.ids.tolist())
        else:
            manifest = dict(format=FORMAT, dim=proj.dim, projection=args.projection,
                            layers={n: list(s) for n, s in factors.shapes.items()}, chunks=[],
                            **owner)
            done = set()
        ids = as_ids(ids, len(corpus))
        todo = np.array([i for i in ids.tolist() if i not in done], dtype=np.int64)
        n = sum(c[0] for c in manifest["chunks"])
        for name, width in (("rows.bin", ROW.itemsize), ("sketches.f16", 2 * proj.dim)):
            store.truncate(path / name, n * width)  # drop the rows of an interrupted chunk
        layers = find_layers(model, factors.layer_names)
        with tqdm(total=len(todo), desc="sketching", unit="seq",
                  disable=not args.progress) as bar:
            for start in range(0, len(todo), args.chunk_size):
                chunk = todo[start:start + args.chunk_size]
                data = corpus_pass(model, layers, source(corpus, args.batch_size, chunk),
                                   [Sketcher(proj, len(chunk))], task=task, progress=bar)[0]
                rows = np.empty(len(chunk), ROW)
                rows["id"], rows["hash"] = chunk, sequence_hashes(corpus, chunk)
                store.append(path / "rows.bin", rows.tobytes())
                store.append(path / "sketches.f16", data.tobytes())
                manifest["chunks"].append([len(chunk), store.crc32(rows), store.crc32(data)])
                store.write_json(path / "sketches.json", manifest)
    return Sketches.open(path, verify=False)


def _build_sharded(model: nn.Module, factors: Factors, corpus: Corpus,
                   path: str | os.PathLike, args: SketchArgs | None = None,
                   ids: Sequence[int] | None = None, task: Task | None = None) -> Sketches:
    """:func:`build_sketches` over the ranks of torch.distributed; -> the one store at ``path``.

    The sequences still to sketch are cut into chunks of ``args.chunk_size``; rank r sketches the
    r-th contiguous run of chunks into its own part store ``<path>.parts/…`` (resumable like any
    store), then rank 0 appends the parts, in order, to ``path`` with :func:`merge_sketches`.
    The chunks are the ones a single process would write, so the store is the same, byte for byte.
    """
    rank, world = distributed.rank_world()
    args, path = args or SketchArgs(), Path(path)
    ids = as_ids(ids, len(corpus))
    distributed.check_same(json.dumps([_owner(model, factors), corpus.fingerprint, str(path),
                                       asdict(replace(args, progress=True)),
                                       hashlib.sha256(ids.tobytes()).hexdigest()]),
                           "the model, factors, corpus, store and SketchArgs of the sketch")
    exists = (path / "sketches.json").exists()
    if rank == 0 and exists:  # check model, factors, projection and corpus; drop a torn chunk
        _build_local(model, factors, corpus, path, replace(args, progress=False),
                     np.zeros(0, np.int64), task)
    distributed.barrier()
    if exists:
        ids = ids[~np.isin(ids, Sketches.open(path, verify=False).ids)]
    n_chunks = -(-len(ids) // args.chunk_size)
    parts = []
    for r, run in enumerate(np.array_split(np.arange(n_chunks), world)):
        part = ids[run[0] * args.chunk_size:(run[-1] + 1) * args.chunk_size] \
            if len(run) else ids[:0]
        key = hashlib.sha256(part.tobytes()).hexdigest()[:12]
        parts.append((path.with_name(path.name + ".parts") / f"{r:05d}-{key}", part))
    part_path, part = parts[rank]
    if len(part):
        _build_local(model, factors, corpus, part_path, args, part, task)
    distributed.barrier()
    if rank == 0:
        merge_sketches(path, [Sketches.open(p) for p, part in parts if len(part)])
        shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)
    distributed.barrier()
    return Sketches.open(path, verify=False)


_COPY_BLOCK = 1 << 24  # bytes copied at a time when merging sketch parts


def merge_sketches(path: str | os.PathLike, parts: Sequence[Sketches]) -> Sketches:
    """Append the rows of the sketch stores ``parts`` (same model, factors and projection) to the
    store at ``path``, created when absent. Each part's chunks are copied as they are, with their
    CRC-32s; the manifest is written last, so an interrupted merge leaves ``path`` as it was."""
    path = Path(path)
    if not parts:
        return Sketches.open(path, verify=False)
    with store.lock(path, SketchError):
        _merge(path, parts)
    return Sketches.open(path)


def _merge(path: Path, parts: Sequence[Sketches]) -> None:
    """:func:`merge_sketches` under its lock."""
    manifest = (_read_manifest(path) if (path / "sketches.json").exists()
                else dict(parts[0].manifest, chunks=[]))
    have = Sketches.open(path, verify=False).ids if manifest["chunks"] else np.zeros(0, np.int64)
    for part in parts:
        diff = [k for k in manifest if k != "chunks" and part.manifest.get(k) != manifest[k]]
        if diff:
            raise SketchError(f"{part.path} differs from {path} in {', '.join(diff)}; sketch "
                              "every part with the same model, factors and SketchArgs")
        if np.isin(part.ids, have).any():
            raise SketchError(f"{part.path} holds sequences that {path} (or an earlier part) "
                              "already holds; merge disjoint parts only")
        have = np.concatenate([have, part.ids])
    n = sum(c[0] for c in manifest["chunks"])
    for name, width in (("rows.bin", ROW.itemsize), ("sketches.f16", 2 * manifest["dim"])):
        store.truncate(path / name, n * width)  # drop the rows of an interrupted merge or build
        with open(path / name, "ab") as out:
            for part in parts:
                with open(part.path / name, "rb") as src:
                    left = len(part) * width
                    while left:
                        block = src.read(min(left, _COPY_BLOCK))
                        if not block:
                            raise SketchError(f"{part.path / name} is truncated; rebuild it")
                        out.write(block)
                        left -= len(block)
            out.flush()
            os.fsync(out.fileno())
    manifest["chunks"] = manifest["chunks"] + [c for p in parts for c in p.manifest["chunks"]]
    store.write_json(path / "sketches.json", manifest)
