"""A FAISS inner-product index over a sketch store, exact while small, approximate when large.

Kinds (``IndexArgs.kind``; "auto" picks by N):

- ``"flat"``   exact inner products, 4·D bytes per sequence; auto for N ≤ ``flat_max``
- ``"hnsw"``   HNSW graph (``hnsw_m`` links, ``ef_search``) over 8-bit scalar-quantised
               vectors, D + 8·``hnsw_m`` bytes per sequence in memory; auto up to ``hnsw_max``
- ``"ivfpq"``  IVF (nlist ≈ √N coarse cells, ``nprobe`` searched) with product quantisation
               (``pq_m`` bytes per sequence); auto above ``hnsw_max``, where memory rules
- ``"ivfsq8"`` IVF with 8-bit scalar quantisation (D bytes per sequence)

Why HNSW before IVF: sketches are random projections, nearly isotropic apart from their
heavy-tailed norms, so IVF's coarse cells do not follow the inner-product neighbourhoods —
on a million sketches of the demo's dimension IVF-PQ found ~10 % of the Flat top-10 at
nprobe 16–64, HNSW 96 % at ef_search 2,048 in 24 ms per query (benchmarks/index_scale.py).

Approximate kinds return ``refine · k`` candidates which are re-ranked exactly against the
float16 sketches on disk (memory map), so quantisation costs little recall.

Shards: with ``shard_size`` the rows are split into shards of that many rows, each its own
FAISS file built with one shared training (bounded memory); a search merges the shards' top-k.
On disk: ``shard_NNN.faiss`` and ``index.json`` (kind, parameters, shard row ranges, the size
and CRC-32 of each file and the fingerprint of the sketches it covers — which ties it to the
model and the factors).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

from . import store
from .checks import check_args, checked, shown
from .progress import tqdm
from .sketch import Sketches

KINDS = ("flat", "ivfpq", "ivfsq8", "hnsw")
FORMAT = "influence_nb.index/1"
_ADD_BLOCK = 65536  # rows converted to float32 and added at a time


class IndexFileError(ValueError):
    """An index file that is missing, corrupt, truncated or built over other sketches."""


@dataclass
class IndexArgs:
    """How to index sketches.

    kind:       "auto", "flat", "hnsw", "ivfpq" or "ivfsq8" (see the module docstring)
    flat_max:   "auto" stays exact (flat) up to this many sequences, then uses "hnsw"
    hnsw_max:   "auto" uses "hnsw" up to this many sequences, then "ivfpq" (memory)
    nlist:      IVF cells; None: √N rounded to a power of two (≥ 16)
    pq_m:       PQ sub-quantisers (bytes per sequence); None: the largest divisor of D
                up to D / 16; must divide D
    hnsw_m:     HNSW links per node
    train_size: rows sampled to train IVF / PQ
    shard_size: rows per shard; None: one shard
    nprobe:     IVF cells searched (set later with :meth:`SketchIndex.set_params`)
    ef_search:  HNSW search breadth (recall vs latency: at 1M sketches 1,024 → 0.91 in 15 ms,
                2,048 → 0.96 in 24 ms, 4,096 → 0.98 in 40 ms of the Flat top-10, 2 threads)
    refine:     approximate kinds fetch refine · k candidates and re-rank them exactly
    seed:       seed of the training sample and k-means
    progress:   show a progress bar
    """
    kind: str = "auto"
    flat_max: int = 200_000
    hnsw_max: int = 5_000_000
    nlist: int | None = None
    pq_m: int | None = None
    hnsw_m: int = 32
    train_size: int = 65_536
    shard_size: int | None = None
    nprobe: int = 32
    ef_search: int = 2048
    refine: int = 4
    seed: int = 0
    progress: bool = True

    MINIMUM: ClassVar[dict[str, float]] = {
        "flat_max": 0, "hnsw_max": 0, "nlist": 1, "pq_m": 1, "hnsw_m": 2, "train_size": 1,
        "shard_size": 1, "nprobe": 1, "ef_search": 1, "refine": 1}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "kind": ("auto", "flat", "hnsw", "ivfpq", "ivfsq8")}

    def __post_init__(self) -> None:
        check_args(self)

    def resolve(self, n: int, dim: int) -> tuple[str, str]:
        """-> (kind, FAISS factory string) for n sequences of dimension dim."""
        kind = self.kind if self.kind != "auto" else (
            "flat" if n <= self.flat_max else "hnsw" if n <= self.hnsw_max else "ivfpq")
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; use 'auto' or one of {KINDS}")
        nlist = self.nlist or max(16, 2 ** round(np.log2(np.sqrt(max(n, 1)))))
        pq_m = self.pq_m or max(d for d in range(1, max(1, dim // 16) + 1) if dim % d == 0)
        if kind == "ivfpq" and dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the sketch dimension {dim}")
        # k-means needs at least one training row per centroid (PQ: 256 per sub-quantizer)
        need = {"ivfpq": max(nlist, 256), "ivfsq8": nlist}.get(kind, 1)
        if min(n, self.train_size) < need:
            raise ValueError(f"an index of kind {kind!r} (nlist={nlist}) needs at least {need} "
                             f"training rows, but there are {min(n, self.train_size)}; use "
                             "kind='flat' or 'hnsw', a smaller nlist, or sketch more sequences")
        return kind, {"flat": "Flat", "ivfpq": f"IVF{nlist},PQ{pq_m}",
                      "ivfsq8": f"IVF{nlist},SQ8", "hnsw": f"HNSW{self.hnsw_m},SQ8"}[kind]


def _rows(data: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 copy of sketch rows (fancy indexing in sorted order: sequential reads)."""
    order = np.argsort(rows)
    out = np.empty((len(rows), data.shape[1]), np.float32)
    out[order] = data[rows[order]]
    return out


class SketchIndex:
    """Inner-product search over a :class:`~influence_nb.sketch.Sketches` store.

    ``search(x, k)`` returns the k largest ⟨x, sketch⟩ per query as (scores, corpus ids); use
    ``-x`` for the most negative ones.
    """

    def __init__(self, sketches: Sketches, shards: list[faiss.Index], manifest: dict):
        self.sketches, self.shards, self.manifest = sketches, shards, manifest
        self.set_params(manifest["args"]["nprobe"], manifest["args"]["ef_search"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def __repr__(self) -> str:
        return (f"SketchIndex({self.manifest['factory']}, {self.manifest['n']} sequences, "
                f"{len(self.shards)} shard(s))")

    def set_params(self, nprobe: int | None = None, ef_search: int | None = None,
                   refine: int | None = None) -> None:
        """Search breadth: IVF cells probed, HNSW ef, and the exact re-ranking factor."""
        args = self.manifest["args"]
        for index in self.shards:
            if nprobe is not None and self.kind.startswith("ivf"):
                faiss.extract_index_ivf(index).nprobe = nprobe
            if ef_search is not None and self.kind == "hnsw":
                index.hnsw.efSearch = ef_search
        args |= {k: v for k, v in dict(nprobe=nprobe, ef_search=ef_search, refine=refine).items()
                 if v is not None}

    @classmethod
    def build(cls, sketches: Sketches, path: str | os.PathLike,
              args: IndexArgs | None = None) -> "SketchIndex":
        """Train (if the kind needs it), fill and save an index over all rows of ``sketches``."""
        args, path = args or IndexArgs(), Path(path)
        n, dim = len(sketches), sketches.dim
        if n == 0:
            raise ValueError(f"{sketches.path} holds no sketches; build them first")
        kind, factory = args.resolve(n, dim)
        empty = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if not empty.is_trained:
            rng = np.random.default_rng(args.seed)
            sample = np.sort(rng.choice(n, min(n, args.train_size), replace=False))
            if kind.startswith("ivf"):
                faiss.extract_index_ivf(empty).cp.seed = args.seed
            empty.train(_rows(sketches.data, sample))
        with store.lock(path, IndexFileError):
            size = args.shard_size or n
            shards, files = [], []
            with tqdm(total=n, desc="indexing", unit="seq", disable=not args.progress) as bar:
                for k, start in enumerate(range(0, n, size)):
                    stop = min(n, start + size)
                    index = faiss.clone_index(empty)
                    for s in range(start, stop, _ADD_BLOCK):
                        block = sketches.data[s:min(stop, s + _ADD_BLOCK)]
                        index.add(np.asarray(block, np.float32))
                        bar.update(len(block))
                    blob = faiss.serialize_index(index).tobytes()
                    name = f"shard_{k:03d}.faiss"
                    store.atomic_write(path / name, blob)
                    shards.append(index)
                    files.append(dict(file=name, start=start, stop=stop, bytes=len(blob),
                                      crc32=store.crc32(blob)))
            manifest = dict(format=FORMAT, kind=kind, factory=factory, n=n, dim=dim,
                            sketches=sketches.fingerprint, shards=files, args=asdict(args))
            store.write_manifest(path / "index.json", manifest)
        return cls(sketches, shards, manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, sketches: Sketches) -> "SketchIndex":
        """Read an index saved by :meth:`build`; refuse one built over other sketches."""
        path = Path(path)
        manifest = store.read_manifest(path / "index.json", FORMAT, IndexFileError,
                                       "rebuild with SketchIndex.build(sketches, path)",
                                       keys=("kind", "factory", "n", "dim", "sketches", "shards",
                                             "args"))
        if manifest["sketches"] != sketches.fingerprint:
            raise IndexFileError(f"the index in {path} was built over other sketches (another model, "
                              f"factors, projection or rows: {manifest['sketches']} ≠ "
                              f"{sketches.fingerprint}); rebuild with SketchIndex.build(...)")
        shards = []
        for s in manifest["shards"]:
            file = store.member(path, s["file"], IndexFileError,
                                "rebuild with SketchIndex.build(sketches, path)")
            blob = file.read_bytes() if file.exists() else b""
            if len(blob) != s["bytes"] or store.crc32(blob) != s["crc32"]:
                what = "truncated" if len(blob) < s["bytes"] else "corrupt"
                raise IndexFileError(f"{path / s['file']} is {what} ({len(blob)} of {s['bytes']} "
                                  "bytes, or a CRC-32 mismatch); rebuild with "
                                  "SketchIndex.build(sketches, path)")
            shards.append(faiss.deserialize_index(np.frombuffer(blob, np.uint8)))
        return cls(sketches, shards, manifest)

    def _queries(self, x: Any) -> np.ndarray:
        """x as float32 (Q, D) query sketches, or a one-line error (FAISS would assert)."""
        want = f"must be finite query sketches, shape (Q, {self.sketches.dim})"
        try:
            arr = np.ascontiguousarray(x, np.float32)
        except (TypeError, ValueError):
            raise TypeError(f"SketchIndex.search(x={shown(x)}): {want}") from None
        if arr.ndim != 2 or arr.shape[1] != self.sketches.dim or not np.isfinite(arr).all():
            raise ValueError(f"SketchIndex.search(x has shape {arr.shape}): {want}")
        return arr

    @checked(minimum={"k": 0})
    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner products: x (Q, D) -> (scores (Q, k), corpus ids (Q, k)), best first.

        k beyond the number of sketches is that number (each sequence found once, never a
        (Q, k) array larger than the store); k = 0 finds nothing. Fewer than k found (an
        approximate index's probes missed some): the rest is padded with score -inf and id -1.
        """
        x = self._queries(x)
        k = min(int(k), len(self.sketches))          # FAISS takes a Python int only
        if k == 0:   # FAISS asserts k > 0
            return np.empty((len(x), 0), np.float32), np.empty((len(x), 0), np.int64)
        exact = self.kind == "flat"
        fetch = k if exact else k * self.manifest["args"]["refine"]
        scores, rows = [], []
        for index, s in zip(self.shards, self.manifest["shards"]):
            D, I = index.search(x, min(fetch, s["stop"] - s["start"]))
            scores.append(D)
            rows.append(np.where(I >= 0, I + s["start"], -1))
        D, I = np.concatenate(scores, 1), np.concatenate(rows, 1)
        if not exact:  # exact inner products with the float16 sketches of the candidates
            valid = I >= 0
            D = np.full(I.shape, -np.inf, np.float32)
            for q in range(len(x)):
                D[q, valid[q]] = _rows(self.sketches.data, I[q, valid[q]]) @ x[q]
        order = np.argsort(-D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)
        ids = np.where(I >= 0, self.sketches.ids[np.maximum(I, 0)], -1)
        pad = k - D.shape[1]
        if pad > 0:
            D = np.pad(D, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return D, ids
