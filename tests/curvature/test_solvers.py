"""Inverse-curvature solvers against ``torch.linalg.solve`` on explicit damped matrices.

Expected values: the brute-force Hessian / empirical Fisher of ``test_operators`` (autograd's
explicit Hessian, a loop of per-example gradients) plus ``λI``, solved by ``torch.linalg.solve``.
Errors are relative: ``‖x − x*‖ / ‖x*‖``.

Tolerances (float64):

* ``Exact`` 1e-10 — a Cholesky solve of the same matrix;
* ``CG(tol=1e-12)`` 1e-9 — stops at relative residual 1e-12, times ``κ ≈ 20``;
* ``LiSSA(depth=450)`` 1e-8 — the error shrinks by ``1 − λ_min/s ≈ 0.95`` per step
  (``0.95^450 ≈ 1e-10``);
* ``Arnoldi(rank=P, iterations=P)`` 1e-8 — full rank: the exact eigendecomposition.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from traintrace.curvature.operators import EmpiricalFisher, Hessian, MatrixOperator
from traintrace.curvature.solvers import (
    CG,
    MFAC,
    Arnoldi,
    CGInverse,
    Exact,
    LiSSA,
    LowRankInverse,
    Solver,
    WoodburyInverse,
    make_solver,
)
from traintrace.exceptions import (
    ConfigurationError,
    ConvergenceWarning,
    NotPositiveDefiniteError,
    SolverDivergedError,
)
from traintrace.task import Classification

from .test_operators import (
    DT,
    MODELS,
    brute_fisher,
    brute_hessian,
    loader,
    make_data,
    make_model,
)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


class Problem:
    """A damped Hessian operator, its explicit matrix and a few right-hand sides."""

    def __init__(self, model_name: str, damping: float | None = None) -> None:
        model = make_model(model_name)
        x, y = make_data()
        self.hessian = brute_hessian(model, x, y)
        eye = torch.eye(self.hessian.shape[0], dtype=DT)
        lam_min = float(torch.linalg.eigvalsh(self.hessian)[0])
        # 0.1 above the most negative eigenvalue: PD with condition number ≈ 15–20
        self.damping = 0.1 + max(0.0, -lam_min) if damping is None else damping
        self.matrix = self.hessian + self.damping * eye
        self.operator = Hessian(
            model,
            Classification(),
            model.state_dict(),
            [(x, y)],
            damping=self.damping,
            mode="forward",
            cache_batches=True,
        )
        self.model, self.x, self.y = model, x, y
        g = torch.Generator().manual_seed(5)
        self.rhs = torch.randn(self.operator.dim, 3, dtype=DT, generator=g)


_PROBLEMS: dict[str, Problem] = {}


def problem(model_name: str) -> Problem:
    if model_name not in _PROBLEMS:
        _PROBLEMS[model_name] = Problem(model_name)
    return _PROBLEMS[model_name]


SOLVERS = {
    "exact": (lambda p: Exact(), 1e-10),
    "cg": (lambda p: CG(tol=1e-12), 1e-9),
    "lissa": (lambda p: LiSSA(depth=450), 1e-8),
    "arnoldi": (lambda p: Arnoldi(rank=p, iterations=p), 1e-8),
}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_solvers_match_linalg_solve(solver_name: str, model_name: str) -> None:
    prob = problem(model_name)
    factory, tol = SOLVERS[solver_name]
    inverse = factory(prob.operator.dim).prepare(prob.operator)
    expected = torch.linalg.solve(prob.matrix, prob.rhs)
    block = inverse.solve(prob.rhs.T).T
    assert block.shape == prob.rhs.shape
    assert rel_err(block, expected) < tol
    single = inverse.solve(prob.rhs[:, 0])
    assert single.shape == (prob.operator.dim,)
    assert rel_err(single, expected[:, 0]) < tol


def test_cg_reports_convergence() -> None:
    prob = problem("mlp")
    inverse = CG(tol=1e-10).prepare(prob.operator)
    inverse.solve(prob.rhs.T)
    assert inverse.info.converged is True
    assert inverse.info.residual is not None and inverse.info.residual <= 1e-10
    assert 1 <= inverse.info.iterations <= 3 * prob.operator.dim


def test_cg_converges_in_as_many_steps_as_distinct_eigenvalues() -> None:
    """A property of exact conjugate directions (a steepest-descent-like bug needs many more)."""
    values = torch.tensor([1.0, 2.0, 5.0] * 10, dtype=DT)
    q, _ = torch.linalg.qr(
        torch.randn(30, 30, dtype=DT, generator=torch.Generator().manual_seed(9))
    )
    op = MatrixOperator(q @ torch.diag(values) @ q.T)
    inverse = CG(tol=1e-10).prepare(op)
    rhs = torch.randn(30, 2, dtype=DT, generator=torch.Generator().manual_seed(10))
    out = inverse.solve(rhs.T).T
    assert inverse.info.iterations <= 4
    assert rel_err(out, torch.linalg.solve(op.dense(), rhs)) < 1e-9


def test_cg_non_convergence_raises_or_warns() -> None:
    prob = problem("mlp")
    with pytest.raises(SolverDivergedError, match=r"did not converge.*max_iter=3"):
        CG(tol=1e-12, max_iter=3).prepare(prob.operator).solve(prob.rhs.T)
    inverse = CG(tol=1e-12, max_iter=3, on_nonconvergence="warn").prepare(prob.operator)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        out = inverse.solve(prob.rhs.T).T
    assert inverse.info.converged is False and inverse.info.iterations == 3
    assert bool(torch.isfinite(out).all())


def test_cg_on_indefinite_hessian_raises_with_damping_advice() -> None:
    prob = problem("mlp")
    op = Hessian(prob.model, Classification(), prob.model.state_dict(), [(prob.x, prob.y)])
    values, vectors = torch.linalg.eigh(prob.hessian)
    assert float(values[0]) < -0.1  # precondition: this Hessian is indefinite
    with pytest.raises(NotPositiveDefiniteError, match=r"pᵀAp <= 0.*damping >") as err:
        CG().prepare(op).solve(vectors[:, 0])  # first direction has curvature λ_min < 0
    suggested = float(re.search(r"damping > ([-0-9.e+]+)", str(err.value)).group(1))
    assert suggested == pytest.approx(-float(values[0]), rel=1e-6)
    with pytest.raises(NotPositiveDefiniteError):
        diag = MatrixOperator(torch.diag(torch.tensor([-1.0, 2.0, 3.0], dtype=DT)))
        CG().prepare(diag).solve(torch.tensor([1.0, 0.0, 0.0], dtype=DT))


def test_exact_refuses_indefinite_and_suggests_a_damping_that_works() -> None:
    prob = problem("mlp")
    op = Hessian(prob.model, Classification(), prob.model.state_dict(), [(prob.x, prob.y)])
    lam_min = float(torch.linalg.eigvalsh(prob.hessian)[0])
    with pytest.raises(NotPositiveDefiniteError, match="smallest eigenvalue") as err:
        Exact().prepare(op)
    message = str(err.value)
    assert f"{lam_min:.6g}" in message
    suggested = float(re.search(r"damping >= ([-0-9.e+]+)", message).group(1))
    assert suggested > -lam_min
    damped = Hessian(
        prob.model, Classification(), prob.model.state_dict(), [(prob.x, prob.y)], damping=suggested
    )
    out = Exact().prepare(damped).solve(prob.rhs.T).T
    expected = torch.linalg.solve(prob.hessian + suggested * torch.eye(op.dim, dtype=DT), prob.rhs)
    assert rel_err(out, expected) < 1e-8


def test_exact_allow_indefinite_inverts_the_absolute_value() -> None:
    prob = problem("mlp")
    values, vectors = torch.linalg.eigh(prob.hessian)
    shifted = prob.hessian + 0.05 * torch.eye(prob.hessian.shape[0], dtype=DT)  # still indefinite
    op = MatrixOperator(0.5 * (shifted + shifted.T))
    inverse = Exact(allow_indefinite=True).prepare(op)
    abs_inv = vectors @ torch.diag(1.0 / (values + 0.05).abs()) @ vectors.T
    assert rel_err(inverse.solve(prob.rhs.T).T, abs_inv @ prob.rhs) < 1e-8


def test_lissa_estimates_a_scale_above_the_top_eigenvalue() -> None:
    prob = problem("logreg")
    inverse = LiSSA(depth=10).prepare(prob.operator)
    lam_max = float(torch.linalg.eigvalsh(prob.matrix)[-1])
    assert lam_max < inverse.scale <= 1.1 * lam_max * (1 + 1e-6)


def test_lissa_divergence_raises_with_a_scale_that_works() -> None:
    prob = problem("mlp")
    lam_max = float(torch.linalg.eigvalsh(prob.matrix)[-1])
    with pytest.raises(SolverDivergedError, match=r"LiSSA diverged.*LiSSA\(scale=") as err:
        LiSSA(scale=lam_max / 100, depth=200).prepare(prob.operator).solve(prob.rhs.T)
    suggested = float(re.search(r"LiSSA\(scale=([0-9.e+-]+)\)", str(err.value)).group(1))
    assert suggested > lam_max
    out = LiSSA(scale=suggested, depth=30).prepare(prob.operator).solve(prob.rhs.T).T
    assert bool(torch.isfinite(out).all())


def test_lissa_on_an_indefinite_operator_diverges_and_suggests_damping() -> None:
    prob = problem("mlp")
    op = Hessian(prob.model, Classification(), prob.model.state_dict(), [(prob.x, prob.y)])
    lam_max = float(torch.linalg.eigvalsh(prob.hessian)[-1])
    with pytest.raises(SolverDivergedError, match=r"not positive definite.*damping >="):
        LiSSA(scale=lam_max, depth=2000).prepare(op).solve(prob.rhs[:, 0])


def test_stochastic_lissa_approximates_the_inverse() -> None:
    """Mini-batch steps (batches of 6) add noise; the average over repeats stays close."""
    prob = problem("logreg")
    op = Hessian(
        prob.model,
        Classification(),
        prob.model.state_dict(),
        loader(prob.x, prob.y, 6),
        damping=0.5,
        mode="forward",
        cache_batches=True,
    )
    expected = torch.linalg.solve(prob.hessian + 0.5 * torch.eye(op.dim, dtype=DT), prob.rhs[:, 0])
    inverse = LiSSA(scale=4.0, depth=150, repeats=4, stochastic=True, residual_tol=0.15).prepare(op)
    assert rel_err(inverse.solve(prob.rhs[:, 0]), expected) < 0.1
    assert inverse.info.iterations == 600
    assert 0 < inverse.info.residual < 0.15 and inverse.info.converged


def test_arnoldi_low_rank_projection_and_scores() -> None:
    prob = problem("mlp")
    lam = prob.operator.damping
    assert lam > 0, "test premise: a damped operator"
    inverse = Arnoldi(rank=5, iterations=prob.operator.dim, complement="zero").prepare(
        prob.operator
    )
    values = torch.linalg.eigvalsh(prob.matrix)
    top = torch.argsort(values.abs(), descending=True)[:5]
    torch.testing.assert_close(inverse.eigenvalues, values[top], atol=1e-10, rtol=1e-8)
    u = inverse.eigenvectors
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=DT), atol=1e-10, rtol=0)
    low_rank = u @ torch.diag(1 / inverse.eigenvalues) @ u.T
    torch.testing.assert_close(inverse.solve(prob.rhs.T).T, low_rank @ prob.rhs)
    grads = prob.rhs.T  # [3, P]
    proj = inverse.project(grads)  # [3, r]
    assert proj.shape == (3, 5)
    # influence through projections only: ⟨U^T a, U^T b / λ⟩ = aᵀ A_r⁻¹ b
    torch.testing.assert_close(
        (proj / inverse.eigenvalues) @ proj.T, grads @ inverse.solve(grads).T, atol=1e-10, rtol=1e-8
    )
    # the default complement: the exact inverse of the damped rank-5 approximation
    damped = Arnoldi(rank=5, iterations=prob.operator.dim).prepare(prob.operator)
    assert damped.complement == lam
    approx = u @ torch.diag(inverse.eigenvalues - lam) @ u.T + lam * torch.eye(u.shape[0], dtype=DT)
    torch.testing.assert_close(
        damped.solve(prob.rhs.T).T, torch.linalg.solve(approx, prob.rhs), atol=1e-10, rtol=1e-8
    )


def test_arnoldi_complement_without_damping_is_the_pseudo_inverse() -> None:
    matrix = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    inverse = Arnoldi(rank=2, iterations=5).prepare(MatrixOperator(matrix))
    assert inverse.complement is None  # damping 0: zero outside the top eigenvectors
    rhs = torch.ones(5, dtype=torch.float64)
    expected = torch.tensor([0, 0, 0, 1 / 4, 1 / 5], dtype=torch.float64)
    torch.testing.assert_close(inverse.solve(rhs), expected)
    with pytest.raises(ConfigurationError, match="'damping' or 'zero'"):
        Arnoldi(complement="ones")


def test_arnoldi_negative_eigenvalues() -> None:
    prob = problem("mlp")
    values = torch.linalg.eigvalsh(prob.hessian)
    damping = 0.05  # still indefinite: λ_min ≈ −0.64, and no eigenvalue near −0.05
    assert float(values[0]) < -0.1 and float((values + damping).abs().min()) > 1e-3
    op = MatrixOperator(prob.hessian, damping=damping)
    p = op.dim
    with pytest.warns(RuntimeWarning, match="negative"):
        dropped = Arnoldi(rank=p, iterations=p).prepare(op)
    assert bool((dropped.eigenvalues > 0).all())
    assert dropped.rank == int((values + damping > 0).sum())
    with pytest.raises(NotPositiveDefiniteError, match="damping >"):
        Arnoldi(rank=p, iterations=p, negative="raise").prepare(op)
    kept = Arnoldi(rank=p, iterations=p, negative="keep").prepare(op)
    expected = torch.linalg.solve(op.dense(), prob.rhs)
    assert rel_err(kept.solve(prob.rhs.T).T, expected) < 1e-8


def test_arnoldi_drops_tiny_eigenvalues_instead_of_dividing_by_zero() -> None:
    prob = problem("logreg")  # 5 exact null directions (softmax shift invariance)
    op = MatrixOperator(0.5 * (prob.hessian + prob.hessian.T))
    inverse = Arnoldi(rank=op.dim, iterations=op.dim, negative="keep").prepare(op)
    assert inverse.rank == op.dim - 5
    assert bool(torch.isfinite(inverse.solve(prob.rhs.T).T).all())
    assert float(inverse.eigenvalues.abs().min()) > 0.1


# ----------------------------------------------------------------------------------------------
# M-FAC
# ----------------------------------------------------------------------------------------------
def test_woodbury_matches_explicit_inverse_and_diagonal() -> None:
    g = torch.Generator().manual_seed(7)
    grads = torch.randn(10, 30, dtype=DT, generator=g)
    lam = 0.1
    fisher = lam * torch.eye(30, dtype=DT) + grads.T @ grads / 10
    inverse = WoodburyInverse(grads, lam)
    rhs = torch.randn(30, 4, dtype=DT, generator=g)
    assert rel_err(inverse.solve(rhs.T).T, torch.linalg.solve(fisher, rhs)) < 1e-10
    explicit = torch.linalg.inv(fisher)
    torch.testing.assert_close(inverse.diagonal(), explicit.diagonal(), atol=1e-10, rtol=1e-9)
    idx = torch.tensor([3, 17, 29])
    torch.testing.assert_close(inverse.diagonal(idx), explicit.diagonal()[idx])


@pytest.mark.parametrize("num_gradients", [None, 9])
def test_mfac_from_empirical_fisher(num_gradients: int | None) -> None:
    model = make_model("mlp")
    x, y = make_data()
    op = EmpiricalFisher(model, Classification(), model.state_dict(), loader(x, y, 4), damping=0.05)
    m = num_gradients or x.shape[0]
    fisher = brute_fisher(model, x[:m], y[:m]) + 0.05 * torch.eye(op.dim, dtype=DT)
    rhs = torch.randn(op.dim, 2, dtype=DT, generator=torch.Generator().manual_seed(8))
    inverse = MFAC(num_gradients=num_gradients).prepare(op)
    assert inverse.num_gradients == m
    assert rel_err(inverse.solve(rhs.T).T, torch.linalg.solve(fisher, rhs)) < 1e-9


def test_mfac_requires_damping_and_the_empirical_fisher() -> None:
    model = make_model("logreg")
    x, y = make_data()
    undamped = EmpiricalFisher(model, Classification(), model.state_dict(), [(x, y)])
    with pytest.raises(ConfigurationError, match="damping"):
        MFAC().prepare(undamped)
    with pytest.raises(ConfigurationError, match="damping"):
        WoodburyInverse(torch.ones(2, 3, dtype=DT), 0.0)
    hessian = Hessian(model, Classification(), model.state_dict(), [(x, y)], damping=0.1)
    with pytest.raises(ConfigurationError, match="EmpiricalFisher"):
        MFAC().prepare(hessian)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def test_make_solver_by_name() -> None:
    assert isinstance(make_solver("cg"), CG)
    assert isinstance(make_solver("LiSSA"), LiSSA)
    assert isinstance(make_solver("arnoldi"), Arnoldi)
    assert isinstance(make_solver("exact"), Exact)
    assert isinstance(make_solver("mfac"), MFAC)
    cg = CG(tol=1e-3)
    assert make_solver(cg) is cg
    with pytest.raises(ConfigurationError, match=r"'arnoldi'.*'cg'.*'exact'.*'lissa'"):
        make_solver("newton")
    assert set(Solver.registry) == {"exact", "cg", "lissa", "arnoldi", "mfac"}


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: CG(tol=0.0), "tol"),
        (lambda: CG(max_iter=0), "max_iter"),
        (lambda: CG(on_nonconvergence="ignore"), "'raise' or 'warn'"),
        (lambda: LiSSA(scale=-1.0), "scale"),
        (lambda: LiSSA(depth=0), "depth"),
        (lambda: LiSSA(repeats=3), "stochastic=True"),
        (lambda: Arnoldi(rank=10, iterations=5), "iterations"),
        (lambda: Arnoldi(negative="flip"), "'drop', 'keep' or 'raise'"),
        (lambda: Exact(rtol=2.0), "rtol"),
        (lambda: MFAC(num_gradients=0), "num_gradients"),
    ],
)
def test_invalid_configs_name_the_allowed_values(build, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        build()


def test_solve_checks_the_right_hand_side() -> None:
    op = MatrixOperator(torch.eye(4, dtype=DT), damping=1.0)
    inverse = CG().prepare(op)
    assert isinstance(inverse, CGInverse)
    with pytest.raises(ConfigurationError, match=r"\[4\] or rows \[n, 4\]"):
        inverse.solve(torch.ones(5, dtype=DT))
    with pytest.raises(ConfigurationError, match="NaN"):
        inverse.solve(torch.full((4,), float("nan"), dtype=DT))
    torch.testing.assert_close(
        inverse.solve(torch.ones(4, dtype=DT)), torch.full((4,), 0.5, dtype=DT)
    )
    assert isinstance(
        Exact(allow_indefinite=True).prepare(MatrixOperator(-torch.eye(2, dtype=DT))),
        LowRankInverse,
    )
    with pytest.raises(ConfigurationError, match="LiSSA\\(stochastic=True\\)"):
        LiSSA(stochastic=True).prepare(op)


def test_truncated_lissa_warns_with_its_residual() -> None:
    """A LiSSA series cut off early is far from A⁻¹b: a ConvergenceWarning says how far and how
    many steps would do; a deep enough series is silent and records its residual."""
    import warnings

    from traintrace.exceptions import ConvergenceWarning

    prob = problem("logreg")
    expected = torch.linalg.solve(prob.matrix, prob.rhs)
    shallow = LiSSA(depth=5).prepare(prob.operator)
    with pytest.warns(ConvergenceWarning, match=r"residual .* > residual_tol=0.05.*steps would"):
        out = shallow.solve(prob.rhs.T).T
    residual = float(((prob.matrix @ out - prob.rhs).norm(dim=0) / prob.rhs.norm(dim=0)).max())
    assert shallow.info.residual == pytest.approx(residual, rel=1e-8)
    assert not shallow.info.converged and rel_err(out, expected) > 0.1
    deep = LiSSA(depth=450).prepare(prob.operator)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        deep.solve(prob.rhs.T)
    assert deep.info.converged and deep.info.residual < 1e-6
    with pytest.raises(ConfigurationError, match="residual_tol"):
        LiSSA(residual_tol=0.0)


def test_batch_eigenvalue_range_is_the_extreme_over_batches() -> None:
    from traintrace.curvature.solvers import batch_eigenvalue_range

    prob = problem("logreg")
    op = Hessian(prob.model, Classification(), prob.model.state_dict(), loader(prob.x, prob.y, 6))
    lows, highs = [], []
    for start in range(0, len(prob.y), 6):
        sl = slice(start, start + 6)
        values = torch.linalg.eigvalsh(brute_hessian(prob.model, prob.x[sl], prob.y[sl]))
        lows.append(float(values[0]))
        highs.append(float(values[-1]))
    low, high = batch_eigenvalue_range(op, op.dim)
    assert high == pytest.approx(max(highs), rel=1e-8)
    assert low == pytest.approx(min(lows), rel=1e-6, abs=1e-9)
    _, first_two = batch_eigenvalue_range(op, op.dim, max_batches=2)
    assert first_two == pytest.approx(max(highs[:2]), rel=1e-8)
    # the stochastic LiSSA default scale: 1.1 × the largest batch λ_max
    assert LiSSA(stochastic=True, scale_iterations=op.dim).prepare(op).scale == pytest.approx(
        1.1 * max(highs), rel=1e-8
    )


def test_stochastic_lissa_checks_its_residual_only_when_a_full_pass_is_cheaper() -> None:
    prob = problem("logreg")
    op = Hessian(
        prob.model, Classification(), prob.model.state_dict(), loader(prob.x, prob.y, 6),
        damping=0.5, cache_batches=True,
    )  # fmt: skip
    assert op.num_batches == -(-len(prob.y) // 6)
    cheap = LiSSA(scale=4.0, depth=op.num_batches, stochastic=True, residual_tol=1.0).prepare(op)
    cheap.solve(prob.rhs[:, 0])
    assert cheap.info.residual is not None
    costly = LiSSA(scale=4.0, depth=op.num_batches - 1, stochastic=True).prepare(op)
    costly.solve(prob.rhs[:, 0])
    assert costly.info.residual is None and costly.info.converged is None


def test_lissa_warns_when_its_depth_cannot_reach_the_tolerance() -> None:
    # diag(1, 1000): s = 1.1 · 1000, so (s/λ_min)·ln(1/0.05) ≈ 3296 steps are needed
    op = MatrixOperator(torch.diag(torch.tensor([1.0, 1000.0], dtype=torch.float64)))
    with pytest.warns(ConvergenceWarning, match=r"depth=100\) will stop before converging"):
        LiSSA(depth=100, scale_iterations=2).prepare(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        LiSSA(depth=4000, scale_iterations=2).prepare(op)


def test_arnoldi_default_rank_is_min_of_p_and_100() -> None:
    matrix = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    op = MatrixOperator(matrix, damping=0.5)
    inverse = Arnoldi().prepare(op)  # P = 5 < 100: every pair, exact
    assert inverse.rank == 5
    rhs = torch.ones(5, dtype=torch.float64)
    torch.testing.assert_close(
        inverse.solve(rhs), rhs / (torch.arange(1.0, 6.0, dtype=torch.float64) + 0.5)
    )
    assert Arnoldi(iterations=3).prepare(op).rank == 3
    big = MatrixOperator(torch.diag(torch.linspace(1.0, 2.0, 150, dtype=DT)), damping=0.5)
    assert Arnoldi().prepare(big).rank == 100
