"""FeatureStore memory flatness and exact top-k speed, as ratios measured in one run.

(b) Peak memory growth (``ru_maxrss`` after the work minus before it, each in a fresh
    subprocess) of writing a store, and of an exact top-k search over it, at ``n`` and ``10n``
    training rows. Flat memory means ratio(10n / n) ≈ 1 (target <= 1.2): nothing held grows
    with the training set. Reads and writes use ``pread``/``pwrite`` of one block, so the page
    cache is not counted in the process's RSS.
(c) Time of an exact top-k search for a batch of queries over the ``10n`` store, divided by the
    time of one plain read pass over the same store (every block read into memory and summed,
    no matrix products) with the files already in the page cache. Target <= 2: the search costs
    little more than reading the store once. The search is bound by reading for small query
    batches and by the matrix products (``2 m`` flops per stored value) for large ones, so the
    ratio is printed for several batch sizes ``m`` (``--queries``, comma-separated).

    .venv/bin/python benchmarks/store_memory_and_topk.py [--n 20000] [--width 512]
        [--checkpoints 2] [--queries 8,32] [--k 10] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from traintrace.features.store import FeatureStore
from traintrace.retrieval.exact import BLOCK_VALUES, exact_top_k


def peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def open_store(path: str, n: int, width: int, checkpoints: int) -> FeatureStore:
    return FeatureStore.open(
        path, {"benchmark": "store_memory_and_topk"}, n=n, width=width, checkpoints=checkpoints
    )


def queries(args: argparse.Namespace, m: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(m, args.width, generator=g) for _ in range(args.checkpoints)]


def role_write(args: argparse.Namespace) -> dict[str, float]:
    store = open_store(args.path, args.n, args.width, args.checkpoints)
    g = torch.Generator().manual_seed(0)
    before = peak_kib()
    start = time.perf_counter()
    for c in range(args.checkpoints):
        for i in store.pending(c):
            lo, hi = store.chunks()[i]
            store.write_chunk(c, i, torch.randn(hi - lo, args.width, generator=g))
    assert store.finalize()
    return {"growth_mib": (peak_kib() - before) / 1024, "seconds": time.perf_counter() - start}


def role_topk(args: argparse.Namespace) -> dict[str, float]:
    store = open_store(args.path, args.n, args.width, args.checkpoints)
    q = queries(args, max(args.queries))
    weights = [1.0 / (c + 1) for c in range(args.checkpoints)]
    before = peak_kib()
    start = time.perf_counter()
    exact_top_k(store, q, weights, args.k)
    return {"growth_mib": (peak_kib() - before) / 1024, "seconds": time.perf_counter() - start}


def run_role(role: str, args: argparse.Namespace, path: Path, n: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--role", role, "--path", str(path), "--n", str(n)]
    for name in ("width", "checkpoints", "k"):
        cmd += [f"--{name}", str(getattr(args, name))]
    cmd += ["--queries", ",".join(map(str, args.queries))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def read_pass(store: FeatureStore, rows: int) -> float:
    """One pass over every row of every checkpoint: read into one reused buffer, then summed."""
    buffer = torch.empty(rows, store.width)
    start = time.perf_counter()
    total = 0.0
    for lo in range(0, store.n, rows):
        hi = min(lo + rows, store.n)
        for c in range(store.checkpoints):
            total += float(store.read(c, lo, hi, out=buffer[: hi - lo]).sum())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="rows of the small store")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument(
        "--queries",
        type=lambda text: [int(m) for m in text.split(",")],
        default=[8, 32],
        help="query batch sizes (comma-separated); memory (b) uses the largest",
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to put the temporary stores")
    parser.add_argument("--role", choices=["write", "topk"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        result = role_write(args) if args.role == "write" else role_topk(args)
        print(json.dumps(result))
        return

    root = Path(tempfile.mkdtemp(prefix="traintrace-bench-", dir=args.dir))
    try:
        sizes = {"n": args.n, "10n": 10 * args.n}
        rows = {}
        for label, n in sizes.items():
            path = root / label
            rows[label] = {"write": run_role("write", args, path, n)}
            rows[label]["topk"] = run_role("topk", args, path, n)
        gib = 10 * args.n * args.width * args.checkpoints * 4 / 2**30
        print(
            f"FeatureStore benchmark: width {args.width}, {args.checkpoints} checkpoints, float32, "
            f"k={args.k}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads"
        )
        print(
            f"(b) peak RSS growth in a fresh process (MiB), top-k of {max(args.queries)} queries:"
        )
        for what in ("write", "topk"):
            small, large = rows["n"][what]["growth_mib"], rows["10n"][what]["growth_mib"]
            print(
                f"    {what:5s}  n={args.n}: {small:7.1f}   10n={10 * args.n}: {large:7.1f}   "
                f"ratio 10n/n = {large / max(small, 1e-9):.2f}   "
                f"(10n took {rows['10n'][what]['seconds']:.2f} s)"
            )

        # (c) in this process, on the 10n store, page cache warm
        store = open_store(str(root / "10n"), 10 * args.n, args.width, args.checkpoints)
        block = BLOCK_VALUES // (args.width * args.checkpoints)
        weights = [1.0 / (c + 1) for c in range(args.checkpoints)]
        read_pass(store, block)  # warm the page cache
        reads: list[float] = []
        searches: dict[int, list[float]] = {m: [] for m in args.queries}
        for _ in range(args.repeats):  # interleaved, so background load hits all alike
            reads.append(read_pass(store, block))
            for m in args.queries:
                q = queries(args, m)
                start = time.perf_counter()
                exact_top_k(store, q, weights, args.k)
                searches[m].append(time.perf_counter() - start)
        read = statistics.median(reads)
        print(f"(c) store of {gib:.2f} GiB in page cache, median of {args.repeats}:")
        print(f"    one read pass (blocks read and summed): {read:.3f} s ({gib / read:.2f} GiB/s)")
        for m, times in searches.items():
            search = statistics.median(times)
            print(
                f"    exact top-k, {m:3d} queries: {search:.3f} s   ratio top-k / read = "
                f"{search / read:.2f}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
