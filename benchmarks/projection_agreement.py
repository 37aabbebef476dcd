"""Agreement of projected with exact TracIn as a function of the projection size k.

For each k and projection kind: the per-query Spearman correlation between projected and exact
TracIn scores over the training set (mean and worst query), and the overlap of their top-10
proponents, on an MLP trained on digits with a few checkpoints. Measured in one run:

    .venv/bin/python benchmarks/projection_agreement.py [--ks 64 256 1024 4096]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument("--kinds", nargs="+", default=["kronecker", "gaussian", "sjlt"])
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train, queries = TensorDataset(x[: args.n], y[: args.n]), TensorDataset(x[-40:], y[-40:])
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpts = []
    for epoch in range(6):
        for i in range(0, args.n, 32):
            opt.zero_grad()
            F.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
        if epoch % 2 == 1:
            ckpts.append(
                tt.Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, lr=0.1)
            )
    p = sum(q.numel() for q in model.parameters())
    exact = tt.TracIn(model, tt.Classification(), ckpts, progress=False).fit(train).score(queries)
    top_exact = exact.topk(10, dim=1).indices
    print(
        f"MLP with P={p:,} parameters, {args.n} training examples, {len(ckpts)} checkpoints, 40 queries"
    )
    print(
        f"{'kind':<10}{'k':>6}{'width':>7}{'Spearman mean':>15}{'worst':>8}{'top-10 overlap':>16}"
    )
    for kind in args.kinds:
        for k in args.ks:
            est = tt.TracIn(
                model,
                tt.Classification(),
                ckpts,
                projection=tt.Projection(k, kind=kind),
                progress=False,
            )
            scores = est.fit(train).score(queries)
            rho = np.array([spearmanr(a, b).statistic for a, b in zip(scores, exact, strict=True)])
            top = scores.topk(10, dim=1).indices
            overlap = np.mean(
                [
                    len(set(a.tolist()) & set(b.tolist())) / 10
                    for a, b in zip(top, top_exact, strict=True)
                ]
            )
            print(
                f"{kind:<10}{k:>6}{est.store_.width:>7}{rho.mean():>15.3f}{rho.min():>8.3f}{overlap:>16.2f}"
            )


if __name__ == "__main__":
    main()
