"""Representer points against the defining identity and a hand computation.

Expected values come from outside the estimator: features from calling the network's layers
directly, the stationary head from an independent Newton solve of the regularized last-layer
objective (explicit Hessian via ``torch.autograd.functional.hessian``), ``α`` from the closed
form ``−(softmax − onehot)/(2λn)``, and scores as explicit ``α_{i,c} (f̃_i · f̃')`` loops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.exceptions import ConfigurationError, NotFittedError
from traintrace.methods.representer import RepresenterPoints

DT = torch.float64
L2 = 1e-2


def _setup(bias: bool = True, classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, classes, bias=bias)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    xt = torch.randn(30, 4, dtype=DT, generator=g)
    yt = torch.randint(0, max(classes, 2), (30,), generator=g)
    xq = torch.randn(7, 4, dtype=DT, generator=g)
    yq = torch.randint(0, max(classes, 2), (7,), generator=g)
    return model, (xt, yt), (xq, yq)


def _features(model: nn.Module, x: torch.Tensor, bias: bool) -> torch.Tensor:
    with torch.no_grad():
        f = model[1](model[0](x))
    return torch.cat([f, torch.ones(len(f), 1, dtype=DT)], 1) if bias else f


def _objective(w_flat: torch.Tensor, feats: torch.Tensor, y: torch.Tensor, classes: int):
    w = w_flat.reshape(classes, -1)
    logits = feats @ w.T
    if classes == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], 1)
    return F.cross_entropy(logits, y) + L2 * (w * w).sum()


def _newton_head(w0: torch.Tensor, feats, y, classes: int) -> torch.Tensor:
    """The unique minimizer of the strongly convex head objective, by damped-free Newton."""
    w = w0.reshape(-1).clone()
    for _ in range(50):
        w_ = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_objective(w_, feats, y, classes), w_)
        h = torch.autograd.functional.hessian(lambda v: _objective(v, feats, y, classes), w)
        w = w - torch.linalg.solve(h, g)
        if g.norm() < 1e-14:
            break
    return w.reshape(classes, -1)


def _alpha_closed_form(head, feats, y, classes: int) -> torch.Tensor:
    logits = feats @ head.T
    n = len(y)
    if classes == 1:
        return -(torch.sigmoid(logits[:, 0]) - y.to(DT))[:, None] / (2 * L2 * n)
    return -(torch.softmax(logits, 1) - F.one_hot(y, classes).to(DT)) / (2 * L2 * n)


@pytest.mark.parametrize("bias", [True, False])
def test_refit_head_is_stationary_and_the_decomposition_reproduces_its_logits(bias: bool) -> None:
    model, (xt, yt), (xq, yq) = _setup(bias)
    est = RepresenterPoints(model, tt.Classification(), tt.Checkpoint(model.state_dict()), l2=L2)
    est.fit(TensorDataset(xt, yt))
    ft, fq = _features(model, xt, bias), _features(model, xq, bias)
    w0 = (
        model[2].weight.detach()
        if not bias
        else torch.cat([model[2].weight.detach(), model[2].bias.detach()[:, None]], 1)
    )
    head = _newton_head(w0, ft, yt, 3)
    got = est.weight_ if not bias else torch.cat([est.weight_, est.bias_[:, None]], 1)
    torch.testing.assert_close(got, head, atol=1e-7, rtol=0)
    assert est.stationarity_residual_ < 1e-9
    torch.testing.assert_close(est.features_, ft, atol=1e-12, rtol=0)
    torch.testing.assert_close(est.alpha_, _alpha_closed_form(head, ft, yt, 3), atol=1e-8, rtol=0)
    # the defining identity: Σ_i α_i (f̃_i · f̃') = W f' + b on unseen query points
    decomposed = est.decompose(TensorDataset(xq, yq))
    brute = sum(est.alpha_[i][None, :] * (ft[i] @ fq.T)[:, None] for i in range(len(yt)))
    torch.testing.assert_close(decomposed, brute, atol=1e-12, rtol=0)
    logits = fq @ got.T
    assert (decomposed - logits).abs().max() < 1e-6
    with torch.no_grad():
        agree = ((ft @ got.T).argmax(1) == model(xt).argmax(1)).to(DT).mean()
    assert est.refit_agreement_ == pytest.approx(float(agree))


def test_scores_match_a_hand_computation_with_labels_and_predicted_classes() -> None:
    model, (xt, yt), (xq, yq) = _setup()
    est = RepresenterPoints(
        model, tt.Classification(), tt.Checkpoint(model.state_dict()), l2=L2, batch_size=4
    ).fit(TensorDataset(xt, yt))
    ft, fq = _features(model, xt, True), _features(model, xq, True)
    alpha = est.alpha_
    head = torch.cat([est.weight_, est.bias_[:, None]], 1)
    labelled = est.score(TensorDataset(xq, yq))
    unlabelled = est.score(TensorDataset(xq))
    predicted = (fq @ head.T).argmax(1)
    for q in range(len(yq)):
        for i in range(len(yt)):
            k = float(ft[i] @ fq[q])
            assert abs(labelled[q, i] - alpha[i, yq[q]] * k) < 1e-12
            assert abs(unlabelled[q, i] - alpha[i, predicted[q]] * k) < 1e-12
    # summed over the training set a query's scores are its target-class logit
    torch.testing.assert_close(
        unlabelled.sum(1), (fq @ head.T).gather(1, predicted[:, None])[:, 0], atol=1e-6, rtol=0
    )
    # a training example of the query's own class with aligned features helps it
    top = est.top_k(TensorDataset(xq, yq), k=3)
    torch.testing.assert_close(top.proponents.scores, labelled.topk(3, dim=1).values)
    self_inf = est.self_influence()
    diag = est.score(TensorDataset(xt, yt)).diagonal()
    torch.testing.assert_close(self_inf, diag, atol=1e-12, rtol=0)
    assert bool((self_inf >= 0).all())  # cross-entropy: α_{i,y_i} = (1 − p)/(2λn) ≥ 0


def test_binary_single_logit_head_scores_toward_the_target_class() -> None:
    model, (xt, yt), (xq, yq) = _setup(classes=1)
    est = RepresenterPoints(model, tt.Classification(), tt.Checkpoint(model.state_dict()), l2=L2)
    est.fit(TensorDataset(xt, yt.to(DT)))
    ft, fq = _features(model, xt, True), _features(model, xq, True)
    head = torch.cat([est.weight_, est.bias_[:, None]], 1)
    torch.testing.assert_close(head, _newton_head(head, ft, yt, 1), atol=1e-7, rtol=0)
    scores = est.score(TensorDataset(xq, yq.to(DT)))
    sign = 2.0 * yq.to(DT) - 1.0
    expected = sign[:, None] * (fq @ ft.T) * est.alpha_[:, 0][None, :]
    torch.testing.assert_close(scores, expected, atol=1e-12, rtol=0)
    assert (scores.sum(1) - sign * (fq @ head.T)[:, 0]).abs().max() < 1e-6


def test_without_refit_the_model_head_is_explained_and_the_residual_reported() -> None:
    model, (xt, yt), _ = _setup()
    est = RepresenterPoints(
        model, tt.Classification(), tt.Checkpoint(model.state_dict()), l2=L2, refit=False
    ).fit(TensorDataset(xt, yt))
    torch.testing.assert_close(est.weight_, model[2].weight.detach())
    ft = _features(model, xt, True)
    head = torch.cat([model[2].weight.detach(), model[2].bias.detach()[:, None]], 1)
    torch.testing.assert_close(est.alpha_, _alpha_closed_form(head, ft, yt, 3), atol=1e-12, rtol=0)
    expected = float((head - est.alpha_.T @ ft).norm() / head.norm())
    assert est.stationarity_residual_ == pytest.approx(expected, rel=1e-10)
    assert est.stationarity_residual_ > 1e-3  # a random head is far from stationary
    assert est.refit_agreement_ == 1.0


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.head(torch.relu(self.body(x)))


def test_errors_name_the_problem() -> None:
    model, (xt, yt), _ = _setup()
    ckpt = tt.Checkpoint(model.state_dict())
    with pytest.raises(ConfigurationError, match="l2"):
        RepresenterPoints(model, tt.Classification(), ckpt, l2=0.0)
    with pytest.raises(ConfigurationError, match=r"nn\.Linear"):
        RepresenterPoints(model, tt.Classification(), ckpt, layer="1")
    with pytest.raises(NotFittedError):
        RepresenterPoints(model, tt.Classification(), ckpt).self_influence()
    scaled = _Scaled().to(DT)
    est = RepresenterPoints(scaled, tt.Classification(), tt.Checkpoint(scaled.state_dict()))
    with pytest.raises(ConfigurationError, match="runs after it"):
        est.fit(TensorDataset(xt, yt))
    reg = RepresenterPoints(model, tt.Regression(), ckpt, l2=L2)
    y = torch.randn(30, 3, dtype=DT)
    reg.fit(TensorDataset(xt, y))
    assert reg.decompose(TensorDataset(xt)).shape == (30, 3)
    with pytest.raises(ConfigurationError, match="Classification"):
        reg.score(TensorDataset(xt, y))
