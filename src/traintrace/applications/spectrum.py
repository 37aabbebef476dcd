"""The curvature spectrum: top eigenvalues and the spectral density of the training Hessian/GGN.

Used to choose damping for inverse-curvature solvers and to compare the curvature of one
mini-batch with that of the full training set (stochastic solvers such as LiSSA with
mini-batches see the former). With ``batch_sizes`` it measures how the extreme eigenvalues of a
mini-batch's curvature grow as the batch shrinks (Granziol, Zohren, Roberts, "Learning rates as a
function of batch size: a random matrix theory approach to neural network training", JMLR 2022)
and turns that into batch-aware solver settings (:class:`BatchScaling`). Top eigenvalues come from Lanczos
(:func:`~traintrace.curvature.lanczos.lanczos`), the density from stochastic Lanczos quadrature
(:func:`~traintrace.curvature.lanczos.slq_density`, Ghorbani, Krishnan, Xiao 2019).

This module also holds the small helpers the other applications share (building a curvature
operator by name, counting products in a progress bar).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature import SpectralDensity, lanczos, slq_density
from traintrace.curvature.lanczos import ProgressOperator
from traintrace.curvature.operators import ModelCurvatureOperator, curvature_operator
from traintrace.data import as_loader
from traintrace.exceptions import ConfigurationError
from traintrace.features.params import Layers
from traintrace.task import Task, require_task

__all__ = ["BatchScaling", "SpectrumResult", "spectrum"]


@dataclass(frozen=True)
class BatchScaling:
    """Extreme eigenvalues of mini-batch curvatures as a function of the batch size ``B``.

    For each ``B`` in :attr:`batch_sizes`, :attr:`samples` random mini-batches of ``B`` distinct
    examples; for each, the largest and smallest Ritz values of
    ``A_B = (1/B) Σ_{i∈B} C(z_i) + λI`` (the same damping ``λ`` as the full-data values).

    **Model.** Granziol et al. model the batch curvature as the full-data one plus a random
    noise matrix whose variance scales as ``1/B − 1/N`` (sampling without replacement); in the
    spiked random-matrix model an outlier eigenvalue ``β`` moves to ``β + σ²_B/β`` with
    ``σ²_B ∝ 1/B − 1/N``. So

        λ_max(B) ≈ λ_max(N) + a · (1/B − 1/N),     λ_min(B) ≈ λ_min(N) − b · (1/B − 1/N),

    with ``a, b ≥ 0`` fitted by least squares (through the full-data point) to the mean batch
    values (:attr:`top_slope`, :attr:`min_slope`).

    **Settings derived from it.** :meth:`lissa_scale` is the scale a stochastic LiSSA with
    batch size ``B`` needs (every batch eigenvalue inside ``(0, 2s)``); :meth:`suggested_damping`
    the damping for a stochastic solver or optimizer with step ``η`` at batch size ``B``, which
    grows as ``η / B`` (Granziol et al.: the minimal damping of stochastic second-order methods is
    proportional to learning rate / batch size).

    Attributes:
        num_examples: ``N``.
        damping: ``λ`` included in every eigenvalue.
        full_top, full_min: full-data ``λ_max`` and (Ritz) ``λ_min``.
        batch_sizes: ``[k]`` batch sizes measured.
        samples: mini-batches drawn per batch size.
        top_mean, top_max: ``[k]`` mean and largest batch ``λ_max`` per batch size.
        min_mean, min_min: ``[k]`` mean and smallest batch ``λ_min`` per batch size.
        top_slope, min_slope: ``a`` and ``b`` above.
    """

    num_examples: int
    damping: float
    full_top: float
    full_min: float
    batch_sizes: tuple[int, ...]
    samples: int
    top_mean: Tensor
    top_max: Tensor
    min_mean: Tensor
    min_min: Tensor
    top_slope: float
    min_slope: float

    def _u(self, batch_size: int) -> float:
        if not isinstance(batch_size, int) or not 1 <= batch_size <= self.num_examples:
            raise ConfigurationError(
                f"batch_size must be an integer in [1, N={self.num_examples}], got {batch_size!r}"
            )
        return 1.0 / batch_size - 1.0 / self.num_examples

    def predicted_top(self, batch_size: int) -> float:
        """``λ_max(B) ≈ λ_max(N) + a (1/B − 1/N)``."""
        return self.full_top + self.top_slope * self._u(batch_size)

    def predicted_min(self, batch_size: int) -> float:
        """``λ_min(B) ≈ λ_min(N) − b (1/B − 1/N)``."""
        return self.full_min - self.min_slope * self._u(batch_size)

    def lissa_scale(self, batch_size: int) -> float:
        """``s_B = 1.1 · max(predicted λ_max(B), largest λ_max measured at B)``: the scale for
        ``LiSSA(scale=..., stochastic=True)`` with batches of ``B`` (a full-data scale
        ``1.1 · λ_max(N)`` diverges once a batch has ``λ_max > 2s``)."""
        top = self.predicted_top(batch_size)
        if batch_size in self.batch_sizes:
            top = max(top, float(self.top_max[self.batch_sizes.index(batch_size)]))
        return 1.1 * top

    def suggested_damping(self, batch_size: int, lr: float | None = None) -> float:
        """Damping for a stochastic solver with step ``lr`` on batches of ``B`` examples.

            δ(B, η) = max(0, −λ̂_min(B)) + η · σ²_B + 1e-3 · λ_max(N),
            σ²_B = (λ_max(N) − λ) · (λ̂_max(B) − λ_max(N))

        ``σ²_B`` is the noise variance that the spiked model infers from the outlier's shift
        (shift ``= σ²_B / β``); ``η σ²_B`` is, to first order, the excess curvature an SGD step of
        size ``η`` sees from the batch noise — proportional to ``η / B``. The first term lifts the
        batch's most negative eigenvalue (zero for a positive semi-definite curvature). ``lr``
        defaults to LiSSA's step ``1 / lissa_scale(B)``. Added on top of :attr:`damping`.
        """
        if lr is None:
            lr = 1.0 / self.lissa_scale(batch_size)
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ConfigurationError(f"lr must be a finite number > 0, got {lr!r}")
        beta = max(self.full_top - self.damping, 0.0)
        variance = beta * max(self.predicted_top(batch_size) - self.full_top, 0.0)
        lift = max(0.0, -self.predicted_min(batch_size))
        return lift + lr * variance + 1e-3 * max(abs(self.full_top), abs(self.full_min))


@dataclass(frozen=True)
class SpectrumResult:
    """Eigenvalue summary of the damped training curvature ``C + λI`` (see :func:`spectrum`).

    Attributes:
        curvature: ``"hessian"`` or ``"ggn"``.
        damping: ``λ`` included in every eigenvalue below.
        num_examples: ``N``, examples in the full-data curvature.
        top_eigenvalues: ``[top]`` largest (algebraic) Ritz values, descending.
        min_eigenvalue: the smallest Ritz value of the same Lanczos run (an *upper* bound on the
            true ``λ_min``: Ritz values lie inside the spectrum).
        density: the SLQ spectral density (``None`` when ``density=False``).
        suggested_damping: ``max(0, −λ_min) + 1e-3 · max(|λ_max|, |λ_min|)`` from the full-data
            values: the damping that lifts the smallest eigenvalue to about ``1e-3 · λ_max``
            above zero (added on top of the ``damping`` already included).
        batch_size: examples in ``batch_data`` (``None`` when not given); the ``batch_*`` fields
            are the same quantities for the curvature of that mini-batch alone.
        iterations: Lanczos steps per run.
        batch_scaling: batch vs full-data extreme eigenvalues by batch size (``None`` unless
            ``batch_sizes`` was given); see :class:`BatchScaling`.
    """

    curvature: str
    damping: float
    num_examples: int
    top_eigenvalues: Tensor
    min_eigenvalue: float
    density: SpectralDensity | None
    suggested_damping: float
    iterations: int
    batch_size: int | None = None
    batch_top_eigenvalues: Tensor | None = None
    batch_min_eigenvalue: float | None = None
    batch_density: SpectralDensity | None = None
    batch_suggested_damping: float | None = None
    batch_scaling: BatchScaling | None = None


def _suggested_damping(lam_min: float, lam_max: float) -> float:
    return max(0.0, -lam_min) + 1e-3 * max(abs(lam_max), abs(lam_min))


def _analyse(
    operator: ModelCurvatureOperator,
    *,
    top: int,
    iterations: int,
    density: bool,
    num_probes: int,
    grid: int,
    seed: int,
    bar: Any,
) -> tuple[Tensor, float, SpectralDensity | None]:
    counted = ProgressOperator(operator, bar)
    result = lanczos(
        counted.matvec,
        operator.dim,
        iterations,
        seed=seed,
        dtype=operator.dtype,
        device=operator.device,
    )
    values = torch.linalg.eigvalsh(result.tridiagonal)
    top_values = values.flip(0)[:top]
    dens = None
    if density:
        dens = slq_density(counted, num_probes, iterations, grid, seed=seed)
    return top_values, float(values[0]), dens


def spectrum(
    model: nn.Module,
    task: Task,
    checkpoint: Checkpoint,
    data: Dataset | DataLoader,
    *,
    curvature: Literal["hessian", "ggn"] = "hessian",
    top: int = 10,
    density: bool = True,
    num_probes: int = 5,
    iterations: int | None = None,
    grid: int = 500,
    batch_data: Any = None,
    batch_sizes: Sequence[int] | None = None,
    batch_samples: int = 3,
    batch_iterations: int | None = None,
    layers: Layers = None,
    damping: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> SpectrumResult:
    """Top eigenvalues and spectral density of the training curvature (and of one mini-batch).

    The curvature is ``A = (1/N) Σ_i C(z_i) + λI`` over the ``N`` examples of ``data`` at the
    checkpoint: ``C = ∇²_θ l`` (``"hessian"``) or ``J_iᵀ H_out J_i`` (``"ggn"``), restricted to
    ``layers``. One Lanczos run of ``m = iterations`` steps gives the ``top`` largest Ritz values
    (descending) and the smallest; SLQ with ``num_probes`` Rademacher probes of ``m`` steps each
    gives a density ``φ`` with ``∫ φ = 1`` (the eigenvalue histogram normalized by ``P``).

    With ``batch_data`` — one mini-batch (a tuple/dict/tensor batch, or a Dataset/DataLoader whose
    examples together form the batch) — the same is computed for ``(1/B) Σ_{i∈batch} C(z_i) + λI``,
    to see how much one mini-batch's curvature differs from the full-data one (mini-batch
    spectra are wider: a stochastic solver needs a scale above the *batch* ``λ_max``).

    With ``batch_sizes``, ``batch_samples`` random mini-batches of each size are drawn from
    ``data`` and the extreme eigenvalues of their curvatures are reported with a ``1/B`` fit and
    batch-aware LiSSA scale and damping (:attr:`SpectrumResult.batch_scaling`).

    ``suggested_damping`` is ``max(0, −λ_min) + 1e-3 · max(|λ_max|, |λ_min|)``: enough to make the
    damped curvature positive definite with its smallest eigenvalue about ``1e-3 · λ_max`` (the
    same rule as the solvers' error messages). ``λ_min`` here is a Ritz value, an upper bound on
    the true smallest eigenvalue: more ``iterations`` tighten it. The smallest (most negative)
    eigenvalue converges more slowly than the largest, so the default runs at least 100 steps
    (on a 1.8k-parameter MLP, 24 steps found 2/3 of ``|λ_min|``, 100 steps all of it).

    Args:
        model, task, checkpoint: the network, its loss and the parameters ``θ``.
        data: the training set (Dataset, or a DataLoader that does not shuffle).
        curvature: ``"hessian"`` or ``"ggn"``.
        top: number of top eigenvalues.
        density: compute the SLQ densities (``num_probes × iterations`` more products each).
        num_probes: SLQ probes.
        iterations: Lanczos steps ``m`` per run (default ``min(P, max(2·top, top + 20, 100))``);
            ``m = P`` gives exact eigenvalues.
        grid: number of points where each density is evaluated.
        batch_data: one mini-batch to compare with (see above).
        batch_sizes: batch sizes ``B < N`` to measure (see :class:`BatchScaling`).
        batch_samples: mini-batches drawn per batch size.
        batch_iterations: Lanczos steps per mini-batch (default ``min(P, 30)``: the extreme
            Ritz values converge first).
        layers: parameters to include (see :func:`~traintrace.features.params.select_parameters`).
        damping: ``λ`` added to the curvature (included in every reported eigenvalue).
        batch_size: used when ``data`` is a Dataset.
        seed: Lanczos start / probe seed.
        progress: show a progress bar over operator products.

    Returns:
        :class:`SpectrumResult`.

    Cost: ``m · (1 + num_probes·density)`` curvature products for the full data (each one pass
    over ``data``, about 2–4 forward+backward passes), the same again on the mini-batch, plus
    ``O(m² P)`` re-orthogonalization and ``m × P`` memory; ``batch_sizes``: ``len(batch_sizes) ×
    batch_samples × batch_iterations`` products on ``B`` examples each.
    """
    require_task(task)
    state = require_checkpoint(checkpoint).state_for(model)
    if not isinstance(top, int) or top < 1:
        raise ConfigurationError(f"top must be an integer >= 1, got {top!r}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ConfigurationError(f"num_probes must be an integer >= 1, got {num_probes!r}")
    loader = as_loader(data, batch_size)
    operator = curvature_operator(
        curvature,
        model,
        task,
        state,
        loader,
        layers=layers,
        damping=damping,
        allowed=("hessian", "ggn"),
    )
    p = operator.dim
    if top > p:
        raise ConfigurationError(f"top={top} exceeds the number of parameters P={p}")
    m = min(p, max(2 * top, top + 20, 100)) if iterations is None else int(iterations)
    if m < top:
        raise ConfigurationError(f"iterations ({iterations}) must be >= top ({top})")
    m = min(m, p)
    batch_operator = None
    if batch_data is not None:
        batches = (
            as_loader(batch_data, batch_size)
            if isinstance(batch_data, (Dataset, DataLoader))
            else [batch_data]
        )
        batch_operator = curvature_operator(
            curvature,
            model,
            task,
            state,
            batches,
            layers=layers,
            damping=damping,
            allowed=("hessian", "ggn"),
        )
    runs = 1 + (batch_operator is not None)
    total = runs * m * (1 + (num_probes if density else 0))
    bar = tqdm(total=total, desc=f"spectrum ({curvature})", unit="product", disable=not progress)
    try:
        settings = dict(
            top=top,
            iterations=m,
            density=density,
            num_probes=num_probes,
            grid=grid,
            seed=seed,
            bar=bar,
        )
        top_values, lam_min, dens = _analyse(operator, **settings)
        batch_fields: dict[str, Any] = {}
        if batch_operator is not None:
            b_top, b_min, b_dens = _analyse(batch_operator, **settings)
            batch_fields = dict(
                batch_size=batch_operator.num_examples,
                batch_top_eigenvalues=b_top,
                batch_min_eigenvalue=b_min,
                batch_density=b_dens,
                batch_suggested_damping=_suggested_damping(b_min, float(b_top[0])),
            )
    finally:
        bar.close()
    scaling = None
    if batch_sizes is not None:
        scaling = _batch_scaling(
            operator,
            curvature,
            model,
            task,
            state,
            loader,
            layers=layers,
            damping=damping,
            batch_sizes=batch_sizes,
            samples=batch_samples,
            iterations=min(p, 30) if batch_iterations is None else int(batch_iterations),
            full_top=float(top_values[0]),
            full_min=lam_min,
            seed=seed,
        )
    return SpectrumResult(
        curvature=curvature,
        damping=operator.damping,
        num_examples=int(operator.num_examples or 0),
        top_eigenvalues=top_values,
        min_eigenvalue=lam_min,
        density=dens,
        suggested_damping=_suggested_damping(lam_min, float(top_values[0])),
        iterations=m,
        batch_scaling=scaling,
        **batch_fields,
    )


def _batch_scaling(
    operator: ModelCurvatureOperator,
    curvature: str,
    model: nn.Module,
    task: Task,
    state: dict[str, Tensor],
    loader: DataLoader,
    *,
    layers: Layers,
    damping: float,
    batch_sizes: Sequence[int],
    samples: int,
    iterations: int,
    full_top: float,
    full_min: float,
    seed: int,
) -> BatchScaling:
    n = int(operator.num_examples or 0)
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(not 1 <= b < n for b in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigurationError(
            f"batch_sizes must be distinct integers in [1, N={n}), got {list(batch_sizes)}"
        )
    if not isinstance(samples, int) or samples < 1:
        raise ConfigurationError(f"batch_samples must be an integer >= 1, got {samples!r}")
    if iterations < 1:
        raise ConfigurationError(f"batch_iterations must be >= 1, got {iterations}")
    generator = torch.Generator().manual_seed(seed)
    tops, mins = [], []
    for size in sizes:
        row_top, row_min = [], []
        for _ in range(samples):
            indices = torch.randperm(n, generator=generator)[:size].tolist()
            batch = DataLoader(
                Subset(loader.dataset, indices), batch_size=size, collate_fn=loader.collate_fn
            )
            op = curvature_operator(
                curvature,  # type: ignore[arg-type]
                model,
                task,
                state,
                batch,
                layers=layers,
                damping=damping,
                allowed=("hessian", "ggn"),
            )
            result = lanczos(
                op.matvec, op.dim, iterations, seed=seed, dtype=op.dtype, device=op.device
            )
            values = torch.linalg.eigvalsh(result.tridiagonal)
            row_top.append(float(values[-1]))
            row_min.append(float(values[0]))
        tops.append(row_top)
        mins.append(row_min)
    top = torch.tensor(tops, dtype=torch.float64)
    low = torch.tensor(mins, dtype=torch.float64)
    u = torch.tensor([1.0 / b - 1.0 / n for b in sizes], dtype=torch.float64)
    denom = float((u * u).sum())
    top_slope = max(0.0, float((u * (top.mean(1) - full_top)).sum()) / denom)
    min_slope = max(0.0, float((u * (full_min - low.mean(1))).sum()) / denom)
    return BatchScaling(
        num_examples=n,
        damping=float(damping),
        full_top=full_top,
        full_min=full_min,
        batch_sizes=sizes,
        samples=samples,
        top_mean=top.mean(1),
        top_max=top.max(1).values,
        min_mean=low.mean(1),
        min_min=low.min(1).values,
        top_slope=top_slope,
        min_slope=min_slope,
    )
