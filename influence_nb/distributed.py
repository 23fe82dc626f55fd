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
- :func:`~influence_nb.sketch.build_sketches`: each rank sketches a contiguous run of chunks into
  its own part store; rank 0 appends the parts to the one store, byte for byte what one process
  writes.

This module holds only the collectives; what is sharded, and how, lives with each computation
(:mod:`~influence_nb.batching` shards batches, :mod:`~influence_nb.passes` chunks).

Under plain ``python`` nothing here does anything (``rank_world() == (0, 1)``).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


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
