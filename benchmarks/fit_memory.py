"""Peak memory of ``TracIn.fit`` at n and 10n training examples: it should stay flat.

Each measurement runs in a fresh process (peak RSS, ``ru_maxrss``) on a data set that makes its
examples on demand from their index, so the data itself takes no memory; the features go to
the on-disk store. Printed as the ratio of the peak RSS growth at 10n to that at n (target
<= 1.2), measured in one run:

    .venv/bin/python benchmarks/fit_memory.py [--n 20000] [--projection 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

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


def child(n: int, projection: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    ckpts = [tt.Checkpoint(model.state_dict(), lr=0.1), tt.Checkpoint(model.state_dict(), lr=0.05)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as d:
        est = tt.TracIn(
            model,
            tt.Classification(),
            ckpts,
            projection=projection,
            store=d + "/s",
            batch_size=256,
            progress=False,
        )
        est.fit(Synthetic(n))
        est.top_k(Synthetic(64), k=10)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_mib": (after - before) / 1024, "peak_mib": after / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--projection", type=int, default=1024)
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
            f"n={n:>7}: peak RSS {results[n]['peak_mib']:.1f} MiB, growth during fit+top-k {results[n]['growth_mib']:.1f} MiB"
        )
    small, large = results[args.n]["growth_mib"], results[10 * args.n]["growth_mib"]
    print(f"ratio of growth 10n / n = {large / max(small, 1e-9):.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
