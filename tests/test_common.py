"""The contract every estimator keeps, checked over a registry (scikit-learn's common tests).

A new estimator gets all of it by adding one entry to ``REGISTRY``: unfitted calls raise
``NotFittedError``; ``fit`` returns ``self``; ``score`` is ``[n_query, n_train]``; ``top_k``
equals the top of ``score``; ``self_influence`` equals ``diag(score(train, train))`` where the
measurement is the loss; results are deterministic and do not depend on the batch size; the sign
convention holds on a convex model (removing the top proponent raises the query's loss); and, in
float64, the scores equal a brute-force reference (explicit per-example gradients and Hessian).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt

DT = torch.float64


def _data(seed: int = 0, n: int = 24, d: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    w = torch.randn(d, classes, generator=g, dtype=DT)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=DT)).argmax(1)
    return x, y


def _trained_logreg(x: torch.Tensor, y: torch.Tensor, decay: float, keep=None) -> nn.Module:
    """Multinomial logistic regression trained to convergence (L-BFGS) on ``keep``."""
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 3).double()
    idx = torch.arange(len(x)) if keep is None else keep
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx]) + 0.5 * decay * sum(
            p.square().sum() for p in model.parameters()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        rows.append(
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
        )
    return torch.stack(rows)


def _hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    shapes = [p.shape for p in params]

    def loss(v):
        out, i = [], 0
        for s in shapes:
            out.append(v[i : i + s.numel()].reshape(s))
            i += s.numel()
        return F.cross_entropy(F.linear(x, out[0], out[1]), y)

    return torch.autograd.functional.hessian(loss, flat)


@dataclass
class Entry:
    make: Callable[..., object]
    brute: Callable[[nn.Module, tuple, tuple], torch.Tensor] | None
    self_is_diagonal: bool = True
    convex_sign: bool = True


DECAY = 0.05


def _tracin_brute(model, train, queries):
    g, q = _per_example(model, *train), _per_example(model, *queries)
    return 0.1 * q @ g.T


def _if_brute(model, train, queries):
    g, q = _per_example(model, *train), _per_example(model, *queries)
    h = _hessian(model, *train) + DECAY * torch.eye(g.shape[1], dtype=DT)
    return q @ torch.linalg.solve(h, g.T) / len(train[0])


REP_L2 = 1e-3


def _representer_brute(model, train, queries):
    """``α_{i,c} (f̃_i · f̃')`` as ``⟨∇Φ_c(x'), −∇L_i⟩ / (2λn)``: explicit per-example gradients
    at the head minimizing ``mean CE + λ‖W̃‖²`` (damped Newton on the explicit Hessian)."""
    x, y = train
    head = nn.Linear(x.shape[1], 3).double()
    v = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])

    def objective(v):
        w, b = v[:-3].reshape(3, -1), v[-3:]
        return F.cross_entropy(F.linear(x, w, b), y) + REP_L2 * v.square().sum()

    for _ in range(100):
        g = torch.func.grad(objective)(v)
        if g.norm() < 1e-13:
            break
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, v), g)
        t = 1.0
        while objective(v - t * step) > objective(v) and t > 1e-8:
            t /= 2
        v = v - t * step
    with torch.no_grad():
        head.weight.copy_(v[:-3].reshape(3, -1))
        head.bias.copy_(v[-3:])
    xq, yq = queries
    logit_grads = []
    for i in range(len(xq)):
        logit = head(xq[i : i + 1])[0, yq[i]]
        grads = torch.autograd.grad(logit, list(head.parameters()))
        logit_grads.append(torch.cat([t.reshape(-1) for t in grads]))
    return -torch.stack(logit_grads) @ _per_example(head, x, y).T / (2 * REP_L2 * len(x))


REGISTRY: dict[str, Entry] = {
    "tracin-exact-stream": Entry(
        lambda m, bs: tt.TracIn(
            m,
            tt.Classification(),
            [tt.Checkpoint(m.state_dict(), lr=0.1)],
            batch_size=bs,
            query_block=7,
            progress=False,
        ),
        _tracin_brute,
    ),
    "tracin-store": Entry(
        lambda m, bs, tmp: tt.TracIn(
            m,
            tt.Classification(),
            [tt.Checkpoint(m.state_dict(), lr=0.1)],
            batch_size=bs,
            store=tmp / f"s{bs}",
            progress=False,
        ),
        _tracin_brute,
    ),
    "if-exact": Entry(
        lambda m, bs: tt.InfluenceFunction(
            m,
            tt.Classification(),
            tt.Checkpoint(m.state_dict()),
            hessian="exact",
            damping=DECAY,
            batch_size=bs,
            query_block=7,
            progress=False,
        ),
        _if_brute,
    ),
    "if-cg": Entry(
        lambda m, bs: tt.InfluenceFunction(
            m,
            tt.Classification(),
            tt.Checkpoint(m.state_dict()),
            hessian=tt.CG(tol=1e-12),
            damping=DECAY,
            batch_size=bs,
            progress=False,
        ),
        _if_brute,
    ),
    "if-ekfac": Entry(
        lambda m, bs: tt.InfluenceFunction(
            m,
            tt.Classification(),
            tt.Checkpoint(m.state_dict()),
            hessian=tt.EKFAC(sampled_labels=False),
            damping=DECAY,
            batch_size=bs,
            progress=False,
        ),
        None,  # an approximation of the Fisher: checked against its own blocks in test_kfac
    ),
    "trak": Entry(
        lambda m, bs: tt.TRAK(
            m,
            tt.Classification(),
            [tt.Checkpoint(m.state_dict())],
            projection=8,
            batch_size=bs,
            progress=False,
        ),
        None,
        self_is_diagonal=False,
        convex_sign=False,
    ),
    "embedding-knn": Entry(
        lambda m, bs: tt.EmbeddingKNN(
            m, tt.Classification(), tt.Checkpoint(m.state_dict()), batch_size=bs, query_block=2
        ),
        # the layer is the whole model: its input is x
        lambda m, train, queries: F.normalize(queries[0], dim=1) @ F.normalize(train[0], dim=1).T,
        self_is_diagonal=False,  # a similarity: every example is its own nearest neighbour
        convex_sign=False,
    ),
    "representer": Entry(
        lambda m, bs: tt.RepresenterPoints(
            m,
            tt.Classification(),
            tt.Checkpoint(m.state_dict()),
            l2=REP_L2,
            batch_size=bs,
            query_block=3,
            progress=False,
        ),
        _representer_brute,
        convex_sign=False,  # explains the target-class logit of a refitted head, not the loss
    ),
}


@pytest.fixture(scope="module")
def setup():
    x, y = _data()
    model = _trained_logreg(x, y, DECAY)
    train = TensorDataset(x, y)
    queries = TensorDataset(x[:5] + 0.1, y[:5])
    return model, (x, y), train, queries


def _make(name, model, bs, tmp_path):
    entry = REGISTRY[name]
    if name == "tracin-store":
        return entry.make(model, bs, tmp_path)
    return entry.make(model, bs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_common_contract(name, setup, tmp_path):
    model, (x, _y), train, queries = setup
    est = _make(name, model, 8, tmp_path)
    with pytest.raises(tt.NotFittedError):
        est.score(queries)
    with pytest.raises(tt.NotFittedError):
        est.top_k(queries, k=2)
    assert est.fit(train) is est
    s = est.score(queries)
    assert s.shape == (5, len(x)) and bool(torch.isfinite(s).all())
    top = est.top_k(queries, k=3)
    torch.testing.assert_close(top.proponents.scores, s.topk(3, dim=1).values)
    torch.testing.assert_close(top.opponents.scores, s.topk(3, dim=1, largest=False).values)
    # determinism and batch-size invariance
    torch.testing.assert_close(est.score(queries), s)
    other = _make(name, model, 5, tmp_path).fit(train)
    torch.testing.assert_close(other.score(queries), s, rtol=1e-8, atol=1e-12)
    if REGISTRY[name].self_is_diagonal:
        torch.testing.assert_close(
            est.self_influence(), est.score(train).diagonal(), rtol=1e-8, atol=1e-14
        )


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.brute is not None))
def test_equals_brute_force_float64(name, setup, tmp_path):
    model, (x, y), train, queries = setup
    est = _make(name, model, 8, tmp_path).fit(train)
    q = queries.tensors
    expected = REGISTRY[name].brute(model, (x, y), q)
    torch.testing.assert_close(est.score(queries), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items() if e.convex_sign))
def test_sign_removing_the_top_proponent_raises_the_query_loss(name, setup, tmp_path):
    """Positive = helps: retrain without the top proponent; the query's loss goes up."""
    model, (x, y), train, queries = setup
    est = _make(name, model, 8, tmp_path).fit(train)
    xq, yq = queries.tensors
    top = int(est.top_k(queries, k=1).proponents.indices[0, 0])
    keep = torch.tensor([i for i in range(len(x)) if i != top])
    retrained = _trained_logreg(x, y, DECAY, keep)
    with torch.no_grad():
        before = F.cross_entropy(model(xq[:1]), yq[:1])
        after = F.cross_entropy(retrained(xq[:1]), yq[:1])
    assert after > before
