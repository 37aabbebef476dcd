"""Fit TracIn into a store: the subject of the process-level tests (torchrun, SIGKILL resume).

    python fit_tracin.py STORE [--slow SECONDS]         # one process
    torchrun --standalone --nproc_per_node 2 fit_tracin.py STORE    # two ranks (gloo)

The model, data and checkpoints are deterministic, so every run computes the same features.
``--slow`` sleeps in every ``__getitem__`` so a test can kill the run part-way.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

import traintrace as tt


class Data(Dataset):
    def __init__(self, slow: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(60, 6, generator=g)
        self.y = torch.randint(0, 3, (60,), generator=g)
        self.slow = slow

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if self.slow:
            time.sleep(self.slow)
        return self.x[i], self.y[i]


def model_and_checkpoints() -> tuple[nn.Module, list[tt.Checkpoint]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ckpts = []
    for c in range(2):
        state = {k: v + 0.1 * c for k, v in model.state_dict().items()}
        ckpts.append(tt.Checkpoint(state, lr=0.1 / (c + 1), name=f"c{c}"))
    return model, ckpts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--projection", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    model, ckpts = model_and_checkpoints()
    est = tt.TracIn(
        model,
        tt.Classification(),
        ckpts,
        projection=args.projection or None,
        store=args.store,
        chunk_size=8,
        batch_size=4,
        progress=False,
    )
    est.fit(Data(args.slow))
    if distributed:
        dist.destroy_process_group()
    print("done", flush=True)


if __name__ == "__main__":
    main()
