"""Tensors kept in a file instead of the process's memory, mapped back one region at a time.

Many queries' rank-r factors outgrow a machine long before the model does (GPT-2 small's MLP
layers: 4 MB per query in float32, 0.8 GB for 200), yet the scorer needs one layer's at a
time. A :class:`Spill` holds them in a temporary file on disk (unlinked at once: it disappears
with the process), mapped shared and read-write, so each tensor is a view of the file:
reading one faults its pages in, and :meth:`Spill.release` drops them from the process again
(``madvise(MADV_DONTNEED)``). What was written stays in the file and in the OS page cache while
memory allows — reclaimable memory, not the process's: a later read costs a page-cache copy
(≈ 0.1 ms per MB), or a disk read once the OS has evicted it.
"""
from __future__ import annotations

import math
import mmap
import os
import tempfile
from collections.abc import Sequence

import torch
from torch import Tensor

# query factors beyond this many bytes go to a Spill (queries.py). Small, so that a scan's
# memory stays flat in the number of queries: at 256 MiB, 50 queries of GPT-2-small-width MLPs
# at 1,024 tokens stayed in memory and peaked 10 % above 8 and 200 (2.30 against 2.12 and
# 2.08 GB); at 64 MiB 8 / 50 / 200 queries peak within 5 % (2.13 / 2.04 / 2.11 GB), at the
# same speed (docs/results.md)
SPILL_BYTES = 64 << 20


class Spill:
    """A file-backed arena of tensors of the given (shape, dtype), each starting on a page.

    ``tensors`` -> the views, zero-filled until written; ``release(t)`` drops a view's pages
    (whole pages inside it) from the process's resident memory; its values stay in the file.
    ``directory``: where the unlinked file lives (default: the system's temporary folder)."""

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
                 directory: str | os.PathLike | None = None):
        page, offsets, end = mmap.PAGESIZE, [], 0
        for shape, dtype in specs:
            offsets.append(end)
            end += -(-math.prod(shape) * dtype.itemsize // page) * page
        with tempfile.TemporaryFile(dir=directory) as f:   # unlinked: gone with the mapping
            f.truncate(max(end, page))
            self.map = mmap.mmap(f.fileno(), max(end, page))
        self.base = torch.frombuffer(self.map, dtype=torch.uint8).data_ptr()
        self.tensors = [torch.frombuffer(self.map, dtype=dtype, count=math.prod(shape),
                                         offset=o).view(shape)
                        for (shape, dtype), o in zip(specs, offsets)]

    def __len__(self) -> int:
        """Bytes in the file."""
        return len(self.map)

    def release(self, t: Tensor) -> None:
        """Drop the whole pages of view ``t`` (contiguous, of this spill) from the process."""
        page = mmap.PAGESIZE
        start = t.data_ptr() - self.base
        stop = start + t.numel() * t.element_size()
        start = -(-start // page) * page
        stop = stop // page * page
        if 0 <= start < stop <= len(self.map):
            self.map.madvise(mmap.MADV_DONTNEED, start, stop - start)
