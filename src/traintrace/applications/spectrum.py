"""The curvature spectrum: top eigenvalues and the spectral density of the training Hessian/GGN.

Used to choose damping for inverse-curvature solvers and to compare the curvature of one
mini-batch with that of the full training set (stochastic solvers such as LiSSA with
mini-batches see the former). Top eigenvalues come from Lanczos
(:func:`~traintrace.curvature.lanczos.lanczos`), the density from stochastic Lanczos quadrature
(:func:`~traintrace.curvature.lanczos.slq_density`, Ghorbani, Krishnan, Xiao 2019).

This module also holds the small helpers the other applications share (building a curvature
operator by name, counting products in a progress bar).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature import SpectralDensity, lanczos, slq_density
from traintrace.curvature.lanczos import ProgressOperator
from traintrace.curvature.operators import ModelCurvatureOperator, curvature_operator
from traintrace.data import as_loader
from traintrace.exceptions import ConfigurationError
from traintrace.features.params import Layers
from traintrace.task import Task, require_task

__all__ = ["SpectrumResult", "spectrum"]


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
        layers: parameters to include (see :func:`~traintrace.features.params.select_parameters`).
        damping: ``λ`` added to the curvature (included in every reported eigenvalue).
        batch_size: used when ``data`` is a Dataset.
        seed: Lanczos start / probe seed.
        progress: show a progress bar over operator products.

    Returns:
        :class:`SpectrumResult`.

    Cost: ``m · (1 + num_probes·density)`` curvature products for the full data (each one pass
    over ``data``, about 2–4 forward+backward passes), the same again on the mini-batch, plus
    ``O(m² P)`` re-orthogonalization and ``m × P`` memory.
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
    return SpectrumResult(
        curvature=curvature,
        damping=operator.damping,
        num_examples=int(operator.num_examples or 0),
        top_eigenvalues=top_values,
        min_eigenvalue=lam_min,
        density=dens,
        suggested_damping=_suggested_damping(lam_min, float(top_values[0])),
        iterations=m,
        **batch_fields,
    )
