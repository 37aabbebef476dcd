"""Brute-force references and tiny models shared by the tests.

Everything here is computed the slow, obvious way: one ``torch.autograd.grad`` call per
example on a model with the checkpoint loaded into it, explicit dot products and sums.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 7, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).flatten(1))


class KwargModel(nn.Module):
    """Takes keyword inputs like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, pixel_values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(pixel_values)) * scale[:, None])


class DictDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.s, self.y = x, s, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "scale": self.s[i], "labels": self.y[i]}


def perturbed_states(model: nn.Module, count: int, seed: int = 0, scale: float = 0.3) -> list:
    """``count`` different states of ``model`` (random perturbations), as checkpoints would be."""
    gen = torch.Generator().manual_seed(seed)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.update({name: first[id(p)]} if id(p) in first else {})
        first.setdefault(id(p), name)
    states = []
    for _ in range(count):
        st = {k: v.clone() for k, v in model.state_dict().items()}
        for k, v in st.items():
            if v.is_floating_point() and "running_var" not in k and k not in aliases:
                v.add_(scale * torch.randn(v.shape, generator=gen, dtype=v.dtype))
        for alias, canonical in aliases.items():  # tied weights stay tied, as in a real checkpoint
            st[alias] = st[canonical]
        states.append(st)
    return states


def loop_gradients(
    model: nn.Module, state: dict, examples: list, value_fn, names=None
) -> torch.Tensor:
    """``[n, P]``: one ``autograd.grad`` per example of ``value_fn(model, example)``."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    params = [p for n, p in m.named_parameters() if names is None or n in names]
    rows = []
    for ex in examples:
        value = value_fn(m, ex)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def brute_tracin(
    model, states, lrs, train_examples, query_examples, train_fn, query_fn, names=None, cosine=False
):
    """``Σ_c η_c ⟨∇query_fn, ∇train_fn⟩`` (query_fn already oriented: lower is better)."""
    total = None
    for state, lr in zip(states, lrs, strict=True):
        g_train = loop_gradients(model, state, train_examples, train_fn, names)
        g_query = loop_gradients(model, state, query_examples, query_fn, names)
        if cosine:
            g_train = g_train / g_train.norm(dim=1, keepdim=True)
            g_query = g_query / g_query.norm(dim=1, keepdim=True)
        term = lr * g_query @ g_train.T
        total = term if total is None else total + term
    return total


def ce(m, ex):
    x, y = ex
    return F.cross_entropy(m(x[None]), y[None])


def neg_margin(m, ex):
    """−(logit_y − logsumexp of the other logits), i.e. the margin oriented as a loss."""
    x, y = ex
    logits = m(x[None])[0]
    others = torch.cat([logits[:y], logits[y + 1 :]])
    return -(logits[y] - torch.logsumexp(others, 0))
