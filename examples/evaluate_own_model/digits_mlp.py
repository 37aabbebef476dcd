"""A small "own project" for ``traintrace evaluate --config evaluate.toml``.

An MLP 64-32-10 trained by full-batch gradient descent on 300 of scikit-learn's digits (bundled
with scikit-learn: nothing is downloaded); 50 other digits are the queries. ``python
digits_mlp.py`` trains it and saves five checkpoints with their optimizer state into ``ckpt/``;
``train_fn`` is the same training on a subset, which ``traintrace evaluate`` calls to build the
ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

N_TRAIN, N_QUERY, STEPS, LR = 300, 50, 300, 0.5


def make_model() -> nn.Module:
    """The architecture (its initial weights do not matter: checkpoints are loaded into it)."""
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    return x, torch.tensor(digits.target[order], dtype=torch.long)


def train_set() -> TensorDataset:
    x, y = _digits()
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN])


def test_set() -> TensorDataset:
    x, y = _digits()
    return TensorDataset(x[N_TRAIN : N_TRAIN + N_QUERY], y[N_TRAIN : N_TRAIN + N_QUERY])


def _train(indices: np.ndarray, seed: int, save_to: Path | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model()
    x, y = train_set().tensors
    idx = torch.as_tensor(indices, dtype=torch.long)
    x, y = x[idx], y[idx]
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=1e-3)
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if save_to is not None and step % (STEPS // 5) == 0:
            save_to.mkdir(parents=True, exist_ok=True)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            torch.save(state, save_to / f"step_{step}.pt")
    return model


def train_fn(indices: np.ndarray, seed: int) -> nn.Module:
    """A fresh model trained on the training examples at ``indices``, deterministic in ``seed``."""
    return _train(indices, seed)


if __name__ == "__main__":
    _train(np.arange(N_TRAIN), seed=0, save_to=Path(__file__).parent / "ckpt")
    print("checkpoints saved in", Path(__file__).parent / "ckpt")
