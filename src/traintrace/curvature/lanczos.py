"""Lanczos iteration with full re-orthogonalization: eigenpairs and spectral densities.

For a symmetric operator ``A`` (Hessian, Gauss–Newton, Fisher — only products ``A v`` are
needed), ``m`` Lanczos steps from a start vector ``q_1`` build an orthonormal basis
``Q = [q_1 … q_m]`` of the Krylov space ``span{q_1, A q_1, …, A^{m−1} q_1}`` and the tridiagonal
``T = Qᵀ A Q`` (diagonal ``α``, off-diagonal ``β``). Eigenpairs ``(θ_j, s_j)`` of ``T`` give Ritz
values ``θ_j`` and Ritz vectors ``Q s_j``, which approximate the extreme eigenpairs of ``A``
first. For symmetric ``A`` this *is* the Arnoldi iteration of Schioppa et al. (2022): Arnoldi's
Hessenberg matrix is tridiagonal, so traintrace keeps this one implementation.

Every new vector is re-orthogonalized against the whole basis (twice — "twice is enough"), so
the basis stays orthonormal in floating point and no spurious copies of converged eigenvalues
appear. Cost: ``m`` products, ``O(m² P)`` flops and ``m × P`` memory for the basis.

When the Krylov space is exhausted (``β ≈ 0``: the start vector lies in an invariant subspace,
e.g. repeated eigenvalues), the iteration restarts with a random vector orthogonal to the basis
and ``β = 0`` (``T`` becomes block diagonal), so ``m = P`` steps always give every eigenpair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from traintrace.exceptions import ConfigurationError, SolverDivergedError

__all__ = [
    "LanczosResult",
    "ProgressOperator",
    "SpectralDensity",
    "SymmetricOperator",
    "lanczos",
    "slq_density",
    "slq_quadrature",
    "top_eigenpairs",
]


@runtime_checkable
class SymmetricOperator(Protocol):
    """Anything with ``dim``, ``dtype``, ``device`` and ``matvec`` (e.g. a ``CurvatureOperator``)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, vector: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class LanczosResult:
    """Output of :func:`lanczos`.

    Attributes:
        alphas: ``[m]`` diagonal of ``T``.
        betas: ``[m − 1]`` off-diagonal of ``T`` (0 where the iteration restarted).
        basis: ``[P, m]`` orthonormal Krylov basis ``Q``.
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor

    @property
    def tridiagonal(self) -> Tensor:
        """``T = Qᵀ A Q`` (``[m, m]``)."""
        t = torch.diag(self.alphas)
        if self.betas.numel():
            t = t + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return t

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Ritz values ``[m]`` (ascending) and Ritz vectors ``[P, m]`` (``Q s_j``)."""
        values, vectors = torch.linalg.eigh(self.tridiagonal)
        return values, self.basis @ vectors


def _as_matvec(
    operator: SymmetricOperator | Callable[[Tensor], Tensor], dim: int | None
) -> tuple[Callable[[Tensor], Tensor], int, torch.dtype | None, torch.device | None]:
    if isinstance(operator, SymmetricOperator):
        return operator.matvec, int(operator.dim), operator.dtype, operator.device
    if callable(operator):
        if dim is None:
            raise ConfigurationError("give dim= when the operator is a plain matvec function")
        return operator, int(dim), None, None
    raise ConfigurationError(
        f"expected a CurvatureOperator or a matvec function, got {type(operator).__name__}"
    )


def _orthogonalize(w: Tensor, basis: Tensor) -> Tensor:
    """Remove the components of ``w`` along the (orthonormal) columns of ``basis``, twice."""
    if basis.shape[1] == 0:
        return w
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w


def _random_unit(
    dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> Tensor:
    v = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / v.norm()


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    iterations: int,
    *,
    seed: int = 0,
    start: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """Run ``m = min(iterations, dim)`` Lanczos steps with full re-orthogonalization.

    Args:
        matvec: ``v [P] -> A v [P]`` for a symmetric ``A``.
        dim: ``P``.
        iterations: number of steps ``m`` (products of ``A``); capped at ``P``.
        seed: seed of the random start vector (Gaussian) and of restart vectors.
        start: start vector ``[P]`` (normalized here); random when None.
        dtype, device: of the basis (the start vector's when given).

    Returns:
        :class:`LanczosResult` with ``T`` (``α``, ``β``) and the basis ``Q`` (``[P, m]``).

    Raises:
        SolverDivergedError: a product was non-finite.
    """
    if dim < 1:
        raise ConfigurationError(f"dim must be >= 1, got {dim}")
    if iterations < 1:
        raise ConfigurationError(f"iterations must be >= 1, got {iterations}")
    m = min(int(iterations), int(dim))
    generator = torch.Generator().manual_seed(seed)
    if start is not None:
        if start.shape != (dim,):
            raise ConfigurationError(f"start must have shape [{dim}], got {tuple(start.shape)}")
        dtype, device = start.dtype, start.device
        norm = start.norm()
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            raise ConfigurationError("the Lanczos start vector must be finite and non-zero")
        q = start / norm
    else:
        device = torch.device("cpu") if device is None else torch.device(device)
        q = _random_unit(dim, generator, dtype, device)
    basis = torch.zeros(dim, m, dtype=dtype, device=device)
    alphas = torch.zeros(m, dtype=dtype, device=device)
    betas = torch.zeros(max(m - 1, 0), dtype=dtype, device=device)
    eps = torch.finfo(dtype).eps
    scale = 0.0  # running estimate of ‖A‖ for the breakdown test
    for j in range(m):
        basis[:, j] = q
        w = matvec(q).to(dtype=dtype, device=device)
        if not bool(torch.isfinite(w).all()):
            raise SolverDivergedError(
                f"Lanczos step {j + 1}: the operator product is non-finite (NaN/inf); check the "
                "model and data for NaN (see NonFiniteGradientError advice)"
            )
        alpha = torch.dot(q, w)
        alphas[j] = alpha
        w = _orthogonalize(w, basis[:, : j + 1])
        if j == m - 1:
            break
        beta = w.norm()
        scale = max(scale, math.hypot(float(alpha), float(beta)))
        if float(beta) <= 1e3 * eps * max(scale, 1e-300):
            # Krylov space exhausted: continue in a fresh direction, T gets a zero coupling.
            betas[j] = 0.0
            q = _orthogonalize(_random_unit(dim, generator, dtype, device), basis[:, : j + 1])
            q = q / q.norm()
        else:
            betas[j] = beta
            q = w / beta
    return LanczosResult(alphas=alphas, betas=betas, basis=basis)


def top_eigenpairs(
    operator: SymmetricOperator | Callable[[Tensor], Tensor],
    k: int,
    iterations: int | None = None,
    *,
    by: Literal["magnitude", "largest", "smallest"] = "magnitude",
    seed: int = 0,
    dim: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` extreme eigenpairs of a symmetric operator from Lanczos Ritz pairs.

    Args:
        operator: a :class:`~traintrace.curvature.operators.CurvatureOperator` or a matvec
            function (then give ``dim``).
        k: number of pairs.
        iterations: Lanczos steps ``m >= k`` (default ``min(P, max(2k, k + 20))``); more steps give
            more accurate pairs. With ``m = P`` the pairs are exact up to rounding.
        by: ``"magnitude"`` (largest ``|λ|``), ``"largest"`` or ``"smallest"`` (algebraic).
        seed: start vector seed.

    Returns:
        ``(values [k], vectors [P, k])`` ordered by ``by`` (largest first, or smallest first for
        ``"smallest"``); vectors are orthonormal columns.

    Cost: ``m`` operator products plus ``O(m² P)``.
    """
    matvec, p, dtype, device = _as_matvec(operator, dim)
    if by not in ("magnitude", "largest", "smallest"):
        raise ConfigurationError(f"by must be 'magnitude', 'largest' or 'smallest', got {by!r}")
    if not 1 <= k <= p:
        raise ConfigurationError(f"k must be between 1 and P={p}, got {k}")
    m = min(p, max(2 * k, k + 20)) if iterations is None else min(int(iterations), p)
    if m < k:
        raise ConfigurationError(f"iterations ({iterations}) must be >= k ({k})")
    result = lanczos(matvec, p, m, seed=seed, dtype=dtype or torch.float64, device=device or "cpu")
    values, vectors = result.ritz()
    if by == "magnitude":
        order = torch.argsort(values.abs(), descending=True)
    elif by == "largest":
        order = torch.argsort(values, descending=True)
    else:
        order = torch.argsort(values)
    order = order[:k]
    return values[order], vectors[:, order]


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``[g]`` points ``t`` where the density is evaluated.
        density: ``[g]`` values ``φ(t)``; ``∫ φ ≈ 1`` (the spectrum normalized by ``P``).
        nodes: ``[probes, m]`` Ritz values ``θ`` per probe.
        weights: ``[probes, m]`` quadrature weights ``τ`` (each row sums to 1).
        sigma: width of the Gaussian kernel.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float

    def mass(self, low: float, high: float) -> float:
        """Estimated fraction of eigenvalues in ``[low, high]`` (exact Gaussian CDFs, no grid)."""
        s = self.sigma * math.sqrt(2.0)
        cdf = 0.5 * (torch.erf((high - self.nodes) / s) - torch.erf((low - self.nodes) / s))
        return float((self.weights * cdf).sum(dim=1).mean())


def slq_density(
    operator: SymmetricOperator | Callable[[Tensor], Tensor],
    num_probes: int = 10,
    iterations: int = 50,
    grid: Tensor | int = 1000,
    sigma: float | None = None,
    *,
    seed: int = 0,
    probes: Tensor | None = None,
    dim: int | None = None,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Ghorbani, Krishnan, Xiao (2019), "An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density". For each probe ``v`` (Rademacher, normalized), ``m`` Lanczos steps from
    ``v`` give nodes ``θ_k`` (eigenvalues of ``T``) and weights ``τ_k = (s_k[0])²`` (squared first
    components of ``T``'s eigenvectors): the Gauss quadrature of the measure
    ``Σ_i (u_iᵀv)² δ(t − λ_i)``, whose expectation is ``(1/P) Σ_i δ(t − λ_i)``. The density is

        φ(t) = (1/probes) Σ_probes Σ_k τ_k · N(t; θ_k, σ²)

    It integrates to 1 and ``∫ t^j φ`` matches ``vᵀ A^j v`` exactly for ``j < 2m`` (before
    smoothing adds ``σ²`` terms). Cost: ``probes × m`` operator products.

    Args:
        operator: a ``CurvatureOperator`` or a matvec function (then give ``dim``).
        num_probes: number of Rademacher probes (ignored when ``probes`` is given).
        iterations: Lanczos steps per probe ``m`` (capped at ``P``).
        grid: points where ``φ`` is evaluated, or their number (spanning all nodes ± 5σ).
        sigma: Gaussian width; default ``0.01 ×`` the spread of all nodes (or ``1e-3·max|θ|`` when
            they coincide).
        seed: probe seed.
        probes: ``[P, probes]`` explicit probe vectors (each normalized here).
    """
    matvec, p, dtype, device = _as_matvec(operator, dim)
    dtype = dtype or torch.float64
    device = device or torch.device("cpu")
    if probes is None:
        if num_probes < 1:
            raise ConfigurationError(f"num_probes must be >= 1, got {num_probes}")
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (p, num_probes), generator=generator) * 2 - 1
        probes = signs.to(dtype=dtype, device=device)
    elif probes.ndim != 2 or probes.shape[0] != p:
        raise ConfigurationError(f"probes must have shape [{p}, n], got {tuple(probes.shape)}")
    all_nodes, all_weights = [], []
    for j in range(probes.shape[1]):
        result = lanczos(matvec, p, iterations, seed=seed + j, start=probes[:, j].to(dtype))
        theta, s = torch.linalg.eigh(result.tridiagonal)
        all_nodes.append(theta)
        all_weights.append(s[0] ** 2)
    nodes = torch.stack(all_nodes)
    weights = torch.stack(all_weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        spread = hi - lo
        sigma = 0.01 * spread if spread > 0 else 1e-3 * max(abs(hi), abs(lo), 1e-12)
    if not sigma > 0:
        raise ConfigurationError(f"sigma must be > 0, got {sigma}")
    if isinstance(grid, int):
        if grid < 2:
            raise ConfigurationError(f"grid must have >= 2 points, got {grid}")
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid, dtype=nodes.dtype)
    grid = grid.to(dtype=nodes.dtype, device=nodes.device)
    diff = grid[:, None, None] - nodes[None]
    kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kernel * weights[None]).sum(dim=2).mean(dim=1)
    return SpectralDensity(
        grid=grid, density=density, nodes=nodes, weights=weights, sigma=float(sigma)
    )


def slq_quadrature(
    matmat: Callable[[Tensor], Tensor],
    dim: int,
    num_probes: int = 20,
    iterations: int = 50,
    *,
    seed: int = 0,
    probes: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of every probe at once (stochastic Lanczos quadrature).

    The same quadrature as :func:`slq_density` — for each probe ``v`` (Rademacher, normalized),
    ``m`` Lanczos steps give ``T``; nodes are its eigenvalues ``θ_k``, weights the squared first
    components ``τ_k`` of its eigenvectors, so ``vᵀ f(A) v ≈ Σ_k τ_k f(θ_k)`` and
    ``tr f(A) ≈ P · mean_probes Σ_k τ_k f(θ_k)`` — but the ``k`` probes advance together: each
    step is one ``matmat`` of a ``[P, k]`` block (one pass over the data for a model operator,
    instead of ``k``). Each column keeps its own Lanczos recursion and, with
    ``reorthogonalize``, is re-orthogonalized (twice) against its own basis. A column whose
    Krylov space is exhausted continues with zero vectors: its extra nodes get weight 0.

    Args:
        matmat: ``V [P, k] -> A V [P, k]`` for a symmetric ``A``.
        dim: ``P``.
        num_probes: ``k`` Rademacher probes (ignored when ``probes`` is given).
        iterations: steps ``m`` (capped at ``P``).
        seed: probe seed (the same probes as :func:`slq_density` with this seed).
        probes: ``[P, k]`` explicit probes (normalized here).
        dtype, device: of the probes and the recursion.
        reorthogonalize: keep each probe's basis (memory ``k × P × m``) and re-orthogonalize;
            without it memory is ``3 × k × P`` and rounding can duplicate converged nodes
            (their weights then split, the quadrature stays usable for ``log det``).

    Returns:
        ``(nodes [k, m], weights [k, m])``, each row of weights summing to 1.

    Cost: ``m`` block products plus ``O(m² P k)`` with re-orthogonalization.
    """
    if dim < 1 or iterations < 1:
        raise ConfigurationError(f"dim and iterations must be >= 1, got {dim}, {iterations}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if probes is None:
        if num_probes < 1:
            raise ConfigurationError(f"num_probes must be >= 1, got {num_probes}")
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (dim, num_probes), generator=generator) * 2 - 1
        probes = signs.to(dtype=dtype, device=device)
    elif probes.ndim != 2 or probes.shape[0] != dim:
        raise ConfigurationError(f"probes must have shape [{dim}, k], got {tuple(probes.shape)}")
    q = probes.to(dtype=dtype, device=device)
    q = q / q.norm(dim=0, keepdim=True)
    k, m = q.shape[1], min(int(iterations), int(dim))
    alphas = torch.zeros(m, k, dtype=dtype, device=device)
    betas = torch.zeros(max(m - 1, 0), k, dtype=dtype, device=device)
    basis = torch.zeros(m, dim, k, dtype=dtype, device=device) if reorthogonalize else None
    previous = torch.zeros_like(q)
    eps = torch.finfo(dtype).eps
    scale = torch.zeros(k, dtype=dtype, device=device)
    for j in range(m):
        if basis is not None:
            basis[j] = q
        w = matmat(q).to(dtype=dtype, device=device)
        if not bool(torch.isfinite(w).all()):
            raise SolverDivergedError(
                f"SLQ step {j + 1}: the operator product is non-finite (NaN/inf); check the "
                "model and data for NaN"
            )
        alpha = (q * w).sum(0)
        alphas[j] = alpha
        w = w - alpha * q - (betas[j - 1] * previous if j > 0 else 0.0)
        if basis is not None:
            for _ in range(2):
                coeff = torch.einsum("jpk,pk->jk", basis[: j + 1], w)
                w = w - torch.einsum("jpk,jk->pk", basis[: j + 1], coeff)
        if j == m - 1:
            break
        beta = w.norm(dim=0)
        scale = torch.maximum(scale, torch.sqrt(alpha**2 + beta**2))
        alive = beta > 1e3 * eps * scale.clamp_min(1e-300)
        beta = torch.where(alive, beta, torch.zeros_like(beta))
        betas[j] = beta
        previous = q
        q = torch.where(alive, w / beta.clamp_min(1e-300), torch.zeros_like(w))
    nodes, weights = [], []
    for c in range(k):
        t = torch.diag(alphas[:, c])
        if m > 1:
            t = t + torch.diag(betas[:, c], 1) + torch.diag(betas[:, c], -1)
        theta, vectors = torch.linalg.eigh(t)
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
    return torch.stack(nodes), torch.stack(weights)


class ProgressOperator:
    """Wraps a symmetric operator and advances a tqdm bar on every product (Lanczos progress)."""

    def __init__(self, operator: Any, bar: Any) -> None:
        self.operator = operator
        self.dim = operator.dim
        self.dtype = operator.dtype
        self.device = operator.device
        self.bar = bar

    def matvec(self, vector: Tensor) -> Tensor:
        out = self.operator.matvec(vector)
        self.bar.update(1)
        return out
