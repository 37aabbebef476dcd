"""Unlearning by one Newton step (Koh & Liang, ICML 2017; METHODS.md §4), on every parameter
or on a selected block (after L-CODEC: Mehta, Pal, Singh, Ravi, "Deep Unlearning via Randomized
Conditionally Independent Hessians", CVPR 2022).

Removing a set ``R`` of training examples from a model trained to a minimum ``θ`` of the mean
training objective moves the minimum, to first order, by ``(1/n) H⁻¹ Σ_{z∈R} ∇l(z, θ)``: the
influence-function estimate of the parameter change, applied to the parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature import KFAC, MFAC, Exact, MatrixOperator, Solver, make_solver
from traintrace.curvature.operators import CurvatureOperator, curvature_operator
from traintrace.data import (
    as_loader,
    batch_size_of,
    dataset_length,
    iterate_batches,
    progress_batches,
)
from traintrace.exceptions import ConfigurationError
from traintrace.features.gradients import GradientComputer
from traintrace.features.params import Layers
from traintrace.task import Task, require_task

__all__ = ["SelectParameters", "unlearn"]


def _indices(examples: object, n: int) -> list[int] | None:
    """The removed indices, or None when ``examples`` is a data set of the examples themselves."""
    if isinstance(examples, (Dataset, DataLoader)):
        return None
    if isinstance(examples, Tensor):
        if examples.dtype in (torch.bool,) or examples.is_floating_point() or examples.ndim != 1:
            raise ConfigurationError(
                f"examples as a tensor must be a 1-D integer tensor of indices into train, got "
                f"dtype {examples.dtype} and shape {tuple(examples.shape)}"
            )
        examples = examples.tolist()
    elif hasattr(examples, "tolist"):  # a NumPy array of indices
        examples = examples.tolist()
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes)):
        raise ConfigurationError(
            "examples must be indices into train (a list, 1-D integer tensor or array) or a "
            f"Dataset of the removed examples, got {type(examples).__name__}"
        )
    out = []
    for i in examples:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise ConfigurationError(f"examples must be integer indices, got {i!r}")
        i = int(i)
        if not 0 <= i < n:
            raise ConfigurationError(f"index {i} is outside the training set [0, {n})")
        out.append(i)
    if len(set(out)) != len(out):
        raise ConfigurationError(
            "examples contains repeated indices; each training example can be removed once"
        )
    if not out:
        raise ConfigurationError("examples is empty: nothing to remove")
    return out


def _subset_loader(train: Dataset | DataLoader, indices: list[int], batch_size: int) -> DataLoader:
    if isinstance(train, DataLoader):
        return DataLoader(
            Subset(train.dataset, indices),
            batch_size=train.batch_size or batch_size,
            collate_fn=train.collate_fn,
        )
    return DataLoader(Subset(train, indices), batch_size=batch_size)


@dataclass(frozen=True)
class SelectParameters:
    """How ``unlearn(..., parameters=...)`` chooses the parameter block it updates.

    **Rule: greedy forward selection by conditional saliency.** Let ``g = Σ_{z∈R} ∇l̃(z, θ)`` be
    the removed examples' summed gradient (L2 term included), ``H = C + λI`` the damped curvature
    of the step and ``d_j = |H_jj|`` its diagonal. Starting from the empty block ``S``, each of
    ``rounds`` rounds

    1. computes the residual ``r = g − H_{:,S} H_SS⁻¹ g_S`` — the gradient of the quadratic model
       of the retraining objective after the Newton step restricted to ``S`` (``r = g`` at first;
       ``r_S = 0``): the part of the removal's pull that the block does not explain yet;
    2. scores every parameter outside ``S`` by its *conditional saliency* ``r_j² / d_j`` — twice
       the further decrease of the quadratic model from adding a Newton step in coordinate ``j``
       alone (Optimal Brain Damage's saliency of the removal gradient, conditioned on ``S``);
    3. adds the ``⌈k_max / rounds⌉`` highest to ``S`` and computes their columns ``H e_j``.

    It stops when the remaining saliency ``Σ_{j∉S} r_j² / d_j`` falls below ``1 − mass`` of the
    initial ``Σ_j g_j² / d_j``, or at ``k_max`` parameters (``fraction · P`` if given, else
    ``min(max_fraction · P, max_parameters)``). The update is the Newton step on ``S``,
    ``H_SS⁻¹ g_S`` — the ``H``-orthogonal projection of the full Newton step onto ``S``, so never
    farther from it in the ``H``-norm than ``θ`` is.

    **Why this and not L-CODEC's estimator.** L-CODEC (Mehta et al., CVPR 2022) finds a Markov
    blanket of the parameters with FOCI: forward stepwise selection that adds, at each step, the
    variable most dependent on the target *given those already selected*, measured by the CODEC
    coefficient (Azadkia & Chatterjee) on samples from many randomly perturbed copies of the
    network — hundreds of forward passes and a nearest-neighbour ranking per selected variable.
    Here the same forward-selection structure is kept, with the conditional dependence replaced
    by the exact second-order quantity the Newton step cares about (the residual saliency above,
    i.e. orthogonal matching pursuit in the ``H``-metric). It is deterministic, needs no
    perturbation samples, and costs only what the block solve needs anyway: the ``k`` columns of
    ``H`` (in ``rounds`` batched passes), a curvature diagonal and ``rounds`` dense solves of size
    ``≤ k``. Ranking once by the unconditioned ``g_j² / d_j`` (``rounds=1``) ignores the coupling
    between parameters: with 10% of the parameters it lands at 0.71 of the original distance to
    the retrain on multinomial logistic regression over digits (0.87 on a tanh MLP), against 0.36
    (0.73) with 8 rounds (one removed example, mean of 3 draws,
    ``benchmarks/unlearning_select.py``; the full Newton step: 0.06 and 0.08).

    Args:
        mass: stop once the block explains this fraction of the initial saliency, in ``(0, 1]``.
        fraction: select exactly ``⌈fraction · P⌉`` parameters instead (``(0, 1]``).
        max_fraction: never more than this fraction of ``P``.
        max_parameters: never more than this many (the dense block is ``k × k``).
        rounds: forward-selection rounds (each one batched pass of curvature products).
        diagonal: ``"exact"`` (``P`` products), ``"hutchinson"`` (``probes`` products,
            Rademacher, ``E[v ⊙ H v] = diag H``), or ``"auto"`` (exact when ``P <= 128``).
        probes: Hutchinson probes.
        seed: Hutchinson seed.
    """

    mass: float = 0.99
    fraction: float | None = None
    max_fraction: float = 0.5
    max_parameters: int = 2048
    rounds: int = 8
    diagonal: Literal["auto", "exact", "hutchinson"] = "auto"
    probes: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        names = ("mass", "max_fraction") + (("fraction",) if self.fraction is not None else ())
        for name in names:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ConfigurationError(
                    f"SelectParameters.{name} must be in (0, 1], got {value!r}"
                )
        for name in ("max_parameters", "probes", "rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(
                    f"SelectParameters.{name} must be an integer >= 1, got {value!r}"
                )
        if self.diagonal not in ("auto", "exact", "hutchinson"):
            raise ConfigurationError(
                "SelectParameters.diagonal must be 'auto', 'exact' or 'hutchinson', got "
                f"{self.diagonal!r}"
            )

    def curvature_diagonal(self, operator: CurvatureOperator) -> Tensor:
        """``diag(C + λI)`` (``[P]``): exact from ``P`` products, or Hutchinson's estimate."""
        p = operator.dim
        exact = self.diagonal == "exact" or (self.diagonal == "auto" and p <= 128)
        if exact:
            eye = torch.eye(p, dtype=operator.dtype, device=operator.device)
            return torch.cat(
                [
                    operator.matmat(eye[:, i : i + 64])[i : i + 64].diagonal()
                    for i in range(0, p, 64)
                ]
            )
        generator = torch.Generator().manual_seed(self.seed)
        total = torch.zeros(p, dtype=operator.dtype, device=operator.device)
        for start in range(0, self.probes, 64):
            k = min(64, self.probes - start)
            signs = torch.randint(0, 2, (p, k), generator=generator) * 2 - 1
            v = signs.to(dtype=operator.dtype, device=operator.device)
            total += (v * operator.matmat(v)).sum(1)
        return total / self.probes

    def max_selected(self, p: int) -> int:
        """``k_max`` for ``P = p`` parameters."""
        if self.fraction is not None:
            cap = math.ceil(self.fraction * p)
        else:
            cap = math.floor(self.max_fraction * p) or 1
        return max(1, min(cap, self.max_parameters, p))

    def select_and_solve(
        self, operator: CurvatureOperator, gradient: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Greedy forward selection (see the class docstring) and the block's Newton step.

        Returns:
            ``(indices [k], step [P])``: the selected parameters (ascending) and
            ``H_SS⁻¹ g_S`` scattered into a zero vector.
        """
        p = operator.dim
        g = gradient.to(dtype=operator.dtype, device=operator.device)
        diag = self.curvature_diagonal(operator).abs().clamp_min(torch.finfo(g.dtype).tiny)
        cap = self.max_selected(p)
        per_round = max(1, math.ceil(cap / self.rounds))
        total = float((g * g / diag).sum())
        chosen = torch.zeros(p, dtype=torch.bool, device=g.device)
        indices = torch.zeros(0, dtype=torch.long, device=g.device)
        columns = torch.zeros(p, 0, dtype=g.dtype, device=g.device)
        residual, delta = g, torch.zeros(0, dtype=g.dtype, device=g.device)
        while indices.numel() < cap:
            saliency = residual * residual / diag
            saliency[chosen] = -1.0
            left = float(saliency.clamp_min(0).sum())
            if self.fraction is None and left <= (1.0 - self.mass) * total:
                break
            take = min(per_round, cap - indices.numel())
            new = torch.argsort(saliency, descending=True)[:take]
            chosen[new] = True
            indices = torch.cat([indices, new])
            columns = torch.cat([columns, _columns(operator, new)], dim=1)
            block = columns[indices]
            inverse = Exact().prepare(MatrixOperator(0.5 * (block + block.T)))
            delta = inverse.solve(g[indices])
            residual = g - columns @ delta
        step = torch.zeros(p, dtype=g.dtype, device=g.device)
        step[indices] = delta
        return indices.sort().values, step


def _columns(operator: CurvatureOperator, indices: Tensor) -> Tensor:
    """``H e_j`` for ``j`` in ``indices``: ``[P, len(indices)]`` in batches of 64 columns."""
    p, out = operator.dim, []
    for start in range(0, indices.numel(), 64):
        cols = indices[start : start + 64]
        e = torch.zeros(p, cols.numel(), dtype=operator.dtype, device=operator.device)
        e[cols, torch.arange(cols.numel(), device=e.device)] = 1.0
        out.append(operator.matmat(e))
    return torch.cat(out, dim=1)


def unlearn(
    model: nn.Module,
    task: Task,
    checkpoint: Checkpoint,
    examples: Sequence[int] | Tensor | Dataset | DataLoader,
    train: Dataset | DataLoader,
    *,
    hessian: Solver | KFAC | str = Exact(),  # noqa: B008 - frozen dataclass, immutable
    curvature: Literal["hessian", "ggn", "fisher"] = "hessian",
    l2: float = 0.0,
    damping: float = 0.0,
    hessian_of: Literal["full", "remaining"] = "full",
    layers: Layers = None,
    parameters: Literal["all", "select"] | SelectParameters = "all",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Remove training examples from a trained model by one Newton step.

    **Convention.** The model was trained to a minimum ``θ`` of the *mean* objective over the
    ``n`` examples of ``train``,

        J(θ) = (1/n) Σ_i l̃(z_i, θ),    l̃(z, θ) = l(z, θ) + (l2/2) ‖θ‖²,

    (``l`` = ``task.loss``; ``l2`` = the L2 penalty / weight decay it was trained with, applied to
    the selected parameters). Removing ``R`` and retraining minimizes
    ``(1/(n−r)) Σ_{i∉R} l̃(z_i, θ)`` — the same hyper-parameters on fewer examples. The step is

        θ_new = θ + (1/n) H⁻¹ Σ_{z∈R} ∇l̃(z, θ),
        H = (1/n) Σ_{i=1..n} ∇²l(z_i, θ) + (l2 + damping) I        (hessian_of="full")

    Koh & Liang's influence of up-weighting each removed example by ``ε = −1/n`` (the mean
    Hessian over the *full* training set). With ``hessian_of="remaining"`` the step is instead
    the exact Newton step on the retraining objective,

        θ_new = θ + (1/(n−r)) H_rem⁻¹ Σ_{z∈R} ∇l̃(z, θ),
        H_rem = (1/(n−r)) Σ_{i∉R} ∇²l(z_i, θ) + (l2 + damping) I,

    (second-order accurate in the removal; needs ``examples`` as indices). Only the selected
    ``layers`` move; every other entry of the state is returned unchanged. ``damping`` is pure
    numerical damping (0 for the exact step). ``C`` is the Hessian (``curvature="hessian"``) or
    its PSD stand-ins ``"ggn"`` / ``"fisher"`` (empirical Fisher, needed by ``MFAC()``);
    K-FAC/EK-FAC (``hessian=KFAC(...)``) approximate the Fisher and use their own ``damping``
    (``damping=`` must then stay 0), plus ``l2`` added as an absolute damping.

    **Distance to a real retrain** (measured in ``tests/applications/test_unlearning.py``):
    L2-regularized multinomial logistic regression (5 features, 3 classes, ``n = 120``,
    ``l2 = 0.01``, float64, trained and retrained from scratch to a gradient below 1e-13),
    removing 4 examples: ``‖θ_new − θ_retrain‖ / ‖θ − θ_retrain‖`` = 0.068 with ``Exact()`` and
    ``"full"`` (the full-data Hessian adds an ``O(r/n)`` error), 0.021 with ``"remaining"`` (the
    second-order error of one Newton step), about 0.5 with K-FAC/EK-FAC or the empirical Fisher
    (their curvature is not the Hessian). For non-convex networks the step approximates
    retraining from the same minimum only locally (Bae et al. 2022) — check on a small model
    before trusting it.

    **Selective unlearning** (``parameters="select"`` or a :class:`SelectParameters`): only a
    block ``S`` of the parameters most relevant to the removed examples moves, by the Newton step
    restricted to it,

        θ_S ← θ_S + s · (C_SS + (l2 + damping) I)⁻¹ g_S,    every other parameter unchanged,

    (``s`` = ``1/n`` or ``1/(n−r)`` and ``C`` as above; ``g = Σ_{z∈R} ∇l̃``), a small dense solve
    of size ``k = |S|``. ``S`` is chosen by greedy forward selection on the conditional saliency
    ``r_j² / (C_jj + λ)`` of the residual removal gradient (a cheaper stand-in for L-CODEC's
    Markov-blanket selection; see :class:`SelectParameters` for the rule and why). The step is
    the ``H``-orthogonal projection of the full Newton step onto ``S``. Needs ``hessian=Exact()``
    (the block is solved densely). Cost: the curvature diagonal (``P`` products when
    ``P <= 128``, else ``probes`` products in one batched pass) plus ``k`` products for the
    block's columns (in ``rounds`` passes) and ``O(rounds · k³)``, instead of ``P`` products and
    ``O(P³)`` for the full exact step.

    Args:
        model, task, checkpoint: the network, its loss and the trained parameters ``θ``.
        examples: the removed set ``R``: indices into ``train`` (iteration order), or a
            Dataset/DataLoader of the removed examples themselves (they must be in ``train``;
            this is not checked).
        train: the full training set the model was trained on (``n`` examples, ``R`` included).
        hessian: the inverse-curvature method — a solver (``Exact()``, ``CG()``, ``LiSSA()``,
            ``Arnoldi(rank=...)``, ``MFAC()``, or their names) or ``KFAC()`` / ``EKFAC()``.
        curvature: ``"hessian"``, ``"ggn"`` or ``"fisher"`` (ignored by K-FAC/EK-FAC).
        l2: the L2 coefficient ``l2`` of the training objective (see above).
        damping: extra ``λ ≥ 0`` added to the curvature.
        hessian_of: ``"full"`` or ``"remaining"`` (see above).
        layers: parameters to update (see :func:`~traintrace.features.params.select_parameters`).
        parameters: ``"all"`` (the full Newton step on ``layers``), ``"select"`` (a block chosen
            with the default :class:`SelectParameters`), or a configured
            :class:`SelectParameters`.
        batch_size: used when ``train`` / ``examples`` are Datasets.
        progress: show a progress bar over the removed examples.

    Returns:
        The new full state dict (same keys, shapes and dtypes as the checkpoint's).

    Sign: the step *adds* ``H⁻¹ Σ ∇l̃``: it undoes the pull the removed examples exerted
    (training moved ``θ`` along ``−∇l̃`` of every example), so their losses rise.

    Cost: the removed examples' gradients (one per-example backward each) plus one solve with
    ``hessian``: ``Exact`` forms ``H`` (``P`` curvature products, each a pass over ``train``, and
    ``O(P³)``), ``CG`` a few tens of products, K-FAC one or two passes over ``train``.
    """
    require_task(task)
    state = require_checkpoint(checkpoint).state_for(model)
    for name, value in (("l2", l2), ("damping", damping)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ConfigurationError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(parameters, str) and parameters not in ("all", "select"):
        raise ConfigurationError(
            f"parameters must be 'all', 'select' or a SelectParameters(...), got {parameters!r}"
        )
    select = (
        SelectParameters()
        if parameters == "select"
        else (parameters if isinstance(parameters, SelectParameters) else None)
    )
    if select is None and not isinstance(parameters, str):
        raise ConfigurationError(
            f"parameters must be 'all', 'select' or a SelectParameters(...), got "
            f"{type(parameters).__name__}"
        )
    if select is not None and not (
        isinstance(hessian, Exact) or (isinstance(hessian, str) and hessian.lower() == "exact")
    ):
        raise ConfigurationError(
            f"parameters='select' solves the selected block densely; leave hessian=Exact() (got "
            f"{hessian!r}), or use parameters='all' with that solver"
        )
    if hessian_of not in ("full", "remaining"):
        raise ConfigurationError(
            f"hessian_of must be 'full' (Koh & Liang: the full-data Hessian) or 'remaining' "
            f"(Newton step on the retraining objective), got {hessian_of!r}"
        )
    loader = as_loader(train, batch_size)
    n = dataset_length(loader)
    if n is None:
        n = sum(batch_size_of(b) for _, b in iterate_batches(loader, torch.device("cpu")))
    indices = _indices(examples, n)
    if indices is None:
        removed = as_loader(examples, batch_size)  # type: ignore[arg-type]
        if hessian_of == "remaining":
            raise ConfigurationError(
                "hessian_of='remaining' needs the removed examples as indices into train (to "
                "leave them out of the Hessian); pass examples=[i, j, ...] or use 'full'"
            )
    else:
        removed = _subset_loader(train, indices, batch_size)

    grads = GradientComputer(model, task, layers)
    theta = grads.layout.flatten(grads.selected_state(state))
    device = theta.device
    total = torch.zeros_like(theta)
    count = 0
    for offset, batch in progress_batches(removed, device, "unlearn: removed gradients", progress):
        g = grads.per_example(state, batch, "loss", offset=offset, where="removed examples")
        total += g.sum(dim=0)
        count += g.shape[0]
    if count == 0:
        raise ConfigurationError("examples holds no examples: nothing to remove")
    if count >= n:
        raise ConfigurationError(
            f"removing {count} of the {n} training examples leaves none; unlearning needs "
            "remaining data"
        )
    total += count * l2 * theta  # Σ_R ∇l̃ = Σ_R ∇l + r · l2 · θ

    if hessian_of == "remaining":
        kept = sorted(set(range(n)) - set(indices))  # type: ignore[arg-type]
        curvature_data = _subset_loader(train, kept, batch_size)
        scale = 1.0 / (n - count)
    else:
        curvature_data = loader
        scale = 1.0 / n

    if select is not None:
        operator = curvature_operator(
            curvature,
            model,
            task,
            state,
            curvature_data,
            layers=layers,
            damping=damping + l2,
            allowed=("hessian", "ggn", "fisher"),
        )
        _, step = select.select_and_solve(operator, total)
    elif isinstance(hessian, KFAC):
        if damping != 0:
            raise ConfigurationError(
                f"with {type(hessian).__name__} the damping is the config's own "
                f"({type(hessian).__name__}(damping=...)); leave unlearn(damping=0)"
            )
        if l2 > 0 and hessian.damping_scale != "absolute":
            raise ConfigurationError(
                "l2 is added to K-FAC's damping as an absolute amount; use "
                f"{type(hessian).__name__}(damping_scale='absolute') with l2 > 0"
            )
        inverse = hessian.prepare(model, task, state, curvature_data, layers, progress=progress)
        step = inverse.solve(total.to(torch.float64), damping=hessian.damping + l2)
    else:
        solver = make_solver(hessian)
        if isinstance(solver, MFAC) and curvature != "fisher":
            raise ConfigurationError(
                "MFAC() inverts the empirical Fisher; pass curvature='fisher' with it"
            )
        operator = curvature_operator(
            curvature,
            model,
            task,
            state,
            curvature_data,
            layers=layers,
            damping=damping + l2,
            allowed=("hessian", "ggn", "fisher"),
        )
        step = solver.prepare(operator).solve(total)
    new_theta = theta + scale * step.to(dtype=theta.dtype, device=device)
    out = {k: v.clone() for k, v in state.items()}
    for name, value in grads.layout.unflatten(new_theta).items():
        out[name] = value.to(dtype=state[name].dtype)
    return out
