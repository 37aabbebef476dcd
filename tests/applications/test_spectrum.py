"""The curvature spectrum against ``torch.linalg.eigvalsh`` of explicit matrices.

Expected values: the Hessian of the mean loss from ``torch.autograd.functional.hessian`` (full
data, and the mini-batch alone), the GGN from an explicit Jacobian of the logits and the
explicit Hessian of the loss in the logits, ``Jᵀ H_out J / N``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_local_ensembles import explicit_hessian
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.applications.spectrum import SpectrumResult, spectrum
from traintrace.exceptions import ConfigurationError

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(3)
    x = 1.5 * torch.randn(40, 3, dtype=DT, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def explicit_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def logits(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, params, (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(logits, flat0)  # [N·C, P]
    out0 = logits(flat0).detach()
    h_out = torch.autograd.functional.hessian(
        lambda o: F.cross_entropy(o.reshape(len(y), -1), y, reduction="sum"), out0
    )
    return jac.T @ h_out @ jac / len(y)


def test_top_eigenvalues_and_density_of_the_hessian_and_a_mini_batch() -> None:
    model, x, y = _setup()
    h = explicit_hessian(model, x, y)
    hb = explicit_hessian(model, x[:8], y[:8])
    p = h.shape[0]
    result = spectrum(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        top=4,
        num_probes=3,
        iterations=p,
        batch_data=(x[:8], y[:8]),
        batch_size=16,
        progress=False,
    )
    assert isinstance(result, SpectrumResult)
    exact = torch.linalg.eigvalsh(h)
    exact_b = torch.linalg.eigvalsh(hb)
    torch.testing.assert_close(result.top_eigenvalues, exact.flip(0)[:4], rtol=1e-6, atol=0)
    torch.testing.assert_close(result.batch_top_eigenvalues, exact_b.flip(0)[:4], rtol=1e-6, atol=0)
    assert result.min_eigenvalue == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-9)
    assert result.batch_min_eigenvalue == pytest.approx(float(exact_b[0]), rel=1e-6, abs=1e-9)
    assert result.num_examples == 40 and result.batch_size == 8
    lam_min, lam_max = float(exact[0]), float(exact[-1])
    assert lam_min < 0  # a random MLP's Hessian is indefinite: the rule must lift it
    assert result.suggested_damping == pytest.approx(-lam_min + 1e-3 * lam_max, rel=1e-6)
    for dens in (result.density, result.batch_density):
        mass = torch.trapezoid(dens.density, dens.grid)
        assert abs(float(mass) - 1.0) < 1e-3
    # with m = P every probe's quadrature nodes are the eigenvalues themselves
    torch.testing.assert_close(result.density.nodes[0].sort().values, exact, atol=1e-9, rtol=1e-7)
    # the first moment of the density is the trace / P
    mean = float(torch.trapezoid(result.density.density * result.density.grid, result.density.grid))
    assert mean == pytest.approx(float(exact.mean()), abs=0.2 * float(exact.abs().max()))


def test_ggn_spectrum_with_damping_and_few_iterations() -> None:
    model, x, y = _setup()
    g = explicit_ggn(model, x, y)
    exact = torch.linalg.eigvalsh(g + 0.1 * torch.eye(g.shape[0], dtype=DT))
    result = spectrum(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        curvature="ggn",
        top=2,
        damping=0.1,
        density=False,
        iterations=25,
        progress=False,
    )
    assert result.density is None and result.batch_density is None
    torch.testing.assert_close(result.top_eigenvalues, exact.flip(0)[:2], rtol=1e-6, atol=0)
    assert result.min_eigenvalue >= float(exact[0]) - 1e-9  # a Ritz value: an upper bound
    assert result.suggested_damping == pytest.approx(1e-3 * float(exact[-1]), rel=1e-6)


def test_errors() -> None:
    model, x, y = _setup()
    ckpt = tt.Checkpoint(model.state_dict())
    data = TensorDataset(x, y)
    with pytest.raises(ConfigurationError, match="top"):
        spectrum(model, tt.Classification(), ckpt, data, top=0)
    with pytest.raises(ConfigurationError, match="iterations"):
        spectrum(model, tt.Classification(), ckpt, data, top=5, iterations=3)
    with pytest.raises(ConfigurationError, match="curvature"):
        spectrum(model, tt.Classification(), ckpt, data, curvature="fisher")


def _heavy_regression():
    """Linear least squares where one example's input is 6× the others: a mini-batch holding it
    has a far larger curvature than the full data (``C = (2/N) Σ x xᵀ``)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, dtype=DT, generator=g)
    x[5] *= 6.0
    y = torch.randn(32, 1, dtype=DT, generator=g)
    model = nn.Linear(4, 1, bias=False).to(DT)
    return model, TensorDataset(x, y), torch.randn(4, dtype=DT, generator=g)


def test_batch_scaling_against_explicit_batch_eigenvalues() -> None:
    model, data, _ = _heavy_regression()
    x = data.tensors[0]
    result = spectrum(
        model,
        tt.Regression(),
        tt.Checkpoint(model.state_dict()),
        data,
        top=1,
        density=False,
        batch_sizes=[2, 8],
        batch_samples=4,
        batch_iterations=4,
        seed=3,
        progress=False,
    )
    scaling = result.batch_scaling
    assert scaling is not None and scaling.batch_sizes == (2, 8) and scaling.num_examples == 32
    full = torch.linalg.eigvalsh(2 * x.T @ x / 32)
    assert scaling.full_top == pytest.approx(float(full[-1]), rel=1e-9)
    # the same mini-batches as spectrum draws (seeded randperm), explicit 2 X_Bᵀ X_B / B
    gen = torch.Generator().manual_seed(3)
    for row, size in enumerate((2, 8)):
        tops, mins = [], []
        for _ in range(4):
            idx = torch.randperm(32, generator=gen)[:size]
            values = torch.linalg.eigvalsh(2 * x[idx].T @ x[idx] / size)
            tops.append(float(values[-1]))
            mins.append(float(values[0]))
        assert float(scaling.top_mean[row]) == pytest.approx(sum(tops) / 4, rel=1e-8)
        assert float(scaling.top_max[row]) == pytest.approx(max(tops), rel=1e-8)
        assert float(scaling.min_mean[row]) == pytest.approx(sum(mins) / 4, rel=1e-6, abs=1e-9)
    # mini-batch spectra are wider, and the 1/B fit says so
    assert bool((scaling.top_mean > scaling.full_top).all()) and scaling.top_slope > 0
    u = torch.tensor([1 / 2 - 1 / 32, 1 / 8 - 1 / 32], dtype=DT)
    slope = float((u * (scaling.top_mean - scaling.full_top)).sum() / (u * u).sum())
    assert scaling.top_slope == pytest.approx(slope)
    assert scaling.predicted_top(32) == pytest.approx(scaling.full_top)
    assert scaling.lissa_scale(2) >= 1.1 * float(scaling.top_max[0])
    # damping grows with lr and with 1/B: δ = lift + η σ²_B + 1e-3 λ_max
    d_small, d_large = scaling.suggested_damping(2, lr=0.1), scaling.suggested_damping(8, lr=0.1)
    assert d_small > d_large > 0
    variance = scaling.full_top * (scaling.predicted_top(2) - scaling.full_top)
    lift = max(0.0, -scaling.predicted_min(2))
    expected = lift + 0.1 * variance + 1e-3 * scaling.full_top
    assert d_small == pytest.approx(expected)
    assert scaling.suggested_damping(2, lr=0.2) > d_small
    with pytest.raises(ConfigurationError, match="batch_sizes"):
        spectrum(model, tt.Regression(), tt.Checkpoint(model.state_dict()), data, top=1,
                 density=False, batch_sizes=[64], progress=False)  # fmt: skip


def test_lissa_with_the_batch_aware_settings_converges_where_the_full_data_scale_diverges() -> None:
    from torch.utils.data import DataLoader

    from traintrace.curvature.operators import Hessian
    from traintrace.curvature.solvers import LiSSA

    model, data, b = _heavy_regression()
    state = model.state_dict()
    scaling = spectrum(
        model, tt.Regression(), tt.Checkpoint(state), data, top=1, density=False,
        batch_sizes=[2, 4, 8, 16], batch_samples=8, progress=False,
    ).batch_scaling  # fmt: skip
    damping = scaling.suggested_damping(2)
    op = Hessian(
        model, tt.Regression(), state, DataLoader(data, batch_size=2), damping=damping,
        cache_batches=True,
    )  # fmt: skip
    matrix = op.dense()
    exact = torch.linalg.solve(matrix, b)
    full_scale = 1.1 * float(torch.linalg.eigvalsh(matrix)[-1])  # the full-data default
    with pytest.raises(tt.SolverDivergedError, match="mini-batch"):
        LiSSA(scale=full_scale, depth=300, stochastic=True).prepare(op).solve(b)
    # the default scale of a stochastic LiSSA is batch-aware: above every batch's λ_max
    inverse = LiSSA(depth=300, stochastic=True, residual_tol=0.2).prepare(op)
    assert inverse.scale > 2 * full_scale
    out = inverse.solve(b)
    assert float((out - exact).norm() / exact.norm()) < 0.15  # measured 0.08
    assert inverse.info.converged
    # so is the scale the spectrum suggests for B = 2
    suggested = LiSSA(scale=scaling.lissa_scale(2), depth=300, stochastic=True, residual_tol=None)
    out = suggested.prepare(op).solve(b)
    assert float((out - exact).norm() / exact.norm()) < 0.15  # measured 0.12
