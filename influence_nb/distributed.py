"""Several processes: torch.distributed, launched by ``torchrun`` (gloo on CPU, NCCL on GPU).

    torchrun --nproc_per_node 8 -m influence_nb.cli fit --model DIR --corpus FILE --out F

The only state is torch.distributed's own default process group: when it is initialised with
more than one process, the engine shards its work over the ranks by itself, and every rank ends
with the same result as one process would have:

- :func:`~influence_nb.curvature.fit_factors`: global batch k runs on rank k mod W; the sums of
  ā āᵀ, δ δᵀ and the EK-FAC Λ, and the sequence and token counts, are all-reduced; rank 0's
  eigenbases are broadcast. Fisher labels are drawn from a generator seeded with (seed, k), so a
  batch draws the same labels whichever rank runs it: W processes fit what one process fits.
- :func:`~influence_nb.scoring.scan`: chunk c runs on rank c mod W; with ``out_dir`` every rank
  writes its chunk files into the shared directory, then reads the others' (a restarted job,
  with any number of ranks, skips every completed chunk); without it the scores are all-reduced.
- :func:`build_sketches_sharded`: each rank sketches a contiguous run of chunks into its own part
  store; rank 0 appends the parts to the one store, byte for byte what one process writes.

Under plain ``python`` nothing here does anything (``rank_world() == (0, 1)``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # imported where used: curvature and scoring import this module
    from .curvature import Factors
    from .data import Corpus
    from .sketch import SketchArgs, Sketches
    from .task import Task

_COPY_BLOCK = 1 << 24  # bytes copied at a time when merging sketch parts


def init(backend: str | None = None, timeout_s: float = 4 * 3600) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE, RANK,
    MASTER_ADDR, ...) -> whether this call created it (then :func:`finish` it). ``backend``:
    "nccl" when CUDA is available, else "gloo". ``timeout_s`` bounds how long a rank waits for
    the others at a merge point (a rank done with its shard waits for the slowest). A no-op
    without torchrun or when the group exists already."""
    if (dist.is_available() and dist.is_initialized()) or \
            int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def finish() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(op, tensors: Sequence[Tensor]) -> None:
    """Apply ``op(tensor)`` in place to each tensor, through the backend's device if need be."""
    device = _comm_device()
    for t in tensors:
        if t.device == device and t.is_contiguous():
            op(t)
        else:
            buf = t.to(device).contiguous()
            op(buf)
            t.copy_(buf)


def all_reduce_(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over the ranks, in place (no-op in one process)."""
    if rank_world()[1] > 1:
        _collective(lambda t: dist.all_reduce(t, dist.ReduceOp.SUM), tensors)


def broadcast_(tensors: Sequence[Tensor], src: int = 0) -> None:
    """Overwrite each tensor with rank ``src``'s, in place (no-op in one process)."""
    if rank_world()[1] > 1:
        _collective(lambda t: dist.broadcast(t, src), tensors)


def sum_counts(*counts: int) -> tuple[int, ...]:
    """Integer counts summed over the ranks."""
    t = torch.tensor(counts, dtype=torch.int64)
    all_reduce_([t])
    return tuple(int(x) for x in t.tolist())


def check_same(value: str, what: str) -> None:
    """Raise on every rank unless all ranks hold the same ``value``, a description of ``what``."""
    if rank_world()[1] == 1:
        return
    values: list = [None] * rank_world()[1]
    dist.all_gather_object(values, hashlib.sha256(value.encode()).hexdigest()[:12])
    if len(set(values)) > 1:
        raise ValueError(f"the ranks disagree on {what} ({', '.join(map(str, values))}); every "
                         "rank must be given the same inputs")


# -- sketches --------------------------------------------------------------------------------------

def build_sketches_sharded(model: nn.Module, factors: Factors, corpus: Corpus,
                           path: str | os.PathLike, args: SketchArgs | None = None,
                           ids: Sequence[int] | None = None, task: Task | None = None
                           ) -> Sketches:
    """:func:`~influence_nb.sketch.build_sketches` over the ranks; -> the one store at ``path``.

    The sequences still to sketch are cut into chunks of ``args.chunk_size``; rank r sketches the
    r-th contiguous run of chunks into its own part store ``<path>.parts/…`` (resumable like any
    store), then rank 0 appends the parts, in order, to ``path`` with :func:`merge_sketches`.
    The chunks are the ones a single process would write, so the store is the same, byte for byte.
    """
    from .sketch import SketchArgs, Sketches, build_sketches
    rank, world = rank_world()
    if world == 1:
        return build_sketches(model, factors, corpus, path, args, ids, task)
    args, path = args or SketchArgs(), Path(path)
    exists = (path / "sketches.json").exists()
    if rank == 0 and exists:  # check model, factors, projection and corpus; drop a torn chunk
        build_sketches(model, factors, corpus, path, replace(args, progress=False),
                       np.zeros(0, np.int64), task)
    barrier()
    ids = np.arange(len(corpus)) if ids is None else np.asarray(ids, np.int64)
    if exists:
        ids = ids[~np.isin(ids, Sketches.open(path, verify=False).ids)]
    n_chunks = -(-len(ids) // args.chunk_size)
    parts = []
    for r, chunks in enumerate(np.array_split(np.arange(n_chunks), world)):
        part = ids[chunks[0] * args.chunk_size:(chunks[-1] + 1) * args.chunk_size] \
            if len(chunks) else ids[:0]
        key = hashlib.sha256(part.tobytes()).hexdigest()[:12]
        parts.append((path.with_name(path.name + ".parts") / f"{r:05d}-{key}", part))
    part_path, part = parts[rank]
    if len(part):
        build_sketches(model, factors, corpus, part_path, args, part, task)
    barrier()
    if rank == 0:
        merge_sketches(path, [Sketches.open(p) for p, part in parts if len(part)])
        shutil.rmtree(path.with_name(path.name + ".parts"), ignore_errors=True)
    barrier()
    return Sketches.open(path, verify=False)


def merge_sketches(path: str | os.PathLike, parts: Sequence[Sketches]) -> Sketches:
    """Append the rows of the sketch stores ``parts`` (same model, factors and projection) to the
    store at ``path``, created when absent. Each part's chunks are copied as they are, with their
    CRC-32s; the manifest is written last, so an interrupted merge leaves ``path`` as it was."""
    from .scoring import _atomic_write
    from .sketch import ROW, SketchError, Sketches
    path = Path(path)
    if not parts:
        return Sketches.open(path, verify=False)
    path.mkdir(parents=True, exist_ok=True)
    manifest = (json.loads((path / "sketches.json").read_text())
                if (path / "sketches.json").exists() else dict(parts[0].manifest, chunks=[]))
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
        with open(path / name, "ab") as out:
            out.truncate(n * width)  # drop the rows of an interrupted merge or build
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
    _atomic_write(path / "sketches.json", json.dumps(manifest, indent=1).encode())
    return Sketches.open(path)
