"""Local ensembles against an explicit eigendecomposition, and a qualitative OOD check.

Expected values: the Hessian of the mean training loss from ``torch.autograd.functional.hessian``
on the flat parameter vector, its eigenvectors from ``torch.linalg.eigh``, and query gradients
from one ``torch.autograd.grad`` call per example (``reference.loop_gradients``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import loop_gradients
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.applications.local_ensembles import LocalEnsembles
from traintrace.exceptions import ConfigurationError

DT = torch.float64


def explicit_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[start : start + size].reshape(shape)
            start += size
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(mean_loss, flat0)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 3, dtype=DT, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    xq = 2 * torch.randn(6, 3, dtype=DT, generator=g)
    return model, x, y, xq


def _complement_norms(h: torch.Tensor, grads: torch.Tensor, m: int) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(h)
    u = vectors[:, torch.argsort(values.abs(), descending=True)[:m]]
    return (grads - grads @ u @ u.T).norm(dim=1)


@pytest.mark.parametrize("prediction", ["output", "measurement"])
def test_scores_match_explicit_eigh_and_gradients(prediction: str) -> None:
    model, x, y, xq = _tiny()
    m = 6
    h = explicit_hessian(model, x, y)
    values = torch.linalg.eigvalsh(h)
    mags = values.abs().sort(descending=True).values
    assert mags[m - 1] - mags[m] > 1e-3 * mags[0]  # a gap, so the top-m span is well defined

    def max_logit(mod, ex):
        return mod(ex[0][None])[0].max()

    if prediction == "output":
        qdata = TensorDataset(xq)
        grads = loop_gradients(model, model.state_dict(), [(q,) for q in xq], max_logit)
    else:
        yq = torch.randint(0, 3, (len(xq),), generator=torch.Generator().manual_seed(5))
        qdata = TensorDataset(xq, yq)
        grads = loop_gradients(
            model,
            model.state_dict(),
            list(zip(xq, yq, strict=True)),
            lambda mod, ex: F.cross_entropy(mod(ex[0][None]), ex[1][None]),
        )
    le = LocalEnsembles(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        rank=m,
        iterations=h.shape[0],
        prediction=prediction,
        batch_size=16,
        progress=False,
    )
    scores = le.score(qdata)
    torch.testing.assert_close(le.query_gradients(qdata), grads, atol=1e-12, rtol=0)
    torch.testing.assert_close(scores, _complement_norms(h, grads, m), atol=1e-6, rtol=0)
    torch.testing.assert_close(le.eigenvalues_.abs(), mags[:m], atol=1e-9, rtol=0)
    assert bool((le.eigen_residuals_ < 1e-6).all())


def test_restricted_layers_and_ggn_use_the_matching_curvature() -> None:
    model, x, y, xq = _tiny()
    le = LocalEnsembles(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        rank=3,
        curvature="ggn",
        layers="2",
        iterations=15,
        progress=False,
    )
    scores = le.score(TensorDataset(xq))
    # for the last layer alone the network is linear in the parameters: GGN = Hessian
    last = nn.Linear(4, 3).to(DT)
    last.load_state_dict(model[2].state_dict())
    with torch.no_grad():
        feats = model[1](model[0](x))
        fq = model[1](model[0](xq))
    h = explicit_hessian(last, feats, y)
    grads = loop_gradients(
        last, last.state_dict(), [(q,) for q in fq], lambda m, e: m(e[0][None])[0].max()
    )
    torch.testing.assert_close(scores, _complement_norms(h, grads, 3), atol=1e-6, rtol=0)


def test_points_far_from_the_training_data_score_higher() -> None:
    """Two Gaussian blobs in 2-D; a tanh MLP fits them. Queries on a circle of radius 8 (far
    from both blobs) must outrank in-distribution queries: AUROC ≥ 0.95 (measured 0.9975).
    Projecting onto the top eigenvectors instead of their complement gives AUROC 0.12 here."""
    g = torch.Generator().manual_seed(0)
    n = 100
    centers = torch.tensor([[-1.5, 0.0], [1.5, 0.0]], dtype=DT)
    y = torch.arange(2).repeat_interleave(n // 2)
    x = centers[y] + 0.5 * torch.randn(n, 2, dtype=DT, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    inside = centers[torch.arange(2).repeat(10)] + 0.5 * torch.randn(20, 2, dtype=DT, generator=g)
    angles = torch.linspace(0, 2 * torch.pi, 21, dtype=DT)[:-1]
    far = 8.0 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    le = LocalEnsembles(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        rank=5,
        iterations=30,
        progress=False,
    )
    s_in, s_far = le.score(TensorDataset(inside)), le.score(TensorDataset(far))
    auroc = float((s_far[:, None] > s_in[None, :]).to(DT).mean())
    assert auroc >= 0.95, auroc


def test_errors() -> None:
    model, x, y, _ = _tiny()
    ckpt = tt.Checkpoint(model.state_dict())
    data = TensorDataset(x, y)
    with pytest.raises(ConfigurationError, match="rank"):
        LocalEnsembles(model, tt.Classification(), ckpt, data, rank=0)
    with pytest.raises(ConfigurationError, match="curvature"):
        LocalEnsembles(model, tt.Classification(), ckpt, data, curvature="fisherman")
    with pytest.raises(ConfigurationError, match="complement"):
        LocalEnsembles(model, tt.Classification(), ckpt, data, rank=31)
    with pytest.raises(ConfigurationError, match="Checkpoint"):
        LocalEnsembles(model, tt.Classification(), model.state_dict(), data)
