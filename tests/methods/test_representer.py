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


def test_composition_is_last_layer_gradients_identity_and_one_over_2_lambda_n() -> None:
    """R, P, w are visible, and the scores are the last-layer gradient inner product."""
    from traintrace.methods.preconditioners import Identity
    from traintrace.methods.streaming import ExactStream

    model, (xt, yt), (xq, yq) = _setup()
    est = RepresenterPoints(
        model, tt.Classification(), tt.Checkpoint(model.state_dict()), l2=L2, progress=False
    ).fit(TensorDataset(xt, yt))
    assert isinstance(est.featurizer, ExactStream) and est.featurizer.keep_captures
    assert est.parameter_names == ["2.weight", "2.bias"]
    assert [type(p) for p in est.preconditioners] == [Identity]
    assert est.weights == [pytest.approx(1 / (2 * L2 * len(yt)))]
    # brute force: explicit gradients at the explained head of Φ_c(x') and of L(x_i, y_i)
    head = nn.Linear(6, 3).to(DT)
    with torch.no_grad():
        head.weight.copy_(est.weight_)
        head.bias.copy_(est.bias_)
    ft, fq = _features(model, xt, False), _features(model, xq, False)

    def grad(value: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(value, [head.weight, head.bias])]
        )

    train_grads = torch.stack(
        [grad(F.cross_entropy(head(ft[i : i + 1]), yt[i : i + 1])) for i in range(len(yt))]
    )
    logit_grads = torch.stack([grad(head(fq[q])[yq[q]]) for q in range(len(yq))])
    expected = -(logit_grads @ train_grads.T) / (2 * L2 * len(yt))
    torch.testing.assert_close(est.score(TensorDataset(xq, yq)), expected, atol=1e-12, rtol=0)


def test_labelled_scores_sum_to_the_label_logit_and_use_labels_false_to_the_predicted() -> None:
    model, (xt, yt), (xq, yq) = _setup(seed=3)
    ckpt = tt.Checkpoint(model.state_dict())
    est = RepresenterPoints(model, tt.Classification(), ckpt, l2=L2, progress=False)
    est.fit(TensorDataset(xt, yt))
    assert est.stationarity_residual_ < 1e-9
    logits = _features(model, xq, True) @ est._head().T
    sums = est.score(TensorDataset(xq, yq)).sum(1)
    torch.testing.assert_close(sums, logits.gather(1, yq[:, None])[:, 0], atol=1e-8, rtol=0)
    predicted = RepresenterPoints(
        model, tt.Classification(use_labels=False), ckpt, l2=L2, progress=False
    ).fit(TensorDataset(xt, yt))
    torch.testing.assert_close(
        predicted.score(TensorDataset(xq, yq)).sum(1), logits.max(1).values, atol=1e-8, rtol=0
    )
    # the task's measurement setting is not used: a margin task explains the logit too
    margin = RepresenterPoints(model, tt.Classification("margin"), ckpt, l2=L2, progress=False)
    torch.testing.assert_close(
        margin.fit(TensorDataset(xt, yt)).score(TensorDataset(xq, yq)).sum(1), sums
    )


def test_queries_never_run_the_training_set_again_and_match_a_fresh_capture() -> None:
    """The kept last-layer captures give the scores a fresh capture pass per block gives."""
    from traintrace.features.engine import ExactGradients
    from traintrace.methods.representer import target_logit_task
    from traintrace.methods.streaming import ExactStream

    model, (xt, yt), (xq, yq) = _setup(seed=5)
    seen: list[int] = []
    model[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    est = RepresenterPoints(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        l2=L2,
        batch_size=8,
        query_block=3,
        progress=False,
    ).fit(TensorDataset(xt, yt))
    seen.clear()
    kept = est.score(TensorDataset(xq, yq))
    assert sum(seen) <= len(yq) + 3  # the queries (and the engine's first check of 3 at most)
    fresh = ExactStream(ExactGradients(model, target_logit_task(est.task), ["2"]))
    est.featurizer = fresh
    fresh.fit(est, est._loader(TensorDataset(xt, yt)), len(yt))
    torch.testing.assert_close(est.score(TensorDataset(xq, yq)), kept, atol=1e-14, rtol=0)
    top = est.top_k(TensorDataset(xq, yq), k=4)
    torch.testing.assert_close(top.opponents.scores, kept.topk(4, dim=1, largest=False).values)


def test_float32_model_scores_in_its_precision() -> None:
    model, (xt, yt), (xq, yq) = _setup()
    model32 = _setup()[0].float()
    ckpt = tt.Checkpoint(model32.state_dict())
    est = RepresenterPoints(model32, tt.Classification(), ckpt, l2=L2, progress=False)
    est.fit(TensorDataset(xt.float(), yt))
    scores = est.score(TensorDataset(xq.float(), yq))
    assert scores.dtype == torch.float32 and est.self_influence().dtype == torch.float32
    ft, fq = _features(model, xt, True), _features(model, xq, True)
    expected = (fq @ ft.T) * est.alpha_.T[yq]
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-4)
