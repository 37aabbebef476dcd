"""PBRF: its solution satisfies the optimality condition of the objective written out by hand
(KL for cross-entropy, squared output distance for MSE), and to first order in ε it is the
damped Gauss–Newton influence function (Bae et al. 2022)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.evaluation.pbrf import PBRF, pbrf, pbrf_scores
from traintrace.exceptions import ConfigurationError

DT = torch.float64
N = 20
DAMPING = 0.1


def tiny_mlp(outputs: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).double()


def classification_data(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def regression_data(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=DT, generator=g), torch.randn(n, 2, dtype=DT, generator=g)


def hand_objective_gradient(model, state, theta0, x, y, m, eps, damping, kind):
    """``∇J`` at ``state`` with ``J`` written out explicitly, by autograd on a loaded copy."""
    net = copy.deepcopy(model)
    net.load_state_dict(state)
    ref = copy.deepcopy(model)
    ref.load_state_dict(theta0)
    with torch.no_grad():
        h0 = ref(x)
    h = net(x)
    if kind == "ce":  # KL(softmax(h0) ‖ softmax(h)), the Bregman divergence of cross-entropy
        p0 = h0.softmax(-1)
        bregman = (p0 * (h0.log_softmax(-1) - h.log_softmax(-1))).sum(-1)
        removed = F.cross_entropy(h[m : m + 1], y[m : m + 1])
    else:  # Regression's loss is mean_k (h_k − y_k)², so D = mean_k (h_k − h0_k)²
        bregman = ((h - h0) ** 2).mean(-1)
        removed = ((h[m] - y[m]) ** 2).mean()
    prox = sum(((p - theta0[n]) ** 2).sum() for n, p in net.named_parameters())
    objective = bregman.mean() - eps * removed + 0.5 * damping * prox
    grads = torch.autograd.grad(objective, list(net.parameters()))
    removed_grad = torch.autograd.grad(
        F.cross_entropy(ref(x[m : m + 1]), y[m : m + 1])
        if kind == "ce"
        else ((ref(x[m]) - y[m]) ** 2).mean(),
        list(ref.parameters()),
    )
    initial = abs(eps) * torch.cat([g.reshape(-1) for g in removed_grad]).norm()
    return torch.cat([g.reshape(-1) for g in grads]), float(initial)


@pytest.mark.parametrize(
    ("kind", "task", "data", "outputs"),
    [
        ("ce", tt.Classification(), classification_data, 3),
        ("mse", tt.Regression(), regression_data, 2),
    ],
)
def test_solution_satisfies_the_optimality_condition(kind, task, data, outputs):
    model = tiny_mlp(outputs)
    x, y = data()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    state = pbrf(model, task, None, TensorDataset(x, y), 3, damping=DAMPING)
    grad, initial = hand_objective_gradient(model, state, theta0, x, y, 3, 1 / N, DAMPING, kind)
    # Tolerance: the solver's default rtol (1e-7 of the gradient at θ^s) with margin.
    assert float(grad.norm()) <= 1e-6 * initial
    moved = torch.cat([(state[k] - theta0[k]).reshape(-1) for k in theta0])
    assert float(moved.norm()) > 1e-3  # it did move: the condition is not met trivially at θ^s
    # the model itself is untouched
    assert all(torch.equal(v, theta0[k]) for k, v in model.state_dict().items())
    # and at θ^s the same hand-written gradient is far from 0
    grad0, _ = hand_objective_gradient(model, theta0, theta0, x, y, 3, 1 / N, DAMPING, kind)
    assert float(grad0.norm()) == pytest.approx(initial, rel=1e-10)


def test_diagnostics_and_value_and_gradient_agree_with_the_hand_objective():
    model = tiny_mlp()
    x, y = classification_data()
    setup = PBRF(model, tt.Classification(), None, TensorDataset(x, y), damping=DAMPING)
    solution = setup.solve(5, epsilon=-2 / N)  # up-weighting works the same way
    assert solution.converged and solution.gradient_norm <= 1e-7 * solution.initial_gradient_norm
    _, grad = setup.value_and_gradient(solution.state, 5, epsilon=-2 / N)
    assert float(grad.norm()) == pytest.approx(solution.gradient_norm, rel=1e-6)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    hand, initial = hand_objective_gradient(
        model, solution.state, theta0, x, y, 5, -2 / N, DAMPING, "ce"
    )
    assert initial == pytest.approx(solution.initial_gradient_norm, rel=1e-10)
    assert float(hand.norm()) <= 1e-6 * initial
    # the example given as a batch is the same removal
    batch = setup.solve((x[5:6], y[5:6]), epsilon=-2 / N)
    for k in solution.state:
        torch.testing.assert_close(batch.state[k], solution.state[k])


@pytest.mark.parametrize(("layers", "task"), [(None, "loss"), ("last", "margin")])
def test_first_order_pbrf_is_the_damped_ggn_influence_function(layers, task):
    model = tiny_mlp()
    x, y = classification_data()
    xq, yq = classification_data(3, seed=1)
    task_ = tt.Classification(task)
    examples = [0, 3, 7]
    influence = tt.InfluenceFunction(
        model,
        task_,
        tt.Checkpoint(model.state_dict()),
        hessian="exact",
        curvature="ggn",
        damping=DAMPING,
        layers=layers,
        progress=False,
    ).fit(TensorDataset(x, y))
    expected = influence.score(TensorDataset(xq, yq))[:, examples]
    # ε = 1/n is removal; a 100× smaller ε scaled back up isolates the first-order term
    small = pbrf_scores(
        model,
        task_,
        None,
        TensorDataset(x, y),
        TensorDataset(xq, yq),
        examples,
        damping=DAMPING,
        epsilon=0.01 / N,
        layers=layers,
        progress=False,
    )
    err = float((small * 100 - expected).abs().max() / expected.abs().max())
    assert err < 0.02, err
    # at the removal itself the nonlinearity shows, but the sign pattern and scale agree
    removal = pbrf_scores(
        model,
        task_,
        None,
        TensorDataset(x, y),
        TensorDataset(xq, yq),
        examples,
        damping=DAMPING,
        layers=layers,
        progress=False,
    )
    err_removal = float((removal - expected).abs().max() / expected.abs().max())
    assert err < err_removal  # the first-order error shrinks with ε
    assert err_removal < 1.0
    assert float(torch.corrcoef(torch.stack([removal.flatten(), expected.flatten()]))[0, 1]) > 0.9


def test_bad_arguments_raise():
    model = tiny_mlp()
    x, y = classification_data()
    train = TensorDataset(x, y)
    with pytest.raises(ConfigurationError, match="damping"):
        PBRF(model, tt.Classification(), None, train, damping=-1.0)
    setup = PBRF(model, tt.Classification(), None, train, damping=DAMPING)
    with pytest.raises(ConfigurationError, match=r"outside the training set \[0, 20\)"):
        setup.solve(20)
    with pytest.raises(ConfigurationError, match="optimizer"):
        setup.solve(0, optimizer="sgd")
    with pytest.raises(ConfigurationError, match="epsilon"):
        setup.solve(0, epsilon=float("nan"))
    with pytest.warns(RuntimeWarning, match="stopped"):
        solution = setup.solve(0, steps=2)
    assert not solution.converged
