"""The on-disk FeatureStore: per-checkpoint training features, written once, resumable, checksummed.

Layout of a store directory::

    meta.json            format version, generation, integrity (checksum algorithm, rows per
                         checksummed piece), layout (n, width, checkpoints, dtype, chunk_size) and
                         the caller's settings (model / checkpoint / data fingerprints, weights,
                         projection, ...). Written once, when the store is created.
    features-000.npy     [n, width] float16, float32 or float64, one per checkpoint (``.npy`` format, so
                         ``numpy.load(path, mmap_mode="r")`` maps it).
    norms-000.npy        [n] float32 (float64 for float64 stores) Euclidean norms of the stored rows (for cosine variants).
    done/rank-00000.json completion records of rank 0 (one JSON object per line, appended).
    done/all.json        completion records merged by :meth:`FeatureStore.finalize` (same format).
    done/writer-00000.lock  the writer lock of rank 0 (exists while a writer holds it).

Rows are split into fixed chunks of ``chunk_size`` rows; a chunk is the unit of work, of
resumption and of distribution over processes.

**Integrity.** A chunk's completion record holds checksums of its stored bytes: one per
*piece* of ``piece_rows`` rows of features (about 1 MiB; pieces never straddle chunks) and
one for the chunk's norms, plus the caller's ``data_hash`` of the examples it was computed from
(see :meth:`FeatureStore.write_chunk`). Every read verifies the pieces and norm chunks it
touches (reading at most one extra piece at each end of an unaligned range); a mismatch — a
flipped byte, a zeroed chunk, a NaN written into a row, an overwritten norm — raises
:class:`~traintrace.exceptions.StoreCorruptError` naming the file, checkpoint, chunk and rows.
Verification is cached per open store while the file is unchanged (same inode, size, mtime and
ctime, and older than :data:`RACY_SECONDS`, as git does for its index), so repeated passes
cost one ``fstat`` per read; the first pass costs one hash of the bytes read. The checksum is
``xxh3_64`` (the ``xxhash`` package, ~30 GB/s) when it is installed at creation, else
``crc32`` from the standard library's ``zlib``; the choice is recorded in ``meta.json``. These
detect accidental corruption, not an adversary who rewrites the records too. Rows with NaN or
infinity are refused on write.

**Crash safety.** :meth:`FeatureStore.write` puts rows into the files with ``pwrite``;
:meth:`FeatureStore.mark_done` first ``fsync``s the features and norms files, reads the chunk
back to checksum it, then appends one line to the rank's completion file and ``fsync``s it. A
process killed at any instant (SIGKILL included) therefore leaves every chunk either recorded
with all its rows on disk, or unrecorded (a torn last line is ignored) — and unrecorded chunks
are recomputed on resume, whatever half-written rows they hold. ``durable=False`` skips the
``fsync`` calls: still safe against a killed process, not against power loss.

**Several processes** share one store:

- *Creation* is race-free without coordination: every process builds a complete store in a
  private temporary sibling directory ``.<name>.creating-<pid>-<host>-<id>`` and renames it to
  ``path``; renaming a directory is atomic and fails when ``path`` already holds a store, so
  exactly one creator wins and the others delete their copy and open the winner's. Siblings
  left by killed creators (and ``.<name>.deleting-…`` ones left by a killed overwrite) are
  removed by the next :meth:`FeatureStore.open` once their process is gone.
- *Writer lock*: a process about to write (:meth:`FeatureStore.pending` with work left, or
  :meth:`FeatureStore.write`) takes an exclusive ``fcntl.flock`` on ``done/writer-<rank>.lock``;
  a second process of the same rank — another fit of the same store — gets
  :class:`~traintrace.exceptions.StoreBusyError` naming the holder's pid at once, instead of
  duplicating the work. The ranks of one ``torchrun`` job hold different lock files. The lock
  is released by :meth:`FeatureStore.finalize` (once complete), :meth:`FeatureStore.close` or
  the death of the process; FeatureStore objects of one process share it.
- *Writing*: :meth:`FeatureStore.pending` hands out unfinished chunks round-robin
  (``chunk % world_size == rank``), so ranks write disjoint rows of the same files.
- *Recording*: each rank appends completions only to its own ``done/rank-RRRRR.json``.
  Readers take the union of all completion files.
- *Finishing*: after all ranks are done (e.g. after ``torch.distributed.barrier()``),
  :meth:`FeatureStore.finalize` (safe from one or every rank) merges the completion files
  into ``done/all.json`` and removes the per-rank files, so a store written by several
  processes is byte-identical to one written by one.
- *Generation*: ``overwrite=True`` deletes the old store and creates one whose ``generation``
  is the old one's plus one. Every open FeatureStore pins its directory and checks, before each
  read, write and completion record, that ``path`` still names it; otherwise
  :class:`~traintrace.exceptions.StoreRewrittenError` ("refit"). So a reader never mixes a new
  store's bytes into its old layout, and a writer still running on the old store stops at its
  next write instead of extending the new store's files. ``overwrite=True`` cannot be
  coordinated between ranks: pass it on rank 0 only, then barrier, then open on the other ranks
  with ``overwrite=False``.

Memory: nothing held grows with ``n`` beyond the completion records (a few checksums per chunk);
reads and writes go through buffers of the requested rows only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from traintrace.exceptions import (
    ConfigurationError,
    DiskFullError,
    NonFiniteGradientError,
    StoreBusyError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreRewrittenError,
)

try:  # POSIX only; without it (Windows) there is no writer lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_PIECE_BYTES",
    "FORMAT_VERSION",
    "ORPHAN_WAIT_SECONDS",
    "RACY_SECONDS",
    "FeatureStore",
    "TemporaryStoreDir",
    "file_checksum",
    "free_disk_bytes",
    "temporary_store_dir",
]

FORMAT_VERSION = 2
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
#: Rows of features per checksum: about this many bytes (at least one row, at most a chunk).
DEFAULT_PIECE_BYTES = 2**20
#: A verified piece is remembered (not re-hashed) only while its file is unchanged and was last
#: changed longer ago than this: file times tick coarsely, so a change within the same tick as
#: the verification could otherwise go unseen.
RACY_SECONDS = 2.0
#: A writer lock still held after its writer died (by processes it forked, e.g. DataLoader
#: workers, which exit once they notice) is waited for this long before StoreBusyError.
ORPHAN_WAIT_SECONDS = 10.0
_MISSING = "<missing>"
_RECOMPUTE = "Delete the store or pass overwrite_store=True to recompute"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


# ---------------------------------------------------------------------------- checksums
def _xxh3(data: memoryview) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def _crc32(data: memoryview) -> str:
    return f"{zlib.crc32(data):08x}"


_CHECKSUMS: dict[str, Callable[[memoryview], str]] = {"xxh3_64": _xxh3, "crc32": _crc32}


def _default_checksum() -> str:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return "crc32"
    return "xxh3_64"


def file_checksum(path: str | os.PathLike[str], algorithm: str | None = None) -> str:
    """``"<algorithm>:<hex>"`` of a whole file, read in 16 MiB blocks (the store's checksums).

    ``algorithm``: ``"xxh3_64"`` or ``"crc32"``; default: xxh3_64 when ``xxhash`` is installed.
    """
    algorithm = algorithm or _default_checksum()
    if algorithm == "xxh3_64":
        try:
            import xxhash
        except ImportError:
            raise ConfigurationError(
                f"checking {path} needs the xxhash package: pip install xxhash"
            ) from None
        digest = xxhash.xxh3_64()
        with open(path, "rb") as f:
            while block := f.read(16 * 2**20):
                digest.update(block)
        return f"xxh3_64:{digest.hexdigest()}"
    if algorithm != "crc32":
        raise ConfigurationError(f"algorithm must be 'xxh3_64' or 'crc32', got {algorithm!r}")
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            crc = zlib.crc32(block, crc)
    return f"crc32:{crc:08x}"


def _checksum_function(name: str, path: Path) -> Callable[[memoryview], str]:
    if name not in _CHECKSUMS:
        raise StoreCorruptError(f"{path / _META} names an unknown checksum {name!r}. {_RECOMPUTE}.")
    if name == "xxh3_64":
        try:
            import xxhash  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                f"the feature store at {path} is checksummed with xxh3_64, which needs the "
                "xxhash package: pip install xxhash (or pip install 'traintrace[fast]'), or "
                "pass overwrite_store=True to recompute it with crc32"
            ) from None
    return _CHECKSUMS[name]


# ---------------------------------------------------------------------------- helpers
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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, content: str | bytes, durable: bool) -> None:
    """Write to a unique temporary name, fsync, rename over ``path``: readers see old or new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        _fsync_dir(path.parent)


def _write_json_atomic(
    path: Path, payload: dict[str, Any], durable: bool, indent: int | None = None
) -> None:
    write_atomic(path, json.dumps(payload, sort_keys=True, indent=indent) + "\n", durable)


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
            raise StoreCorruptError(
                f"{path} ends early (truncated?): cannot read at byte {offset}. {_RECOMPUTE}."
            )
        buffer, offset = buffer[got:], offset + got


def _header_length(path: Path) -> int:
    """Byte offset of the data in a ``.npy`` file (the length of its header)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (conservatively True when unsure)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _owner_gone(tag: str, strict: bool = False) -> bool:
    """``tag`` is ``<pid>-<host>-<id>`` (or ``<pid>-<id>`` unless ``strict``): is that process gone?"""
    parts = tag.split("-")
    if not parts or not parts[0].isdigit() or (strict and len(parts) < 3):
        return False
    if len(parts) >= 3 and parts[1] != _HOST:
        return False  # another machine's (shared file system): not ours to judge
    return not _pid_alive(int(parts[0]))


def _clean_stale(parent: Path, prefixes: tuple[str, ...], strict: bool = False) -> list[Path]:
    """Remove entries of ``parent`` named ``<prefix><pid>-…`` whose process is gone."""
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        for prefix in prefixes:
            if entry.name.startswith(prefix) and _owner_gone(entry.name[len(prefix) :], strict):
                target = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        target.unlink()
                removed.append(target)
    return removed


def _drop_torn_tail(fd: int) -> None:
    """Cut an unterminated last line (a record torn by a kill) so appends start a fresh line.

    Only the rank's own writer appends to its file (it holds the rank's lock), so this cannot
    cut another writer's record.
    """
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        text = os.pread(fd, size, 0)
        os.ftruncate(fd, text.rfind(b"\n") + 1)


def _disk_full(err: OSError, path: Path, what: str) -> DiskFullError:
    return DiskFullError(
        err.errno,
        f"no space left on the device holding the feature store {path} while {what} "
        f"({err.strerror}). Finished chunks are kept; free space and rerun (the fit resumes).",
    )


def free_disk_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the file system that holds (or will hold) ``path``.

    ``path`` and its parents need not exist: the nearest existing ancestor is measured, so a
    ``store=`` under folders not created yet gets a number instead of ``FileNotFoundError``.
    """
    probe = Path(os.path.abspath(os.fspath(path)))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


# ---------------------------------------------------------------------------- writer locks
_LOCKS: dict[tuple[int, str], tuple[int, set[str]]] = {}  # (pid, lock) -> (fd, holders)
_LOCKS_GUARD = threading.RLock()  # reentrant: a __del__ may release during a GC inside


def _holds_lock(file: Path, token: str) -> bool:
    held = _LOCKS.get((os.getpid(), str(file)))
    return held is not None and token in held[1]


def _acquire_lock(file: Path, store: Path, rank: int, token: str) -> None:
    """Take (or share within this process) the exclusive writer lock ``file`` for ``token``."""
    if fcntl is None:  # pragma: no cover - Windows: no lock
        return
    key = (os.getpid(), str(file))
    with _LOCKS_GUARD:
        if key in _LOCKS:
            _LOCKS[key][1].add(token)
            return
        orphaned_since: float | None = None
        while True:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
                os.close(fd)
                pid = holder[0] if holder else "unknown"
                here = len(holder) > 1 and holder[1] == socket.gethostname()
                gone = here and pid.isdigit() and not _pid_alive(int(pid))
                if gone:
                    # the writer died, but processes it forked (DataLoader workers) share its
                    # lock until they notice: they exit within seconds
                    orphaned_since = orphaned_since or time.monotonic()
                    if time.monotonic() - orphaned_since < ORPHAN_WAIT_SECONDS:
                        time.sleep(0.1)
                        continue
                    raise StoreBusyError(
                        f"the writer of this store (pid {pid}, rank {rank}) is gone, but a process "
                        f"it started (e.g. a DataLoader worker) still holds its lock after "
                        f"{ORPHAN_WAIT_SECONDS:.0f} s: {store}. Stop that process (fuser -v "
                        f"{file}) and rerun; finished chunks are kept."
                    ) from None
                host = f" on {holder[1]}" if len(holder) > 1 else ""
                raise StoreBusyError(
                    f"another process is writing this store (pid {pid}{host}, rank {rank}): "
                    f"{store}. Wait for it to finish — its chunks are then reused — or stop it; "
                    "to fit a different model or data at the same time, choose another store= "
                    "path."
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the file may have been unlinked by a releasing holder since we opened it
                same = os.fstat(fd).st_ino == os.stat(file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _LOCKS[key] = (fd, {token})


def _release_lock(file: Path, token: str | None) -> None:
    """Drop ``token``'s hold (every hold of this process when ``None``); unlock after the last."""
    if fcntl is None:  # pragma: no cover - Windows
        return
    key = (os.getpid(), str(file))
    with _LOCKS_GUARD:
        held = _LOCKS.get(key)
        if held is None:
            return
        if token is None:
            held[1].clear()
        else:
            held[1].discard(token)
        if held[1]:
            return
        del _LOCKS[key]
        with contextlib.suppress(OSError):
            file.unlink()  # while still locked: the next writer creates a fresh file
        os.close(held[0])


# ---------------------------------------------------------------------------- temporary stores
_TEMP_PREFIX = "traintrace-store-"


class TemporaryStoreDir:
    """A private directory for a temporary store, removed on garbage collection or exit.

    Created under the system temporary directory as ``traintrace-store-<pid>-<host>-<id>``.
    It is removed when this object is garbage-collected, by :meth:`cleanup`, or at normal
    interpreter exit (``weakref.finalize``); directories left by processes that were killed
    (SIGKILL skips every exit handler) are removed by the next :func:`temporary_store_dir`
    on this machine once their process is gone. A drop-in for ``tempfile.TemporaryDirectory``:
    ``.name`` is the path as a string.
    """

    def __init__(self, prefix: str = _TEMP_PREFIX, dir: str | os.PathLike[str] | None = None):
        """Create the directory (and remove stale ones left by dead processes)."""
        root = Path(dir) if dir is not None else Path(tempfile.gettempdir())
        _clean_stale(root, (prefix,), strict=True)  # never tempfile's random names
        self.path = root / f"{prefix}{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir(parents=True)
        self.name = str(self.path)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.name, ignore_errors=True)

    def cleanup(self) -> None:
        """Remove the directory now."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"TemporaryStoreDir({self.name!r})"

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def temporary_store_dir() -> TemporaryStoreDir:
    """A fresh :class:`TemporaryStoreDir` (see there); keep the object alive while in use."""
    return TemporaryStoreDir()


# ---------------------------------------------------------------------------- the store
class FeatureStore:
    """Per-checkpoint ``[n, width]`` training features on disk, written in resumable chunks.

    Create or reopen one with :meth:`open`; see the module docstring for the file layout, the
    integrity checks, and the crash-safety and multi-process protocols. Typical use by a
    featurizer::

        store = FeatureStore.open(path, settings, n=n, width=k, checkpoints=C, rank=r, world_size=w)
        for c in range(C):
            for chunk in store.pending(c):          # takes the writer lock
                start, stop = store.chunks()[chunk]
                rows, data_hash = features_of(range(start, stop), checkpoint=c)
                store.write_chunk(c, chunk, rows, data_hash=data_hash)
        # all ranks: barrier; then
        store.finalize()                            # releases the writer lock

    Reads (:meth:`read`, :meth:`norms`, :meth:`iter_chunks`) return :attr:`read_dtype` tensors
    (float64 for float64 stores, float32 otherwise) of the requested rows only, verified
    against the chunks' checksums.
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        rank: int,
        world_size: int,
        durable: bool,
        dir_fd: int | None = None,
        verify: bool = True,
    ):
        """Use :meth:`open`."""
        self.path = path
        self._meta = meta
        layout = meta["layout"]
        self.n: int = int(layout["n"])
        self.width: int = int(layout["width"])
        self.checkpoints: int = int(layout["checkpoints"])
        self.dtype: str = layout["dtype"]
        self.chunk_size: int = int(layout["chunk_size"])
        #: incremented by every ``overwrite=True``; checked before each read and write
        self.generation: int = int(meta.get("generation", 0))
        integrity = meta["integrity"]
        self.checksum: str = integrity["checksum"]
        #: rows of features per checksum (reads are verified at this granularity)
        self.piece_rows: int = int(integrity["piece_rows"])
        self.rank = rank
        self.world_size = world_size
        self.durable = durable
        #: verify checksums on read (``False`` only to measure their cost)
        self.verify_reads = verify
        self._hash = _checksum_function(self.checksum, path)
        self._np_dtype = np.dtype(_DTYPES[self.dtype])
        self._row_bytes = self.width * self._np_dtype.itemsize
        #: dtype of reads and norms: float64 for float64 stores, float32 otherwise
        self.read_dtype: torch.dtype = _TORCH_DTYPES[_READ_DTYPES[self.dtype]]
        self._read_np = np.dtype(_DTYPES[_READ_DTYPES[self.dtype]])
        self._norm_bytes = self._read_np.itemsize
        self._fds: dict[tuple[str, int, bool], int] = {}
        self._fd_lock = threading.Lock()
        self._headers: dict[tuple[str, int], int] = {}
        self._records: dict[tuple[int, int], dict[str, Any]] = {}
        self._verified: dict[tuple[str, int], tuple[tuple[int, ...], set[tuple[int, int]]]] = {}
        self._written: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._token = uuid.uuid4().hex  # this object's hold on the writer lock
        self._dir_fd = dir_fd
        self._dir_id: tuple[int, int] | None = None
        self._pinless = dir_fd is None  # no directory to pin (Windows): no identity checks
        if dir_fd is not None:
            st = os.fstat(dir_fd)
            self._dir_id = (st.st_dev, st.st_ino)
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
        verify: bool = True,
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
            overwrite: delete an existing store at ``path`` first (rank 0 only); the new one's
                ``generation`` is one more, so FeatureStores open on the old one stop with
                :class:`StoreRewrittenError`.
            rank, world_size: this process among the processes writing concurrently; ``rank``
                names this process's completion and lock files and ``pending`` hands out chunks
                ``chunk % world_size == rank``.
            durable: ``fsync`` before recording a chunk (survives power loss, not only kills).
            verify: verify checksums on read (default; ``False`` only to measure their cost).

        Raises:
            StoreMismatchError: the store at ``path`` was written with different settings or
                layout; the message lists every difference with both values.
            StoreCorruptError: the store's metadata or files are damaged.
            DiskFullError: no space left to create the store.
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
            "generation": 0,
            "integrity": {
                "checksum": _default_checksum(),
                "piece_rows": max(1, min(chunk_size, DEFAULT_PIECE_BYTES // (width * itemsize))),
            },
            "layout": {
                "n": n,
                "width": width,
                "checkpoints": checkpoints,
                "dtype": dtype_name,
                "chunk_size": chunk_size,
            },
            "settings": _canonical(settings),
        }
        cls._clean_siblings(path)
        if overwrite:
            meta["generation"] = cls._generation_at(path) + 1
            cls._remove(path)
        if not (path / _META).exists():
            cls._create(path, meta)
        dir_fd, stored = cls._pin(path)
        try:
            diff = _differences(
                {k: stored.get(k) for k in ("format_version", "layout", "settings")},
                {k: meta[k] for k in ("format_version", "layout", "settings")},
            )
            if diff:
                raise StoreMismatchError(
                    f"the feature store at {path} was written with different settings:\n"
                    + "\n".join(diff)
                    + "\nIts features cannot be mixed with this run's. Pass overwrite_store=True "
                    "to the estimator (overwrite=True to FeatureStore.open) to delete it and "
                    "start again, or choose a new path."
                )
            return cls(path, stored, rank, world_size, durable, dir_fd=dir_fd, verify=verify)
        except BaseException:
            if dir_fd is not None:
                os.close(dir_fd)
            raise

    @staticmethod
    def _read_meta(path: Path) -> dict[str, Any]:
        try:
            with open(path / _META, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"cannot read {path / _META}: {err}. {_RECOMPUTE}.") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise StoreCorruptError(
                f"{path / _META} is not a traintrace feature store's metadata. {_RECOMPUTE}."
            )
        try:
            layout = meta["layout"]
            for key in ("n", "width", "checkpoints", "chunk_size"):
                if not isinstance(layout[key], int) or isinstance(layout[key], bool):
                    raise TypeError(f"layout.{key} is {layout[key]!r}")
                if layout[key] < 1:
                    raise ValueError(f"layout.{key} is {layout[key]}")
            if layout["dtype"] not in _DTYPES:
                raise ValueError(f"layout.dtype is {layout['dtype']!r}")
            if not isinstance(meta["settings"], dict):
                raise TypeError("settings is not an object")
            if meta.get("format_version") == FORMAT_VERSION:
                integrity = meta["integrity"]
                if not isinstance(integrity["piece_rows"], int) or integrity["piece_rows"] < 1:
                    raise ValueError(f"integrity.piece_rows is {integrity['piece_rows']!r}")
                if not isinstance(meta.get("generation"), int):
                    raise TypeError(f"generation is {meta.get('generation')!r}")
        except (KeyError, TypeError, ValueError) as err:
            raise StoreCorruptError(
                f"{path / _META} is damaged ({type(err).__name__}: {err}). {_RECOMPUTE}."
            ) from None
        return meta

    @classmethod
    def _pin(cls, path: Path) -> tuple[int | None, dict[str, Any]]:
        """Open the store directory (pinning it) and read the metadata of that directory."""
        for _ in range(100):
            try:
                dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:  # pragma: no cover - Windows cannot open directories
                return None, cls._read_meta(path)
            try:
                meta = cls._read_meta(path)
                st, pinned = os.stat(path), os.fstat(dir_fd)
            except BaseException:
                os.close(dir_fd)
                raise
            if (st.st_dev, st.st_ino) == (pinned.st_dev, pinned.st_ino):
                return dir_fd, meta
            os.close(dir_fd)  # replaced between the two: look again
        raise StoreCorruptError(f"the feature store at {path} keeps being replaced")

    @classmethod
    def _generation_at(cls, path: Path) -> int:
        """The generation of the store at ``path``; -1 when there is none (0 if unreadable)."""
        try:
            text = (path / _META).read_text(encoding="utf-8")
        except FileNotFoundError:
            return -1
        except OSError:
            return 0
        try:
            generation = json.loads(text).get("generation", 0)
        except (ValueError, AttributeError):
            return 0
        return generation if isinstance(generation, int) and generation >= 0 else 0

    @staticmethod
    def _clean_siblings(path: Path) -> list[Path]:
        """Remove ``.<name>.creating-*`` / ``.deleting-*`` left beside ``path`` by dead processes."""
        return _clean_stale(path.parent, (f".{path.name}.creating-", f".{path.name}.deleting-"))

    @classmethod
    def _remove(cls, path: Path) -> None:
        if not path.exists():
            return
        if not path.is_dir():
            raise ConfigurationError(f"{path} exists and is not a directory; choose another path")
        if any(path.iterdir()) and not (path / _META).exists():
            raise ConfigurationError(
                f"{path} is a non-empty directory without {_META}: not a feature store, so "
                "overwrite_store=True refuses to delete it. Choose another path."
            )
        trash = path.with_name(f".{path.name}.deleting-{os.getpid()}-{_HOST}-{uuid.uuid4().hex}")
        os.replace(path, trash)  # atomic: the old store vanishes at once, then is deleted
        shutil.rmtree(trash, ignore_errors=True)

    @classmethod
    def _create(cls, path: Path, meta: dict[str, Any]) -> None:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if (path / _META).exists():
                return  # another process created it since open() looked
            raise ConfigurationError(
                f"{path} exists but holds no {_META}: it is not a feature store. Choose another "
                "path or empty it."
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigurationError(
                f"cannot create the feature store {path}: a parent is a file, not a folder"
            ) from None
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}-{_HOST}-{uuid.uuid4().hex}")
        try:
            tmp.mkdir()
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
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(err, path, "creating it") from None
            raise
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
                    raise StoreCorruptError(f"cannot read {file}: {err}. {_RECOMPUTE}.") from None
                if size != header + expected:
                    raise StoreCorruptError(
                        f"{file} has {size} bytes, expected {header + expected} for its layout: "
                        f"the store is damaged. {_RECOMPUTE}."
                    )
                self._headers[(kind, c)] = header

    # ------------------------------------------------------------------ identity (generation)
    def _check_same_store(self) -> None:
        """Raise :class:`StoreRewrittenError` unless ``path`` still names the store opened."""
        if self._dir_id is None:
            if not self._pinless:
                self._repin()
            return
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._dir_id
        except FileNotFoundError:
            same = False
        if not same:
            raise self._rewritten()

    def _repin(self) -> None:
        """After unpickling: pin ``path`` again if it holds the same generation and layout."""
        try:
            dir_fd, meta = self._pin(self.path)
        except (OSError, StoreCorruptError):
            raise self._rewritten() from None
        if dir_fd is None:  # pragma: no cover - Windows
            self._pinless = True
            return
        keys = ("generation", "layout", "settings", "integrity")
        if any(meta.get(k) != self._meta.get(k) for k in keys):
            os.close(dir_fd)
            raise self._rewritten(meta.get("generation"))
        st = os.fstat(dir_fd)
        self._dir_fd, self._dir_id = dir_fd, (st.st_dev, st.st_ino)

    def _rewritten(self, now: Any = None) -> StoreRewrittenError:
        if now is None:
            now = self._generation_at(self.path) if (self.path / _META).exists() else None
        state = f"generation {self.generation} → {now}" if now is not None else "it was deleted"
        return StoreRewrittenError(
            f"the feature store at {self.path} was rewritten by another process (or another "
            f"estimator's overwrite_store=True) since this estimator opened it ({state}): its "
            "rows no longer belong to this estimator. "
            "Refit (call fit again) to use the new store, or give each estimator its own store= "
            "path."
        )

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

    def _chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.n)

    def _n_pieces(self, chunk: int) -> int:
        start, stop = self._chunk_range(chunk)
        return math.ceil((stop - start) / self.piece_rows)

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int, int]]:
        """``(chunk, piece, first row, stop row)`` of every piece overlapping ``[start, stop)``."""
        if stop <= start:
            return
        for chunk in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1):
            c0, c1 = self._chunk_range(chunk)
            lo = (max(start, c0) - c0) // self.piece_rows
            hi = (min(stop, c1) - 1 - c0) // self.piece_rows
            for piece in range(lo, hi + 1):
                a = c0 + piece * self.piece_rows
                yield chunk, piece, a, min(a + self.piece_rows, c1)

    # ------------------------------------------------------------------ completion records
    def _done_dir(self) -> Path:
        return self.path / _DONE

    def _own_file(self) -> Path:
        return self._done_dir() / f"rank-{self.rank:05d}.json"

    def _lock_file(self) -> Path:
        return self._done_dir() / f"writer-{self.rank:05d}.lock"

    def _parse_record(self, line: str) -> tuple[tuple[int, int], dict[str, Any]]:
        record = json.loads(line)
        c, i = record["c"], record["i"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (c, i)):
            raise TypeError(f"checkpoint/chunk {c!r}/{i!r} are not integers")
        if not (0 <= c < self.checkpoints and 0 <= i < self.n_chunks):
            raise ValueError(f"checkpoint {c} / chunk {i} is outside this store's layout")
        features, norms, data = record["features"], record["norms"], record.get("data")
        if (
            not isinstance(features, list)
            or len(features) != self._n_pieces(i)
            or not all(isinstance(h, str) for h in features)
        ):
            raise ValueError(f"chunk {i} of checkpoint {c} has malformed feature checksums")
        if not isinstance(norms, str) or not (data is None or isinstance(data, str)):
            raise ValueError(f"chunk {i} of checkpoint {c} has a malformed record")
        return (c, i), {"features": features, "norms": norms, "data": data}

    def _load_file(self, file: Path) -> dict[tuple[int, int], dict[str, Any]]:
        with open(file, encoding="utf-8") as f:
            text = f.read()
        lines = text.split("\n")
        # an unterminated last line is a record torn by a kill: its chunk is simply not done
        complete, torn = lines[:-1], lines[-1]
        if torn and file.name == _ALL:
            raise ValueError("it ends in an unterminated line")
        records = {}
        for number, line in enumerate(complete, 1):
            if not line.strip():
                continue
            try:
                key, record = self._parse_record(line)
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"line {number}: {err}") from None
            records[key] = record
        return records

    def _load_records(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Union of every completion file: ``{(checkpoint, chunk): record}``."""
        self._check_same_store()
        for _ in range(100):
            records: dict[tuple[int, int], dict[str, Any]] = {}
            try:
                files = sorted(self._done_dir().glob("*.json"))
                # all.json first, then rank files (a later record of a chunk wins)
                files.sort(key=lambda p: p.name != _ALL)
                for file in files:
                    try:
                        records.update(self._load_file(file))
                    except FileNotFoundError:
                        raise
                    except (OSError, ValueError, UnicodeDecodeError) as err:
                        raise StoreCorruptError(
                            f"unreadable completion record {file}: {err}. Delete {file} and run "
                            "the fit again: deleting it recomputes the chunks it recorded (the "
                            "other chunks are kept)."
                        ) from None
            except FileNotFoundError:  # a concurrent finalize merged and removed a rank file
                continue
            self._records = records
            return records
        raise StoreCorruptError(f"completion records in {self._done_dir()} keep changing")

    def _completed(self) -> set[tuple[int, int]]:
        """``{(checkpoint, chunk)}`` recorded complete by any process."""
        return set(self._load_records())

    def _record(self, checkpoint: int, chunk: int) -> dict[str, Any] | None:
        record = self._records.get((checkpoint, chunk))
        if record is None:
            record = self._load_records().get((checkpoint, chunk))
        return record

    def done(self, checkpoint: int) -> list[int]:
        """Indices of the chunks of ``checkpoint`` recorded as complete (by any process)."""
        self._check_checkpoint(checkpoint)
        return sorted(i for c, i in self._completed() if c == checkpoint)

    def chunk_data_hash(self, checkpoint: int, chunk: int) -> str | None:
        """The ``data_hash`` recorded with chunk ``chunk`` of ``checkpoint``.

        ``None`` when the chunk is not complete or was recorded without one. A featurizer that
        hashes the training examples of each chunk compares it before resuming, and refuses a
        store whose training data changed (see :meth:`write_chunk`).
        """
        self._check_checkpoint(checkpoint)
        self._check_chunk(chunk)
        record = self._record(checkpoint, chunk)
        return None if record is None else record["data"]

    def pending(
        self, checkpoint: int, rank: int | None = None, world_size: int | None = None
    ) -> list[int]:
        """Chunk indices of ``checkpoint`` not yet complete that belong to ``rank``.

        Chunks are dealt round-robin: chunk ``i`` belongs to rank ``i % world_size``. Defaults
        are the store's own ``rank`` and ``world_size``. When this process has chunks to
        write, it takes the writer lock first.

        Raises:
            StoreBusyError: another process holds this rank's writer lock (is fitting the same
                store).
        """
        self._check_checkpoint(checkpoint)
        own = rank is None or rank == self.rank
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigurationError(f"need 0 <= rank < world_size, got {rank} and {world_size}")
        done = self._completed()
        todo = [i for i in range(rank, self.n_chunks, world_size) if (checkpoint, i) not in done]
        if todo and own:
            self._lock()
        return todo

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

    def _lock(self) -> None:
        if not _holds_lock(self._lock_file(), self._token):
            self._check_same_store()
            _acquire_lock(self._lock_file(), self.path, self.rank, self._token)

    def _unlock(self, everyone: bool = False) -> None:
        """Release this object's hold on the writer lock (``everyone``: this process's)."""
        _release_lock(self._lock_file(), None if everyone else self._token)

    def _checksums(self, checkpoint: int, chunk: int) -> dict[str, Any]:
        """Checksums of chunk ``chunk`` as stored on disk (read back through the write fds)."""
        start, stop = self._chunk_range(chunk)
        buffer = np.empty((stop - start, self.width), dtype=self._np_dtype)
        _pread_into(
            self._fd("features", checkpoint, write=True),
            memoryview(buffer).cast("B"),
            self._headers[("features", checkpoint)] + start * self._row_bytes,
            self._file("features", checkpoint),
        )
        norms = np.empty(stop - start, dtype=self._read_np)
        _pread_into(
            self._fd("norms", checkpoint, write=True),
            memoryview(norms).cast("B"),
            self._headers[("norms", checkpoint)] + start * self._norm_bytes,
            self._file("norms", checkpoint),
        )
        p = self.piece_rows
        return {
            "features": [
                self._hash(memoryview(buffer[a : a + p]).cast("B"))
                for a in range(0, stop - start, p)
            ],
            "norms": self._hash(memoryview(norms).cast("B")),
        }

    def mark_done(self, checkpoint: int, chunk: int, data_hash: str | None = None) -> None:
        """Record chunk ``chunk`` of ``checkpoint`` complete, after flushing its rows to disk.

        Every row of the chunk must have been written by this process (since :meth:`open`);
        otherwise :class:`ConfigurationError`. The record holds the chunk's checksums and
        ``data_hash`` (see :meth:`write_chunk`). See the module docstring for the ordering that
        makes this crash-safe.

        Raises:
            StoreRewrittenError: the store was overwritten by another process since it was
                opened (nothing is recorded in the new store).
            DiskFullError: no space left to record it.
        """
        self._check_checkpoint(checkpoint)
        self._check_chunk(chunk)
        if data_hash is not None and not isinstance(data_hash, str):
            raise ConfigurationError(f"data_hash must be a str or None, got {data_hash!r}")
        start, stop = self._chunk_range(chunk)
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
        self._lock()
        self._check_same_store()
        try:
            if self.durable:
                for kind in ("features", "norms"):
                    if (kind, checkpoint, True) in self._fds:
                        os.fsync(self._fds[(kind, checkpoint, True)])
            record = {"c": checkpoint, "i": chunk, **self._checksums(checkpoint, chunk)}
            record["data"] = data_hash
            line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
            fd = self._open_in_store(
                f"{_DONE}/{self._own_file().name}", os.O_RDWR | os.O_APPEND | os.O_CREAT
            )
            try:
                self._check_same_store()  # the file opened is this store's, not a newer one's
                _drop_torn_tail(fd)
                os.write(fd, line)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise self._rewritten() from None
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(
                    err, self.path, f"recording chunk {chunk} of checkpoint {checkpoint}"
                ) from None
            raise
        self._records[(checkpoint, chunk)] = {
            "features": record["features"],
            "norms": record["norms"],
            "data": data_hash,
        }
        self._written.pop((checkpoint, chunk), None)

    def write_chunk(
        self, checkpoint: int, chunk: int, rows: Tensor, data_hash: str | None = None
    ) -> None:
        """Write all rows of chunk ``chunk`` and record it complete: :meth:`write` + :meth:`mark_done`.

        ``data_hash``: any string identifying the training examples the rows were computed
        from (e.g. a hash of their tensors, computed while featurizing); it is recorded with the
        chunk and returned by :meth:`chunk_data_hash`, so a resumed fit can refuse a store whose
        data changed.
        """
        self._check_chunk(chunk)
        start, _ = self._chunk_range(chunk)
        self.write(checkpoint, start, rows)
        self.mark_done(checkpoint, chunk, data_hash)

    def finalize(self) -> bool:
        """Merge the per-rank completion files into one once the store is complete.

        Returns :meth:`is_complete`; an incomplete store is left untouched (so a rank still
        writing loses nothing). Call after every writer finished (after a barrier); safe to
        call from every rank at once. After it, a store written by several processes is
        byte-identical to one written by one process. Releases this process's writer lock
        when the store is complete.
        """
        records = self._load_records()
        if len(records) < self.checkpoints * self.n_chunks:
            return False
        lines = [
            json.dumps({"c": c, "i": i, **records[(c, i)]}, sort_keys=True) + "\n"
            for c, i in sorted(records)
        ]
        try:
            self._check_same_store()
            write_atomic(self._done_dir() / _ALL, "".join(lines), self.durable)
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(err, self.path, "finalizing it") from None
            raise
        # rank files, and temporary files left by writers killed while recording (none can
        # be in flight once every chunk is complete); never another finalize's all.json.tmp
        for pattern in ("rank-*.json", ".rank-*.tmp"):
            for file in self._done_dir().glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    file.unlink()
        # temporary all.json files of finalizes killed mid-write (their process is gone)
        _clean_stale(self._done_dir(), (f".{_ALL}.",))
        self._unlock(everyone=True)  # complete: no FeatureStore of this process writes again
        return True

    # ------------------------------------------------------------------ rows
    def _check_checkpoint(self, checkpoint: int) -> None:
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int):
            raise ConfigurationError(f"checkpoint must be an int, got {checkpoint!r}")
        if not 0 <= checkpoint < self.checkpoints:
            raise ConfigurationError(
                f"checkpoint must be in [0, {self.checkpoints}), got {checkpoint}"
            )

    def _check_chunk(self, chunk: int) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 <= chunk < self.n_chunks:
            raise ConfigurationError(f"chunk must be an int in [0, {self.n_chunks}), got {chunk!r}")

    def _file(self, kind: str, checkpoint: int) -> Path:
        return self.path / f"{kind}-{checkpoint:03d}.npy"

    def _fd(self, kind: str, checkpoint: int, write: bool = False) -> int:
        """A descriptor kept open (read-only unless ``write``, so read-only stores can be read)."""
        key = (kind, checkpoint, write)
        with self._fd_lock:  # reads may come from a prefetching thread
            if key not in self._fds:
                flags = (os.O_RDWR if write else os.O_RDONLY) | getattr(os, "O_BINARY", 0)
                self._check_same_store()
                try:
                    fd = self._open_in_store(self._file(kind, checkpoint).name, flags)
                except FileNotFoundError:
                    self._check_same_store()
                    raise StoreCorruptError(
                        f"{self._file(kind, checkpoint)} is missing. {_RECOMPUTE}."
                    ) from None
                try:
                    self._check_same_store()  # opened in this store, not in a newer one
                except BaseException:
                    os.close(fd)
                    raise
                self._fds[key] = fd
            return self._fds[key]

    def _open_in_store(self, relative: str, flags: int) -> int:
        """``os.open`` of a file of *this* store directory (the pinned one, even if renamed)."""
        flags |= getattr(os, "O_CLOEXEC", 0)
        if self._dir_fd is not None and os.open in os.supports_dir_fd:
            return os.open(relative, flags, 0o644, dir_fd=self._dir_fd)
        return os.open(self.path / relative, flags, 0o644)  # pragma: no cover - Windows

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n if stop is None else stop
        if not 0 <= start <= stop <= self.n:
            raise ConfigurationError(f"rows [{start}, {stop}) are outside [0, {self.n})")
        return start, stop

    def write(self, checkpoint: int, start: int, rows: Tensor) -> None:
        """Write ``rows`` ``[b, width]`` at rows ``[start, start + b)`` of ``checkpoint``.

        Rows are cast to the store's dtype; their norms (of the stored values) are written too.
        Nothing is recorded complete until :meth:`mark_done`. Takes the writer lock.

        Raises:
            NonFiniteGradientError: a row holds NaN or infinity (the message names the
                checkpoint, the rows and the first offending row; nothing is written).
            ConfigurationError: wrong shape or range, or a value beyond float16's range.
            StoreBusyError: another process is writing this store.
            StoreRewrittenError: the store was overwritten since it was opened.
            DiskFullError: no space left on the device.
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
        if not bool(torch.isfinite(rows.sum())):
            bad = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten()
            if len(bad):
                first = start + int(bad[0])
                raise NonFiniteGradientError(
                    f"rows [{start}, {stop}) of checkpoint {checkpoint} hold NaN or infinity: "
                    f"{len(bad)} rows, the first is row {first} (chunk "
                    f"{first // self.chunk_size}). Nothing was written. These training "
                    "examples' features are not finite: check their inputs and labels, or the "
                    "checkpoint."
                )
        stored = rows.to(_TORCH_DTYPES[self.dtype]).contiguous()
        if stored.dtype != rows.dtype and not bool(torch.isfinite(stored.sum(dtype=torch.float64))):
            big = float(rows.abs().max())
            wider = "float32" if self.dtype == "float16" else "float64"
            raise ConfigurationError(
                f"rows [{start}, {stop}) of checkpoint {checkpoint} hold values up to {big:.3g}, "
                f"beyond {self.dtype}'s range ({torch.finfo(stored.dtype).max:.6g}): use "
                f"dtype='{wider}' or scale the features"
            )
        array = stored.numpy()
        # float64 accumulation without a float64 copy of the rows
        norms64 = torch.linalg.vector_norm(stored, dim=1, dtype=torch.float64).numpy()
        if float(norms64.max()) > float(np.finfo(self._read_np).max):
            raise NonFiniteGradientError(
                f"rows [{start}, {stop}) of checkpoint {checkpoint}: a norm overflows "
                f"{self._read_np} (values up to {float(rows.abs().max()):.3g}); use "
                "dtype='float64' or scale the features"
            )
        norms = norms64.astype(self._read_np)
        self._lock()
        self._check_same_store()
        try:
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
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise _disk_full(
                    err, self.path, f"writing rows [{start}, {stop}) of checkpoint {checkpoint}"
                ) from None
            raise
        for i in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1):
            self._written.setdefault((checkpoint, i), []).append((start, stop))

    # ------------------------------------------------------------------ verified reads
    def _stamp(self, fd: int) -> tuple[int, ...]:
        st = os.fstat(fd)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _verified_set(self, kind: str, checkpoint: int, stamp: tuple[int, ...]) -> set:
        cached = self._verified.get((kind, checkpoint))
        if cached is None or cached[0] != stamp:
            cached = (stamp, set())
            self._verified[(kind, checkpoint)] = cached
        return cached[1]

    def _corrupt(
        self, kind: str, checkpoint: int, chunk: int, first: int, stop: int, values: np.ndarray
    ) -> StoreCorruptError:
        finite = np.isfinite(values)
        what = ""
        if not finite.all():
            rows = np.nonzero(~finite.reshape(len(finite), -1).all(axis=1))[0]
            what = f"; row {first + int(rows[0])} holds NaN or infinity"
        return StoreCorruptError(
            f"checksum mismatch in {self._file(kind, checkpoint)}: checkpoint {checkpoint}, "
            f"chunk {chunk}, rows [{first}, {stop}){what}. The file changed after the chunk was "
            f"written (a disk fault, another program, or an edit). {_RECOMPUTE} (only the "
            f"damaged chunks are recomputed if you delete {self._done_dir()} instead)."
        )

    def _verified_read(
        self, kind: str, checkpoint: int, start: int, stop: int, buffer: np.ndarray | None
    ) -> np.ndarray:
        """Rows ``[start, stop)`` of ``kind`` (stored dtype), checked against their checksums.

        Reads into ``buffer`` when given and no extension is needed. Unrecorded (incomplete)
        chunks are returned as they are.
        """
        self._check_same_store()
        features = kind == "features"
        dtype = self._np_dtype if features else self._read_np
        row_shape = (self.width,) if features else ()
        row_bytes = self._row_bytes if features else self._norm_bytes
        fd = self._fd(kind, checkpoint)
        todo: list[tuple[int, int, int, int, dict[str, Any]]] = []
        if self.verify_reads and stop > start:
            stamp = self._stamp(fd)
            verified = self._verified_set(kind, checkpoint, stamp)
            if features:
                units = self._pieces(start, stop)
            else:
                units = (
                    (i, 0, *self._chunk_range(i))
                    for i in range(start // self.chunk_size, (stop - 1) // self.chunk_size + 1)
                )
            unverified = [u for u in units if (u[0], u[1]) not in verified]
            if any((checkpoint, u[0]) not in self._records for u in unverified):
                self._load_records()  # chunks completed since (by any process)
            todo = [
                (*u, self._records[(checkpoint, u[0])])
                for u in unverified
                if (checkpoint, u[0]) in self._records
            ]
        a = min([start] + [u[2] for u in todo])
        b = max([stop] + [u[3] for u in todo])
        if buffer is None or (a, b) != (start, stop):
            data = np.empty((b - a, *row_shape), dtype=dtype)
        else:
            data = buffer
        if b > a:
            _pread_into(
                fd,
                memoryview(data).cast("B"),
                self._headers[(kind, checkpoint)] + a * row_bytes,
                self._file(kind, checkpoint),
            )
        if todo:
            racy = time.time_ns() - int(RACY_SECONDS * 1e9)
            remember = stamp[3] < racy and stamp[2] < racy
            for chunk, piece, first, last, record in todo:
                expected = record["features"][piece] if features else record["norms"]
                part = data[first - a : last - a]
                if self._hash(memoryview(np.ascontiguousarray(part)).cast("B")) != expected:
                    raise self._corrupt(kind, checkpoint, chunk, first, last, part)
                if remember:
                    verified.add((chunk, piece))
        if (a, b) != (start, stop):
            data = data[start - a : stop - a]
            if buffer is not None:
                buffer[...] = data
                return buffer
        return data

    def verify(self, checkpoint: int | None = None) -> None:
        """Read and verify every recorded chunk (of ``checkpoint``, or of all checkpoints).

        Raises:
            StoreCorruptError: a chunk's bytes differ from its checksum (the message names the
                file, checkpoint, chunk and rows).
        """
        checkpoints = range(self.checkpoints) if checkpoint is None else [checkpoint]
        for c in checkpoints:
            self._check_checkpoint(c)
            for start, stop in self.chunks():
                self._verified_read("features", c, start, stop, None)
                self._verified_read("norms", c, start, stop, None)

    def read(
        self, checkpoint: int, start: int = 0, stop: int | None = None, *, out: Tensor | None = None
    ) -> Tensor:
        """Rows ``[start, stop)`` of ``checkpoint`` as a :attr:`read_dtype` tensor ``[rows, width]``.

        Reads only those rows (plus, for verification, the rest of the checksummed pieces at
        both ends; no mapping of the whole file). ``out``: a contiguous :attr:`read_dtype`
        tensor of that shape to read into (reused buffers keep memory flat in loops). Does not
        check completeness: use :meth:`require_complete` before trusting results.

        Raises:
            StoreCorruptError: the rows' bytes differ from their recorded checksums.
            StoreRewrittenError: the store was overwritten since it was opened.
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
        buffer = out.numpy() if direct and out is not None else None
        data = self._verified_read("features", checkpoint, start, stop, buffer)
        if out is None:
            return torch.from_numpy(data).to(self.read_dtype)
        if data is not buffer:
            out.copy_(torch.from_numpy(data))
        return out

    def norms(self, checkpoint: int, start: int = 0, stop: int | None = None) -> Tensor:
        """Euclidean norms of the stored rows ``[start, stop)``, :attr:`read_dtype` ``[rows]``.

        Verified against the chunks' norm checksums like :meth:`read`.
        """
        self._check_checkpoint(checkpoint)
        start, stop = self._range(start, stop)
        data = self._verified_read("norms", checkpoint, start, stop, None)
        return torch.from_numpy(np.ascontiguousarray(data))

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
        """Read-only ``numpy`` memory map of ``checkpoint``'s whole ``[n, width]`` array.

        The recorded chunks are verified first (one full read); later changes to the file are
        not seen by the map's reads, so prefer :meth:`read` / :meth:`iter_chunks`.
        """
        self._check_checkpoint(checkpoint)
        self.verify(checkpoint)
        return np.memmap(  # layout from meta.json, not from the file's (unchecksummed) header
            self._file("features", checkpoint),
            dtype=self._np_dtype,
            mode="r",
            offset=self._headers[("features", checkpoint)],
            shape=(self.n, self.width),
        )

    def content_fingerprint(self) -> str:
        """SHA-256 of the metadata and every completion record (checksums and data hashes).

        Changes whenever the store's settings or any recorded chunk's bytes change; equal
        fingerprints mean equal contents (up to the checksum's strength). Cheap: no rows read.
        """
        records = self._load_records()
        digest = hashlib.sha256((self.path / _META).read_bytes())
        for key in sorted(records):
            digest.update(json.dumps([*key, records[key]], sort_keys=True).encode())
        return digest.hexdigest()

    def close(self) -> None:
        """Close open data file descriptors (reopened on demand) and release the writer lock."""
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._unlock()

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. to spawned workers): descriptors, locks and unrecorded writes stay.

        The copy pins the store again on first use and refuses it if its generation changed.
        """
        state = self.__dict__.copy()
        state.update(
            _fds={},
            _fd_lock=None,
            _written={},
            _verified={},
            _token=uuid.uuid4().hex,
            _dir_fd=None,
            _dir_id=None,
            _pinless=False,
            _hash=None,
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd_lock = threading.Lock()
        self._hash = _checksum_function(self.checksum, self.path)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
        with contextlib.suppress(Exception):
            if self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
