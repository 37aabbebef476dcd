"""Cost of verifying the FeatureStore's checksums on read: read time with and without it.

A store of ``n × width`` float32 rows per checkpoint is written once (``durable=False``), read
once to put it in the page cache, then read block by block as the exact top-k search reads it
(all checkpoints of one block of rows at a time, into reused buffers), in four ways:

- ``off``: ``verify=False`` — plain ``pread``, the baseline;
- ``first pass``: a freshly opened store, so every piece is hashed once (what the first read
  of a store costs in a process);
- ``repeated``: the same store object again, file unchanged (and older than ``RACY_SECONDS``):
  pieces are remembered, so a read costs one ``fstat`` — what every later pass costs;
- ``top-k off / first``: a whole exact top-k search for ``--queries`` queries, without and
  with verification (first pass), i.e. the overhead a user sees on a search.

Each is timed ``--repeat`` times (median); wall and CPU time (``time.process_time``, all
threads) are printed side by side, with the overhead against ``off``. Warm page cache is the
worst case for the relative overhead (a read from disk is slower, the hash is not). Run with
``--checksum crc32`` to see the standard-library fallback used when ``xxhash`` is missing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/store_checksum_overhead.py \\
        [--n 16384] [--width 1024] [--checkpoints 2] [--queries 8] [--repeat 5] \\
        [--checksum xxh3_64|crc32] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from traintrace.features import store as store_module
from traintrace.features.store import FeatureStore
from traintrace.retrieval.exact import _block_rows, exact_top_k

SETTINGS = {"benchmark": "store_checksum_overhead"}


def open_store(args: argparse.Namespace, verify: bool = True) -> FeatureStore:
    return FeatureStore.open(
        args.path,
        SETTINGS,
        n=args.n,
        width=args.width,
        checkpoints=args.checkpoints,
        durable=False,
        verify=verify,
    )


def write(args: argparse.Namespace) -> None:
    store = open_store(args)
    g = torch.Generator().manual_seed(0)
    for c in range(args.checkpoints):
        for i in store.pending(c):
            lo, hi = store.chunks()[i]
            store.write_chunk(c, i, torch.randn(hi - lo, args.width, generator=g))
    assert store.finalize()
    store.close()


def read_pass(store: FeatureStore) -> float:
    """Read every block of rows of every checkpoint (as exact_top_k does); returns a checksum."""
    rows = _block_rows(store, 1, None)
    buffers = torch.empty(store.checkpoints, rows, store.width)
    total = 0.0
    for start in range(0, store.n, rows):
        stop = min(start + rows, store.n)
        for c in range(store.checkpoints):
            block = store.read(c, start, stop, out=buffers[c, : stop - start])
            total += float(block[0, 0])
    return total


def timed(
    fn: Callable[[FeatureStore], object], stores: Callable[[], FeatureStore], repeat: int
) -> tuple[float, float]:
    """Median wall and CPU seconds of ``fn(store)`` over ``repeat`` runs (stores made untimed)."""
    walls, cpus = [], []
    for _ in range(repeat):
        store = stores()
        wall, cpu = time.perf_counter(), time.process_time()
        fn(store)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--checksum", choices=["xxh3_64", "crc32"], default=None)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if args.checksum is not None:
        store_module._default_checksum = lambda: args.checksum  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        args.path = str(Path(tmp) / "store")
        write(args)
        # older than RACY_SECONDS, so verified pieces may be remembered
        time.sleep(store_module.RACY_SECONDS + 0.5)
        plain = open_store(args, verify=False)
        read_pass(plain)  # page cache warm
        size = args.n * args.width * args.checkpoints * 4
        g = torch.Generator().manual_seed(1)
        queries = [torch.randn(args.queries, args.width, generator=g)] * args.checkpoints
        weights = [1.0] * args.checkpoints
        verified = open_store(args)
        print(
            f"store: {args.checkpoints} × {args.n} × {args.width} float32 = {size / 2**20:.0f} MiB, "
            f"checksum {verified.checksum}, pieces of {verified.piece_rows} rows, "
            f"blocks of {_block_rows(plain, 1, None)} rows; median of {args.repeat}"
        )
        fresh = lambda: open_store(args)  # noqa: E731 - a new store: nothing verified yet
        search = lambda store: exact_top_k(store, queries, weights, 10)  # noqa: E731
        rows = {
            "off": timed(read_pass, lambda: plain, args.repeat),
            "first pass": timed(read_pass, fresh, args.repeat),
        }
        read_pass(verified)
        rows["repeated"] = timed(read_pass, lambda: verified, args.repeat)
        rows["top-k off"] = timed(search, lambda: plain, args.repeat)
        rows["top-k first"] = timed(search, fresh, args.repeat)
        rows["top-k again"] = timed(search, lambda: verified, args.repeat)
        print(f"{'read':<12} {'wall s':>8} {'cpu s':>8} {'GB/s':>7} {'wall +%':>8} {'cpu +%':>8}")
        for name, (wall, cpu) in rows.items():
            base = rows["top-k off" if name.startswith("top-k") else "off"]
            print(
                f"{name:<12} {wall:8.3f} {cpu:8.3f} {size / wall / 1e9:7.2f} "
                f"{100 * (wall / base[0] - 1):+8.1f} {100 * (cpu / base[1] - 1):+8.1f}"
            )


if __name__ == "__main__":
    main()
