"""The on-disk FeatureStore: per-checkpoint training features, written once, resumable, shared.

Layout of a store directory::

    meta.json            format version, layout (n, width, checkpoints, dtype, chunk_size) and
                         the caller's settings (model / checkpoint / data fingerprints, weights,
                         projection, ...). Written once, when the store is created.
    features-000.npy     [n, width] float16, float32 or float64, one per checkpoint (``.npy`` format, so
                         ``numpy.load(path, mmap_mode="r")`` maps it).
    norms-000.npy        [n] float32 (float64 for float64 stores) Euclidean norms of the stored rows (for cosine variants).
    done/rank-00000.json chunks completed by rank 0 (one file per writing process).
    done/all.json        completions merged by :meth:`FeatureStore.finalize`.

Rows are split into fixed chunks of ``chunk_size`` rows; a chunk is the unit of work, of
resumption and of distribution over processes.

**Crash safety.** :meth:`FeatureStore.write` puts rows into the files with ``pwrite``;
:meth:`FeatureStore.mark_done` first ``fsync``s the features and norms files, then records the
chunk by writing the rank's completion file to a temporary name, ``fsync``-ing it and renaming
it over the old one (``os.replace`` is atomic), then ``fsync``-ing the directory. A process
killed at any instant (SIGKILL included) therefore leaves every chunk either recorded with all
its rows on disk, or unrecorded — and unrecorded chunks are recomputed on resume, whatever
half-written rows they hold. ``durable=False`` skips the ``fsync`` calls: still safe against
a killed process (its written pages live in the kernel's page cache), not against power loss.

**Several processes** (ranks under ``torchrun``) share one store:

- *Creation* is race-free without coordination: every process builds a complete store in a
  private temporary sibling directory and renames it to ``path``; renaming a directory is
  atomic and fails when ``path`` already holds a store, so exactly one creator wins and the
  others delete their copy and open the winner's (checking its settings like any reopen).
- *Writing*: :meth:`FeatureStore.pending` hands out unfinished chunks round-robin
  (``chunk % world_size == rank``), so ranks write disjoint rows of the same files.
- *Recording*: each rank records completions only in its own ``done/rank-RRRRR.json`` — no
  read-modify-write of a shared file. Readers take the union of all completion files.
- *Finishing*: after all ranks are done (e.g. after ``torch.distributed.barrier()``),
  :meth:`FeatureStore.finalize` (safe from one or every rank) merges the completion files
  into ``done/all.json`` and removes the per-rank files, so a store written by several
  processes is byte-identical to one written by one.
- ``overwrite=True`` deletes the old store, which cannot be coordinated between ranks: pass
  it on rank 0 only, then barrier, then open on the other ranks with ``overwrite=False``.
- Every concurrently writing process must have a distinct ``rank``. Two processes sharing a
  rank can only lose completion records (so chunks are recomputed), never corrupt rows.

Memory: nothing held grows with ``n`` beyond the completion sets (ranges of chunk indices);
reads and writes go through buffers of the requested rows only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from traintrace.exceptions import (
    ConfigurationError,
    NonFiniteGradientError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
)

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
]

FORMAT_VERSION = 1
_FORMAT = "traintrace.FeatureStore"
_META = "meta.json"
_DONE = "done"
_ALL = "all.json"
_DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
#: Dtype of reads and norms per stored dtype: float64 stays float64, the rest read as float32.
_READ_DTYPES = {"float16": "float32", "float32": "float32", "float64": "float64"}
#: Default chunk: about this many bytes of stored rows (at least one row, at most ``n``).
DEFAULT_CHUNK_BYTES = 32 * 2**20
_MISSING = "<missing>"


def _dtype_name(dtype: Any) -> str:
    for name, np_dtype in _DTYPES.items():
        if dtype in (name, np_dtype, _TORCH_DTYPES[name]) or (
            isinstance(dtype, np.dtype) and dtype == np.dtype(np_dtype)
        ):
            return name
    raise ConfigurationError(f"dtype must be 'float16', 'float32' or 'float64', got {dtype!r}")


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as JSON would give it back (tuples become lists, keys strings)."""
    if not isinstance(settings, Mapping):
        raise ConfigurationError(
            f"settings must be a dict of JSON values, got {type(settings).__name__}"
        )
    try:
        text = json.dumps(dict(settings), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigurationError(
            f"settings must hold only JSON values (str, int, finite float, bool, None, lists, "
            f"dicts with string keys): {err}. Convert objects to strings or numbers first "
            "(e.g. a fingerprint hash instead of a tensor)."
        ) from None
    return json.loads(text)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


def _differences(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    a, b = _flatten(stored, "", {}), _flatten(requested, "", {})
    lines = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key, _MISSING), b.get(key, _MISSING)
        if left != right or type(left) is not type(right):
            lines.append(f"  {key}: stored {_show(left)}, requested {_show(right)}")
    return lines


def _show(value: Any) -> str:
    return value if value == _MISSING else json.dumps(value)


def _to_ranges(indices: set[int]) -> list[list[int]]:
    """``{0, 1, 2, 5}`` → ``[[0, 3], [5, 6]]`` (half-open ranges)."""
    ranges: list[list[int]] = []
    for i in sorted(indices):
        if ranges and ranges[-1][1] == i:
            ranges[-1][1] = i + 1
        else:
            ranges.append([i, i + 1])
    return ranges


def _from_ranges(ranges: list[list[int]]) -> set[int]:
    return {i for start, stop in ranges for i in range(start, stop)}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(
    path: Path, payload: dict[str, Any], durable: bool, indent: int | None = None
) -> None:
    """Write to a unique temporary name, fsync, rename over ``path``: readers see old or new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, sort_keys=True, indent=indent)
        f.write("\n")
        f.flush()
        if durable:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


_SEEK_LOCK = threading.Lock()  # for platforms without positioned I/O (seek + read/write)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, data, offset)
        else:  # pragma: no cover - Windows
            with _SEEK_LOCK:
                os.lseek(fd, offset, os.SEEK_SET)
                written = os.write(fd, data)
        data, offset = data[written:], offset + written


def _pread_into(fd: int, buffer: memoryview, offset: int, path: Path) -> None:
    while len(buffer):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [buffer], offset)
        else:  # pragma: no cover - macOS / Windows: one extra copy
            if hasattr(os, "pread"):
                data = os.pread(fd, len(buffer), offset)
            else:
                with _SEEK_LOCK:
                    os.lseek(fd, offset, os.SEEK_SET)
                    data = os.read(fd, len(buffer))
            got = len(data)
            buffer[:got] = data
        if got == 0:
            raise StoreCorruptError(f"{path} ends early (truncated?): cannot read at byte {offset}")
        buffer, offset = buffer[got:], offset + got


def _header_length(path: Path) -> int:
    """Byte offset of the data in a ``.npy`` file (the length of its header)."""
    array = np.load(path, mmap_mode="r")
    offset = int(array.offset)
    del array
    return offset


class FeatureStore:
    """Per-checkpoint ``[n, width]`` training features on disk, written in resumable chunks.

    Create or reopen one with :meth:`open`; see the module docstring for the file layout, the
    crash-safety and the multi-process protocols. Typical use by a featurizer::

        store = FeatureStore.open(path, settings, n=n, width=k, checkpoints=C, rank=r, world_size=w)
        for c in range(C):
            for chunk in store.pending(c):
                start, stop = store.chunks()[chunk]
                store.write(c, start, features_of(range(start, stop), checkpoint=c))
                store.mark_done(c, chunk)
        # all ranks: barrier; then
        store.finalize()

    Reads (:meth:`read`, :meth:`norms`, :meth:`iter_chunks`) return :attr:`read_dtype` tensors
    (float64 for float64 stores, float32 otherwise) of the
    requested rows only.
    """

    def __init__(self, path: Path, meta: dict[str, Any], rank: int, world_size: int, durable: bool):
        """Use :meth:`open`."""
        self.path = path
        self._meta = meta
        layout = meta["layout"]
        self.n: int = int(layout["n"])
        self.width: int = int(layout["width"])
        self.checkpoints: int = int(layout["checkpoints"])
        self.dtype: str = layout["dtype"]
        self.chunk_size: int = int(layout["chunk_size"])
        self.rank = rank
        self.world_size = world_size
        self.durable = durable
        self._np_dtype = np.dtype(_DTYPES[self.dtype])
        self._row_bytes = self.width * self._np_dtype.itemsize
        #: dtype of reads and norms: float64 for float64 stores, float32 otherwise
        self.read_dtype: torch.dtype = _TORCH_DTYPES[_READ_DTYPES[self.dtype]]
        self._read_np = np.dtype(_DTYPES[_READ_DTYPES[self.dtype]])
        self._norm_bytes = self._read_np.itemsize
        self._fds: dict[tuple[str, int, bool], int] = {}
        self._fd_lock = threading.Lock()
        self._headers: dict[tuple[str, int], int] = {}
        self._own_done: set[tuple[int, int]] | None = None
        self._written: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._check_files()

    # ------------------------------------------------------------------ creation / reopening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        settings: Mapping[str, Any],
        *,
        n: int,
        width: int,
        checkpoints: int,
        dtype: str | torch.dtype = "float32",
        chunk_size: int | None = None,
        overwrite: bool = False,
        rank: int = 0,
        world_size: int = 1,
        durable: bool = True,
    ) -> FeatureStore:
        """Create the store at ``path``, or reopen the one there if it has the same settings.

        Args:
            path: a directory (created with its parents; an existing empty directory is fine).
            settings: JSON-able dict describing what the features are (model fingerprint,
                checkpoint fingerprints and weights, projection, dataset length and fingerprint,
                ...). Reopening compares it key by key with the stored one.
            n: training examples (rows per checkpoint).
            width: features per example (columns).
            checkpoints: number of checkpoints (one features file each).
            dtype: ``"float32"``, ``"float64"`` (exact for float64 models) or ``"float16"`` (half the disk; ~3 significant digits, values
                beyond ±65504 are refused on write).
            chunk_size: rows per chunk (unit of work and resumption); default: about
                ``DEFAULT_CHUNK_BYTES`` (32 MiB) of rows.
            overwrite: delete an existing store at ``path`` first (rank 0 only).
            rank, world_size: this process among the processes writing concurrently; ``rank``
                names this process's completion file and ``pending`` hands out chunks
                ``chunk % world_size == rank``.
            durable: ``fsync`` before recording a chunk (survives power loss, not only kills).

        Raises:
            StoreMismatchError: the store at ``path`` was written with different settings or
                layout; the message lists every difference with both values.
            ConfigurationError: invalid arguments, or ``path`` is a non-empty directory that is
                not a feature store.
        """
        path = Path(path)
        for name, value, low in (("n", n, 1), ("width", width, 1), ("checkpoints", checkpoints, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigurationError(f"world_size must be an integer >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigurationError(
                f"rank must be an integer in [0, world_size={world_size}), got {rank!r}"
            )
        dtype_name = _dtype_name(dtype)
        itemsize = np.dtype(_DTYPES[dtype_name]).itemsize
        if chunk_size is None:
            chunk_size = max(1, min(n, DEFAULT_CHUNK_BYTES // (width * itemsize)))
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if overwrite and rank != 0:
            raise ConfigurationError(
                f"overwrite=True on rank {rank}: deleting a store cannot be coordinated between "
                "processes. Overwrite on rank 0 only, barrier, then open on the other ranks with "
                "overwrite=False."
            )
        meta = {
            "format": _FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": {
                "n": n,
                "width": width,
                "checkpoints": checkpoints,
                "dtype": dtype_name,
                "chunk_size": chunk_size,
            },
            "settings": _canonical(settings),
        }
        if overwrite:
            cls._remove(path)
        if not (path / _META).exists():
            cls._create(path, meta)
        stored = cls._read_meta(path)
        diff = _differences(
            {k: stored.get(k) for k in ("format_version", "layout", "settings")},
            {k: meta[k] for k in ("format_version", "layout", "settings")},
        )
        if diff:
            raise StoreMismatchError(
                f"the feature store at {path} was written with different settings:\n"
                + "\n".join(diff)
                + "\nIts features cannot be mixed with this run's. Pass overwrite=True to delete "
                "it and start again, or choose a new path."
            )
        return cls(path, stored, rank, world_size, durable)

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        try:
            with open(path / _META, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise StoreCorruptError(f"cannot read {path / _META}: {err}") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise StoreCorruptError(f"{path / _META} is not a traintrace feature store's metadata")
        return meta

    @classmethod
    def _remove(cls, path: Path) -> None:
        if not path.exists():
            return
        if not path.is_dir():
            raise ConfigurationError(f"{path} exists and is not a directory; choose another path")
        if any(path.iterdir()) and not (path / _META).exists():
            raise ConfigurationError(
                f"{path} is a non-empty directory without {_META}: not a feature store, so "
                "overwrite=True refuses to delete it. Choose another path."
            )
        trash = path.with_name(f".{path.name}.deleting-{uuid.uuid4().hex}")
        os.replace(path, trash)  # atomic: the old store vanishes at once, then is deleted
        shutil.rmtree(trash)

    @classmethod
    def _create(cls, path: Path, meta: dict[str, Any]) -> None:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if (path / _META).exists():
                return  # another process created it since open() looked
            raise ConfigurationError(
                f"{path} exists but holds no {_META}: it is not a feature store. Choose another "
                "path or empty it."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{uuid.uuid4().hex}")
        tmp.mkdir()
        try:
            layout = meta["layout"]
            np_dtype = _DTYPES[layout["dtype"]]
            for c in range(layout["checkpoints"]):
                for name, shape, dt in (
                    (f"features-{c:03d}.npy", (layout["n"], layout["width"]), np_dtype),
                    (f"norms-{c:03d}.npy", (layout["n"],), _DTYPES[_READ_DTYPES[layout["dtype"]]]),
                ):
                    # open_memmap writes the .npy header and extends the file sparsely (zeros)
                    array = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=dt, shape=shape)
                    del array
            (tmp / _DONE).mkdir()
            _write_json_atomic(tmp / _META, meta, durable=True, indent=2)
            try:
                os.rename(tmp, path)  # atomic; fails if another process created the store first
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EACCES, errno.EPERM):
                    raise
                if not (path / _META).exists():
                    raise
            else:
                _fsync_dir(path.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _check_files(self) -> None:
        for c in range(self.checkpoints):
            for kind, expected in (
                ("features", self.n * self._row_bytes),
                ("norms", self.n * self._norm_bytes),
            ):
                file = self._file(kind, c)
                try:
                    header = _header_length(file)
                    size = file.stat().st_size
                except (OSError, ValueError) as err:
                    raise StoreCorruptError(f"cannot read {file}: {err}") from None
                if size != header + expected:
                    raise StoreCorruptError(
                        f"{file} has {size} bytes, expected {header + expected} for its layout: "
                        "the store is damaged. Delete it (or open with overwrite=True)."
                    )
                self._headers[(kind, c)] = header

    # ------------------------------------------------------------------ description
    @property
    def settings(self) -> dict[str, Any]:
        """The caller's settings as stored (a copy)."""
        return json.loads(json.dumps(self._meta["settings"]))

    @property
    def layout(self) -> dict[str, Any]:
        """``{"n", "width", "checkpoints", "dtype", "chunk_size"}``."""
        return dict(self._meta["layout"])

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, n={self.n}, width={self.width}, "
            f"checkpoints={self.checkpoints}, dtype={self.dtype!r}, chunk_size={self.chunk_size})"
        )

    def chunks(self) -> list[tuple[int, int]]:
        """Half-open row ranges ``(start, stop)`` of every chunk, in order."""
        return [
            (start, min(start + self.chunk_size, self.n))
            for start in range(0, self.n, self.chunk_size)
        ]

    @property
    def n_chunks(self) -> int:
        """Number of chunks (per checkpoint)."""
        return math.ceil(self.n / self.chunk_size)

    # ------------------------------------------------------------------ completion records
    def _done_dir(self) -> Path:
        return self.path / _DONE

    def _own_file(self) -> Path:
        return self._done_dir() / f"rank-{self.rank:05d}.json"

    @staticmethod
    def _load_done(file: Path) -> set[tuple[int, int]]:
        with open(file, encoding="utf-8") as f:
            payload = json.load(f)
        return {(int(c), i) for c, ranges in payload["done"].items() for i in _from_ranges(ranges)}

    def _completed(self) -> set[tuple[int, int]]:
        """Union of every completion file: ``{(checkpoint, chunk)}``."""
        for _ in range(100):
            done: set[tuple[int, int]] = set()
            try:
                for file in sorted(self._done_dir().glob("*.json")):
                    done |= self._load_done(file)
            except FileNotFoundError:  # a concurrent finalize merged and removed a rank file
                continue
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise StoreCorruptError(
                    f"unreadable completion record in {self._done_dir()}: {err}"
                ) from None
            return done
        raise StoreCorruptError(f"completion records in {self._done_dir()} keep changing")

    def _own(self) -> set[tuple[int, int]]:
        if self._own_done is None:
            file = self._own_file()
            self._own_done = self._load_done(file) if file.exists() else set()
        return self._own_done

    def _save_done(self, file: Path, done: set[tuple[int, int]]) -> None:
        by_checkpoint: dict[str, list[list[int]]] = {}
        for c in range(self.checkpoints):
            ranges = _to_ranges({i for cc, i in done if cc == c})
            if ranges:
                by_checkpoint[str(c)] = ranges
        _write_json_atomic(file, {"done": by_checkpoint}, self.durable)

    def done(self, checkpoint: int) -> list[int]:
        """Indices of the chunks of ``checkpoint`` recorded as complete (by any process)."""
        self._check_checkpoint(checkpoint)
        return sorted(i for c, i in self._completed() if c == checkpoint)

    def pending(
        self, checkpoint: int, rank: int | None = None, world_size: int | None = None
    ) -> list[int]:
        """Chunk indices of ``checkpoint`` not yet complete that belong to ``rank``.

        Chunks are dealt round-robin: chunk ``i`` belongs to rank ``i % world_size``. Defaults
        are the store's own ``rank`` and ``world_size``.
        """
        self._check_checkpoint(checkpoint)
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigurationError(f"need 0 <= rank < world_size, got {rank} and {world_size}")
        done = self._completed()
        return [i for i in range(rank, self.n_chunks, world_size) if (checkpoint, i) not in done]

    def missing(self) -> dict[int, list[int]]:
        """``{checkpoint: [incomplete chunk indices]}`` over all checkpoints (empty when done)."""
        done = self._completed()
        out: dict[int, list[int]] = {}
        for c in range(self.checkpoints):
            todo = [i for i in range(self.n_chunks) if (c, i) not in done]
            if todo:
                out[c] = todo
        return out

    def is_complete(self) -> bool:
        """Every chunk of every checkpoint is recorded as complete (by any process)."""
        return not self.missing()

    def require_complete(self) -> None:
        """Raise :class:`StoreIncompleteError` naming the missing chunks unless complete."""
        missing = self.missing()
        if missing:
            counts = ", ".join(
                f"checkpoint {c}: {len(idx)} of {self.n_chunks} chunks"
                for c, idx in missing.items()
            )
            raise StoreIncompleteError(
                f"the feature store at {self.path} is incomplete ({counts} missing): a "
                "featurizing run was interrupted or is still running. Run it again to resume "
                "(finished chunks are kept), and wait for every rank to finish."
            )

    def mark_done(self, checkpoint: int, chunk: int) -> None:
        """Record chunk ``chunk`` of ``checkpoint`` complete, after flushing its rows to disk.

        Every row of the chunk must have been written by this process (since :meth:`open`);
        otherwise :class:`ConfigurationError`. See the module docstring for the ordering that
        makes this crash-safe.
        """
        self._check_checkpoint(checkpoint)
        if not 0 <= chunk < self.n_chunks:
            raise ConfigurationError(f"chunk must be in [0, {self.n_chunks}), got {chunk}")
        start, stop = self.chunks()[chunk]
        covered = 0
        cursor = start
        for a, b in sorted(self._written.get((checkpoint, chunk), [])):
            a, b = max(a, cursor), min(b, stop)
            if b > a:
                covered += b - a
                cursor = b
        if covered != stop - start:
            raise ConfigurationError(
                f"mark_done(checkpoint={checkpoint}, chunk={chunk}): only {covered} of its "
                f"{stop - start} rows [{start}, {stop}) were written by this process; write them "
                "all first"
            )
        if self.durable:
            for kind in ("features", "norms"):
                if (kind, checkpoint, True) in self._fds:
                    os.fsync(self._fds[(kind, checkpoint, True)])
        own = self._own()
        own.add((checkpoint, chunk))
        self._save_done(self._own_file(), own)
        self._written.pop((checkpoint, chunk), None)

    def write_chunk(self, checkpoint: int, chunk: int, rows: Tensor) -> None:
        """Write all rows of chunk ``chunk`` and record it complete: :meth:`write` + :meth:`mark_done`."""
        start, _ = self.chunks()[chunk]
        self.write(checkpoint, start, rows)
        self.mark_done(checkpoint, chunk)

    def finalize(self) -> bool:
        """Merge the per-rank completion files into one once the store is complete.

        Returns :meth:`is_complete`; an incomplete store is left untouched (so a rank still
        writing loses nothing). Call after every writer finished (after a barrier); safe to
        call from every rank at once. After it, a store written by several processes is
        byte-identical to one written by one process.
        """
        done = self._completed()
        if len(done) < self.checkpoints * self.n_chunks:
            return False
        self._save_done(self._done_dir() / _ALL, done)
        # rank files, and temporary rank files left by writers killed while recording (none can
        # be in flight once every chunk is complete); never another finalize's all.json.tmp
        for pattern in ("rank-*.json", ".rank-*.tmp"):
            for file in self._done_dir().glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
        self._own_done = None
        return True

    # ------------------------------------------------------------------ rows
    def _check_checkpoint(self, checkpoint: int) -> None:
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int):
            raise ConfigurationError(f"checkpoint must be an int, got {checkpoint!r}")
        if not 0 <= checkpoint < self.checkpoints:
            raise ConfigurationError(
                f"checkpoint must be in [0, {self.checkpoints}), got {checkpoint}"
            )

    def _file(self, kind: str, checkpoint: int) -> Path:
        return self.path / f"{kind}-{checkpoint:03d}.npy"

    def _fd(self, kind: str, checkpoint: int, write: bool = False) -> int:
        """A descriptor kept open (read-only unless ``write``, so read-only stores can be read)."""
        key = (kind, checkpoint, write)
        with self._fd_lock:  # reads may come from a prefetching thread
            if key not in self._fds:
                flags = (os.O_RDWR if write else os.O_RDONLY) | getattr(os, "O_BINARY", 0)
                self._fds[key] = os.open(self._file(kind, checkpoint), flags)
            return self._fds[key]

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise ConfigurationError(f"rows [{start}, {stop}) are outside [0, {self.n})")
        return start, stop

    def write(self, checkpoint: int, start: int, rows: Tensor) -> None:
        """Write ``rows`` ``[b, width]`` at rows ``[start, start + b)`` of ``checkpoint``.

        Rows are cast to the store's dtype; their norms (of the stored values) are written too.
        Nothing is recorded complete until :meth:`mark_done`.

        Raises:
            NonFiniteGradientError: a row holds NaN or infinity.
            ConfigurationError: wrong shape or range, or a value beyond float16's range.
        """
        self._check_checkpoint(checkpoint)
        if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[1] != self.width:
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ConfigurationError(f"rows must be a [b, {self.width}] tensor, got {shape}")
        start, stop = self._range(start, start + rows.shape[0])
        if start == stop:
            return
        rows = rows.detach().to("cpu")
        # one reduction first; the elementwise check only when the sum is not finite
        if not bool(torch.isfinite(rows.sum())) and not bool(torch.isfinite(rows).all()):
            raise NonFiniteGradientError(
                f"rows [{start}, {stop}) of checkpoint {checkpoint} hold NaN or infinity"
            )
        stored = rows.to(_TORCH_DTYPES[self.dtype]).contiguous()
        if self.dtype == "float16" and not bool(torch.isfinite(stored.sum(dtype=torch.float32))):
            big = float(rows.abs().max())
            raise ConfigurationError(
                f"rows [{start}, {stop}) of checkpoint {checkpoint} hold values up to {big:.3g}, "
                "beyond float16's range (65504): use dtype='float32' or scale the features"
            )
        array = stored.numpy()
        # float64 accumulation without a float64 copy of the rows
        norms = (
            torch.linalg.vector_norm(stored, dim=1, dtype=torch.float64)
            .numpy()
            .astype(self._read_np)
        )
        _pwrite_all(
            self._fd("features", checkpoint, write=True),
            memoryview(array).cast("B"),
            self._headers[("features", checkpoint)] + start * self._row_bytes,
        )
        _pwrite_all(
            self._fd("norms", checkpoint, write=True),
            memoryview(norms).cast("B"),
            self._headers[("norms", checkpoint)] + start * self._norm_bytes,
        )
        for i in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1):
            self._written.setdefault((checkpoint, i), []).append((start, stop))

    def read(
        self, checkpoint: int, start: int = 0, stop: int | None = None, *, out: Tensor | None = None
    ) -> Tensor:
        """Rows ``[start, stop)`` of ``checkpoint`` as a :attr:`read_dtype` tensor ``[rows, width]``.

        Reads only those rows (no mapping of the whole file). ``out``: a contiguous
        :attr:`read_dtype` tensor of that shape to read into (reused buffers keep memory flat in loops). Does not
        check completeness: use :meth:`require_complete` before trusting results.
        """
        self._check_checkpoint(checkpoint)
        start, stop = self._range(start, stop)
        shape = (stop - start, self.width)
        if out is not None and (
            tuple(out.shape) != shape or out.dtype != self.read_dtype or not out.is_contiguous()
        ):
            raise ConfigurationError(
                f"out must be a contiguous {self.read_dtype} tensor of shape {shape}, got "
                f"{out.dtype} {tuple(out.shape)}"
            )
        direct = self._np_dtype == self._read_np
        if direct and out is not None:
            buffer = out.numpy()
        else:
            buffer = np.empty(shape, dtype=self._np_dtype)
        if stop > start:
            _pread_into(
                self._fd("features", checkpoint),
                memoryview(buffer).cast("B"),
                self._headers[("features", checkpoint)] + start * self._row_bytes,
                self._file("features", checkpoint),
            )
        if out is None:
            return torch.from_numpy(buffer).to(self.read_dtype)
        if not direct:
            out.copy_(torch.from_numpy(buffer))
        return out

    def norms(self, checkpoint: int, start: int = 0, stop: int | None = None) -> Tensor:
        """Euclidean norms of the stored rows ``[start, stop)``, :attr:`read_dtype` ``[rows]``."""
        self._check_checkpoint(checkpoint)
        start, stop = self._range(start, stop)
        buffer = np.empty(stop - start, dtype=self._read_np)
        if stop > start:
            _pread_into(
                self._fd("norms", checkpoint),
                memoryview(buffer).cast("B"),
                self._headers[("norms", checkpoint)] + start * self._norm_bytes,
                self._file("norms", checkpoint),
            )
        return torch.from_numpy(buffer)

    def iter_chunks(self, checkpoint: int, rows: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, features[start : start + rows])`` over all of ``checkpoint``.

        ``rows`` defaults to the store's ``chunk_size``; memory is one block of ``rows`` rows.
        """
        rows = self.chunk_size if rows is None else rows
        if rows < 1:
            raise ConfigurationError(f"rows must be >= 1, got {rows}")
        for start in range(0, self.n, rows):
            yield start, self.read(checkpoint, start, min(start + rows, self.n))

    def memmap(self, checkpoint: int) -> np.memmap:
        """Read-only ``numpy`` memory map of ``checkpoint``'s whole ``[n, width]`` array."""
        self._check_checkpoint(checkpoint)
        return np.load(self._file("features", checkpoint), mmap_mode="r")

    def close(self) -> None:
        """Close open file descriptors (reopened on demand)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. to spawned workers): open descriptors and unrecorded writes stay."""
        state = self.__dict__.copy()
        state.update(_fds={}, _fd_lock=None, _own_done=None, _written={})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd_lock = threading.Lock()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
