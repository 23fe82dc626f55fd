"""On-disk artifacts: atomic writes, appends that survive a kill, manifests, checksummed chunks.

Every artifact influence_nb writes (factors, scans, sketches, index, results) goes through
here, so that one set of rules holds for all of them:

- a file is written to a temporary name in its directory, fsynced, then renamed into place:
  a reader sees the old file or the new one, never a part (:func:`atomic_write`);
- append-only data files grow by fsynced appends and are cut back to the length their
  manifest commits to before the next append (:func:`append`, :func:`truncate`): the manifest,
  rewritten atomically last, is what makes rows exist;
- a manifest is JSON with a ``format`` field and a ``seal``: the SHA-256 of its own canonical
  JSON, which records the digest of each data file it names, so one hash covers the manifest
  and its data (:func:`write_manifest`); a missing, unreadable, foreign, edited or unsealed one
  is a one-line error of the artifact's own exception class naming the fix
  (:func:`read_manifest`);
- a chunk store (:class:`ChunkStore`) keeps one ``.npz`` per chunk of a long computation
  under a manifest of what is computed, each with its CRC-32 and its store's run id inside, so
  a restarted job skips finished chunks, a changed job is refused, and so is a chunk of
  another run (copied from another folder, or left behind by a deleted manifest);
- a store that several files make up is written under :func:`lock`, so two writers never
  interleave; the lock is the kernel's (``flock``), released when its holder dies, so a
  killed writer never leaves a stale lock behind;
- a file name read from a manifest must name a file inside the manifest's folder
  (:func:`member`), so a forged manifest cannot make a reader open another path.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import socket
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """Where fitted factors and built worlds are cached: ``$INFLUENCE_NB_CACHE`` or
    ``~/.cache/influence_nb``."""
    return Path(os.environ.get("INFLUENCE_NB_CACHE", Path.home() / ".cache" / "influence_nb"))


def temporary(path: str | os.PathLike) -> Path:
    """Where a file or folder is written before its rename to ``path``: beside it, hidden,
    naming this host and process (see :func:`remove_stale_temporaries`)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``: temporary name (:func:`temporary`), fsync, rename (a reader
    never sees a part)."""
    path = Path(path)
    tmp = temporary(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
    publish(tmp, path)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync the written file ``tmp``, then rename it to ``path`` (a reader never sees a part)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 16 MiB pieces into one buffer (no copy of a large file
    in memory)."""
    h, buf = hashlib.sha256(), bytearray(16 << 20)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32"}


def read_safetensors(path: str | os.PathLike, sha256: str) -> dict | None:
    """The tensors of the safetensors file ``path`` ({name: CPU tensor}), each read from the
    file straight into its own tensor while the whole file is hashed: the file's bytes are
    never in memory beside the tensors (``safetensors.torch.load(path.read_bytes())`` holds
    both: 2 × the file at its peak). None when the file's SHA-256 is not ``sha256``, or the
    file is missing, short or not safetensors.

    Not ``safetensors.safe_open``: it maps the file, so the pages it reads count in the process
    beside the tensors until it closes, and a tensor read at the file's alignment rounded float64
    products differently (1e-16) from the same values freshly allocated."""
    import torch   # here: the other artifacts need no torch
    h = hashlib.sha256()

    def read(fh, n: int) -> bytes:
        data = fh.read(n)
        h.update(data)
        if len(data) != n:
            raise EOFError
        return data

    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(read(fh, 8), "little")
            if n > os.fstat(fh.fileno()).st_size - 8:      # not a header this file can hold
                return None
            header = json.loads(read(fh, n))
            header.pop("__metadata__", None)
            out, at, size = {}, 0, os.fstat(fh.fileno()).st_size - 8 - n
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
                # checked before allocating: a forged header names no tensor the file lacks
                if not at <= begin <= end <= size or \
                        math.prod(info["shape"]) * dtype.itemsize != end - begin:
                    return None
                read(fh, begin - at)                         # a gap, if any: hashed too
                t = torch.empty(info["shape"], dtype=dtype)
                buf = t.reshape(-1).view(torch.uint8).numpy()
                if fh.readinto(buf) != buf.nbytes:
                    return None
                h.update(buf)
                out[name], at = t, end
            while chunk := fh.read(1 << 20):                 # nothing should follow
                h.update(chunk)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None
    return out if h.hexdigest() == sha256 else None


def remove_stale_temporaries(directory: Path) -> None:
    """Remove what :func:`atomic_write`s killed before their rename left in ``directory``: the
    temporaries of this host whose process is gone (another host's, or a live writer's, stay —
    their writer may still rename them)."""
    host = socket.gethostname()
    for tmp in directory.glob(f".*.{host}.*.tmp"):
        pid = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            if tmp.is_dir():   # a folder written aside (the demo world's build)
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process
        return True
    return True


def write_json(path: str | os.PathLike, obj: object) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=1).encode())


@contextlib.contextmanager
def lock(directory: str | os.PathLike, error: type[Exception], wait: bool = False,
         name: str = ".lock") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created when absent) while writing it.

    A second writer waits with ``wait``; without, it gets a one-line ``error`` naming the
    process that holds the lock. The lock file ``name`` stays behind, but its lock dies with
    its holder: a killed writer's folder is free at once. A lock of another ``name`` guards
    another step (computing what a writer will then save under ``.lock``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / name, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise error(f"{directory} is being written by {holder}; wait for it to finish or "
                        "write to another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"process {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def member(directory: str | os.PathLike, name: object, error: type[Exception], fix: str
           ) -> Path:
    """``directory / name`` for a plain file name read from a manifest; anything else (a path,
    "..", not a string) is a one-line ``error`` ending with ``fix``."""
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name:
        raise error(f"the manifest in {directory} names {name!r}, not a file in that folder; "
                    f"{fix}")
    return Path(directory) / name


def append(path: str | os.PathLike, data: bytes | np.ndarray) -> None:
    """Append ``data`` (bytes, or a C-contiguous array's memory, uncopied) to ``path`` and
    fsync (rows a manifest will commit to afterwards)."""
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def truncate(path: str | os.PathLike, size: int) -> None:
    """Cut ``path`` (created when absent) to ``size`` bytes: drops an interrupted append."""
    with open(path, "ab") as fh:
        fh.truncate(size)


def crc32(data: bytes | np.ndarray) -> int:
    """CRC-32 of bytes or of an array's memory (made contiguous)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
    return zlib.crc32(data)


def seal_of(manifest: dict) -> str:
    """SHA-256 (hex) of a manifest's compact JSON, ``seal`` left out: it covers every field and
    the order of every list and mapping (a mapping of layers is in module order), and through
    the digests the manifest records, its data files."""
    body = {k: v for k, v in manifest.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def write_manifest(path: str | os.PathLike, manifest: dict) -> None:
    """:func:`write_json` of ``manifest`` with its ``seal`` (:func:`seal_of`, over the
    manifest as it reads back from JSON)."""
    manifest = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "seal"}))
    write_json(path, manifest | {"seal": seal_of(manifest)})


def read_manifest(file: str | os.PathLike, fmt: str, error: type[Exception], fix: str,
                  keys: tuple[str, ...] = ()) -> dict:
    """The JSON manifest ``file`` of format ``fmt`` with at least ``keys``, its seal checked
    and dropped; missing, corrupt, foreign, unsealed (older than sealing), edited or
    incomplete -> one-line ``error`` that ends with ``fix`` (how to rebuild)."""
    file = Path(file)
    if not file.exists():
        raise error(f"{file} is missing; {fix}")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{file} is corrupt or not a manifest of format {fmt!r}; {fix}")
    if "seal" not in manifest:
        raise error(f"{file} predates sealed manifests (written by an older influence_nb, "
                    f"nothing vouches for it); {fix}")
    if manifest.pop("seal") != seal_of(manifest):
        raise error(f"{file} fails its seal (edited or damaged since it was written); {fix}")
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise error(f"{file} lacks {', '.join(missing)}; {fix}")
    return manifest


class ChunkStore:
    """Chunk files ``chunk_{start}.npz`` (ids, arrays, CRC-32, run id) under ``manifest.json``,
    the description of what is computed and the store's run id (drawn once, when the manifest
    is written); a store whose description differs is another computation and is refused, and
    so is a chunk whose run id is not the manifest's (from another folder, or from before the
    manifest was deleted and written anew).

    ``read(start, ids)`` -> the chunk's arrays, or None when the chunk is not done yet.
    """

    FORMAT = "influence_nb.chunks/1"

    def __init__(self, root: str | os.PathLike, description: dict, what: str = "scan"):
        self.root, self.what = Path(root), what
        self.root.mkdir(parents=True, exist_ok=True)
        self.description = json.loads(json.dumps(description))  # as it reads back from JSON
        path = self.root / "manifest.json"
        with lock(self.root, ValueError, wait=True, name=".manifest.lock"):
            remove_stale_temporaries(self.root)   # a chunk write killed before its rename
            if not path.exists():   # ranks of one job open one store: one of them writes it
                self._create(path)
        m = read_manifest(path, self.FORMAT, ValueError,
                          f"delete {self.root} and run the {what} again", ("description", "run"))
        if m["description"] != self.description:
            diff = [k for k in self.description if m["description"].get(k) != self.description[k]]
            raise ValueError(f"{self.root} holds a {what} of other {', '.join(diff)}; resume "
                             "with the same inputs or use a new out_dir")
        self.run = m["run"]

    def _create(self, path: Path) -> None:
        """Write the manifest with a new run id, unless chunks of an unknown run are there."""
        orphans = sorted(self.root.glob("chunk_*.npz"))
        if orphans:
            raise ValueError(f"{self.root} holds {len(orphans)} chunks but no manifest.json (it "
                             f"was deleted): they belong to no known run; delete them, or the "
                             f"folder, and run the {self.what} again")
        write_manifest(path, dict(format=self.FORMAT, description=self.description,
                                  run=uuid.uuid4().hex))

    def _file(self, start: int) -> Path:
        return self.root / f"chunk_{start:010d}.npz"

    def read(self, start: int, ids: np.ndarray,
             shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray] | None:
        """The chunk's arrays (CRC-checked, of this run, for exactly ``ids``, and of ``shapes``
        when given), or None when it is not written yet; anything else is a one-line
        ValueError."""
        path = self._file(start)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is unreadable ({type(e).__name__}); delete it and resume "
                             f"the {self.what}") from None
        if "crc32" not in arrays or "ids" not in arrays:
            raise ValueError(f"{path} was not written by this store (no CRC-32 or ids); delete it "
                             f"and resume the {self.what}")
        if int(arrays.pop("crc32")) != _crc_of(arrays):
            raise ValueError(f"{path} is corrupt (fails its CRC-32); delete it and resume the "
                             f"{self.what}")
        if str(arrays.pop("run", "")) != self.run:
            raise ValueError(f"{path} is a chunk from another run than {self.root}'s manifest "
                             f"(copied from another folder?): delete it and resume the "
                             f"{self.what}")
        if not np.array_equal(arrays.pop("ids"), ids):
            raise ValueError(f"{path} holds other sequences than this {self.what}; use a new "
                             "out_dir")
        for name, shape in (shapes or {}).items():
            if name not in arrays or arrays[name].shape != tuple(shape):
                raise ValueError(f"{path} holds no {name} of shape {tuple(shape)}; delete it "
                                 f"and resume the {self.what}")
        return arrays

    def write(self, start: int, ids: np.ndarray, **arrays: np.ndarray) -> None:
        arrays = dict(arrays, ids=np.asarray(ids), run=np.array(self.run))
        buf = io.BytesIO()
        np.savez(buf, crc32=np.int64(_crc_of(arrays)), **arrays)
        atomic_write(self._file(start), buf.getvalue())


def _crc_of(arrays: dict[str, np.ndarray]) -> int:
    """One CRC-32 over the named arrays' memory, in name order."""
    crc = 0
    for k in sorted(arrays):
        crc = zlib.crc32(np.ascontiguousarray(arrays[k]), crc)
    return crc
