"""A user's project written outside the repository: a model factory, data sets, checkpoints."""

from __future__ import annotations

import textwrap

import pytest
import torch

USER_MODULE = '''
"""A user's model and data, as the traintrace command line imports them."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

HOSTILE = "<script>document.title='PWNED'</script><img src=x onerror=alert(1)>"


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.1), nn.Linear(6, 3))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def train_set():
    return TensorDataset(*_data(24, 0))


def test_set():
    return TensorDataset(*_data(5, 1))


def flipped():
    mask = torch.zeros(24, dtype=torch.bool)
    mask[:3] = True
    return mask


def margin_task():
    import traintrace as tt

    return tt.Classification("margin")


def decode(example):
    x, y = example
    return f"{HOSTILE} x0={float(x[0]):.2f}"
'''


def _train(module_dir, ckpt_dir):
    """Train the user's model briefly and save {'model', 'optimizer'} checkpoints."""
    import importlib
    import sys

    sys.path.insert(0, str(module_dir))
    try:
        mod = importlib.import_module("userproj")
        model = mod.make_model()
        x, y = mod.train_set().tensors
        y = y.clone()
        y[:3] = (y[:3] + 1) % 3  # the "flipped" labels the module reports
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        ckpt_dir.mkdir()
        for epoch in range(1, 4):
            for _ in range(10):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            torch.save(
                {"model": model.state_dict(), "optimizer": opt.state_dict()},
                ckpt_dir / f"epoch_{epoch}.pt",
            )
    finally:
        sys.path.remove(str(module_dir))
        sys.modules.pop("userproj", None)


@pytest.fixture(scope="session")
def user_project(tmp_path_factory):
    """``(folder, module_dir)``: ``module_dir/userproj.py`` and ``folder/ckpt/epoch_*.pt``."""
    folder = tmp_path_factory.mktemp("userproject")
    module_dir = folder / "src"
    module_dir.mkdir()
    (module_dir / "userproj.py").write_text(textwrap.dedent(USER_MODULE))
    _train(module_dir, folder / "ckpt")
    return folder, module_dir
