"""Featurizing cost relative to training: time of TracIn.fit per checkpoint / one training epoch.

Both are measured in this one run on the same data and model (an MLP of about 1M parameters),
so the ratio is meaningful on a shared, noisy machine where absolute seconds are not. The
physical limit for exact per-example gradients is about one forward and one backward pass per
example; materializing ``batch × P`` gradients and copying them into the feature matrix costs
more, which is what this ratio shows (benchmarks/featurize_projections.py measures the
Kronecker projection, which needs no per-example gradient).

    .venv/bin/python benchmarks/featurize_vs_epoch.py [--n 512] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import traintrace as tt


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def one_epoch(model: nn.Module, loader: DataLoader, opt: torch.optim.Optimizer) -> float:
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="training examples")
    parser.add_argument("--batch", type=int, default=64, help="batch size for both")
    parser.add_argument("--repeats", type=int, default=3, help="timings per side (median)")
    parser.add_argument(
        "--n-large", type=int, default=16384, help="examples for the Kronecker-only measurement"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    model = mlp()
    n_params = sum(p.numel() for p in model.parameters())
    data = TensorDataset(torch.randn(args.n, 784), torch.randint(0, 10, (args.n,)))
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    one_epoch(model, loader, opt)  # warm-up
    ckpt = tt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=1e-3)

    epoch_times, fit_times, kron_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so background load hits all sides alike
        epoch_times.append(one_epoch(model, loader, opt))
        for projection, times in ((None, fit_times), (4096, kron_times)):
            est = tt.TracIn(
                model, tt.Classification(), [ckpt], projection=projection, progress=False
            )
            start = time.perf_counter()
            est.fit(loader)
            times.append(time.perf_counter() - start)
            del est

    epoch, fit = statistics.median(epoch_times), statistics.median(fit_times)
    kron = statistics.median(kron_times)
    print(
        f"MLP with {n_params:,} parameters, {args.n} examples, batch {args.batch}, torch {torch.__version__}"
    )
    print(f"one training epoch (forward+backward+step): {epoch:.3f} s (median of {args.repeats})")
    print(f"TracIn.fit, one checkpoint, exact vmap gradients into the store: {fit:.3f} s")
    print(f"ratio featurize / epoch = {fit / epoch:.1f} (exact: {n_params:,} numbers per example)")
    print(f"TracIn.fit with projection=4096 (Kronecker) into the store: {kron:.3f} s")
    print(f"ratio featurize / epoch = {kron / epoch:.2f} (Kronecker projection)")

    # Fixed costs per fit (checkpoint fingerprint, store creation) dominate at 512 examples;
    # the exact path cannot go much larger (n × P floats on disk), the projected one can.
    big = TensorDataset(torch.randn(args.n_large, 784), torch.randint(0, 10, (args.n_large,)))
    big_loader = DataLoader(big, batch_size=args.batch, shuffle=False)
    epochs, fits = [], []
    for _ in range(args.repeats):
        epochs.append(one_epoch(model, big_loader, opt))
        est = tt.TracIn(model, tt.Classification(), [ckpt], projection=4096, progress=False)
        start = time.perf_counter()
        est.fit(big_loader)
        fits.append(time.perf_counter() - start)
    big_epoch, big_fit = statistics.median(epochs), statistics.median(fits)
    print(
        f"{args.n_large} examples: epoch {big_epoch:.3f} s, Kronecker fit {big_fit:.3f} s, "
        f"ratio featurize / epoch = {big_fit / big_epoch:.2f}"
    )


if __name__ == "__main__":
    main()
