"""TRAK against the explicit formula with explicit per-example gradients, and against TracIn."""

from __future__ import annotations

import pytest
import torch
from reference import ce, loop_gradients, neg_margin, perturbed_states
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt


def setup(seed=0, n=40):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()  # P = 31
    g = torch.Generator().manual_seed(seed)
    x, y = (
        torch.randn(n, 3, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (n,), generator=g),
    )
    xq, yq = (
        torch.randn(5, 3, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (5,), generator=g),
    )
    return model, perturbed_states(model, 2, seed=seed), (x, y), (xq, yq)


def test_trak_equals_the_explicit_formula_for_an_ensemble_of_two_models():
    model, states, (x, y), (xq, yq) = setup()
    ckpts = [tt.Checkpoint(s) for s in states]  # no lr needed: each model weighs 1/M
    # projection >= P: the Kronecker factors are identities, so R is orthogonal and TRAK's
    # formula is invariant to it — the explicit, unprojected computation is the reference
    est = tt.TRAK(
        model, tt.Classification("margin"), ckpts, projection=64, damping=1e-3, progress=False
    )
    est.fit(TensorDataset(x, y))
    scores = est.score(TensorDataset(xq, yq))
    expected = torch.zeros(5, len(x), dtype=torch.float64)
    train, query = list(zip(x, y, strict=True)), list(zip(xq, yq, strict=True))
    for st in states:
        g = loop_gradients(model, st, train, ce)  # loss gradients: TRAK's Q-weighted side
        phi = loop_gradients(model, st, train, neg_margin)  # output-function gradients
        q = loop_gradients(model, st, query, neg_margin)
        kernel = phi.T @ phi + 1e-3 * torch.eye(phi.shape[1], dtype=torch.float64)
        expected += q @ torch.linalg.solve(kernel, g.T) / len(states)
    assert ((scores - expected).abs().max() / expected.abs().max()) < 1e-8
    top = est.top_k(TensorDataset(xq, yq), k=3)
    torch.testing.assert_close(
        top.proponents.scores, scores.sort(dim=1, descending=True).values[:, :3]
    )


def test_identity_preconditioning_is_projected_tracin_at_one_checkpoint():
    model, states, (x, y), (xq, yq) = setup(1)
    proj = tt.Projection(16, kind="gaussian", seed=3)
    trak = tt.TRAK(
        model,
        tt.Classification(),
        [tt.Checkpoint(states[0])],
        projection=proj,
        preconditioner="identity",
        progress=False,
    )
    tracin = tt.TracIn(
        model,
        tt.Classification(),
        [tt.Checkpoint(states[0], lr=1.0)],
        projection=proj,
        progress=False,
    )
    for est in (trak, tracin):
        est.fit(TensorDataset(x, y))
    torch.testing.assert_close(
        trak.score(TensorDataset(xq, yq)), tracin.score(TensorDataset(xq, yq))
    )


def test_self_influence_is_the_diagonal_and_errors_are_clear():
    model, states, (x, y), _ = setup(2)
    est = tt.TRAK(
        model,
        tt.Classification(),
        [tt.Checkpoint(s) for s in states],
        projection=64,
        progress=False,
    )
    est.fit(TensorDataset(x, y))
    torch.testing.assert_close(
        est.self_influence(), est.score(TensorDataset(x, y)).diagonal(), rtol=1e-8, atol=1e-12
    )
    with pytest.raises(tt.ConfigurationError, match="needs a projection"):
        tt.TRAK(model, tt.Classification(), [tt.Checkpoint(states[0])], projection=None)
    with pytest.raises(tt.NotPositiveDefiniteError, match="smaller projection or damping"):
        tt.TRAK(
            model,
            tt.Classification(),
            [tt.Checkpoint(states[0])],
            projection=64,
            damping=0.0,
            progress=False,
        ).fit(TensorDataset(x[:5], y[:5]))


def test_more_features_than_examples_warns():
    model, states, (x, y), _ = setup(3, n=12)
    est = tt.TRAK(
        model,
        tt.Classification(),
        [tt.Checkpoint(states[0])],
        projection=64,
        damping=1e-3,
        progress=False,
    )
    with pytest.warns(RuntimeWarning, match="rank at most 12"):
        est.fit(TensorDataset(x, y))


def test_default_projection_is_resolved_at_fit_from_the_training_set_size():
    from traintrace.methods.trak import default_projection

    # width: a power of two near n / 8, within [32, 2048]; Gaussian unless P · k > 2^30
    assert default_projection(1000, 10_000) == tt.Projection(64, kind="gaussian")
    assert default_projection(100, 10_000).dim == 32
    assert default_projection(10**6, 10_000).dim == 2048
    assert default_projection(10**6, 10**8).kind == "kronecker"
    model, states, (x, y), (xq, yq) = setup(4, n=40)
    ckpts = [tt.Checkpoint(s) for s in states]
    auto = tt.TRAK(model, tt.Classification(), ckpts, damping=1e-3, progress=False)
    assert auto.projection_ is None
    auto.fit(TensorDataset(x, y))
    n_params = sum(p.numel() for p in model.parameters())
    assert auto.projection_ == default_projection(40, n_params)
    assert auto.projection_.kind == "gaussian" and auto.projection_.dim == 32
    explicit = tt.TRAK(
        model, tt.Classification(), ckpts, projection=auto.projection_, damping=1e-3, progress=False
    ).fit(TensorDataset(x, y))
    torch.testing.assert_close(
        auto.score(TensorDataset(xq, yq)), explicit.score(TensorDataset(xq, yq))
    )
