"""LOO correlation against a hand computation, and the retraining convenience."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

import traintrace as tt
from traintrace.evaluation.loo import loo_benchmark, loo_correlation
from traintrace.methods.retraining import LeaveOneOut, Retrainer, query_measurement

SCORES = np.array([[1.0, 2.0, 3.0, 4.0, 5.0], [0.5, -1.0, 0.0, 2.0, 1.0]])
ACTUAL = np.array([[2.0, 4.0, 5.0, 4.0, 5.0], [-1.0, -2.0, -3.0, -4.0, -5.0]])
# By hand.
# q0: centered scores [-2,-1,0,1,2], centered actual [-2,0,1,0,1]: Pearson 6/√(10·6) = 0.7746;
#     actual ranks (ties averaged) [1, 2.5, 4.5, 2.5, 4.5]: Spearman 7/√(10·9) = 0.7379.
# q1: centered scores [0,-1.5,-0.5,1.5,0.5], centered actual [2,1,0,-1,-2]: Pearson −4/√(5·10);
#     ranks [3,1,2,5,4] vs [5,4,3,2,1]: Σd² = 32, Spearman 1 − 6·32/(5·24) = −0.6.
PEARSON = np.array([6 / np.sqrt(60), -4 / np.sqrt(50)])
SPEARMAN = np.array([7 / np.sqrt(90), -0.6])


def test_loo_correlation_equals_a_hand_computation():
    result = loo_correlation(torch.tensor(SCORES), ACTUAL)
    np.testing.assert_allclose(result.pearson_per_query, PEARSON, atol=1e-12)
    np.testing.assert_allclose(result.spearman_per_query, SPEARMAN, atol=1e-12)
    assert result.pearson == pytest.approx(PEARSON.mean())
    assert result.spearman == pytest.approx(SPEARMAN.mean())
    for q in range(2):  # and with scipy, independently
        assert result.pearson_per_query[q] == pytest.approx(pearsonr(SCORES[q], ACTUAL[q])[0])
        assert result.spearman_per_query[q] == pytest.approx(
            spearmanr(SCORES[q], ACTUAL[q]).statistic
        )


def test_one_query_and_unevaluated_columns():
    one = loo_correlation(SCORES[0], ACTUAL[0])
    assert one.pearson == pytest.approx(PEARSON[0])
    actual = np.concatenate([ACTUAL, np.full((2, 2), np.nan)], axis=1)  # 2 columns not retrained
    scores = np.concatenate([SCORES, np.array([[9.0, -9.0], [9.0, -9.0]])], axis=1)
    partial = loo_correlation(scores, actual)
    np.testing.assert_array_equal(partial.columns, np.arange(5))
    np.testing.assert_allclose(partial.spearman_per_query, SPEARMAN, atol=1e-12)


def test_bad_inputs():
    with pytest.raises(tt.ConfigurationError, match="same shape"):
        loo_correlation(SCORES, ACTUAL[:, :4])
    bad = ACTUAL.copy()
    bad[0, 1] = np.nan
    with pytest.raises(tt.ConfigurationError, match="entirely NaN"):
        loo_correlation(SCORES, bad)
    with pytest.raises(tt.ConfigurationError, match="at least 3"):
        loo_correlation(SCORES[:, :2], ACTUAL[:, :2])


# a linear "model": the query loss when training on S is Σ_{i∈S} beta[q, i]
BETA = np.array([[0.3, -0.5, 0.1, 0.0, 0.8, -0.2], [-0.4, 0.2, 0.6, -0.1, 0.0, 0.5]])


def additive(indices, seed):
    return BETA[:, indices].sum(axis=1)


def test_loo_benchmark_retrains_the_chosen_indices():
    engine = Retrainer(measure_fn=additive, executor=None, progress=False)
    # removing i changes the loss by −beta: the exact "helps" score is −beta
    exact = loo_benchmark(-BETA, engine, indices=[0, 1, 2, 4])
    assert exact.pearson == pytest.approx(1.0) and exact.spearman == pytest.approx(1.0)
    np.testing.assert_array_equal(exact.columns, [0, 1, 2, 4])
    flipped = loo_benchmark(BETA, engine)
    assert flipped.pearson == pytest.approx(-1.0)
    actual = LeaveOneOut(engine, 6).fit().score()
    np.testing.assert_allclose(actual.numpy(), -BETA, atol=1e-12)


# -- end to end: influence functions predict actual leave-one-out on a convex model -------------
N, D, C, MU = 24, 4, 3, 0.05


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + 3, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, C, generator=g, dtype=torch.float64)
    y = (x @ w + 0.8 * torch.randn(N + 3, C, generator=g, dtype=torch.float64)).argmax(1)
    return x[:N], y[:N], x[N:], y[N:]


def test_influence_function_agrees_with_actual_leave_one_out():
    import torch.nn.functional as F
    from torch.utils.data import TensorDataset

    x, y, xq, yq = _data()

    def train_fn(indices, seed):
        # minimizes (1/N) Σ_{i∈S} l_i + (μ/2)‖θ‖²: removing one example is Koh & Liang's
        # "upweight by −1/N", whose Hessian InfluenceFunction(damping=μ) inverts exactly
        model = torch.nn.Linear(D, C).double()
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        opt = torch.optim.LBFGS(
            model.parameters(),
            lr=1.0,
            max_iter=200,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )
        idx = torch.as_tensor(indices)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum") / N
            loss = loss + MU / 2 * sum(p.pow(2).sum() for p in model.parameters())
            loss.backward()
            return loss

        opt.step(closure)
        return model

    task = tt.Classification()
    queries = TensorDataset(xq, yq)
    engine = Retrainer(train_fn, query_measurement(task, queries), executor=None, progress=False)
    actual = LeaveOneOut(engine, N).fit().score()

    full = train_fn(np.arange(N), 0)
    influence = tt.InfluenceFunction(
        full, task, tt.Checkpoint(full.state_dict()), damping=MU, progress=False
    ).fit(TensorDataset(x, y))
    predicted = influence.score(queries)
    result = loo_correlation(predicted, actual)
    assert result.pearson_per_query.min() > 0.97, result
    # same scale: the least-squares slope of actual on predicted is 1.40 here (first-order
    # influence underestimates large effects when one example is 1/24 of the data); it falls to
    # 1.12 at N=80 and 1.05 at N=200, so a factor like n or n/(n−1) in either would show
    p, a = predicted.double().numpy(), actual.numpy()
    slope = (p * a).sum() / (p * p).sum()
    assert 1.2 < slope < 1.6
