"""The proximal Bregman response function (PBRF): what influence functions actually estimate.

Bae, Ng, Lo, Ghassemi, Grosse, "If Influence Functions are the Answer, Then What is the
Question?", NeurIPS 2022. In non-convex networks influence functions do not track leave-one-out
retraining; to first order they track the minimizer of

    J(θ) = (1/n) Σ_j D_L(h(θ, x_j), h(θ^s, x_j)) − ε Σ_{m ∈ M} l(z_m, θ) + (λ/2) ‖θ − θ^s‖²

from the trained parameters ``θ^s``, where ``h`` is the network output (``task.forward``), ``j``
runs over all ``n`` training examples, ``M`` is the removed example (or group) and ``D_L`` the
Bregman divergence of the task's loss in output space:

    D_L(h, h^s) = l(h, y) − l(h^s, y) − ⟨∇_h l(h^s, y), h − h^s⟩.

For cross-entropy on logits this is ``KL(softmax(h^s) ‖ softmax(h))`` (the labels cancel); for
:class:`~traintrace.Regression` (``l = mean_k (h_k − y_k)²``) it is ``mean_k (h_k − h^s_k)²``.

**ε and removal.** The training objective is the *mean* loss, so removing ``z_m`` subtracts
``(1/n) l(z_m)``: with the ``− ε l`` term above (the paper's and METHODS.md's form), removal is
``ε = +1/n`` (the default). ``ε < 0`` up-weights.

**First order = damped-GGN influence.** At ``θ^s`` the gradient of ``J`` is ``−ε ∇l_M`` and the
Hessian of the Bregman term is exactly the Gauss–Newton matrix ``G = (1/n) Σ_j J_jᵀ H_j J_j``
(the first derivative of ``D_L`` vanishes at ``h^s``), so one Newton step gives
``θ* − θ^s = ε (G + λI)⁻¹ ∇l_M + O(ε²)`` and the change of a query measurement is
``ε ∇f(z')ᵀ (G + λI)⁻¹ ∇l_M``. With ``ε = 1/n`` that is ``InfluenceFunction(model, task,
checkpoint, curvature="ggn", damping=λ).score`` — same scale and sign (positive = the training
example helps: removing it raises the query's oriented measurement). :func:`pbrf_scores` returns
the exact (optimized) counterpart, the ground truth to judge IHVP solvers by.

Everything is evaluated functionally in eval mode (like every gradient in traintrace); with
``layers`` only the selected parameters move (matching ``InfluenceFunction(layers=...)``).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint
from traintrace.data import as_loader, batch_size_of, iterate_batches, to_plain
from traintrace.exceptions import ConfigurationError, SolverDivergedError
from traintrace.features.gradients import GradientComputer
from traintrace.features.params import Layers
from traintrace.task import Task

__all__ = ["PBRF", "PBRFSolution", "pbrf", "pbrf_scores"]

Optimizer = Literal["lbfgs", "adam"]


@dataclass(frozen=True)
class PBRFSolution:
    """The result of one PBRF optimization.

    Attributes:
        state: the full model state with the optimized parameters ``θ*`` (others as ``θ^s``).
        epsilon: the ε used (``1/n`` = removal).
        objective: ``J(θ*)``.
        gradient_norm: ``‖∇J(θ*)‖`` over the optimized parameters (0 at the exact optimum).
        initial_gradient_norm: ``‖∇J(θ^s)‖ = |ε| ‖∇l_M(θ^s)‖``, the scale to judge it by.
        iterations: optimizer iterations used.
        converged: ``gradient_norm <= rtol · initial_gradient_norm``.
    """

    state: dict[str, Tensor]
    epsilon: float
    objective: float
    gradient_norm: float
    initial_gradient_norm: float
    iterations: int
    converged: bool


class PBRF:
    """Set-up shared by PBRF solves: the model at ``θ^s``, the training data and ``λ``.

    Args:
        model: the network (not modified; evaluated functionally in eval mode).
        task: the training loss (its Bregman divergence is taken in output space) and the query
            measurement.
        checkpoint: the trained parameters ``θ^s`` (a :class:`~traintrace.Checkpoint`, a state
            dict, or ``None`` for the model's current parameters).
        train: the ``n`` training examples of the Bregman term (a Dataset or unshuffled
            DataLoader); example indices refer to its order.
        damping: ``λ >= 0`` of the proximal term; use the ``damping`` you give the influence
            function you compare with.
        layers: parameters to optimize (``None`` all, ``"last"``, module names); the rest stay at
            ``θ^s``.
        batch_size: used when a Dataset is given.

    Cost: every batch, its outputs ``h(θ^s)`` and their loss gradients are kept in memory (the
    PBRF is a ground truth for small models); each objective evaluation is one forward+backward
    pass over the training set, and a solve takes tens to hundreds of them.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint | Mapping[str, Tensor] | None,
        train: Any,
        *,
        damping: float,
        layers: Layers = None,
        batch_size: int = 64,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"task must be a traintrace Task (tt.Classification(), ...), got {task!r}"
            )
        try:
            damping = float(damping)
        except (TypeError, ValueError):
            raise ConfigurationError(f"damping must be a number >= 0, got {damping!r}") from None
        if not math.isfinite(damping) or damping < 0:
            raise ConfigurationError(f"damping must be a finite number >= 0, got {damping!r}")
        if checkpoint is None:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            if not isinstance(checkpoint, Checkpoint):
                if not isinstance(checkpoint, Mapping):
                    raise ConfigurationError(
                        "checkpoint must be a tt.Checkpoint, a state dict or None, got "
                        f"{type(checkpoint).__name__}"
                    )
                checkpoint = Checkpoint(checkpoint, name="θ^s")
            state = checkpoint.state_for(model)
        self.model = model
        self.task = task
        self.damping = damping
        self.layers = layers
        self.state = state
        self.computer = GradientComputer(model, task, layers)
        self.layout = self.computer.layout
        self.params0 = self.computer.selected_state(state)
        first = next(iter(self.params0.values()))
        self.dtype = first.dtype
        self.device = first.device
        self.loader: DataLoader = as_loader(train, batch_size)
        self._targets: list[tuple[Any, Tensor, Tensor, Tensor]] = []
        for _, batch in iterate_batches(self.loader, self.device):
            forward = self.computer.outputs_of_params(state, batch)
            with torch.no_grad():
                h0 = forward(self.params0).detach()
            l0 = task.loss(h0, batch).detach()
            g0 = grad(lambda out, b=batch: task.loss(out, b).sum())(h0).detach()
            self._targets.append((batch, h0, l0, g0))
        self.n_train = sum(batch_size_of(b) for b, *_ in self._targets)
        if self.n_train == 0:
            raise ConfigurationError("the training data holds no examples")

    # -- pieces ---------------------------------------------------------------------------------
    def example_batch(self, example: Any) -> Any:
        """The batch of the removed example(s): an index into ``train``, or a batch itself."""
        if isinstance(example, bool):
            raise ConfigurationError("example must be an index or a batch, got a bool")
        index = None
        if isinstance(example, Tensor):
            if example.ndim == 0 and not example.is_floating_point():
                index = int(example)
        else:
            try:
                index = operator.index(example)
            except TypeError:
                index = None
        if index is not None:
            if not 0 <= index < self.n_train:
                raise ConfigurationError(
                    f"example index {index} is outside the training set [0, {self.n_train})"
                )
            item = self.loader.dataset[index]
            collate = self.loader.collate_fn or default_collate
            return to_plain(collate([item]), self.device)
        batch = to_plain(example, self.device)
        if batch_size_of(batch) < 1:
            raise ConfigurationError("the example batch holds no examples")
        return batch

    def _epsilon(self, epsilon: float | None) -> float:
        if epsilon is None:
            return 1.0 / self.n_train
        value = float(epsilon)
        if not math.isfinite(value):
            raise ConfigurationError(f"epsilon must be finite, got {epsilon!r}")
        return value

    def _accumulate(self, params: dict[str, Tensor], example: Any, epsilon: float) -> float:
        """``J(params)``; adds ``∇J`` into each ``params[name].grad`` (one pass over the data)."""
        leaves = list(params.values())
        total = 0.0
        for batch, h0, l0, g0 in self._targets:
            out = self.computer.outputs_of_params(self.state, batch)(params)
            lin = (g0 * (out - h0)).reshape(out.shape[0], -1).sum(dim=1)
            bregman = (self.task.loss(out, batch) - l0 - lin).sum() / self.n_train
            bregman.backward(inputs=leaves)
            total += float(bregman.detach())
        if epsilon != 0.0:
            removed = (
                -epsilon
                * self.computer.function_of_params(self.state, example, "loss")(params).sum()
            )
            removed.backward(inputs=leaves)
            total += float(removed.detach())
        if self.damping:
            prox = sum(((p - self.params0[n]) ** 2).sum() for n, p in params.items())
            prox = 0.5 * self.damping * prox
            prox.backward(inputs=leaves)
            total += float(prox.detach())
        return total

    def _leaves(self, params: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        source = self.params0 if params is None else params
        return {n: source[n].detach().clone().requires_grad_(True) for n in self.layout.names}

    def _flat_grad(self, leaves: dict[str, Tensor]) -> Tensor:
        return self.layout.flatten(
            {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in leaves.items()}
        )

    def value_and_gradient(
        self, state: Mapping[str, Tensor], example: Any, epsilon: float | None = None
    ) -> tuple[float, Tensor]:
        """``(J(θ), ∇J(θ))`` at a state (its selected parameters), the gradient flat ``[P]``."""
        leaves = self._leaves(state)
        value = self._accumulate(leaves, self.example_batch(example), self._epsilon(epsilon))
        return value, self._flat_grad(leaves)

    # -- solving ----------------------------------------------------------------------------------
    def solve(
        self,
        example: Any,
        *,
        epsilon: float | None = None,
        optimizer: Optimizer = "lbfgs",
        steps: int | None = None,
        lr: float | None = None,
        rtol: float | None = None,
    ) -> PBRFSolution:
        """Minimize ``J`` from ``θ^s`` by full-batch optimization.

        Args:
            example: the removed example: an index into ``train``, or a batch (a group of
                examples, whose losses are summed in the ``− ε l`` term).
            epsilon: ``None`` → ``1/n`` (removal); any finite value otherwise.
            optimizer: ``"lbfgs"`` (default; ``torch.optim.LBFGS`` with a strong-Wolfe line
                search, ``steps`` iterations at most — the right choice for small models in
                float64) or ``"adam"`` (``steps`` full-batch Adam steps with learning rate
                ``lr``).
            steps: iteration limit (default 500 for L-BFGS, 5000 for Adam).
            lr: step size (default 1 for L-BFGS, 1e-3 for Adam).
            rtol: stop once ``‖∇J‖ <= rtol · ‖∇J(θ^s)‖`` (default 1e-7 in float64, 1e-3 in
                float32). A solve that does not get there warns (:class:`RuntimeWarning`) and
                reports ``converged=False``.

        Raises:
            SolverDivergedError: when the objective or its gradient becomes non-finite.
        """
        if optimizer not in ("lbfgs", "adam"):
            raise ConfigurationError(f"optimizer must be 'lbfgs' or 'adam', got {optimizer!r}")
        if steps is None:
            steps = 500 if optimizer == "lbfgs" else 5000
        if not isinstance(steps, int) or steps < 1:
            raise ConfigurationError(f"steps must be a positive integer, got {steps!r}")
        if lr is None:
            lr = 1.0 if optimizer == "lbfgs" else 1e-3
        if not lr > 0:
            raise ConfigurationError(f"lr must be positive, got {lr!r}")
        if rtol is None:
            rtol = 1e-7 if self.dtype == torch.float64 else 1e-3
        eps = self._epsilon(epsilon)
        batch = self.example_batch(example)
        leaves = self._leaves()
        self._accumulate(leaves, batch, eps)
        g0 = float(self._flat_grad(leaves).norm())
        target = rtol * g0
        iterations = 0
        best: list[Any] = [g0, {n: p.detach().clone() for n, p in leaves.items()}]
        if g0 > 0:
            params = list(leaves.values())

            def closure() -> Tensor:
                nonlocal iterations
                iterations += 1
                for p in params:
                    p.grad = None
                value = self._accumulate(leaves, batch, eps)
                gnorm = float(self._flat_grad(leaves).norm())
                if not (math.isfinite(value) and math.isfinite(gnorm)):
                    raise SolverDivergedError(
                        f"the PBRF objective became {value} (gradient norm {gnorm}) after "
                        f"{iterations} evaluations; lower lr, raise damping, or use float64 "
                        "(model.double())"
                    )
                if gnorm < best[0]:
                    best[0] = gnorm
                    best[1] = {n: p.detach().clone() for n, p in leaves.items()}
                return torch.tensor(value, dtype=self.dtype)

            if optimizer == "lbfgs":
                opt = torch.optim.LBFGS(
                    params,
                    lr=lr,
                    max_iter=steps,
                    max_eval=steps * 2,
                    tolerance_grad=target / math.sqrt(self.layout.numel),
                    tolerance_change=0.0,
                    history_size=100,
                    line_search_fn="strong_wolfe",
                )
                opt.step(closure)
                # The line search compares objective values, whose rounding error (~1e-16 of the
                # per-example losses) hides the last digits of the optimum. Near it, unit
                # quasi-Newton steps need gradients only: polish with them, keeping the best.
                left = steps - iterations
                if best[0] > target and left > 0:
                    group = opt.param_groups[0]
                    # continue from L-BFGS's own last point, so its curvature pairs stay valid
                    group.update(line_search_fn=None, lr=1.0, max_iter=left, max_eval=left + 1)
                    opt.step(closure)
            else:
                opt = torch.optim.Adam(params, lr=lr)
                for _ in range(steps):
                    opt.zero_grad()
                    closure()
                    if best[0] <= target:
                        break
                    opt.step()
        with torch.no_grad():
            for n, p in leaves.items():
                p.copy_(best[1][n])
                p.grad = None
        value = self._accumulate(leaves, batch, eps)
        gnorm = float(self._flat_grad(leaves).norm())
        if not (math.isfinite(value) and math.isfinite(gnorm)):
            raise SolverDivergedError(
                f"the PBRF solve ended at a non-finite objective ({value}) or gradient ({gnorm})"
            )
        converged = gnorm <= target
        if not converged:
            warnings.warn(
                f"PBRF {optimizer} stopped at ‖∇J‖={gnorm:.3g}, {gnorm / g0:.2g} of the initial "
                f"{g0:.3g} (rtol={rtol:g}) after {iterations} evaluations; raise steps, use "
                "float64, or raise damping",
                RuntimeWarning,
                stacklevel=2,
            )
        state = dict(self.state)
        state.update({n: p.detach().clone() for n, p in leaves.items()})
        return PBRFSolution(
            state=state,
            epsilon=eps,
            objective=value,
            gradient_norm=gnorm,
            initial_gradient_norm=g0,
            iterations=iterations,
            converged=converged,
        )

    def measurements(self, state: Mapping[str, Tensor], queries: Any) -> Tensor:
        """Oriented query measurements (lower is better) at ``state``, ``[n_query]``."""
        loader = as_loader(queries, 64) if not isinstance(queries, DataLoader) else queries
        values = [
            self.computer.values(state, batch, "measurement")
            for _, batch in iterate_batches(loader, self.device)
        ]
        return torch.cat(values) if values else torch.empty(0, dtype=self.dtype)

    def measurement_change(
        self,
        queries: Any,
        examples: Sequence[Any] | None = None,
        *,
        epsilon: float | None = None,
        progress: bool = True,
        **solve_options: Any,
    ) -> Tensor:
        """``f(z', θ*_m) − f(z', θ^s)`` for every query and removed example, ``[n_query, m]``.

        ``f`` is the task's *oriented* measurement (lower is better), so with the default
        ``ε = 1/n`` this is comparable entry by entry with ``InfluenceFunction(...,
        curvature="ggn", damping=λ).score(queries)[:, examples]``: positive = the training
        example helps the query. ``examples``: indices into ``train`` (or batches; default every
        training example — one solve each). ``solve_options`` go to :meth:`solve`.
        """
        if examples is None:
            examples = range(self.n_train)
        base = self.measurements(self.state, queries)
        columns = []
        for example in tqdm(
            list(examples), desc="PBRF", unit="solve", disable=not progress, leave=False
        ):
            solution = self.solve(example, epsilon=epsilon, **solve_options)
            columns.append(self.measurements(solution.state, queries) - base)
        if not columns:
            return torch.empty(len(base), 0, dtype=base.dtype)
        return torch.stack(columns, dim=1)


def pbrf(
    model: nn.Module,
    task: Task,
    checkpoint: Checkpoint | Mapping[str, Tensor] | None,
    train: Any,
    example: Any,
    *,
    damping: float,
    epsilon: float | None = None,
    layers: Layers = None,
    optimizer: Optimizer = "lbfgs",
    steps: int | None = None,
    lr: float | None = None,
    rtol: float | None = None,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """The PBRF parameters ``θ*`` for removing ``example`` (see the module docstring).

    ``θ* = argmin_θ (1/n) Σ_j D_L(h(θ,x_j), h(θ^s,x_j)) − ε l(z_m, θ) + (λ/2)‖θ − θ^s‖²``,
    found by full-batch optimization from ``θ^s`` (:meth:`PBRF.solve`; L-BFGS by default).
    ``ε = 1/n`` (default) is removal; ``λ = damping``. Returns the full model state dict with the
    optimized parameters. Use :class:`PBRF` directly for the convergence diagnostics
    (:class:`PBRFSolution`) or for several solves sharing one set-up.
    """
    setup = PBRF(
        model, task, checkpoint, train, damping=damping, layers=layers, batch_size=batch_size
    )
    solution = setup.solve(
        example, epsilon=epsilon, optimizer=optimizer, steps=steps, lr=lr, rtol=rtol
    )
    return solution.state


def pbrf_scores(
    model: nn.Module,
    task: Task,
    checkpoint: Checkpoint | Mapping[str, Tensor] | None,
    train: Any,
    queries: Any,
    examples: Sequence[Any] | None = None,
    *,
    damping: float,
    epsilon: float | None = None,
    layers: Layers = None,
    optimizer: Optimizer = "lbfgs",
    steps: int | None = None,
    lr: float | None = None,
    rtol: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """PBRF ground-truth attribution scores ``[n_query, len(examples)]``.

    Entry ``[q, k]`` is the change of query ``q``'s oriented measurement when ``examples[k]`` is
    removed in the PBRF sense (``ε = 1/n``): the quantity ``InfluenceFunction(model, task,
    checkpoint, curvature="ggn", damping=damping).score(queries)[:, examples]`` approximates to
    first order. Positive = the training example helps the query. One PBRF solve per example.
    """
    setup = PBRF(
        model, task, checkpoint, train, damping=damping, layers=layers, batch_size=batch_size
    )
    return setup.measurement_change(
        queries,
        examples,
        epsilon=epsilon,
        progress=progress,
        optimizer=optimizer,
        steps=steps,
        lr=lr,
        rtol=rtol,
    )
