"""Linearized-Laplace evidence against a brute-force log-determinant, and the damping search.

Expected values: the GGN of the *summed* loss built explicitly from ``torch.func.jacrev`` of the
logits and the softmax output Hessian ``diag(p) − p pᵀ`` per example, then
``log Z(δ) = −Σ CE − (δ/2)‖θ‖² + (P/2) log δ − ½ logdet(GGN_sum + δ I)`` with ``δ = n λ``
(``torch.linalg.slogdet``); the K-FAC variant uses the dense K-FAC matrix
(``KroneckerInverse.dense``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.curvature.lanczos import slq_density
from traintrace.curvature.laplace import DampingSelection, LaplaceEvidence, select_damping
from traintrace.curvature.operators import GaussNewton
from traintrace.exceptions import ConfigurationError, NotPositiveDefiniteError

DT = torch.float64
N = 40


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N, 3, dtype=DT, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    # a few full-batch steps so that θ is a trained-ish point, as the evidence assumes
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def _flat_params(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(v):
        out, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            out[name] = v[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return out

    return theta, unflat


def brute_log_evidence(model, x, y, damping: float) -> float:
    """``log Z`` in the textbook prior-precision form, ``δ = n λ``, from an explicit GGN."""
    theta, unflat = _flat_params(model)
    logits = functional_call(model, unflat(theta), (x,))
    jac = jacrev(lambda v: functional_call(model, unflat(v), (x,)))(theta)  # [N, C, P]
    p = torch.softmax(logits, 1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
    ggn_sum = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac)
    n, dim = len(y), theta.numel()
    delta = n * damping
    nll = float(F.cross_entropy(logits, y, reduction="sum"))
    _, logdet = torch.linalg.slogdet(ggn_sum + delta * torch.eye(dim, dtype=DT))
    return (
        -nll
        - 0.5 * delta * float(theta @ theta)
        + 0.5 * dim * math.log(delta)
        - 0.5 * float(logdet)
    )


def test_evidence_equals_the_brute_force_log_determinant() -> None:
    model, x, y = _setup()
    evidence = LaplaceEvidence.compute(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        batch_size=16,
        progress=False,
    )
    assert evidence.method == "eigen" and evidence.num_parameters == 31
    for lam in (1e-4, 3e-3, 0.1, 2.0):
        assert float(evidence(lam)) == pytest.approx(brute_log_evidence(model, x, y, lam), abs=1e-8)
    curve = evidence(torch.tensor([1e-3, 1e-2]))
    assert curve.shape == (2,)


def test_the_search_matches_a_grid_search_and_the_mackay_fixed_point() -> None:
    model, x, y = _setup()
    selection = select_damping(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        progress=False,
    )
    assert isinstance(selection, DampingSelection)
    assert selection.search == "brent" and selection.method == "eigen"
    # brute-force grid search, 4001 log-spaced points, on the explicit log-determinant's formula
    low, high = selection.bounds
    grid = torch.logspace(math.log10(low), math.log10(high), 4001, dtype=DT)
    theta, _ = _flat_params(model)
    values = [brute_log_evidence(model, x, y, float(lam)) for lam in grid[::40]]
    coarse = int(torch.tensor(values).argmax()) * 40
    fine = grid[max(coarse - 40, 0) : coarse + 41]
    fine_values = torch.tensor([brute_log_evidence(model, x, y, float(lam)) for lam in fine])
    best = float(fine[int(fine_values.argmax())])
    step = float(grid[1] / grid[0])
    assert selection.damping == pytest.approx(best, rel=2 * (step - 1))
    assert selection.log_evidence >= float(fine_values.max()) - 1e-9
    assert selection.log_evidence == pytest.approx(
        brute_log_evidence(model, x, y, selection.damping), abs=1e-8
    )
    # the curve reported is the evidence on its grid, and its argmax is the search's neighbour
    assert selection.grid.shape == selection.log_evidence_grid.shape == (41,)
    assert selection.grid_damping == pytest.approx(selection.damping, rel=0.6)
    # MacKay: at the optimum λ = γ / (n ‖θ‖²)
    n_norm = N * float(theta @ theta)
    assert selection.damping == pytest.approx(selection.effective_parameters / n_norm, rel=1e-4)
    assert selection.prior_precision == pytest.approx(N * selection.damping)
    assert low < selection.damping < high


def test_kronecker_eigenvalues_give_the_dense_kfac_log_determinant() -> None:
    model, x, y = _setup()
    data = TensorDataset(x, y)
    state = model.state_dict()
    for config in (tt.KFAC(sampled_labels=False), tt.EKFAC(sampled_labels=False)):
        evidence = LaplaceEvidence.compute(
            model,
            tt.Classification(),
            tt.Checkpoint(state),
            data,
            curvature=config,
            progress=False,
        )
        assert evidence.method == "kfac"
        dense = config.prepare(model, tt.Classification(), state, [data[:]]).dense()
        for lam in (1e-3, 0.05):
            _, logdet = torch.linalg.slogdet(dense + lam * torch.eye(31, dtype=DT))
            torch.testing.assert_close(evidence.log_det(lam)[0], logdet, atol=1e-8, rtol=1e-10)
        assert evidence.select().damping > 0


def test_slq_log_determinant() -> None:
    model, x, y = _setup()
    data = TensorDataset(x, y)
    op = GaussNewton(model, tt.Classification(), model.state_dict(), [data[:]])
    exact = LaplaceEvidence.compute(
        model, tt.Classification(), tt.Checkpoint(model.state_dict()), data, progress=False
    )
    # SLQ with the standard basis as probes and m = P steps is exact: tr f(C) = Σ_j f(C)_jj
    dens = slq_density(op, iterations=31, grid=2, probes=torch.eye(31, dtype=DT))
    basis = LaplaceEvidence(
        log_likelihood=exact.log_likelihood,
        squared_norm=exact.squared_norm,
        num_examples=N,
        num_parameters=31,
        nodes=dens.nodes,
        weights=dens.weights,
        method="slq",
    )
    for lam in (1e-3, 0.1):
        assert float(basis(lam)) == pytest.approx(float(exact(lam)), abs=1e-7)
    # random probes: an unbiased estimate, a few percent off with 30 probes on this model
    slq = LaplaceEvidence.compute(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        data,
        method="slq",
        num_probes=30,
        iterations=20,
        progress=False,
    )
    assert slq.eigenvalues is None
    for lam in (1e-2, 0.1):
        assert float(slq.log_det(lam)[0]) == pytest.approx(float(exact.log_det(lam)[0]), rel=0.1)
    assert slq.select().damping == pytest.approx(exact.select().damping, rel=0.5)


def test_errors() -> None:
    model, x, y = _setup()
    data = TensorDataset(x, y)
    ckpt = tt.Checkpoint(model.state_dict())
    task = tt.Classification()
    with pytest.raises(ConfigurationError, match="bounds"):
        select_damping(model, task, ckpt, data, bounds=(1.0, 0.1), progress=False)
    with pytest.raises(ConfigurationError, match="method"):
        select_damping(model, task, ckpt, data, method="kfac", progress=False)
    with pytest.raises(ConfigurationError, match="max_dim"):
        select_damping(model, task, ckpt, data, method="eigen", max_dim=10, progress=False)
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    with pytest.raises(ConfigurationError, match="‖θ‖² = 0"):
        select_damping(model, task, tt.Checkpoint(zero), data, progress=False)
    # an untrained tanh MLP's Hessian is indefinite: the Laplace evidence refuses it
    torch.manual_seed(5)
    raw = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    with pytest.raises(NotPositiveDefiniteError, match="ggn"):
        select_damping(
            raw, task, tt.Checkpoint(raw.state_dict()), data, curvature="hessian", progress=False
        )
    # PSD curvatures: negative eigenvalues are round-off, clamped; a Hessian's are refused
    values = torch.tensor([-1e-5, 0.5, 2.0], dtype=DT)
    common = dict(log_likelihood=-3.0, squared_norm=1.0, num_examples=10, num_parameters=3)
    ggn = LaplaceEvidence(eigenvalues=values, curvature="ggn", **common)
    assert float(ggn.eigenvalues[0]) == 0.0
    with pytest.raises(NotPositiveDefiniteError, match="-1e-05"):
        LaplaceEvidence(eigenvalues=values, curvature="hessian", **common)
    with pytest.warns(RuntimeWarning, match="edge of bounds"):
        select_damping(model, task, ckpt, data, bounds=(1e-9, 1e-8), progress=False)


def test_last_layer_evidence_uses_the_principal_block() -> None:
    """``layers="last"``: a last-layer Laplace — the GGN block of the last layer (a principal
    submatrix of the full GGN) and ‖θ‖² of its parameters only."""
    model, x, y = _setup()
    theta, unflat = _flat_params(model)
    jac = jacrev(lambda v: functional_call(model, unflat(v), (x,)))(theta)
    p = torch.softmax(functional_call(model, unflat(theta), (x,)), 1)
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    ggn_mean = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / N
    last = slice(16, 31)  # 2.weight (3×4) and 2.bias (3) follow 0.weight (4×3) and 0.bias (4)
    block, t_last = ggn_mean[last, last], theta[last]
    evidence = LaplaceEvidence.compute(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        layers="last",
        progress=False,
    )
    assert evidence.num_parameters == 15
    nll = float(F.cross_entropy(functional_call(model, unflat(theta), (x,)), y, reduction="sum"))
    for lam in (1e-3, 0.2):
        _, logdet = torch.linalg.slogdet(block + lam * torch.eye(15, dtype=DT))
        expected = (
            -nll
            - 0.5 * N * lam * float(t_last @ t_last)
            + 7.5 * math.log(lam)
            - 0.5 * float(logdet)
        )
        assert float(evidence(lam)) == pytest.approx(expected, abs=1e-8)
