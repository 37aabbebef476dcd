"""Peak anonymous memory of ``TracIn`` fit + top-k at n and 10n training examples: flat in n.

Each measurement runs in a fresh process on a data set that makes its examples on demand from
their index, so the data itself takes no memory. Peak ``RssAnon`` (heap and tensors, not the
file-backed pages of a memory-mapped store) is sampled every 10 ms. ``--projection 0`` (the
default) is the exact streaming path (nothing stored); ``--projection k`` the projected store.
Printed as the ratio of the peaks at 10n and n (target <= 1.1), measured in one run:

    .venv/bin/python benchmarks/fit_memory.py [--n 20000] [--projection 0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading

import torch
from torch import nn
from torch.utils.data import Dataset

import traintrace as tt


class Synthetic(Dataset):
    """Example ``i`` is generated from seed ``i``: constant memory whatever ``n`` is."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(256, generator=g), int(torch.randint(0, 10, (1,), generator=g))


def _rss_anon() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(n: int, projection: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    ckpts = [tt.Checkpoint(model.state_dict(), lr=0.1), tt.Checkpoint(model.state_dict(), lr=0.05)]
    before = _rss_anon()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    with tempfile.TemporaryDirectory() as d:
        est = tt.TracIn(
            model,
            tt.Classification(),
            ckpts,
            projection=projection or None,
            store=d + "/s" if projection else None,
            batch_size=256,
            progress=False,
        )
        est.fit(Synthetic(n))
        est.top_k(Synthetic(64), k=10)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], _rss_anon())
    print(json.dumps({"growth_mib": peak[0] - before, "peak_mib": peak[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--projection", type=int, default=0, help="0: exact streaming")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.projection)
        return
    results = {}
    for n in (args.n, 10 * args.n):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--projection", str(args.projection)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results[n] = json.loads(out.strip().splitlines()[-1])
        print(
            f"n={n:>7}: peak RssAnon {results[n]['peak_mib']:.1f} MiB, growth during fit+top-k "
            f"{results[n]['growth_mib']:.1f} MiB"
        )
    small, large = results[args.n]["peak_mib"], results[10 * args.n]["peak_mib"]
    print(f"ratio of peak RssAnon 10n / n = {large / max(small, 1e-9):.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
