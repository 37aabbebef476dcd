"""InfluenceFunction against ``(1/n) qᵀ (C + λI)⁻¹ g`` built from an explicit Hessian and explicit
per-example gradients, and against actual leave-one-out retraining (Koh & Liang's check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import ce, loop_gradients, neg_margin
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import traintrace as tt

DT = torch.float64


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def tiny_data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def explicit_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Hessian of the mean cross-entropy w.r.t. all parameters, flattened in named order."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat0)


def brute_influence(model, x, y, xq, yq, damping, curvature_matrix=None, query_fn=ce):
    n = len(x)
    h = explicit_hessian(model, x, y) if curvature_matrix is None else curvature_matrix
    h = h + damping * torch.eye(h.shape[0], dtype=DT)
    g = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    q = loop_gradients(model, model.state_dict(), list(zip(xq, yq, strict=True)), query_fn)
    return q @ torch.linalg.solve(h, g.T) / n


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Solver, tolerance (relative to the largest score). The damped Hessian is positive definite.
PATHS = [
    (tt.Exact(), 1e-9),
    (tt.CG(tol=1e-10), 1e-7),
    (tt.LiSSA(depth=400), 1e-6),
    (tt.Arnoldi(rank=38), 1e-7),  # full rank: P = 4·5 + 5 + 5·3 + 3 = 43, negative eigs none
]


@pytest.mark.parametrize(
    ("solver", "tol"), PATHS, ids=lambda v: type(v).__name__ if not isinstance(v, float) else ""
)
def test_each_solver_equals_the_explicit_inverse(solver, tol):
    model = tiny_mlp()
    x, y = tiny_data()
    xq, yq = tiny_data(5, seed=1)
    damping = 0.5
    if isinstance(solver, tt.Arnoldi):
        solver = tt.Arnoldi(rank=43, iterations=43)
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=solver,
        damping=damping,
        progress=False,
    )
    est.fit(TensorDataset(x, y))
    expected = brute_influence(model, x, y, xq, yq, damping)
    assert rel_err(est.score(TensorDataset(xq, yq)), expected) < tol
    # self-influence is the diagonal of score(train, train) with the loss measurement
    train_scores = est.score(TensorDataset(x, y))
    torch.testing.assert_close(est.self_influence(), train_scores.diagonal(), rtol=1e-6, atol=1e-12)


def test_margin_measurement_and_top_k():
    model = tiny_mlp(1)
    x, y = tiny_data(seed=2)
    xq, yq = tiny_data(4, seed=3)
    est = tt.InfluenceFunction(
        model,
        tt.Classification("margin"),
        tt.Checkpoint(model.state_dict()),
        damping=0.6,
        progress=False,
    ).fit(TensorDataset(x, y))
    scores = est.score(TensorDataset(xq, yq))
    assert rel_err(scores, brute_influence(model, x, y, xq, yq, 0.6, query_fn=neg_margin)) < 1e-9
    top = est.top_k(TensorDataset(xq, yq), k=3)
    torch.testing.assert_close(
        top.proponents.scores, scores.sort(dim=1, descending=True).values[:, :3]
    )


def test_ggn_and_fisher_curvatures_and_mfac():
    model = tiny_mlp(2)
    x, y = tiny_data(seed=4)
    xq, yq = tiny_data(3, seed=5)
    g = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    fisher = g.T @ g / len(x)
    for kwargs in ({"curvature": "fisher"}, {"hessian": tt.MFAC()}):
        est = tt.InfluenceFunction(
            model,
            tt.Classification(),
            tt.Checkpoint(model.state_dict()),
            damping=0.1,
            progress=False,
            **kwargs,
        ).fit(TensorDataset(x, y))
        expected = brute_influence(model, x, y, xq, yq, 0.1, curvature_matrix=fisher)
        assert rel_err(est.score(TensorDataset(xq, yq)), expected) < 1e-8, kwargs
    # GGN: Jᵀ H_out J built explicitly from per-example Jacobians of the logits
    model.eval()
    rows = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda flat, xi=xi: functional_call(model, _unflatten(model, flat), (xi[None],))[0],
            torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        )
        p = torch.softmax(model(xi[None])[0], 0).detach()
        rows.append(jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac)
    ggn = torch.stack(rows).mean(0)
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        curvature="ggn",
        damping=0.1,
        progress=False,
    ).fit(TensorDataset(x, y))
    expected = brute_influence(model, x, y, xq, yq, 0.1, curvature_matrix=ggn)
    assert rel_err(est.score(TensorDataset(xq, yq)), expected) < 1e-8


def _unflatten(model, flat):
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


@pytest.mark.parametrize(
    "config", [tt.KFAC(sampled_labels=False), tt.EKFAC(sampled_labels=False)], ids=["kfac", "ekfac"]
)
def test_kronecker_paths_use_their_own_block_inverse(config):
    model = tiny_mlp(3)
    x, y = tiny_data(seed=6)
    xq, yq = tiny_data(3, seed=7)
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=config,
        damping=0.2,
        progress=False,
    ).fit(TensorDataset(x, y))
    block = est.inverse_.dense()  # F̂ without damping
    expected = brute_influence(model, x, y, xq, yq, 0.2, curvature_matrix=block)
    assert rel_err(est.score(TensorDataset(xq, yq)), expected) < 1e-8
    # and it approximates the exact empirical-Fisher influence (same curvature family)
    g = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    exact = brute_influence(model, x, y, xq, yq, 0.2, curvature_matrix=g.T @ g / len(x))
    corr = np.corrcoef(est.score(TensorDataset(xq, yq)).flatten(), exact.flatten())[0, 1]
    assert corr > 0.8, corr


def test_arnoldi_low_rank_scores_and_self_influence_without_stored_gradients():
    model = tiny_mlp(4)
    x, y = tiny_data(seed=8)
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=tt.Arnoldi(rank=5, iterations=43),
        damping=0.5,
        progress=False,
    ).fit(TensorDataset(x, y))
    assert not hasattr(est, "store_")  # nothing of size n × P (or n × r) is stored
    # equals the explicit formula with H⁻¹ replaced by the inverse of the damped rank-5
    # approximation: top-5 eigenpairs, every other direction at the damping 0.5
    h = explicit_hessian(model, x, y) + 0.5 * torch.eye(43, dtype=DT)
    vals, vecs = torch.linalg.eigh(h)
    top = vals.abs().argsort(descending=True)[:5]
    u = vecs[:, top]
    approx = u @ torch.diag(1 / vals[top]) @ u.T + (torch.eye(43, dtype=DT) - u @ u.T) / 0.5
    g = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    torch.testing.assert_close(
        est.self_influence(), ((g @ approx) * g).sum(1) / 24, rtol=1e-6, atol=1e-12
    )
    torch.testing.assert_close(
        est.score(TensorDataset(x, y)), (g @ approx @ g.T) / 24, rtol=1e-6, atol=1e-12
    )
    # the paper's formula: zero on the complement
    est_zero = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=tt.Arnoldi(rank=5, iterations=43, complement="zero"),
        damping=0.5,
        progress=False,
    ).fit(TensorDataset(x, y))
    zero = u @ torch.diag(1 / vals[top]) @ u.T
    torch.testing.assert_close(
        est_zero.self_influence(), ((g @ zero) * g).sum(1) / 24, rtol=1e-6, atol=1e-12
    )
    torch.testing.assert_close(
        est_zero.score(TensorDataset(x, y)), (g @ zero @ g.T) / 24, rtol=1e-6, atol=1e-12
    )


def test_indefinite_hessian_without_damping_is_a_clear_error_never_nan():
    model = tiny_mlp(5)
    x, y = tiny_data(seed=9)
    h = explicit_hessian(model, x, y)
    assert torch.linalg.eigvalsh(h)[0] < 0, "test premise: an indefinite Hessian"
    for solver in (tt.Exact(), tt.CG()):
        est = tt.InfluenceFunction(
            model,
            tt.Classification(),
            tt.Checkpoint(model.state_dict()),
            hessian=solver,
            damping=0.0,
            progress=False,
        )
        with pytest.raises(tt.NotPositiveDefiniteError, match="damping"):
            est.fit(TensorDataset(x, y)).score(TensorDataset(x[:2], y[:2]))
    with pytest.raises(tt.NotFittedError):
        tt.InfluenceFunction(
            model, tt.Classification(), tt.Checkpoint(model.state_dict())
        ).self_influence()
    with pytest.raises(tt.ConfigurationError, match="curvature must be one of"):
        tt.InfluenceFunction(
            model, tt.Classification(), tt.Checkpoint(model.state_dict()), curvature="bfgs"
        )
    with pytest.raises(tt.ConfigurationError, match="M-FAC needs damping"):
        tt.InfluenceFunction(
            model,
            tt.Classification(),
            tt.Checkpoint(model.state_dict()),
            hessian="mfac",
            damping=0.0,
            progress=False,
        ).fit(TensorDataset(x, y))


@pytest.mark.parametrize("solver", [tt.Exact(), tt.CG(tol=1e-12)])
def test_default_damping_lifts_an_indefinite_hessian_by_the_spectrum_rule(solver):
    # the default damping="auto" is max(0, −λ_min) + 1e-3·max|λ| of the explicit Hessian, and
    # the scores are the explicit (H + λI)⁻¹ formula at that λ; an explicit number still wins
    model = tiny_mlp(5)
    x, y = tiny_data(seed=9)
    values = torch.linalg.eigvalsh(explicit_hessian(model, x, y))
    assert values[0] < 0, "test premise: an indefinite Hessian"
    expected = float(-values[0] + 1e-3 * values.abs().max())
    ckpt = tt.Checkpoint(model.state_dict())
    est = tt.InfluenceFunction(model, tt.Classification(), ckpt, hessian=solver, progress=False)
    est.fit(TensorDataset(x, y))
    assert est.damping_ == pytest.approx(expected, rel=1e-6)
    assert "spectrum" in est.damping_reason_ and f"{expected:.4g}" in est.damping_reason_
    torch.testing.assert_close(
        est.score(TensorDataset(x[:3], y[:3])),
        brute_influence(model, x, y, x[:3], y[:3], expected),
        rtol=1e-6,
        atol=1e-10,
    )
    fixed = tt.InfluenceFunction(
        model, tt.Classification(), ckpt, hessian=solver, damping=0.5, progress=False
    ).fit(TensorDataset(x, y))
    assert fixed.damping_ == 0.5


# -- leave-one-out retraining on L2-regularized multinomial logistic regression -----------------

L2 = 0.05


def _train_lbfgs(x, y, init=None):
    """Minimize mean CE + (L2/2)‖θ‖² (weights and bias) to a tight tolerance, in float64."""
    model = nn.Linear(64, 10).double()
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + L2 / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


@pytest.fixture(scope="module")
def loo_problem():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=DT)
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:200], y[:200], x[1500:1600], y[1500:1600]
    model = _train_lbfgs(x_train, y_train)
    with torch.no_grad():
        test_losses = F.cross_entropy(model(x_test), y_test, reduction="none")
    q = int(test_losses.argmax())  # the worst-predicted test digit: the most to explain
    query = TensorDataset(x_test[q : q + 1], y_test[q : q + 1])
    exact = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=tt.Exact(),
        damping=L2,
        progress=False,
    ).fit(TensorDataset(x_train, y_train))
    predicted = exact.score(query)[0]
    gen = torch.Generator().manual_seed(0)
    removed = torch.cat(
        [predicted.abs().argsort(descending=True)[:20], torch.randperm(200, generator=gen)[:10]]
    ).unique()
    base = float(test_losses[q])
    actual = []
    for i in removed.tolist():
        keep = torch.arange(200) != i
        retrained = _train_lbfgs(x_train[keep], y_train[keep], init=model.state_dict())
        with torch.no_grad():
            actual.append(
                float(F.cross_entropy(retrained(x_test[q : q + 1]), y_test[q : q + 1])) - base
            )
    return model, TensorDataset(x_train, y_train), query, removed, torch.tensor(actual, dtype=DT)


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver",
    [tt.Exact(), tt.CG(tol=1e-10), tt.LiSSA(depth=2000), tt.Arnoldi(rank=650, iterations=650)],
    ids=["exact", "cg", "lissa", "arnoldi-full-rank"],
)
def test_leave_one_out_correlation_on_logistic_regression(loo_problem, solver):
    model, train, query, removed, actual = loo_problem
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=solver,
        damping=L2,
        progress=False,
    ).fit(train)
    predicted = est.score(query)[0, removed]
    pearson = float(np.corrcoef(predicted.numpy(), actual.numpy())[0, 1])
    assert pearson >= 0.95, f"Pearson {pearson:.3f} between predicted and retrained loss change"
    # same sign convention as the retrain: removing a helpful example raises the query's loss
    assert float((torch.sign(predicted) == torch.sign(actual)).double().mean()) > 0.8


@pytest.mark.parametrize(
    "hessian",
    [tt.Exact(), tt.CG(), tt.LiSSA(), tt.Arnoldi(rank=10), tt.KFAC(), tt.EKFAC(), tt.MFAC()],
    ids=lambda h: type(h).__name__,
)
def test_every_path_on_an_indefinite_hessian_without_damping_errors_clearly_or_stays_finite(
    hessian,
):
    model = tiny_mlp(5)
    x, y = tiny_data(seed=9)
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=hessian,
        damping=0.0,
        progress=False,
    )
    try:
        with pytest.warns(RuntimeWarning) if isinstance(hessian, tt.Arnoldi) else _no_context():
            scores = est.fit(TensorDataset(x, y)).score(TensorDataset(x[:3], y[:3]))
    except tt.TraintraceError as err:
        assert "damping" in str(err) or "scale" in str(err), str(err)
    else:
        assert bool(torch.isfinite(scores).all())


def _no_context():
    import contextlib

    return contextlib.nullcontext()


def test_evidence_damping_is_chosen_by_select_damping_and_used():
    model = tiny_mlp(4)
    x, y = tiny_data(seed=8)
    ckpt = tt.Checkpoint(model.state_dict())
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        ckpt,
        hessian="exact",
        curvature="ggn",
        damping="evidence",
        progress=False,
    ).fit(TensorDataset(x, y))
    sel = tt.select_damping(model, tt.Classification(), ckpt, TensorDataset(x, y), progress=False)
    assert est.damping_ == pytest.approx(sel.damping) and est.damping_ > 0
    explicit = tt.InfluenceFunction(
        model,
        tt.Classification(),
        ckpt,
        hessian="exact",
        curvature="ggn",
        damping=est.damping_,
        progress=False,
    ).fit(TensorDataset(x, y))
    torch.testing.assert_close(
        est.score(TensorDataset(x[:3], y[:3])), explicit.score(TensorDataset(x[:3], y[:3]))
    )
    with pytest.raises(tt.ConfigurationError, match="evidence"):
        tt.InfluenceFunction(model, tt.Classification(), ckpt, damping="automatic")
