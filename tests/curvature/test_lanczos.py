"""Lanczos eigenpairs and stochastic Lanczos quadrature against ``torch.linalg.eigh``.

Expected values: eigendecompositions of explicit matrices — synthetic ones with a chosen
spectrum (``Q diag(λ) Qᵀ`` for a random orthogonal ``Q``) and the brute-force model Hessian of
``test_operators``. Quadrature weights are checked through Gauss quadrature's exactness:
``Σ_k τ_k θ_k^j = vᵀ A^j v / vᵀ v`` for ``j < 2m``.
"""

from __future__ import annotations

import math

import pytest
import torch

from traintrace.curvature.lanczos import lanczos, slq_density, top_eigenpairs
from traintrace.curvature.operators import Hessian, MatrixOperator
from traintrace.exceptions import ConfigurationError
from traintrace.task import Classification

from .test_operators import DT, brute_hessian, make_data, make_model


def with_spectrum(values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), dtype=DT, generator=g))
    return q @ torch.diag(values.to(DT)) @ q.T


def test_lanczos_builds_an_orthonormal_basis_and_the_projected_matrix() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 40, dtype=DT, generator=g)
    a = a + a.T
    result = lanczos(lambda v: a @ v, 40, 15, seed=3)
    q = result.basis
    assert q.shape == (40, 15)
    torch.testing.assert_close(q.T @ q, torch.eye(15, dtype=DT), atol=1e-12, rtol=0)
    torch.testing.assert_close(q.T @ a @ q, result.tridiagonal, atol=1e-10, rtol=0)


def test_full_lanczos_recovers_every_eigenvalue_even_when_repeated() -> None:
    """The logistic-regression Hessian has a 5-dimensional null space: the Krylov space of one
    start vector is exhausted early and the iteration must restart to span everything."""
    model = make_model("logreg")
    x, y = make_data()
    h = brute_hessian(model, x, y)
    op = Hessian(model, Classification(), model.state_dict(), [(x, y)], damping=0.2)
    result = lanczos(op.matvec, op.dim, op.dim, seed=0)
    ritz, vectors = result.ritz()
    expected = torch.linalg.eigvalsh(h + 0.2 * torch.eye(op.dim, dtype=DT))
    torch.testing.assert_close(ritz, expected, atol=1e-10, rtol=1e-8)
    assert bool((result.betas == 0).any())  # it did restart
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(op.dim, dtype=DT), atol=1e-10, rtol=0)


@pytest.mark.parametrize("by", ["magnitude", "largest", "smallest"])
def test_top_eigenpairs_of_the_mlp_hessian(by: str) -> None:
    model = make_model("mlp")
    x, y = make_data()
    h = brute_hessian(model, x, y)
    op = Hessian(model, Classification(), model.state_dict(), [(x, y)], mode="forward")
    values, vectors = top_eigenpairs(op, 4, iterations=op.dim, by=by)
    exact = torch.linalg.eigvalsh(h)
    key = {"magnitude": exact.abs(), "largest": exact, "smallest": -exact}[by]
    expected = exact[torch.argsort(key, descending=True)[:4]]
    torch.testing.assert_close(values, expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(h @ vectors, vectors * values, atol=1e-9, rtol=0)


def test_few_iterations_suffice_for_well_separated_top_eigenvalues() -> None:
    """Matrix-free use: 30 products on a 200-dim operator find 3 outlying eigenvalues."""
    bulk = torch.linspace(0.0, 1.0, 197, dtype=DT)
    values = torch.cat([torch.tensor([100.0, 50.0, 25.0], dtype=DT), bulk])
    op = MatrixOperator(with_spectrum(values))
    top, vectors = top_eigenpairs(op, 3, iterations=30)
    torch.testing.assert_close(top, values[:3], atol=1e-8, rtol=1e-10)
    residual = op.matmat(vectors) - vectors * top
    assert float(residual.norm()) < 1e-6


def test_slq_quadrature_is_exact_for_low_moments() -> None:
    """Gauss quadrature with m nodes integrates t^j exactly for j < 2m: Σ τ θ^j = vᵀAʲv / vᵀv."""
    g = torch.Generator().manual_seed(2)
    a = with_spectrum(torch.rand(60, dtype=DT, generator=g) * 4 - 1)
    probes = (torch.randint(0, 2, (60, 3), generator=g) * 2 - 1).to(DT)
    dens = slq_density(MatrixOperator(a), iterations=8, probes=probes)
    assert dens.nodes.shape == (3, 8) and dens.weights.shape == (3, 8)
    torch.testing.assert_close(dens.weights.sum(dim=1), torch.ones(3, dtype=DT))
    for j in range(6):
        quad = (dens.weights * dens.nodes**j).sum(dim=1)
        aj = torch.linalg.matrix_power(a, j)
        expected = torch.einsum("pi,ij,pj->p", probes.T, aj, probes.T) / 60
        torch.testing.assert_close(quad, expected, atol=1e-10, rtol=1e-8)


def test_slq_density_integrates_to_one_and_puts_mass_where_the_eigenvalues_are() -> None:
    """Two clusters: 150 eigenvalues near 1, 50 near 10 → masses ≈ 0.75 and 0.25."""
    g = torch.Generator().manual_seed(4)
    low = 0.9 + 0.2 * torch.rand(150, dtype=DT, generator=g)
    high = 9.5 + torch.rand(50, dtype=DT, generator=g)
    op = MatrixOperator(with_spectrum(torch.cat([low, high])))
    dens = slq_density(op, num_probes=10, iterations=30, grid=2000, seed=1)
    integral = float(torch.trapezoid(dens.density, dens.grid))
    assert integral == pytest.approx(1.0, abs=1e-3)
    assert dens.mass(0.5, 1.5) == pytest.approx(0.75, abs=0.05)
    assert dens.mass(9.0, 11.0) == pytest.approx(0.25, abs=0.05)
    assert dens.mass(2.0, 8.5) < 0.01
    # the grid density agrees with the exact Gaussian masses
    inside = (dens.grid >= 0.5) & (dens.grid <= 1.5)
    grid_mass = float(torch.trapezoid(dens.density[inside], dens.grid[inside]))
    assert grid_mass == pytest.approx(dens.mass(0.5, 1.5), abs=5e-3)


def test_slq_of_the_model_hessian_matches_its_spectrum() -> None:
    model = make_model("mlp")
    x, y = make_data()
    h = brute_hessian(model, x, y)
    op = Hessian(model, Classification(), model.state_dict(), [(x, y)], mode="forward")
    exact = torch.linalg.eigvalsh(h)
    g = torch.Generator().manual_seed(6)
    probes = (torch.randint(0, 2, (op.dim, 4), generator=g) * 2 - 1).to(DT)
    dens = slq_density(op, iterations=op.dim, grid=4000, sigma=1e-3, probes=probes)
    # with m = P the Ritz values are the eigenvalues, so all mass sits on them
    weighted = dens.nodes[dens.weights > 1e-10]
    distance = (weighted[:, None] - exact[None, :]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-8
    assert dens.mass(float(exact[0]) - 0.01, float(exact[-1]) + 0.01) == pytest.approx(1.0)
    neg_fraction = float((exact < 0).double().mean())
    assert dens.mass(-10.0, -1e-2) == pytest.approx(neg_fraction, abs=0.2)
    # the density's mean is the probes' mean Rayleigh quotient vᵀHv / vᵀv (Hutchinson)
    mean = float(torch.trapezoid(dens.grid * dens.density, dens.grid))
    rayleigh = float(torch.einsum("ip,ij,jp->p", probes, h, probes).mean()) / op.dim
    assert mean == pytest.approx(rayleigh, abs=1e-4)


def test_errors() -> None:
    with pytest.raises(ConfigurationError, match="dim="):
        top_eigenpairs(lambda v: v, 2)
    with pytest.raises(ConfigurationError, match="k must be"):
        top_eigenpairs(MatrixOperator(torch.eye(3, dtype=DT)), 4)
    with pytest.raises(ConfigurationError, match="iterations"):
        lanczos(lambda v: v, 3, 0)
    with pytest.raises(ConfigurationError, match="probes"):
        slq_density(MatrixOperator(torch.eye(3, dtype=DT)), probes=torch.ones(4, 2, dtype=DT))


def test_batched_slq_quadrature_matches_one_probe_at_a_time() -> None:
    """All probes in one block recursion give the nodes and weights of :func:`slq_density`
    (same Rademacher probes for the same seed), with and without re-orthogonalization."""
    from traintrace.curvature.lanczos import slq_density, slq_quadrature

    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=g))
    values = torch.linspace(0.01, 5.0, 40, dtype=torch.float64)
    matrix = basis @ torch.diag(values) @ basis.T
    dens = slq_density(lambda v: matrix @ v, num_probes=4, iterations=12, grid=2, seed=3, dim=40)
    nodes, weights = slq_quadrature(lambda b: matrix @ b, 40, 4, 12, seed=3)
    torch.testing.assert_close(nodes, dens.nodes, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights, dens.weights, atol=1e-10, rtol=0)
    plain, plain_w = slq_quadrature(lambda b: matrix @ b, 40, 4, 12, seed=3, reorthogonalize=False)
    estimate = (plain_w * torch.log(plain)).sum(1).mean() * 40
    exact = float(torch.log(values).sum())
    reorth = float((weights * torch.log(nodes)).sum(1).mean() * 40)
    assert float(estimate) == pytest.approx(reorth, rel=1e-6)
    assert reorth == pytest.approx(exact, rel=0.1)
    # m = P on a matrix with a repeated eigenvalue: the Krylov space closes early, later nodes
    # carry zero weight and the quadrature is exact
    repeated = torch.diag(torch.tensor([1.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    n4, w4 = slq_quadrature(lambda b: repeated @ b, 4, 3, 4, seed=0)
    assert bool(torch.isfinite(n4).all()) and torch.allclose(
        w4.sum(1), torch.ones(3, dtype=torch.float64)
    )
    trace_log = 4 * float((w4 * torch.log(n4.clamp_min(1e-300))).sum(1).mean())
    assert trace_log == pytest.approx(math.log(6.0), abs=1e-10)
