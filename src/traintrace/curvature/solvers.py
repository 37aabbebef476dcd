"""Inverse-curvature solvers: ``x = A⁻¹ b`` for a damped curvature operator ``A = C + λI``.

A *solver* is a small typed config (a frozen dataclass validated on construction). Its
:meth:`Solver.prepare` takes a :class:`~traintrace.curvature.operators.CurvatureOperator` (damping
already inside it) and returns an :class:`InverseOperator`, whose :meth:`InverseOperator.solve`
maps right-hand sides ``b`` (``[P]``) or rows ``B`` (``[n, P]``, one vector per row, the same
orientation as per-example gradients everywhere in traintrace) to ``A⁻¹ b`` / rows
``(A⁻¹ Bᵀ)ᵀ`` of the same shape. Scale and sign
are those of the exact inverse: no ``1/n`` factors and no minus signs are added here (the
estimators apply METHODS.md's formula around it).

============  ===================================  ===========================================
solver        set-up                               per ``solve`` (``k`` right-hand sides)
============  ===================================  ===========================================
``Exact``     ``P`` products + ``O(P³)`` Cholesky  ``O(P² k)``
``CG``        none                                 ``≤ max_iter`` block products
``LiSSA``     ~20 products to estimate the scale   ``depth × repeats`` block products
``Arnoldi``   ``iterations`` products, ``O(n² P)`` ``O(P r k)``
``MFAC``      ``m`` gradients, ``O(m² P)``         ``O(m P k)``
============  ===================================  ===========================================

Pick one by name with :func:`make_solver` (``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``,
``"mfac"``) or pass a configured instance. Every solver refuses to return NaN: a curvature that is
not positive definite, a diverging recursion or a non-converged iteration raises an error that
says what to change (damping, scale, iterations).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from traintrace.curvature.lanczos import lanczos, top_eigenpairs
from traintrace.curvature.operators import (
    CurvatureOperator,
    EmpiricalFisher,
    ModelCurvatureOperator,
)
from traintrace.exceptions import (
    ConfigurationError,
    ConvergenceWarning,
    NotPositiveDefiniteError,
    SolverDivergedError,
)

__all__ = [
    "CG",
    "MFAC",
    "Arnoldi",
    "CGInverse",
    "CholeskyInverse",
    "Exact",
    "InverseOperator",
    "LiSSA",
    "LiSSAInverse",
    "LowRankInverse",
    "SolveInfo",
    "Solver",
    "WoodburyInverse",
    "batch_eigenvalue_range",
    "make_solver",
]


def _suggest_damping(current: float, lam_min: float, lam_max: float) -> float:
    """A damping that lifts the smallest eigenvalue to about ``1e-3 · λ_max`` above zero."""
    needed = current - min(lam_min, 0.0)
    return needed + 1e-3 * max(abs(lam_max), abs(lam_min), 1e-12)


def _not_pd_message(what: str, damping: float, lam_min: float, lam_max: float) -> str:
    return (
        f"{what}: the damped curvature (C + λI with damping λ={damping:g}) is not positive "
        f"definite; its smallest eigenvalue is {lam_min:.6g} (largest {lam_max:.6g}). Use "
        f"damping >= {_suggest_damping(damping, lam_min, lam_max):.6g} (must exceed "
        f"{damping - min(lam_min, 0.0):.6g}), or a positive semi-definite curvature "
        "(GaussNewton or EmpiricalFisher) with damping > 0."
    )


def _as_block(rhs: Tensor, operator_dim: int, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``[P]`` or rows ``[n, P]`` -> ``(columns [P, n], was_vector)``, checked."""
    if not isinstance(rhs, Tensor) or rhs.ndim not in (1, 2) or rhs.shape[-1] != operator_dim:
        shape = tuple(rhs.shape) if isinstance(rhs, Tensor) else type(rhs).__name__
        raise ConfigurationError(
            f"solve expects a vector [{operator_dim}] or rows [n, {operator_dim}] (one vector "
            f"per row), got {shape}"
        )
    if not bool(torch.isfinite(rhs).all()):
        raise ConfigurationError(
            "the right-hand side contains NaN or inf; check the gradients passed to solve"
        )
    vector = rhs.ndim == 1
    block = rhs.unsqueeze(1) if vector else rhs.T
    return block.to(dtype), vector


@dataclass(frozen=True)
class SolveInfo:
    """What the last :meth:`InverseOperator.solve` did.

    Attributes:
        iterations: operator products used (CG iterations, LiSSA steps × repeats), 0 for direct
            solvers.
        residual: largest relative residual ``‖A x − b‖ / ‖b‖`` over columns where the solver
            tracks it (CG), else None.
        converged: whether the stopping criterion was met (None when not applicable).
    """

    iterations: int = 0
    residual: float | None = None
    converged: bool | None = None


class InverseOperator(abc.ABC):
    """``b -> A⁻¹ b`` for a prepared solver. ``b`` is ``[P]`` or rows ``[n, P]``; output has its shape."""

    dim: int
    dtype: torch.dtype
    #: Information about the most recent :meth:`solve`.
    info: SolveInfo = SolveInfo()

    def solve(self, rhs: Tensor) -> Tensor:
        """``A⁻¹ b`` for ``b`` ``[P]``, or ``A⁻¹`` applied to every row of ``[n, P]``.

        Returns the input's shape, in the operator's dtype.
        """
        block, vector = _as_block(rhs, self.dim, self.dtype)
        out = self._solve(block)
        if not bool(torch.isfinite(out).all()):
            raise SolverDivergedError(
                f"{type(self).__name__} produced non-finite values; the curvature is probably "
                "singular or badly conditioned: increase damping"
            )
        return out.squeeze(1) if vector else out.T

    __call__ = solve

    @abc.abstractmethod
    def _solve(self, block: Tensor) -> Tensor:
        """``A⁻¹ B`` for a checked ``[P, k]`` block."""


class Solver(abc.ABC):
    """A configured inverse-curvature method. Subclasses set ``name`` and implement ``prepare``."""

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Solver]]] = {}

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Solver.registry[cls.name] = cls

    @abc.abstractmethod
    def prepare(self, operator: CurvatureOperator) -> InverseOperator:
        """Do the set-up work on ``operator`` (damping included) and return the inverse."""


def make_solver(spec: str | Solver) -> Solver:
    """A solver from its name (default settings) or a configured instance (returned as is)."""
    if isinstance(spec, Solver):
        return spec
    if isinstance(spec, str) and spec.lower() in Solver.registry:
        return Solver.registry[spec.lower()]()
    raise ConfigurationError(
        f"unknown solver {spec!r}; use one of {sorted(Solver.registry)} or an instance such as "
        "CG(tol=1e-6) or LiSSA(depth=500)"
    )


def _positive_int(name: str, value: object, owner: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{owner}.{name} must be an integer >= 1, got {value!r}")


# -- Exact ------------------------------------------------------------------------------------


class CholeskyInverse(InverseOperator):
    """``A⁻¹ B`` by ``cholesky_solve`` with the lower factor ``L`` (``A = L Lᵀ``)."""

    def __init__(self, factor: Tensor) -> None:
        self.factor = factor
        self.dim = int(factor.shape[0])
        self.dtype = factor.dtype

    def _solve(self, block: Tensor) -> Tensor:
        return torch.cholesky_solve(block.to(self.factor.device), self.factor)


@dataclass(frozen=True)
class Exact(Solver):
    """Form ``A`` explicitly (``P`` products) and factor it: ``A = L Lᵀ`` (Cholesky).

    Args:
        allow_indefinite: when ``A`` is not positive definite, use the eigendecomposition
            ``A = U Λ Uᵀ`` and the pseudo-inverse of ``|A|``: ``U diag(1/|λ|) Uᵀ`` over the
            eigenvalues with ``|λ| > rtol · max|λ|`` (others dropped). Default False: refuse with
            :class:`NotPositiveDefiniteError` reporting ``λ_min`` and a damping that would work.
        rtol: relative cut-off for the pseudo-inverse.
        max_dim: refuse ``P`` above this (``P²`` memory, ``P³`` time).

    Cost: ``P`` operator products, ``O(P³)`` set-up, ``O(P² k)`` per solve. Memory ``P²``.
    """

    name: ClassVar[str] = "exact"
    allow_indefinite: bool = False
    rtol: float = 1e-10
    max_dim: int = 20_000

    def __post_init__(self) -> None:
        if not isinstance(self.allow_indefinite, bool):
            raise ConfigurationError(
                f"Exact.allow_indefinite must be True or False, got {self.allow_indefinite!r}"
            )
        if not 0 <= self.rtol < 1:
            raise ConfigurationError(f"Exact.rtol must be in [0, 1), got {self.rtol!r}")
        _positive_int("max_dim", self.max_dim, "Exact")

    def prepare(self, operator: CurvatureOperator) -> InverseOperator:
        if operator.dim > self.max_dim:
            gib = operator.dim**2 * 8 / 2**30
            raise ConfigurationError(
                f"Exact forms the P×P matrix (P={operator.dim}, ~{gib:.1f} GiB in float64), above "
                f"max_dim={self.max_dim}; use CG, LiSSA, Arnoldi or EK-FAC, restrict layers=, or "
                "raise Exact(max_dim=...)"
            )
        matrix = operator.dense()
        matrix = 0.5 * (matrix + matrix.T)
        factor, status = torch.linalg.cholesky_ex(matrix)
        if int(status) == 0 and bool(torch.isfinite(factor).all()):
            return CholeskyInverse(factor)
        values, vectors = torch.linalg.eigh(matrix)
        lam_min, lam_max = float(values[0]), float(values[-1])
        if not self.allow_indefinite:
            raise NotPositiveDefiniteError(
                _not_pd_message("Exact", operator.damping, lam_min, lam_max)
                + " (Or Exact(allow_indefinite=True) to invert |A| — no longer a true inverse.)"
            )
        magnitude = values.abs()
        keep = magnitude > self.rtol * float(magnitude.max())
        return LowRankInverse(values[keep].abs(), vectors[:, keep])


# -- CG ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CG(Solver):
    """Conjugate gradient on operator products, all right-hand-side columns at once.

    Each column runs its own CG (own step sizes); one :meth:`matmat` per iteration serves every
    column still running. Stops a column when ``‖A x − b‖ ≤ tol · ‖b‖`` (recursive residual).

    Args:
        tol: relative residual tolerance.
        max_iter: iteration cap (default ``10 · P``, as scipy); each iteration is one product,
            i.e. one pass over the data for model operators.
        on_nonconvergence: ``"raise"`` (default) a :class:`~traintrace.exceptions.SolverDivergedError`
            reporting iterations and residual, or ``"warn"`` and return the last iterate.

    Raises:
        NotPositiveDefiniteError: when a search direction has ``pᵀAp <= 0`` (the damped
            curvature is not positive definite); the message gives the curvature along ``p``
            (an upper bound on ``λ_min``) and a damping that at least removes that direction.

    Cost: ``≤ max_iter`` products; in exact arithmetic at most ``P`` iterations, in practice
    about ``√κ · log(1/tol)`` for condition number ``κ``.
    """

    name: ClassVar[str] = "cg"
    tol: float = 1e-6
    max_iter: int | None = None
    on_nonconvergence: Literal["raise", "warn"] = "raise"

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and 0 < self.tol < 1):
            raise ConfigurationError(f"CG.tol must be in (0, 1), got {self.tol!r}")
        if self.max_iter is not None:
            _positive_int("max_iter", self.max_iter, "CG")
        if self.on_nonconvergence not in ("raise", "warn"):
            raise ConfigurationError(
                f"CG.on_nonconvergence must be 'raise' or 'warn', got {self.on_nonconvergence!r}"
            )

    def prepare(self, operator: CurvatureOperator) -> CGInverse:
        return CGInverse(operator, self)


class CGInverse(InverseOperator):
    """``A⁻¹ B`` by (column-wise) conjugate gradient; see :class:`CG`."""

    def __init__(self, operator: CurvatureOperator, config: CG) -> None:
        self.operator = operator
        self.config = config
        self.dim = operator.dim
        self.dtype = operator.dtype

    def _solve(self, block: Tensor) -> Tensor:
        op, cfg = self.operator, self.config
        max_iter = cfg.max_iter if cfg.max_iter is not None else 10 * self.dim
        b = block.to(device=op.device)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(0)
        target = cfg.tol * b.norm(dim=0)
        active = rs.sqrt() > target
        iterations = 0
        while bool(active.any()) and iterations < max_iter:
            idx = active.nonzero().flatten()
            pa = p[:, idx]
            ap = op.matmat(pa)
            iterations += 1
            curvature = (pa * ap).sum(0)
            if bool((curvature <= 0).any()) or not bool(torch.isfinite(curvature).all()):
                bad = int(torch.argmin(curvature))
                rayleigh = float(curvature[bad] / (pa[:, bad] ** 2).sum())
                raise NotPositiveDefiniteError(
                    f"CG iteration {iterations}: a search direction p has pᵀAp <= 0 (curvature "
                    f"pᵀAp/pᵀp = {rayleigh:.6g}), so the damped curvature (damping λ="
                    f"{op.damping:g}) is not positive definite. λ_min <= {rayleigh:.6g}; use "
                    f"damping > {op.damping - rayleigh:.6g} at the very least (compute λ_min "
                    "with traintrace.curvature.lanczos.top_eigenpairs(operator, 1, by='smallest') "
                    "to choose it), or GaussNewton/EmpiricalFisher with damping > 0."
                )
            alpha = rs[idx] / curvature
            x[:, idx] += alpha * pa
            r[:, idx] -= alpha * ap
            rs_new = (r[:, idx] ** 2).sum(0)
            if not bool(torch.isfinite(rs_new).all()):
                raise SolverDivergedError(
                    f"CG iteration {iterations}: the residual became non-finite; the curvature is "
                    "badly conditioned: increase damping"
                )
            p[:, idx] = r[:, idx] + (rs_new / rs[idx]) * pa
            rs[idx] = rs_new
            active[idx] = rs_new.sqrt() > target[idx]
        bnorm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
        residual = float((rs.sqrt() / bnorm).max())
        converged = not bool(active.any())
        self.info = SolveInfo(iterations=iterations, residual=residual, converged=converged)
        if not converged:
            message = (
                f"CG did not converge: relative residual {residual:.3g} > tol={cfg.tol:g} after "
                f"max_iter={max_iter} iterations. Raise max_iter, increase damping (faster: "
                f"the iteration count grows with √(λ_max/λ_min)), or loosen tol."
            )
            if cfg.on_nonconvergence == "raise":
                raise SolverDivergedError(message + " (Or CG(on_nonconvergence='warn').)")
            warnings.warn(message, ConvergenceWarning, stacklevel=3)
        return x


# -- LiSSA ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiSSA(Solver):
    """LiSSA: the truncated Neumann series of ``A⁻¹`` (Agarwal et al. 2017; Koh & Liang 2017).

    ``v_0 = b``, ``v_j = b + (I − A_j / s) v_{j−1}`` for ``j = 1..depth``, result ``v_depth / s``,
    averaged over ``repeats``. ``A_j = A`` (the full damped operator) or, with ``stochastic``, the
    damped curvature of the ``j``-th mini-batch (cycling through the batches). The series
    converges to ``A⁻¹ b`` iff every eigenvalue of ``A`` lies in ``(0, 2s)``; the error shrinks by
    ``max |1 − λ/s|`` per step (about ``1 − λ_min/s``), so ``depth ≈ (s/λ_min) · log(1/tol)``.
    With mini-batches every ``A_j`` must have its eigenvalues in ``(0, 2s)``, and a mini-batch's
    curvature has larger extreme eigenvalues than the full data's (Granziol, Zohren, Roberts,
    "Learning rates as a function of batch size: a random matrix theory approach", JMLR 2022):
    the recursion is SGD with step ``1/s`` on ``½ xᵀAx − bᵀx``, whose stable step is set by the
    *batch* ``λ_max``.

    Args:
        scale: ``s``. Default (None): ``1.1 ×`` the largest eigenvalue estimated by
            ``scale_iterations`` Lanczos steps — of the full operator, or, with ``stochastic``,
            the largest over the first ``scale_batches`` mini-batches actually used (the
            batch-aware scale; a full-data scale can diverge on a mini-batch whose ``λ_max`` is
            above ``2s``). ``tt.spectrum(..., batch_sizes=[...])`` reports how the batch
            ``λ_max`` grows as the batch shrinks.
        depth: recursion depth (operator products per repeat).
        repeats: independent recursions averaged (only useful with ``stochastic``).
        stochastic: one mini-batch product per step (``batch_matmat`` of a model operator)
            instead of the full operator — cheaper steps, noisy result.
        scale_iterations: Lanczos steps for the default scale and for the divergence report.
        scale_batches: mini-batches whose ``λ_max`` sets the default scale when stochastic.
        divergence_threshold: declare divergence when an update ``‖v_j − v_{j−1}‖`` exceeds this
            multiple of ``‖b‖`` (for the full operator the updates never grow when the series
            converges) or becomes non-finite.
        residual_tol: after the recursion, the relative residual ``‖A x − b‖ / ‖b‖`` (full
            operator, one extra product for all columns) is computed and a
            :class:`~traintrace.exceptions.ConvergenceWarning` is issued when its largest value
            exceeds this (a truncated series returns a biased answer: raise ``depth``). ``None``
            skips the check and its product. With ``stochastic`` the check runs only when one
            pass over the batches costs no more than the recursion (number of batches
            ``<= depth × repeats``); otherwise ``info.residual`` stays None.
        seed: Lanczos start vector seed.

    Raises:
        SolverDivergedError: on divergence, with the estimated eigenvalue range and a suggested
            scale (``2 ×`` the estimated top eigenvalue) — and a damping when ``λ_min <= 0``.

    Cost: ``repeats × depth`` products (mini-batch ones when stochastic) per solve, all
    right-hand-side columns at once, plus one full product for the residual.
    """

    name: ClassVar[str] = "lissa"
    scale: float | None = None
    depth: int = 1000
    repeats: int = 1
    stochastic: bool = False
    scale_iterations: int = 20
    scale_batches: int = 16
    divergence_threshold: float = 10.0
    residual_tol: float | None = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scale is not None and not (
            isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0
        ):
            raise ConfigurationError(
                f"LiSSA.scale must be a number > 0 or None, got {self.scale!r}"
            )
        _positive_int("depth", self.depth, "LiSSA")
        _positive_int("repeats", self.repeats, "LiSSA")
        _positive_int("scale_iterations", self.scale_iterations, "LiSSA")
        _positive_int("scale_batches", self.scale_batches, "LiSSA")
        if not isinstance(self.stochastic, bool):
            raise ConfigurationError(
                f"LiSSA.stochastic must be True or False, got {self.stochastic!r}"
            )
        if self.repeats > 1 and not self.stochastic:
            raise ConfigurationError(
                f"LiSSA.repeats={self.repeats} only averages stochastic recursions; with the full "
                "operator every repeat is identical. Set stochastic=True or repeats=1."
            )
        if not self.divergence_threshold > 1:
            raise ConfigurationError(
                f"LiSSA.divergence_threshold must be > 1, got {self.divergence_threshold!r}"
            )
        if self.residual_tol is not None and not (
            isinstance(self.residual_tol, (int, float)) and self.residual_tol > 0
        ):
            raise ConfigurationError(
                f"LiSSA.residual_tol must be a number > 0 or None, got {self.residual_tol!r}"
            )

    def prepare(self, operator: CurvatureOperator) -> LiSSAInverse:
        if self.stochastic and not isinstance(operator, ModelCurvatureOperator):
            raise ConfigurationError(
                f"LiSSA(stochastic=True) needs mini-batches, i.e. a Hessian, GaussNewton or "
                f"EmpiricalFisher operator; got {type(operator).__name__}. Use stochastic=False."
            )
        scale = self.scale
        if scale is None:
            if self.stochastic:
                lam_min, lam_max = batch_eigenvalue_range(
                    operator,  # type: ignore[arg-type]
                    self.scale_iterations,
                    self.seed,
                    max_batches=self.scale_batches,
                )
            else:
                lam_min, lam_max = _eigenvalue_range(operator, self.scale_iterations, self.seed)
            if lam_max <= 0:
                raise NotPositiveDefiniteError(
                    _not_pd_message("LiSSA scale estimate", operator.damping, lam_min, lam_max)
                )
            scale = 1.1 * lam_max
            _warn_lissa_depth(self, scale, lam_min, lam_max)
        return LiSSAInverse(operator, self, float(scale))


def _warn_lissa_depth(config: LiSSA, scale: float, lam_min: float, lam_max: float) -> None:
    """Warn when ``depth`` is far below the ``(s/λ_min)·ln(1/tol)`` steps LiSSA needs.

    The LDS benchmark (``benchmarks/lds_peers.py``, digits MLP, 9.6k parameters, damping 0.038)
    measured LDS 0.765 at depth 100 (90 s), 0.772 at depth 300 (156 s) and CG (tol 1e-4) 0.772 in
    66–91 s; the default depth 1000 would take ~500 s there. CG reaches ``tol`` in about
    ``√κ · ln(2/tol)`` products, LiSSA in ``κ · ln(1/tol)``, so for a damped non-convex model LiSSA
    is the slow choice.
    """
    if lam_min <= 0:
        return  # divergence is reported by the recursion itself
    tol = config.residual_tol if config.residual_tol is not None else 0.05
    needed = math.ceil(scale / lam_min * math.log(1 / tol))
    if config.depth < needed:
        kappa = lam_max / lam_min
        cg = math.ceil(math.sqrt(kappa) * math.log(2 / tol))
        warnings.warn(
            f"LiSSA(depth={config.depth}) will stop before converging: with scale s = {scale:.3g} "
            f"and λ_min ≈ {lam_min:.3g} the series needs about (s/λ_min)·ln(1/tol) = {needed} "
            f"steps to reach a relative residual of {tol:g} (each step one pass over the data). "
            f"tt.CG() needs about √κ·ln(2/tol) = {cg} products for the same operator (κ ≈ "
            f"{kappa:.3g}); use it, raise depth, or raise the damping (fewer steps)",
            ConvergenceWarning,
            stacklevel=4,
        )


def batch_eigenvalue_range(
    operator: ModelCurvatureOperator,
    iterations: int,
    seed: int = 0,
    *,
    max_batches: int | None = None,
) -> tuple[float, float]:
    """Extreme Ritz values over mini-batches: ``(min_B λ_min(A_B), max_B λ_max(A_B))``.

    ``A_B = (1/|B|) Σ_{i∈B} C(z_i) + λI`` for each of the first ``max_batches`` batches of the
    operator (all when None), ``iterations`` Lanczos steps each. Cost: ``iterations`` mini-batch
    products per batch.
    """
    lowest, highest = math.inf, -math.inf
    for count, batch in enumerate(operator.iter_batches()):
        if max_batches is not None and count >= max_batches:
            break

        def product(v: Tensor, batch: Any = batch) -> Tensor:
            return operator.batch_matmat(v.unsqueeze(1), batch).squeeze(1)

        result = lanczos(
            product,
            operator.dim,
            iterations,
            seed=seed,
            dtype=operator.dtype,
            device=operator.device,
        )
        values = torch.linalg.eigvalsh(result.tridiagonal)
        lowest, highest = min(lowest, float(values[0])), max(highest, float(values[-1]))
    if not math.isfinite(highest):
        raise ConfigurationError("the operator's batches are empty: no eigenvalue to estimate")
    return lowest, highest


def _eigenvalue_range(
    operator: CurvatureOperator, iterations: int, seed: int
) -> tuple[float, float]:
    """Extreme Ritz values after a few Lanczos steps (inner estimates of ``λ_min``, ``λ_max``)."""
    result = lanczos(
        operator.matvec,
        operator.dim,
        iterations,
        seed=seed,
        dtype=operator.dtype,
        device=operator.device,
    )
    values = torch.linalg.eigvalsh(result.tridiagonal)
    return float(values[0]), float(values[-1])


class LiSSAInverse(InverseOperator):
    """``A⁻¹ B`` by the LiSSA recursion; see :class:`LiSSA`. ``scale`` is the resolved ``s``."""

    def __init__(self, operator: CurvatureOperator, config: LiSSA, scale: float) -> None:
        self.operator = operator
        self.config = config
        self.scale = scale
        self.dim = operator.dim
        self.dtype = operator.dtype
        self._batch_iter: Iterator[Any] | None = None

    def _next_batch(self) -> Any:
        operator: ModelCurvatureOperator = self.operator  # type: ignore[assignment] # see prepare
        for _ in range(2):
            if self._batch_iter is None:
                self._batch_iter = operator.iter_batches()
            try:
                return next(self._batch_iter)
            except StopIteration:
                self._batch_iter: Iterator[Any] | None = None
        raise ConfigurationError("LiSSA(stochastic=True): the operator's batches are empty")

    def _product(self, v: Tensor) -> Tensor:
        if self.config.stochastic:
            return self.operator.batch_matmat(v, self._next_batch())  # type: ignore[attr-defined]
        return self.operator.matmat(v)

    def _solve(self, block: Tensor) -> Tensor:
        cfg, s = self.config, self.scale
        b = block.to(device=self.operator.device)
        bnorm = b.norm(dim=0)
        limit = cfg.divergence_threshold * bnorm
        total = torch.zeros_like(b)
        for rep in range(cfg.repeats):
            v = b.clone()
            for step in range(1, cfg.depth + 1):
                new = b + v - self._product(v) / s
                update = (new - v).norm(dim=0)
                if not bool(torch.isfinite(new).all()) or bool((update > limit).any()):
                    self._diverged(rep, step, float((update / bnorm.clamp_min(1e-300)).max()))
                v = new
            total += v / s
        x = total / cfg.repeats
        self.info = SolveInfo(iterations=cfg.depth * cfg.repeats)
        if cfg.residual_tol is not None and self._residual_affordable():
            residual = (self.operator.matmat(x) - b).norm(dim=0) / bnorm.clamp_min(
                torch.finfo(b.dtype).tiny
            )
            worst = float(residual.max())
            converged = worst <= cfg.residual_tol
            self.info = SolveInfo(
                iterations=cfg.depth * cfg.repeats, residual=worst, converged=converged
            )
            if not converged:
                self._warn_residual(worst)
        return x

    def _residual_affordable(self) -> bool:
        """A full product for the residual: always for the full operator; with mini-batches only
        when one pass over the batches costs no more than the recursion itself."""
        if not self.config.stochastic:
            return True
        count = self.operator.num_batches  # type: ignore[attr-defined]
        return count is not None and count <= self.config.depth * self.config.repeats

    def _warn_residual(self, residual: float) -> None:
        cfg, s = self.config, self.scale
        lam_min, lam_max = _eigenvalue_range(self.operator, cfg.scale_iterations, cfg.seed)
        message = (
            f"LiSSA stopped with relative residual ‖Ax − b‖/‖b‖ = {residual:.3g} > "
            f"residual_tol={cfg.residual_tol:g} after depth={cfg.depth} (scale s={s:.6g}): the "
            "result is still far from A⁻¹b. "
        )
        if lam_min > 0 and not cfg.stochastic:
            rate = max(abs(1 - lam_min / s), abs(1 - lam_max / s))
            if 0 < rate < 1:
                needed = math.log(cfg.residual_tol / max(residual, 1e-300)) / math.log(rate)
                message += (
                    f"The error shrinks by about {rate:.4g} per step (Lanczos estimate of λ_min "
                    f"{lam_min:.4g}, λ_max {lam_max:.4g}): about {cfg.depth + math.ceil(needed)} "
                    "steps would reach the tolerance. "
                )
        if cfg.stochastic:
            message += (
                "With stochastic=True part of the residual is mini-batch noise that more depth "
                "does not remove: raise repeats or the batch size. "
            )
        message += "Raise depth, increase damping, or use CG (it raises when it does not converge)."
        warnings.warn(message, ConvergenceWarning, stacklevel=4)

    def _diverged(self, rep: int, step: int, growth: float) -> None:
        cfg, op = self.config, self.operator
        lam_min, lam_max = _eigenvalue_range(op, cfg.scale_iterations, cfg.seed)
        message = (
            f"LiSSA diverged at step {step} of repeat {rep + 1}: an update grew to "
            f"{growth:.3g} × ‖b‖ (threshold {cfg.divergence_threshold:g}, or non-finite) with "
            f"scale s={self.scale:.6g}. The recursion converges only when every eigenvalue of the "
            f"damped curvature lies in (0, 2s); a {cfg.scale_iterations}-step Lanczos estimate "
            f"puts them in [{lam_min:.6g}, {lam_max:.6g}]. "
        )
        if lam_max > 0:
            message += (
                f"Use LiSSA(scale={2 * lam_max:.6g}) (2 × the estimated top eigenvalue), or "
                "scale=None to estimate it."
            )
        if lam_min <= 0:
            message += " " + _not_pd_message("Also", op.damping, lam_min, lam_max)
        if cfg.stochastic:
            message += (
                " With stochastic=True a single mini-batch can have larger eigenvalues: use a "
                "larger scale or batch size — LiSSA(scale=None, stochastic=True) estimates it "
                "from the batches, and tt.spectrum(..., batch_sizes=[B]).batch_scaling."
                "lissa_scale(B) predicts it for batch size B."
            )
        raise SolverDivergedError(message)


# -- Arnoldi (low rank) -------------------------------------------------------------------------


class LowRankInverse(InverseOperator):
    """``A⁻¹ ≈ U diag(1/λ) Uᵀ + (1/λ_c)(I − U Uᵀ)`` from eigenpairs ``(λ_j, u_j)``.

    Attributes:
        eigenvalues: ``[r]`` (of the damped operator, damping included).
        eigenvectors: ``[P, r]`` orthonormal columns ``U``.
        complement: ``λ_c``, the eigenvalue given to every direction outside ``U``; ``None``
            (the Arnoldi paper's choice) makes the inverse zero there. With ``λ_c`` = the damping
            this is the exact inverse of ``U diag(λ − damping) Uᵀ + damping·I``: the curvature's
            rank-``r`` approximation, damped.

    Influence through it is ``Σ_j (u_jᵀ∇f)(u_jᵀ∇l)(1/λ_j − 1/λ_c) + (∇f·∇l)/λ_c``, so the
    training side only needs :meth:`project` (``r`` numbers per example) and, with a complement,
    the plain gradient dot products and squared norms.
    """

    def __init__(
        self, eigenvalues: Tensor, eigenvectors: Tensor, complement: float | None = None
    ) -> None:
        if eigenvalues.ndim != 1 or eigenvectors.shape[1:] != eigenvalues.shape:
            raise ConfigurationError(
                f"eigenvalues [r] and eigenvectors [P, r] do not match: "
                f"{tuple(eigenvalues.shape)} vs {tuple(eigenvectors.shape)}"
            )
        if bool((eigenvalues == 0).any()):
            raise ConfigurationError("LowRankInverse got a zero eigenvalue; drop it first")
        if complement is not None and not (math.isfinite(complement) and complement > 0):
            raise ConfigurationError(
                f"LowRankInverse: the complement eigenvalue must be a finite number > 0, got "
                f"{complement!r}"
            )
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors
        self.complement = None if complement is None else float(complement)
        self.dim = int(eigenvectors.shape[0])
        self.dtype = eigenvectors.dtype

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def project(self, gradients: Tensor) -> Tensor:
        """``G U``: ``[n, P] -> [n, r]`` coordinates in the eigenbasis (cost ``O(n P r)``)."""
        if gradients.ndim != 2 or gradients.shape[1] != self.dim:
            raise ConfigurationError(
                f"project expects gradients [n, {self.dim}], got {tuple(gradients.shape)}"
            )
        return gradients.to(self.dtype) @ self.eigenvectors

    def _solve(self, block: Tensor) -> Tensor:
        u = self.eigenvectors
        block = block.to(u.device)
        coords = u.T @ block
        out = u @ (coords / self.eigenvalues[:, None])
        if self.complement is not None:
            out += (block - u @ coords) / self.complement
        return out


@dataclass(frozen=True)
class Arnoldi(Solver):
    """Low-rank inverse from the top eigenpairs (Schioppa, Zablotskaia, Vilar, Sokolov 2022).

    Runs ``iterations`` (``n``) Arnoldi steps on ``A`` with operator products only — for a
    symmetric ``A`` this is Lanczos with full re-orthogonalization
    (:func:`~traintrace.curvature.lanczos.lanczos`) — and keeps ("distills") the ``rank`` Ritz
    pairs of largest ``|λ|``. Then ``A⁻¹ ≈ Σ_j u_j u_jᵀ / λ_j + (I − UUᵀ)/λ`` with ``λ`` the
    damping (:class:`LowRankInverse`): the exact inverse of the damped rank-``r`` approximation
    of the curvature. The paper sets the inverse to zero on the complement of the kept
    eigenvectors (``complement="zero"``), which discards exactly the directions the inverse
    weighs most (small curvature) and needs a rank in the hundreds to approach the full inverse.

    Args:
        rank: number of eigenpairs kept (``r``). Default (None): ``min(P, 100)``. Memory
            ``2 · rank × P`` numbers: pass a smaller rank for large models.
        complement: ``"damping"`` (default) — directions outside the kept eigenvectors get the
            eigenvalue ``λ`` (the damping: their curvature is taken as zero); ``"zero"`` — the
            inverse is zero there (the paper's formula). On ``benchmarks/lds_peers.py`` (digits
            MLP, P = 9.6k, spectrum damping) the LDS with ``"damping"`` is 0.759 at rank 50 and
            0.773 at rank 200, level with CG's full inverse (0.772); with ``"zero"`` it is
            0.462 / 0.540 / 0.623 / 0.721 / 0.746 at rank 20 / 50 / 100 / 200 / 400. Scores with
            a complement also need the plain gradient dot products (one exact TracIn-like
            contraction). With damping 0 both are the same (the pseudo-inverse of the singular
            rank-``r`` approximation is zero outside ``U``).
        iterations: Arnoldi/Lanczos steps ``n >= rank`` (default ``min(P, 2 · rank)``; the paper
            distills e.g. 200 steps to 50 pairs). ``rank = iterations = P`` gives the exact inverse.
        negative: what to do with kept eigenvalues ``<= 0`` (a damped operator that is not
            positive definite): ``"drop"`` them with a warning (default), ``"keep"`` them (the
            paper's formula, ``1/λ`` with its sign — scores along those directions flip sign), or
            ``"raise"`` :class:`NotPositiveDefiniteError`.
        rtol: eigenvalues with ``|λ| <= rtol · max|λ|`` are always dropped (never divide by ~0).
        seed: start vector seed.

    Cost: ``n`` operator products, ``O(n² P)`` re-orthogonalization, ``n × P`` memory; then
    ``O(P r)`` per projected vector.
    """

    name: ClassVar[str] = "arnoldi"
    rank: int | None = None
    iterations: int | None = None
    negative: Literal["drop", "keep", "raise"] = "drop"
    rtol: float = 1e-8
    seed: int = 0
    complement: Literal["damping", "zero"] = "damping"

    def __post_init__(self) -> None:
        if self.complement not in ("damping", "zero"):
            raise ConfigurationError(
                f"Arnoldi.complement must be 'damping' or 'zero', got {self.complement!r}"
            )
        if self.rank is not None:
            _positive_int("rank", self.rank, "Arnoldi")
        if self.iterations is not None:
            _positive_int("iterations", self.iterations, "Arnoldi")
            if self.iterations < (self.rank or 1):
                raise ConfigurationError(
                    f"Arnoldi.iterations ({self.iterations}) must be >= rank ({self.rank})"
                )
        if self.negative not in ("drop", "keep", "raise"):
            raise ConfigurationError(
                f"Arnoldi.negative must be 'drop', 'keep' or 'raise', got {self.negative!r}"
            )
        if not 0 <= self.rtol < 1:
            raise ConfigurationError(f"Arnoldi.rtol must be in [0, 1), got {self.rtol!r}")

    def prepare(self, operator: CurvatureOperator) -> LowRankInverse:
        if self.rank is None:  # the default rule: min(P, 100), iterations min(P, 2 · rank)
            rank = min(operator.dim, 100)
            if self.iterations is not None:
                rank = min(rank, self.iterations)
            return dataclasses.replace(self, rank=rank).prepare(operator)
        if self.rank > operator.dim:
            raise ConfigurationError(
                f"Arnoldi.rank={self.rank} exceeds the number of parameters P={operator.dim}"
            )
        iterations = self.iterations if self.iterations is not None else 2 * self.rank
        iterations = min(iterations, operator.dim)
        values, vectors = top_eigenpairs(
            operator, self.rank, iterations, by="magnitude", seed=self.seed
        )
        magnitude = values.abs()
        keep = magnitude > self.rtol * float(magnitude.max())
        negative = (values <= 0) & keep
        if bool(negative.any()) and self.negative != "keep":
            message = (
                f"Arnoldi: {int(negative.sum())} of the top {self.rank} eigenvalues of the damped "
                f"curvature are negative (most negative {float(values.min()):.6g}, damping "
                f"{operator.damping:g}). "
            )
            if self.negative == "raise":
                raise NotPositiveDefiniteError(
                    message
                    + f"Use damping > {operator.damping - float(values.min()):.6g}, GaussNewton, "
                    "or Arnoldi(negative='drop' or 'keep')."
                )
            warnings.warn(
                message + "They are dropped (Arnoldi(negative='keep') keeps them with their sign).",
                RuntimeWarning,
                stacklevel=2,
            )
            keep &= ~negative
        if not bool(keep.any()):
            raise NotPositiveDefiniteError(
                "Arnoldi: no usable eigenvalue is left after dropping negative and tiny ones; "
                "increase damping"
            )
        # damping 0: the rank-r approximation is singular outside U, its pseudo-inverse zero there
        damped = self.complement == "damping" and operator.damping > 0
        complement = operator.damping if damped else None
        return LowRankInverse(values[keep], vectors[:, keep], complement)


# -- M-FAC (Woodbury) -------------------------------------------------------------------------


class WoodburyInverse(InverseOperator):
    """Exact inverse of ``F = λI + (1/m) Gᵀ G`` from ``m`` gradients (M-FAC, Frantar et al. 2021).

    By Woodbury, ``F⁻¹ = (1/λ) (I − Gᵀ (λ m I + G Gᵀ)⁻¹ G) = (1/λ)(I − QᵀQ)`` with
    ``Q = L⁻¹ G`` (``[m, P]``) and ``L Lᵀ = λ m I + G Gᵀ`` (Cholesky). This is the closed form of
    the paper's recursive Sherman–Morrison updates (which are a Cholesky factorization of that
    ``m × m`` matrix in disguise).

    Args:
        gradients: ``G``, ``[m, P]`` (one gradient per row).
        damping: ``λ > 0`` (required: ``Gᵀ G`` has rank ``<= m``).

    Cost: set-up ``O(m² P + m³)``; :meth:`solve` ``O(m P k)``; one diagonal entry of ``F⁻¹`` in
    ``O(m)`` (:meth:`diagonal`). Memory ``m × P``. Loses precision when ``λ ≪ ‖g‖²/m``
    (``1 − ‖Q_{:,i}‖²`` cancels).
    """

    def __init__(self, gradients: Tensor, damping: float) -> None:
        if gradients.ndim != 2 or gradients.shape[0] < 1:
            raise ConfigurationError(
                f"M-FAC needs a matrix of gradients [m, P], got {tuple(gradients.shape)}"
            )
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ConfigurationError(
                f"M-FAC needs damping λ > 0 (F = λI + GᵀG/m is singular otherwise: rank <= m), "
                f"got {damping!r}; pass e.g. damping=1e-3 × the mean squared gradient norm"
            )
        if not bool(torch.isfinite(gradients).all()):
            raise ConfigurationError("M-FAC: the gradients contain NaN or inf")
        m = gradients.shape[0]
        self.damping = float(damping)
        self.num_gradients = m
        self.dim = int(gradients.shape[1])
        self.dtype = gradients.dtype
        gram = gradients @ gradients.T
        gram.diagonal().add_(self.damping * m)
        factor = torch.linalg.cholesky(0.5 * (gram + gram.T))
        self.q = torch.linalg.solve_triangular(factor, gradients, upper=False)

    def _solve(self, block: Tensor) -> Tensor:
        q = self.q
        block = block.to(q.device)
        return (block - q.T @ (q @ block)) / self.damping

    def diagonal(self, indices: Tensor | None = None) -> Tensor:
        """Diagonal entries ``(F⁻¹)_ii = (1 − ‖Q_{:,i}‖²) / λ`` at ``indices`` (all when None);
        ``O(m)`` each."""
        cols = self.q if indices is None else self.q[:, indices]
        return (1.0 - (cols**2).sum(0)) / self.damping


@dataclass(frozen=True)
class MFAC(Solver):
    """M-FAC: the inverse of the damped empirical Fisher from ``m`` per-example gradients.

    ``prepare`` needs an :class:`~traintrace.curvature.operators.EmpiricalFisher` with damping
    ``λ > 0``; it collects the gradients of its first ``num_gradients`` examples (all when None)
    and returns a :class:`WoodburyInverse` of ``λI + (1/m) Σ g_i g_iᵀ``. With all ``N`` examples
    this is the exact inverse of the operator. For gradients you already have, build
    ``WoodburyInverse(gradients, damping)`` directly.

    Args:
        num_gradients: ``m``; memory ``m × P``.
    """

    name: ClassVar[str] = "mfac"
    num_gradients: int | None = field(default=None)

    def __post_init__(self) -> None:
        if self.num_gradients is not None:
            _positive_int("num_gradients", self.num_gradients, "MFAC")

    def prepare(self, operator: CurvatureOperator) -> WoodburyInverse:
        if not isinstance(operator, EmpiricalFisher):
            raise ConfigurationError(
                f"M-FAC inverts the empirical Fisher built from per-example gradients; got "
                f"{type(operator).__name__}. Use EmpiricalFisher(model, task, state, batches, "
                "damping=λ>0), or WoodburyInverse(gradients, damping) for gradients you have."
            )
        if operator.damping <= 0:
            raise ConfigurationError(
                "M-FAC needs damping λ > 0 (F = λI + GᵀG/m has rank <= m without it); build the "
                "EmpiricalFisher with damping=λ > 0, e.g. 1e-3 × the mean squared gradient norm"
            )
        gradients = operator.gradients(self.num_gradients)
        return WoodburyInverse(gradients, operator.damping)
