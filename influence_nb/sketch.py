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

Bases (``SketchArgs.variant``):

- ``"whitened"`` (default): B = the EK-FAC eigenbases (Q_S, Q_A), s_out s_inᵀ the rank-one
  (log-space least squares) fit of (Λ + λ)^-1/2: both sides whitened,
  X_m ≈ Q_Sᵀ DW Q_A / √(Λ+λ) and X_q ≈ Q_Sᵀ ∇f Q_A / √(Λ+λ) — the split of the score
  ⟨g̃ ⊘ (Λ+λ), d̃⟩ that balances the norms. Rank one keeps the measurement bilinear.
- ``"plain"``: B = I, s = 1; all of the preconditioning sits on the query side.

Structures (``SketchArgs.structure``): ``"khatri-rao"`` (default) draws independent (p_j, q_j)
per coordinate, cost m · (out + in) per token and layer; ``"kronecker"`` takes all pairs of
k = √m shared rows, sketch = P_out DW P_inᵀ = Σ_t (P_out δ_t)(P_in ā_t)ᵀ, cost k · (out + in)
per token plus k² per token for the outer products — so a Kronecker sketch can be far larger
for the same time. For nearly low-rank gradients its error is a product of two k-dimensional
projections where independent rows avoid that (benchmarks/retrieval.py compares them).

The sketches of all layers are concatenated and scaled by 1/√m, so ⟨sketch_q, sketch_m⟩ ≈ the
total score.

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
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from einops import einsum, rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from .curvature import Factors, fingerprint_of, rotate, to_device
from .data import Corpus
from .hooks import Capture, eval_mode, find_layers
from .scoring import Queries, _atomic_write, factors_id
from .task import Task

VARIANTS = ("whitened", "plain")
STRUCTURES = ("khatri-rao", "kronecker")
FORMAT = "influence_nb.sketches/1"
ROW = np.dtype([("id", "<i8"), ("hash", "<u8")])


class SketchError(ValueError):
    """A sketch store that is missing, corrupt, truncated or made for another model/factors."""


@dataclass
class SketchArgs:
    """How to sketch.

    m:          sketch coordinates per layer; D = layers · m (float16: 2·D bytes per sequence)
    variant:    "whitened" (EK-FAC eigenbasis scaled by ≈ (Λ+λ)^-1/2; default) or "plain"
    structure:  "khatri-rao" (independent bilinear measurements; default) or "kronecker"
                (P_out DW P_inᵀ with k_out = k_in = √m)
    seed:       seed of the Gaussian projections (stored: queries are sketched alike)
    batch_size: training sequences per forward + backward
    chunk_size: sequences per committed chunk (the unit of resumption)
    progress:   show a progress bar
    """
    m: int = 256
    variant: str = "whitened"
    structure: str = "khatri-rao"
    seed: int = 0
    batch_size: int = 32
    chunk_size: int = 2048
    progress: bool = True

    @property
    def projection(self) -> dict:
        """The settings that define the projection (what a store must agree on)."""
        return dict(m=self.m, variant=self.variant, structure=self.structure, seed=self.seed)


@dataclass
class LayerProjection:
    """Rows u (rows, out), v (rows, in+1) of the training side and u', v' of the query side."""
    u: Tensor
    v: Tensor
    u_q: Tensor
    v_q: Tensor


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


class Projection:
    """The per-layer measurement rows of a variant, drawn from ``seed`` (reproducible)."""

    def __init__(self, factors: Factors, args: SketchArgs):
        if args.variant not in VARIANTS or args.structure not in STRUCTURES:
            raise ValueError(f"unknown sketch variant {args.variant!r} / structure "
                             f"{args.structure!r}; use one of {VARIANTS} / {STRUCTURES}")
        if args.variant == "whitened" and not factors.layers:
            raise ValueError("the whitened sketch needs K-FAC or EK-FAC factors, these are "
                             "'identity'; fit curvature or use SketchArgs(variant='plain')")
        g = torch.Generator().manual_seed(args.seed)
        self.layers: dict[str, LayerProjection] = {}
        for name, (d_out, d_in) in factors.shapes.items():
            p, q = _gaussian_rows(args, d_out, d_in, g)
            if args.variant == "plain":
                self.layers[name] = LayerProjection(p, q, p, q)
                continue
            f = factors.layers[name]
            s_out, s_in = _rank_one_scales(f.eigenvalues(factors.args.strategy),
                                           factors.damping(name))
            Q_S, Q_A = [x.double().cpu() for x in f.Q_S], [x.double().cpu() for x in f.Q_A]
            # rows of B diag(s) p: (p · s) Bᵀ = rotate(p · s, B, transpose)
            self.layers[name] = LayerProjection(
                rotate(p * s_out, Q_S, True), rotate(q * s_in, Q_A, True),
                rotate(p / s_out, Q_S, True), rotate(q / s_in, Q_A, True))
        self._cast: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.dim = len(self.layers) * args.m
        # Khatri-Rao pairs row j with row j; Kronecker pairs every row i with every row j
        self.pattern = "b t j, b t j -> b j" if args.structure == "khatri-rao" else \
            "b t i, b t j -> b i j"

    def sketch_tokens(self, a: dict[str, Tensor], delta: dict[str, Tensor]) -> Tensor:
        """Training sketches of a batch from captured ā (B, T, in+1) and δ (B, T, out) -> (B, D)."""
        parts = []
        for name, p in self.layers.items():
            x, d = a[name], delta[name]
            key = (name, d.dtype, d.device)
            if key not in self._cast:
                self._cast[key] = p.u.to(d).T.contiguous(), p.v.to(d).T.contiguous()
            u, v = self._cast[key]
            parts.append(einsum(d @ u, x @ v, self.pattern).flatten(1))  # Σ_t (u·δ_t)(v·ā_t)
        return torch.cat(parts, 1)

    def sketch_queries(self, queries: Queries) -> Tensor:
        """Query sketches of the preconditioned gradients R = U Vᵀ -> (Q, D) float32."""
        parts = []
        for name, p in self.layers.items():
            U, V = queries.R[name].U.double().cpu(), queries.R[name].V.double().cpu()
            uU, vV = (rearrange(x, "q j r -> q r j") for x in (p.u_q @ U, p.v_q @ V))
            parts.append(einsum(uU, vV, self.pattern).flatten(1))      # Σ_r (u'·U_r)(v'·V_r)
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
                if (zlib.crc32(rows[start:stop].tobytes()) != crc_rows
                        or zlib.crc32(np.ascontiguousarray(data[start:stop])) != crc_data):
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


def read_manifest(file: Path, fmt: str, error: type[Exception], fix: str) -> dict:
    """A JSON manifest of format ``fmt``; missing, corrupt or foreign -> one-line ``error``
    that ends with ``fix`` (how to rebuild)."""
    if not file.exists():
        raise error(f"{file} is missing; {fix}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{file} is corrupt or not a manifest of format {fmt!r}; {fix}")
    return manifest


def _read_manifest(path: Path) -> dict:
    return read_manifest(path / "sketches.json", FORMAT, SketchError,
                         f"delete {path} and rebuild with build_sketches(model, factors, "
                         "corpus, path)")


def _owner(model: nn.Module, factors: Factors) -> dict:
    return dict(model_fingerprint=fingerprint_of(model, factors.layer_names),
                factors_id=factors_id(factors))


def _check_owner(path: Path, manifest: dict, model: nn.Module | None,
                 factors: Factors | None) -> None:
    if model is not None:
        fp = fingerprint_of(model, list(manifest["layers"]))
        if fp != manifest["model_fingerprint"]:
            raise SketchError(f"the sketches in {path} were made with another model (fingerprint "
                              f"{manifest['model_fingerprint']} ≠ {fp}); use that model or "
                              "rebuild them in a new directory")
    if factors is not None and factors_id(factors) != manifest["factors_id"]:
        raise SketchError(f"the sketches in {path} were made with other factors "
                          f"({manifest['factors_id']} ≠ {factors_id(factors)}); load those factors "
                          "or rebuild the sketches in a new directory")


def build_sketches(model: nn.Module, factors: Factors, corpus: Corpus,
                   path: str | os.PathLike, args: SketchArgs | None = None,
                   ids: Sequence[int] | None = None, task: Task | None = None) -> Sketches:
    """Sketch the sequences ``ids`` of ``corpus`` (default: all) that ``path`` does not hold yet.

    Creates the store, resumes an interrupted build, or appends new ids to an existing store
    (old rows keep their ids). An existing store must match the model, factors and projection.
    """
    args, task = args or SketchArgs(), task or Task()
    if args.chunk_size % args.batch_size:
        raise ValueError(f"chunk_size ({args.chunk_size}) must be a multiple of batch_size "
                         f"({args.batch_size})")
    path = Path(path)
    owner = _owner(model, factors)
    proj = Projection(factors, args)
    if (path / "sketches.json").exists():
        store = Sketches.open(path, model, factors, verify=False)
        if store.manifest["projection"] != args.projection:
            raise SketchError(f"{path} holds sketches with projection {store.manifest['projection']}"
                              f", not {args.projection}; pass those SketchArgs or a new directory")
        store.check_corpus(corpus)
        manifest, done = store.manifest, set(store.ids.tolist())
    else:
        path.mkdir(parents=True, exist_ok=True)
        manifest = dict(format=FORMAT, dim=proj.dim, projection=args.projection,
                        layers={n: list(s) for n, s in factors.shapes.items()}, chunks=[],
                        **owner)
        done = set()
    ids = np.arange(len(corpus)) if ids is None else np.asarray(ids, np.int64)
    todo = np.array([i for i in ids.tolist() if i not in done], dtype=np.int64)
    n = sum(c[0] for c in manifest["chunks"])
    for name, width in (("rows.bin", ROW.itemsize), ("sketches.f16", 2 * proj.dim)):
        with open(path / name, "ab") as fh:  # drop the rows of an interrupted chunk
            fh.truncate(n * width)
    layers = find_layers(model, factors.layer_names)
    device = next(model.parameters()).device
    with eval_mode(model), Capture(model, layers) as cap, \
            tqdm(total=len(todo), desc="sketching", unit="seq", disable=not args.progress) as bar:
        for start in range(0, len(todo), args.chunk_size):
            chunk = todo[start:start + args.chunk_size]
            parts = []
            for batch in corpus.batches(args.batch_size, ids=chunk):
                batch = to_device(batch, device)
                cap.start(task.loss_mask(batch))
                with torch.enable_grad():
                    cap.backward(-task.training_loss(task.forward(model, batch), batch))
                parts.append(proj.sketch_tokens(cap.a, cap.delta).cpu())
                bar.update(len(batch))
            data = torch.cat(parts).numpy().astype(np.float16)
            if not np.isfinite(data).all():
                raise FloatingPointError("a sketch overflowed float16; the gradients are huge "
                                         "(check the model)")
            rows = np.empty(len(chunk), ROW)
            rows["id"], rows["hash"] = chunk, sequence_hashes(corpus, chunk)
            for name, blob in (("rows.bin", rows.tobytes()), ("sketches.f16", data.tobytes())):
                with open(path / name, "ab") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
            manifest["chunks"].append([len(chunk), zlib.crc32(rows.tobytes()),
                                       zlib.crc32(data.tobytes())])
            _atomic_write(path / "sketches.json", json.dumps(manifest, indent=1).encode())
    return Sketches.open(path, verify=False)
