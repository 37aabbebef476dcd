"""Linearized-Laplace model evidence, and the damping (prior precision) that maximizes it.

MacKay (1992), "A practical Bayesian framework for backpropagation networks"; Immer, Bauer,
Fortuin, Rätsch, Khan (2021), "Scalable Marginal Likelihood Estimation for Model Selection in Deep
Learning"; Immer, Korzepa, Bauer (2021), "Improving predictions of Bayesian neural nets via local
linearization" (the GGN as the curvature of the linearized model).

**Model.** The likelihood of the ``n`` training examples is ``p(D | θ) = Π_i exp(−l(z_i, θ))``
(``l`` = ``task.loss``: cross-entropy is exactly ``−log p(y | x, θ)``; ``Regression``'s squared
error is ``−log N(y; f, ½)`` up to a constant that does not depend on the damping), and the prior
on the ``P`` selected parameters is isotropic Gaussian, ``θ ~ N(0, δ⁻¹ I)`` with prior precision
``δ``. The trained parameters ``θ`` are taken as the mode and the curvature at ``θ`` as the
posterior precision (the *post-hoc* Laplace approximation: ``θ`` is not retrained for each
``δ``). The Laplace approximation of ``log p(D | δ)`` is

    log Z(δ) = −Σ_i l(z_i, θ) − (δ/2)‖θ‖² + (P/2) log δ − ½ log det(n·C + δ I)

where ``C`` is the curvature of the **mean** training loss, ``(1/n) Σ_i C(z_i)`` — the
generalized Gauss–Newton matrix by default (``Σ_i J_iᵀ H_i J_i = n·C`` is the GGN of the summed
log-likelihood, the Hessian of the linearized model). The two ``(P/2) log 2π`` terms of the
Gaussian prior and of the Laplace integral cancel.

**Scale: the damping is the prior precision per example.** traintrace's inverse-curvature
methods use ``(C + λ I)`` with ``C`` the mean-loss curvature (``InfluenceFunction(damping=λ)``;
training with ``mean loss + (λ/2)‖θ‖²`` is the MAP of this model with ``δ = n λ``). With
``δ = n λ`` the ``log n`` terms cancel and

    log Z(λ) = −Σ_i l(z_i, θ) − (n λ/2) ‖θ‖² + (P/2) log λ − ½ Σ_j log(c_j + λ)

with ``c_j`` the eigenvalues of ``C``. This is the function evaluated and maximized here: the
same number as the ``δ`` form above (not a rescaled one), expressed in the damping you pass to
``InfluenceFunction``. :attr:`DampingSelection.damping` is ``λ*``;
:attr:`DampingSelection.prior_precision` is ``δ* = n λ*``.

**The maximizer.** ``d log Z / dλ = ½ (γ(λ)/λ − n‖θ‖²)`` with
``γ(λ) = Σ_j c_j / (c_j + λ)`` (MacKay's effective number of parameters), so the optimum solves
``λ = γ(λ) / (n ‖θ‖²)``. For a positive semi-definite ``C``, ``γ(λ)/λ`` decreases strictly, so
``log Z`` has exactly one maximum — in ``λ`` and in ``log λ``; a bounded 1-D search
(:func:`scipy.optimize.minimize_scalar`, method ``"bounded"``, on ``log λ``) finds it. Since
``γ < P`` the optimum is below ``P / (n‖θ‖²)``, and since ``γ(λ) ≥ ½`` whenever ``λ ≤ c_max``
it is above ``min(c_max, 1 / (2 n ‖θ‖²))``: these bracket the default search.

**Log-determinant.**

* ``method="eigen"`` — the dense ``C`` (``P`` curvature products) and its eigenvalues: exact,
  for small models (``P ≤ max_dim``).
* ``method="kfac"`` — ``curvature=tt.KFAC()`` / ``tt.EKFAC()``: the eigenvalues of the
  block-diagonal Kronecker-factored Fisher are its per-layer ``Λ`` (``λ_S λ_Aᵀ`` for K-FAC, the
  refitted ones for EK-FAC) plus the diagonal blocks' entries; ``log det`` of that
  approximation is exact and costs nothing beyond computing the factors.
* ``method="slq"`` — stochastic Lanczos quadrature (Ubaru, Chen, Saad 2017): ``m`` Lanczos steps
  from each of ``num_probes`` Rademacher probes on ``C`` give Ritz nodes ``θ_k`` and weights
  ``τ_k``, and ``log det(C + λI) ≈ P · mean_probes Σ_k τ_k log(θ_k + λ)``. One set of Lanczos
  runs serves every ``λ`` (the nodes shift with ``λ``). Unbiased in the probes; the error falls
  as ``1/√probes``. All probes advance together (:func:`~traintrace.curvature.lanczos.
  slq_quadrature`): ``m`` passes over the data with ``num_probes`` columns each; every probe's
  basis is kept for re-orthogonalization while ``m · P · probes <= 2²⁷`` elements.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature.kfac import KFAC
from traintrace.curvature.lanczos import slq_quadrature
from traintrace.curvature.operators import curvature_operator
from traintrace.data import as_loader, iterate_batches
from traintrace.exceptions import ConfigurationError, NotPositiveDefiniteError
from traintrace.features.gradients import GradientComputer
from traintrace.features.params import Layers
from traintrace.task import Task, require_task

__all__ = ["DampingSelection", "LaplaceEvidence", "select_damping"]

Method = Literal["auto", "eigen", "kfac", "slq"]

#: SLQ keeps every probe's Lanczos basis (and re-orthogonalizes) up to this many elements.
_REORTHOGONALIZE_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class DampingSelection:
    """The damping that maximizes the linearized-Laplace evidence (see :func:`select_damping`).

    Attributes:
        damping: ``λ*``, on traintrace's damping scale: use it as ``(C + λ* I)`` with ``C`` the
            curvature of the *mean* training loss (``InfluenceFunction(damping=λ*)``).
        prior_precision: ``δ* = n λ*``, the precision of the Gaussian prior on the summed loss.
        log_evidence: ``log Z(λ*)`` (nats, see the module docstring for the terms).
        grid: ``[g]`` damping values where the evidence was also evaluated (ascending).
        log_evidence_grid: ``[g]`` ``log Z`` at :attr:`grid` (the curve searched).
        grid_damping: the best grid point (a grid search's answer).
        bounds: ``(low, high)`` interval of the 1-D search over ``log λ``.
        method: ``"eigen"``, ``"kfac"`` or ``"slq"`` (how ``log det`` was computed).
        curvature: ``"ggn"``, ``"hessian"``, ``"fisher"``, ``"K-FAC"`` or ``"EK-FAC"``.
        search: ``"brent"`` (bounded Brent on ``log λ``) or ``"grid"`` when a grid point beat it.
        num_examples: ``n``.
        num_parameters: ``P``.
        log_likelihood: ``−Σ_i l(z_i, θ)``.
        squared_norm: ``‖θ‖²`` of the selected parameters.
        effective_parameters: ``γ(λ*) = Σ_j c_j / (c_j + λ*)``; at the optimum
            ``λ* ≈ γ / (n ‖θ‖²)`` (MacKay's fixed point).
    """

    damping: float
    prior_precision: float
    log_evidence: float
    grid: Tensor
    log_evidence_grid: Tensor
    grid_damping: float
    bounds: tuple[float, float]
    method: str
    curvature: str
    search: str
    num_examples: int
    num_parameters: int
    log_likelihood: float
    squared_norm: float
    effective_parameters: float


class LaplaceEvidence:
    """``log Z(λ)`` for every damping ``λ`` from one spectral computation (see the module doc).

    Build it with :meth:`compute` (from a model) or directly from the spectrum of ``C``:

    Args:
        log_likelihood: ``−Σ_i l(z_i, θ)``.
        squared_norm: ``‖θ‖²``.
        num_examples: ``n``.
        num_parameters: ``P``.
        eigenvalues: ``[P]`` eigenvalues ``c_j`` of the mean-loss curvature (``eigen``/``kfac``),
            or None with ``nodes``/``weights``.
        nodes, weights: ``[probes, m]`` SLQ Ritz nodes and quadrature weights (rows sum to 1).
        method, curvature: labels reported in :class:`DampingSelection`.
        dtype: the dtype the spectrum was computed in (sets the round-off tolerance of the
            positive semi-definiteness check: only a Hessian is refused when indefinite).

    Call it with a damping (a float or a tensor of them) to get ``log Z``; :meth:`select` finds
    the maximizer. Each evaluation costs ``O(P)`` (``eigen``/``kfac``) or ``O(probes · m)``.
    """

    def __init__(
        self,
        *,
        log_likelihood: float,
        squared_norm: float,
        num_examples: int,
        num_parameters: int,
        eigenvalues: Tensor | None = None,
        nodes: Tensor | None = None,
        weights: Tensor | None = None,
        method: str = "eigen",
        curvature: str = "ggn",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        if (eigenvalues is None) == (nodes is None):
            raise ConfigurationError("give either eigenvalues, or SLQ nodes and weights")
        if nodes is not None and (weights is None or weights.shape != nodes.shape):
            raise ConfigurationError("SLQ nodes and weights must both be given, of equal shape")
        for name, value in (("log_likelihood", log_likelihood), ("squared_norm", squared_norm)):
            if not math.isfinite(value):
                raise ConfigurationError(
                    f"{name} is {value}; the model's loss or parameters are not finite (check the "
                    "checkpoint and data for NaN/inf)"
                )
        if squared_norm <= 0:
            raise ConfigurationError(
                "‖θ‖² = 0: under a zero-mean prior the evidence grows without bound as the prior "
                "precision grows; evidence-based damping needs trained (non-zero) parameters"
            )
        if num_examples < 1 or num_parameters < 1:
            raise ConfigurationError(
                f"need n >= 1 and P >= 1, got n={num_examples}, P={num_parameters}"
            )
        self.log_likelihood = float(log_likelihood)
        self.squared_norm = float(squared_norm)
        self.num_examples = int(num_examples)
        self.num_parameters = int(num_parameters)
        self.method = method
        self.curvature = curvature
        if eigenvalues is not None:
            values = eigenvalues.detach().to(torch.float64).cpu().flatten()
            if values.numel() != num_parameters:
                raise ConfigurationError(
                    f"got {values.numel()} eigenvalues for P={num_parameters} parameters"
                )
            self._nodes = _check_psd(values, curvature, dtype)[None]
            self._weights = torch.full_like(self._nodes, 1.0 / num_parameters)
        else:
            nodes64 = nodes.detach().to(torch.float64).cpu()  # type: ignore[union-attr]
            self._nodes = _check_psd(nodes64, curvature, dtype)
            self._weights = weights.detach().to(torch.float64).cpu()  # type: ignore[union-attr]
        self.max_eigenvalue = float(self._nodes.max())
        if not self.max_eigenvalue > 0:
            raise ConfigurationError(
                "the curvature is zero at this checkpoint (no eigenvalue above 0), so the evidence "
                "has no maximum over the damping; check that the loss depends on the selected "
                "parameters"
            )

    @property
    def eigenvalues(self) -> Tensor | None:
        """``[P]`` eigenvalues of ``C`` (clamped at 0), or None for an SLQ estimate."""
        return None if self.method == "slq" else self._nodes[0]

    def _trace(self, fn: Any, damping: Tensor) -> Tensor:
        """``tr f(C + λ)`` for each ``λ`` of ``damping`` ([g]) as ``P · mean_probes Σ τ f``."""
        shifted = self._nodes[None] + damping[:, None, None]
        return self.num_parameters * (self._weights[None] * fn(shifted)).sum(-1).mean(-1)

    def log_det(self, damping: float | Tensor) -> Tensor:
        """``log det(C + λ I)`` (``[g]`` for ``g`` dampings)."""
        lam = _as_dampings(damping)
        return self._trace(torch.log, lam)

    def effective_parameters(self, damping: float | Tensor) -> Tensor:
        """``γ(λ) = Σ_j c_j / (c_j + λ)`` (``[g]``)."""
        lam = _as_dampings(damping)
        return self.num_parameters - lam * self._trace(torch.reciprocal, lam)

    def __call__(self, damping: float | Tensor) -> Tensor:
        """``log Z(λ)``: a 0-d tensor for a float, ``[g]`` for ``g`` dampings."""
        lam = _as_dampings(damping)
        n, p = self.num_examples, self.num_parameters
        value = (
            self.log_likelihood
            - 0.5 * n * lam * self.squared_norm
            + 0.5 * p * torch.log(lam)
            - 0.5 * self._trace(torch.log, lam)
        )
        return value[0] if isinstance(damping, (int, float)) else value

    def default_bounds(self) -> tuple[float, float]:
        """An interval that contains the maximizer: ``[min(c_max, 1/(2n‖θ‖²)) / 2,
        2 P/(n‖θ‖²)]`` (see the module docstring; the factors 2 are slack)."""
        scale = self.num_examples * self.squared_norm
        low = min(self.max_eigenvalue, 1.0 / (2.0 * scale))
        high = self.num_parameters / scale
        return 0.5 * low, 2.0 * high

    def select(
        self,
        bounds: tuple[float, float] | None = None,
        grid: int | Sequence[float] | Tensor = 41,
        xatol: float = 1e-6,
    ) -> DampingSelection:
        """Maximize ``log Z`` over ``λ`` in ``bounds``: bounded Brent on ``log λ``, plus a grid.

        Args:
            bounds: ``(low, high)`` with ``0 < low < high``; default :meth:`default_bounds`.
            grid: number of log-spaced grid points over ``bounds`` (``>= 2``), or the dampings.
            xatol: absolute tolerance of the search in ``log λ``.

        Returns:
            :class:`DampingSelection`. The grid's best point is kept if it beats Brent's (it
            cannot for a positive semi-definite curvature, where ``log Z`` is unimodal).

        Warns:
            RuntimeWarning: when the optimum lies at an edge of user-given ``bounds``.
        """
        from scipy.optimize import minimize_scalar

        low, high = self.default_bounds() if bounds is None else _check_bounds(bounds)
        if isinstance(grid, int):
            if grid < 2:
                raise ConfigurationError(f"grid must have >= 2 points, got {grid}")
            points = torch.logspace(math.log10(low), math.log10(high), grid, dtype=torch.float64)
        else:
            points = torch.as_tensor(grid, dtype=torch.float64).flatten().sort().values
            if points.numel() < 1 or not bool((points > 0).all()):
                raise ConfigurationError("grid dampings must be > 0")
        curve = self(points)
        best = int(torch.argmax(curve))

        def negative(log_lam: float) -> float:
            return -float(self(math.exp(log_lam)))

        result = minimize_scalar(
            negative,
            bounds=(math.log(low), math.log(high)),
            method="bounded",
            options={"xatol": xatol},
        )
        damping, value, search = math.exp(float(result.x)), -float(result.fun), "brent"
        if float(curve[best]) > value:
            damping, value, search = float(points[best]), float(curve[best]), "grid"
        if bounds is not None and (
            damping <= low * math.exp(10 * xatol) or damping >= high * math.exp(-10 * xatol)
        ):
            warnings.warn(
                f"the evidence is largest at the edge of bounds=({low:.4g}, {high:.4g}) "
                f"(λ={damping:.4g}); widen the bounds (the default bounds always contain the "
                "optimum of a positive semi-definite curvature)",
                RuntimeWarning,
                stacklevel=2,
            )
        return DampingSelection(
            damping=damping,
            prior_precision=self.num_examples * damping,
            log_evidence=value,
            grid=points,
            log_evidence_grid=curve,
            grid_damping=float(points[best]),
            bounds=(low, high),
            method=self.method,
            curvature=self.curvature,
            search=search,
            num_examples=self.num_examples,
            num_parameters=self.num_parameters,
            log_likelihood=self.log_likelihood,
            squared_norm=self.squared_norm,
            effective_parameters=float(self.effective_parameters(damping)[0]),
        )

    @classmethod
    def compute(
        cls,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint,
        data: Dataset | DataLoader,
        *,
        curvature: Literal["ggn", "hessian", "fisher"] | KFAC = "ggn",
        method: Method = "auto",
        layers: Layers = None,
        batch_size: int = 64,
        max_dim: int = 4000,
        num_probes: int = 20,
        iterations: int = 60,
        seed: int = 0,
        progress: bool = True,
    ) -> LaplaceEvidence:
        """The evidence function of a trained model (arguments as in :func:`select_damping`)."""
        require_task(task)
        state = require_checkpoint(checkpoint).state_for(model)
        loader = as_loader(data, batch_size)
        grads = GradientComputer(model, task, layers)
        theta = grads.layout.flatten(grads.selected_state(state)).to(torch.float64)
        p = theta.numel()
        total_loss, n = 0.0, 0
        for _, batch in iterate_batches(loader, theta.device):
            losses = grads.values(state, batch, "loss")
            total_loss += float(losses.to(torch.float64).sum())
            n += int(losses.shape[0])
        if n == 0:
            raise ConfigurationError("data holds no examples: the evidence needs training data")
        if method not in ("auto", "eigen", "kfac", "slq"):
            raise ConfigurationError(
                f"method must be 'auto', 'eigen', 'kfac' or 'slq', got {method!r}"
            )
        is_kfac = isinstance(curvature, KFAC)
        if method == "auto":
            method = "kfac" if is_kfac else ("eigen" if p <= max_dim else "slq")
        if (method == "kfac") != is_kfac:
            raise ConfigurationError(
                "method='kfac' needs curvature=tt.KFAC() or tt.EKFAC() (and a K-FAC curvature "
                f"needs method='kfac' or 'auto'); got method={method!r}, curvature={curvature!r}"
            )
        common = dict(
            log_likelihood=-total_loss,
            squared_norm=float(theta.pow(2).sum()),
            num_examples=n,
            num_parameters=p,
            method=method,
        )
        if is_kfac:
            inverse = curvature.prepare(model, task, state, loader, layers, progress=progress)  # type: ignore[union-attr]
            values = [b.eigenvalues.flatten() for b in inverse.blocks]
            values += [d.flatten() for d in inverse.diagonal.values()]
            eig = torch.cat([v.to(torch.float64).cpu() for v in values])
            return cls(eigenvalues=eig, curvature=inverse.method, **common)  # type: ignore[arg-type]
        operator = curvature_operator(
            curvature,  # type: ignore[arg-type]
            model,
            task,
            state,
            loader,
            layers=layers,
            allowed=("ggn", "hessian", "fisher"),
        )
        if method == "eigen":
            if p > max_dim:
                raise ConfigurationError(
                    f"method='eigen' forms the P×P curvature (P={p} > max_dim={max_dim}); use "
                    "method='slq' or 'kfac', or raise max_dim"
                )
            dense = operator.dense().to(torch.float64)
            eig = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
            return cls(eigenvalues=eig, curvature=str(curvature), dtype=operator.dtype, **common)  # type: ignore[arg-type]
        if not isinstance(num_probes, int) or num_probes < 1:
            raise ConfigurationError(f"num_probes must be an integer >= 1, got {num_probes!r}")
        if not isinstance(iterations, int) or iterations < 2:
            raise ConfigurationError(f"iterations must be an integer >= 2, got {iterations!r}")
        from tqdm.auto import tqdm

        steps = min(iterations, p)
        bar = tqdm(
            total=steps,
            desc=f"evidence SLQ ({curvature}, {num_probes} probes)",
            unit="block product",
            disable=not progress,
        )

        def matmat(block: Tensor) -> Tensor:
            out = operator.matmat(block)
            bar.update(1)
            return out

        try:
            nodes, weights = slq_quadrature(
                matmat,
                p,
                num_probes,
                steps,
                seed=seed,
                dtype=operator.dtype,
                device=operator.device,
                reorthogonalize=steps * p * num_probes <= _REORTHOGONALIZE_ELEMENTS,
            )
        finally:
            bar.close()
        return cls(
            nodes=nodes,
            weights=weights,
            curvature=str(curvature),
            dtype=operator.dtype,
            **common,  # type: ignore[arg-type]
        )


def select_damping(
    model: nn.Module,
    task: Task,
    checkpoint: Checkpoint,
    data: Dataset | DataLoader,
    *,
    curvature: Literal["ggn", "hessian", "fisher"] | KFAC = "ggn",
    method: Method = "auto",
    bounds: tuple[float, float] | None = None,
    grid: int | Sequence[float] | Tensor = 41,
    layers: Layers = None,
    batch_size: int = 64,
    max_dim: int = 4000,
    num_probes: int = 20,
    iterations: int = 60,
    seed: int = 0,
    progress: bool = True,
) -> DampingSelection:
    """The damping ``λ`` that maximizes the linearized-Laplace evidence of a trained model.

    Maximizes (module docstring: MacKay 1992; Immer et al. 2021)

        log Z(λ) = −Σ_i l(z_i, θ) − (nλ/2)‖θ‖² + (P/2) log λ − ½ log det(C + λ I)

    over ``λ > 0``, where ``C`` is the curvature of the *mean* training loss over the ``n``
    examples of ``data`` at the checkpoint ``θ``, restricted to the ``P`` selected parameters —
    identical to the textbook ``−Σ l − (δ/2)‖θ‖² + (P/2) log δ − ½ log det(n C + δ I)`` with prior
    precision ``δ = n λ``. The result's ``damping`` is on the scale traintrace uses everywhere:
    ``InfluenceFunction(damping=sel.damping)`` inverts ``C + λ I``.

    Args:
        model, task, checkpoint: the network, its loss (the negative log-likelihood) and ``θ``.
        data: the training set (Dataset, or a DataLoader that does not shuffle).
        curvature: ``"ggn"`` (default: the Laplace posterior precision of the linearized
            model), ``"fisher"`` (empirical Fisher), ``"hessian"`` (only when positive
            semi-definite at ``θ``), or a ``tt.KFAC()`` / ``tt.EKFAC()`` config (its own damping
            is ignored; with ``sampled_labels=True``, the default, it approximates the GGN).
        method: ``"eigen"`` (dense eigenvalues, exact), ``"kfac"`` (Kronecker eigenvalues),
            ``"slq"`` (stochastic Lanczos quadrature), or ``"auto"``: ``kfac`` for a K-FAC
            config, ``eigen`` when ``P <= max_dim``, else ``slq``.
        bounds: search interval for ``λ`` (default: one that provably contains the optimum,
            :meth:`LaplaceEvidence.default_bounds`).
        grid: number of log-spaced points (or the dampings) where the curve is also evaluated.
        layers: parameters to include (e.g. ``"last"`` for a last-layer Laplace).
        batch_size: used when ``data`` is a Dataset.
        max_dim: largest ``P`` for ``"eigen"``.
        num_probes, iterations: SLQ probes and Lanczos steps per probe.
        seed: SLQ probe seed.
        progress: progress bars.

    Returns:
        :class:`DampingSelection` (frozen): ``.damping``, ``.log_evidence``, the grid and curve,
        the method used.

    Raises:
        NotPositiveDefiniteError: ``curvature="hessian"`` with a clearly negative eigenvalue
            (the Laplace evidence needs a positive semi-definite curvature; use ``"ggn"``).
        ConfigurationError: bad arguments, zero parameters or zero curvature.

    Cost: one forward pass over ``data`` (the log-likelihood) plus ``eigen``: ``P`` curvature
    products (``⌈P/64⌉`` passes with 64 vmapped columns) and an ``O(P³)`` ``eigvalsh``;
    ``kfac``: K-FAC's one (EK-FAC two) passes; ``slq``: ``iterations`` passes of ``num_probes``
    batched products.
    The search itself is ``O(P)`` per evaluation (a few dozen evaluations).
    """
    evidence = LaplaceEvidence.compute(
        model,
        task,
        checkpoint,
        data,
        curvature=curvature,
        method=method,
        layers=layers,
        batch_size=batch_size,
        max_dim=max_dim,
        num_probes=num_probes,
        iterations=iterations,
        seed=seed,
        progress=progress,
    )
    return evidence.select(bounds=bounds, grid=grid)


def _as_dampings(damping: float | Tensor) -> Tensor:
    lam = torch.as_tensor(damping, dtype=torch.float64).flatten().cpu()
    if lam.numel() == 0 or not bool(torch.isfinite(lam).all()) or not bool((lam > 0).all()):
        raise ConfigurationError(f"dampings must be finite and > 0, got {damping!r}")
    return lam


def _check_bounds(bounds: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ConfigurationError(f"bounds must be (low, high), got {bounds!r}") from None
    if not (0 < low < high < math.inf):
        raise ConfigurationError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    return low, high


def _check_psd(values: Tensor, curvature: str, dtype: torch.dtype = torch.float64) -> Tensor:
    """Clamp round-off negatives at 0; refuse a clearly indefinite Hessian.

    The GGN, the Fisher and K-FAC are positive semi-definite by construction: their negative
    eigenvalues are round-off and are clamped. A Hessian eigenvalue below
    ``−max(1e-8, 1e3 · eps(dtype)) · max|c|`` is a real negative curvature and is refused.
    """
    if not bool(torch.isfinite(values).all()):
        raise ConfigurationError(
            f"the {curvature} curvature has non-finite eigenvalues; check the checkpoint and data "
            "for NaN/inf"
        )
    scale = float(values.abs().max()) if values.numel() else 0.0
    lowest = float(values.min()) if values.numel() else 0.0
    tolerance = max(1e-8, 1e3 * torch.finfo(dtype).eps) * scale
    if curvature == "hessian" and lowest < -tolerance:
        raise NotPositiveDefiniteError(
            f"the Laplace evidence needs a positive semi-definite curvature, but the {curvature} "
            f"curvature has eigenvalue {lowest:.6g} (largest {scale:.6g}); use curvature='ggn' "
            "(the linearized model's curvature, always PSD for convex losses)"
        )
    return values.clamp_min(0.0)
