"""The sketch store: a gradient sketch (:mod:`influence_nb.projection`) per training sequence,
written once and searched by every later query.

On disk (a directory): ``sketches.f16`` (N, D) float16 rows, ``norms.f32`` (N, L) float32
per sequence and layer the norm of what the sketch does not hold exactly
(:meth:`~influence_nb.projection.Projection.rest_sq`: the scale of the sketch's error that a
recall-targeted search bounds), ``rows.bin`` (N,) records of (corpus id, hash of the
sequence's tokens) and ``sketches.json``, the manifest, written last (and sealed) after each chunk: it lists the
committed chunks with their CRC-32s, the model and factor fingerprints and the projection's
settings (the projection itself is drawn again from them). A store whose corpus is short
enough (``SketchArgs.exact_bytes``) also keeps each sequence's exact token factors
(:mod:`influence_nb.tokens`: ``token_counts.i32`` and ``token_norms.f32`` a row per
sequence, ``tokens.f16`` and ``token_scales.f32`` a row per token; manifest ``tokens`` true):
:meth:`Sketches.exact_scores` reads them, the scores themselves to float16 rounding, for any
rows. Stores of format 1, before the norms,
still open and serve fixed-size searches; a search with a recall target asks to rebuild them.
A build killed at any moment resumes after the last committed chunk; sketching more ids later
appends rows and keeps the old ones. Under torch.distributed the chunks are shared out over the
ranks and the parts merged, byte for byte the store one process writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import distributed, store, tokens
from .batching import source
from .checks import as_ids, checked
from .curvature import Factors, fingerprint_of
from .data import Corpus
from .layers import find_layers
from .passes import corpus_pass
from .progress import tqdm
from .projection import VARIANTS, Projection, SketchArgs, Sketcher
from .tokens import TokenFactors
from .task import Task

if TYPE_CHECKING:  # annotations only
    from .queries import Queries

FORMAT = "influence_nb.sketches/2"
FORMAT_1 = "influence_nb.sketches/1"   # before norms.f32: opened read-only, never extended
ROW = np.dtype([("id", "<i8"), ("hash", "<u8")])
BLOCK = 1 << 16  # store rows per block of sketch inner products
# a chunk's exact token factors at most (one longer sequence alone): a build holds its chunk
# in memory until it is written (GPT-2 small's MLPs take 184 KB a token: 2,048 sequences of
# 16 tokens would be 6 GB)
CHUNK_BYTES = 256 << 20


class SketchError(ValueError):
    """A sketch store that is missing, corrupt, truncated or made for another model/factors."""


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

    def __init__(self, path: Path, manifest: dict, rows: np.ndarray, data: np.ndarray,
                 norms: np.ndarray | None = None, *exact: np.ndarray):
        self.path, self.manifest, self.rows, self.data = path, manifest, rows, data
        self._norms = norms
        # (N,) token counts, (N, L) norms, (Σ counts, W) float16 factors, (Σ counts, L·2)
        # scales; None: not kept
        self.exact: tuple[np.ndarray, ...] | None = (exact[0].reshape(-1), *exact[1:]) \
            if exact else None
        self._projections: dict[str, Projection] = {}

    @property
    def ids(self) -> np.ndarray:
        return self.rows["id"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def norms(self) -> np.ndarray:
        """(N, L) float32 norms of what each layer's sketch leaves out (layers in the
        manifest's order); SketchError for a store of format 1, made before them."""
        if self.manifest["format"] == FORMAT_1:
            raise SketchError(f"{self.path} predates the per-sequence norms a search with a "
                              "recall target needs (sketch store format 1); rebuild it with "
                              "build_sketches(...) in a new directory, or search with "
                              "candidates=K")
        return self._norms

    @property
    def args(self) -> SketchArgs:
        """The projection's settings the store was made with (SketchError: a variant the
        package no longer draws)."""
        settings = {k: v for k, v in self.manifest["projection"].items() if k != "structure"}
        if settings["variant"] not in VARIANTS:
            raise SketchError(f"{self.path} holds sketches of the variant "
                              f"{settings['variant']!r}, no longer in the package "
                              f"(benchmarks/sketch_variants.py); rebuild it with SketchArgs()")
        return SketchArgs(**settings)

    def projection(self, factors: Factors) -> Projection:
        """The store's projection, drawn again from its settings (SketchError: one the package
        no longer draws — random Khatri-Rao pairs, benchmarks/sketch_variants.py)."""
        key = factors.factors_id()
        if key in self._projections:       # drawn once per factors: a search asks twice
            return self._projections[key]
        proj = Projection.draw(factors, self.args)
        if self.manifest["projection"]["structure"] != "kronecker" and proj.variant != "eigen":
            raise SketchError(f"{self.path} holds {proj.variant} sketches of the Khatri-Rao "
                              "structure, no longer in the package (benchmarks/"
                              "sketch_variants.py); rebuild it with SketchArgs()")
        self._projections[key] = proj
        return proj

    @property
    def fingerprint(self) -> str:
        """A hash of the projection, the model, the factors and the rows: what an index covers."""
        m = self.manifest
        return hashlib.sha256(json.dumps([m["projection"], m["model_fingerprint"],
                                          m["factors_id"], m["chunks"]]).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        exact = "" if self.exact is None else \
            f" + exact token factors ({self.exact[2].nbytes + self.exact[3].nbytes:,} bytes)"
        return (f"Sketches({len(self)} sequences × {self.dim} dims, "
                f"{self.manifest['projection']['variant']}{exact}, {self.path})")

    @classmethod
    @checked()
    def open(cls, path: str | os.PathLike, model: nn.Module | None = None,
             factors: Factors | None = None, verify: bool = True) -> "Sketches":
        """Open a store read-only. With ``model`` / ``factors``, refuse a store made for others;
        ``verify`` checks every chunk's CRC-32 (reads the whole file once)."""
        path = Path(path)
        manifest = _read_manifest(path)
        if model is not None or factors is not None:
            _check_owner(path, manifest, model, factors)
        n = sum(c[0] for c in manifest["chunks"])
        units, arrays = _extent(path, manifest, n), []
        for name, width, dtype, ragged in _files(manifest):
            have = (path / name).stat().st_size if (path / name).exists() else -1
            if have < units[ragged] * width:  # longer: an interrupted chunk, dropped next build
                raise SketchError(f"{path / name} is truncated ({max(have, 0)} of "
                                  f"{units[ragged] * width} bytes); delete the directory and "
                                  "rebuild with build_sketches(...)")
            shape = (units[ragged], width // dtype.itemsize)
            arrays.append(np.fromfile(path / name, dtype=dtype, count=n) if name == "rows.bin"
                          else np.memmap(path / name, dtype, "r", shape=shape) if shape[0]
                          else np.zeros(shape, dtype))
        if verify:
            start, ragged = 0, [f[3] for f in _files(manifest)]
            first = units["first"]                   # each row's first token (ragged files)
            for k, (size, *crcs) in enumerate(manifest["chunks"]):
                stop = start + size
                if [store.crc32(x[first[start]:first[stop]] if r else x[start:stop])
                        for x, r in zip(arrays, ragged)] != crcs:
                    raise SketchError(f"{path} is corrupt (chunk {k}, rows {start}–{stop}, fails "
                                      "its CRC-32); delete the directory and rebuild with "
                                      "build_sketches(...)")
                start = stop
        return cls(path, manifest, *arrays)

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
        self._check_queries(model, factors, queries)
        return self.projection(factors).sketch_queries(queries).numpy()

    def _check_queries(self, model: nn.Module, factors: Factors, queries: Queries) -> None:
        _check_owner(self.path, self.manifest, model, factors)
        if queries.factors_id != self.manifest["factors_id"]:
            raise SketchError("the queries were preconditioned with other factors than the "
                              f"sketches in {self.path}; make them with the same factors")

    def estimates(self, model: nn.Module, factors: Factors, queries: Queries,
                  rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(Q, n) sketch estimates ŝ of the queries' scores on the store's ``rows`` and (Q, n)
        the scale H of their error (:meth:`noise_scale`): |s − ŝ| ≤ H for the eigen sketch, of
        the order of H for a random one. Blocks of rows at a time: the store stays a memory
        map."""
        x = self.query_sketches(model, factors, queries)
        data = self.data[rows]
        s_hat = np.concatenate([x @ np.asarray(data[i:i + BLOCK], np.float32).T
                                for i in range(0, len(data), BLOCK)], 1) if len(data) \
            else np.zeros((len(x), 0), np.float32)
        return s_hat, self.noise_scale(self.query_rest(factors, queries, x), rows)

    def exact_scores(self, model: nn.Module, factors: Factors, queries: Queries,
                     rows: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(Q, n) the queries' scores on the store's ``rows`` from their exact token factors
        (:mod:`influence_nb.tokens`; SketchError for a store without them) and (Q, n) the
        bound on their float16 rounding. Only those rows' factors are read."""
        if self.exact is None:
            raise SketchError(f"{self.path} keeps no exact token factors (the corpus's took more "
                              "than SketchArgs.exact_bytes); use estimates(), or rebuild the "
                              "store in a new directory with a larger exact_bytes")
        self._check_queries(model, factors, queries)
        counts, norms, data, scales = self.exact
        picked = np.arange(len(counts))[rows]
        c = counts[picked]
        if len(picked) and (np.diff(picked) == 1).all():   # a run: views of the memory map
            start = int(counts[:picked[0]].sum())
            data, scales = data[start:start + c.sum()], scales[start:start + c.sum()]
        else:                                              # their tokens, gathered
            take = tokens.positions(tokens.starts(counts)[picked], c)
            data, scales = data[take], scales[take]
        shapes = {name: tuple(s) for name, s in self.manifest["layers"].items()}
        return (tokens.estimates(queries, shapes, c, data, scales),
                tokens.query_rest(queries, list(shapes)) @ norms[picked].astype(np.float64).T)

    def query_rest(self, factors: Factors, queries: Queries, x: np.ndarray) -> np.ndarray:
        """(Q, L) float64 :meth:`Projection.query_rest` of queries sketched as ``x`` (Q, D)
        (:meth:`query_sketches`): the sketch's error on sequence i is at most (eigen) or of
        the order of (random, times ~1/√m) :meth:`noise_scale`, Σ_ℓ rest_ℓ · norms[i, ℓ]."""
        return self.projection(factors).query_rest(queries, torch.from_numpy(x)).numpy()

    def noise_scale(self, rest: np.ndarray, rows: np.ndarray | slice = slice(None)
                    ) -> np.ndarray:
        """(Q, n) the sketch error's scale for queries of :meth:`query_rest` ``rest`` (Q, L) on
        the store's ``rows``."""
        return rest @ self.norms[rows].astype(np.float64).T


def _files(manifest: dict) -> list[tuple[str, int, np.dtype, bool]]:
    """(file, bytes per sequence — per token where ragged —, dtype, ragged) of a store's data
    files, in the chunks' CRC order."""
    f16, f32 = np.dtype(np.float16), np.dtype(np.float32)
    files = [("rows.bin", ROW.itemsize, ROW, False),
             ("sketches.f16", 2 * manifest["dim"], f16, False)]
    if manifest["format"] != FORMAT_1:
        files.append(("norms.f32", 4 * len(manifest["layers"]), f32, False))
    if manifest.get("tokens"):
        L = len(manifest["layers"])
        shapes = {name: tuple(s) for name, s in manifest["layers"].items()}
        files += [("token_counts.i32", 4, np.dtype(np.int32), False),
                  ("token_norms.f32", 4 * L, f32, False),
                  ("tokens.f16", 2 * tokens.width(shapes), f16, True),
                  ("token_scales.f32", 8 * L, f32, True)]
    return files


def _token_bytes(manifest: dict) -> int:
    """Bytes of token factors a token of a store keeps (0: none)."""
    shapes = {name: tuple(s) for name, s in manifest["layers"].items()}
    return tokens.token_bytes(shapes) if manifest.get("tokens") else 0


def row_bytes(dim: int, layers: int) -> int:
    """Bytes a sequence's row takes in a store without token factors: id and hash, the
    float16 sketch of ``dim`` coordinates and a float32 norm per layer."""
    return ROW.itemsize + 2 * dim + 4 * layers


def store_bytes(manifest: dict, corpus: Corpus, ids: np.ndarray) -> int:
    """Bytes the rows ``ids`` add to a store of ``manifest`` on disk: :func:`row_bytes`, and
    where the store keeps token factors every token's (a bound on the scored ones: each
    sequence's last is not) with a count and norms a sequence."""
    L, n = len(manifest["layers"]), len(ids)
    need = n * row_bytes(manifest["dim"], L)
    if manifest.get("tokens"):
        need += (int(np.diff(corpus.offsets)[ids].sum()) * _token_bytes(manifest)
                 + n * 4 * (1 + L))
    return need


def check_disk(path: Path, need: int) -> None:
    """A one-line SketchError when the file system of ``path`` has fewer than ``need`` bytes
    free: before a build starts, not when a chunk's write fails hours into it."""
    free = shutil.disk_usage(path).free
    if need > free:
        raise SketchError(f"the sketches need {need / 2 ** 30:.2f} GiB at {path} but "
                          f"{free / 2 ** 30:.2f} GiB are free; free some space or build in "
                          "another directory")


def _extent(path: Path, manifest: dict, n: int) -> dict:
    """What the first n rows of a store span: {False: n rows, True: their tokens (the ragged
    files' rows), "first": (n + 1,) each row's first token and the end}."""
    counts = np.zeros(0, np.int64)
    if manifest.get("tokens") and n:
        counts = np.fromfile(path / "token_counts.i32", np.int32,
                             count=n) if (path / "token_counts.i32").exists() else counts
        if len(counts) < n:
            raise SketchError(f"{path / 'token_counts.i32'} is truncated; delete the directory "
                              "and rebuild with build_sketches(...)")
    first = tokens.starts(counts)
    return {False: n, True: int(first[-1]), "first": first}


def _read_manifest(path: Path) -> dict:
    try:   # a store of format 1 opens as it is (no norms)
        old = json.loads((path / "sketches.json").read_text()).get("format") == FORMAT_1
    except (OSError, ValueError, AttributeError):
        old = False
    return store.read_manifest(path / "sketches.json", FORMAT_1 if old else FORMAT, SketchError,
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
                          f"({manifest['factors_id']} ≠ {factors.factors_id()}); load those "
                          "factors or rebuild the sketches in a new directory")


def exact_need(shapes: dict[str, tuple[int, int]], corpus: Corpus) -> int:
    """Bytes of the exact token factors of all of ``corpus`` for layers of (out, in+1)
    ``shapes``: every token (a bound on the scored ones) and a count and norms a sequence."""
    return (int(corpus.offsets[-1]) * tokens.token_bytes(shapes)
            + len(corpus) * 4 * (1 + len(shapes)))


def keeps_tokens(shapes: dict[str, tuple[int, int]], corpus: Corpus, args: SketchArgs) -> bool:
    """Whether a new store of ``corpus`` keeps exact token factors: :func:`exact_need` within
    ``args.exact_bytes``."""
    return bool(exact_need(shapes, corpus) <= args.exact_bytes)


def chunk_bounds(corpus: Corpus, ids: np.ndarray, args: SketchArgs, per_token: int
                 ) -> np.ndarray:
    """Where a build's chunks of ``ids`` begin, and the end, (k + 1,): ``args.chunk_size``
    sequences each and, for a store keeping ``per_token`` bytes of token factors a token (0:
    none), no more than :data:`CHUNK_BYTES` of them (a longer sequence alone). Cut from the
    first id on: a resumed or sharded build cuts the chunks one process would."""
    n = len(ids)
    if not per_token:
        return np.r_[np.arange(0, n, args.chunk_size), n]
    need = np.r_[0, np.cumsum(np.diff(corpus.offsets)[ids] * per_token)]
    bounds = [0]
    while bounds[-1] < n:
        s = bounds[-1]
        fits = int(np.searchsorted(need, need[s] + CHUNK_BYTES, "right")) - 1
        bounds.append(min(s + args.chunk_size, max(s + 1, fits)))
    return np.array(bounds)


@checked(distinct=("ids",), nonempty=("ids",))
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
    if args.batch_size and args.chunk_size % args.batch_size:
        raise ValueError(f"chunk_size ({args.chunk_size}) must be a multiple of batch_size "
                         f"({args.batch_size})")
    path = Path(path)
    owner = _owner(model, factors)
    proj = Projection.draw(factors, args)
    with store.lock(path, SketchError):
        if (path / "sketches.json").exists():
            old = Sketches.open(path, model, factors)   # verified: appending to a corrupt store
            if old.manifest["projection"] != args.projection:  # would bury the damage
                raise SketchError(f"{path} holds sketches with projection "
                                  f"{old.manifest['projection']}, not {args.projection}; pass "
                                  "those settings or a new directory")
            old.check_corpus(corpus)
            manifest, done = old.manifest, set(old.ids.tolist())
        else:
            manifest = dict(format=FORMAT, dim=proj.dim, projection=args.projection,
                            layers={n: list(s) for n, s in factors.shapes.items()}, chunks=[],
                            tokens=keeps_tokens(factors.shapes, corpus, args), **owner)
            done = set()
        ids = as_ids(ids, len(corpus))
        todo = np.array([i for i in ids.tolist() if i not in done], dtype=np.int64)
        if len(todo) and manifest["format"] == FORMAT_1:
            raise SketchError(f"{path} is a sketch store of format 1, before per-sequence "
                              "norms: it cannot grow; build the sketches in a new directory")
        check_disk(path, store_bytes(manifest, corpus, todo))
        n = sum(c[0] for c in manifest["chunks"])
        units = _extent(path, manifest, n)
        for name, width, _, ragged in _files(manifest):  # drop an interrupted chunk's rows
            store.truncate(path / name, units[ragged] * width)
        layers = find_layers(model, factors.layer_names)
        bounds = chunk_bounds(corpus, todo, args, _token_bytes(manifest))
        with tqdm(total=len(todo), desc="sketching", unit="seq",
                  disable=not args.progress) as bar:
            for start, end in zip(bounds[:-1], bounds[1:]):
                chunk = todo[start:end]
                consumers = [Sketcher(proj, len(chunk))]
                if manifest.get("tokens"):
                    consumers.append(TokenFactors(factors.shapes, len(chunk)))
                done_pass = corpus_pass(model, layers,
                                        source(corpus, args.batch_size, chunk,
                                               tokens=args.batch_tokens,
                                               sequences=args.batch_sequences),
                                        consumers, task=task, progress=bar)
                rows = np.empty(len(chunk), ROW)
                rows["id"], rows["hash"] = chunk, sequence_hashes(corpus, chunk)
                arrays = [rows, *[x for out in done_pass for x in out]]
                for (name, *_), x in zip(_files(manifest), arrays):
                    store.append(path / name, np.ascontiguousarray(x))   # no copy
                manifest["chunks"].append([len(chunk), *map(store.crc32, arrays)])
                store.write_manifest(path / "sketches.json", manifest)
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
    keeps = keeps_tokens(factors.shapes, corpus, args)
    if exists:
        old = Sketches.open(path, verify=False)
        ids, keeps = ids[~np.isin(ids, old.ids)], old.manifest.get("tokens")
    bounds = chunk_bounds(corpus, ids, args, tokens.token_bytes(factors.shapes) if keeps else 0)
    parts = []
    for r, run in enumerate(np.array_split(np.arange(len(bounds) - 1), world)):
        part = ids[bounds[run[0]]:bounds[run[-1] + 1]] if len(run) else ids[:0]
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
    units = _extent(path, manifest, n)
    extents = [_extent(part.path, part.manifest, len(part)) for part in parts]
    for name, width, _, ragged in _files(manifest):
        store.truncate(path / name, units[ragged] * width)  # an interrupted merge or build
        with open(path / name, "ab") as out:
            for part, extent in zip(parts, extents):
                with open(part.path / name, "rb") as src:
                    left = extent[ragged] * width
                    while left:
                        block = src.read(min(left, _COPY_BLOCK))
                        if not block:
                            raise SketchError(f"{part.path / name} is truncated; rebuild it")
                        out.write(block)
                        left -= len(block)
            out.flush()
            os.fsync(out.fileno())
    manifest["chunks"] = manifest["chunks"] + [c for p in parts for c in p.manifest["chunks"]]
    store.write_manifest(path / "sketches.json", manifest)
