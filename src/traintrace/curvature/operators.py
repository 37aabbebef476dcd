"""Matrix-free curvature operators: Hessian, generalized Gauss–Newton and empirical Fisher.

Every operator here is a symmetric ``P × P`` matrix acting on flat vectors in the
:class:`~traintrace.features.params.ParameterLayout` order of the selected parameters (the same
order as every gradient and stored feature in traintrace). Model-based operators are the
**average over every example** of the given batches, plus damping::

    A = (1/N) Σ_{i=1..N} C(z_i) + λ I

where ``N`` is the total number of examples in one pass over ``batches`` and ``C(z)`` is

* :class:`Hessian` — ``∇²_θ l(z, θ)`` (indefinite in general for non-convex models);
* :class:`GaussNewton` — ``J(z)ᵀ H_out(z) J(z)``, ``J = ∂outputs/∂θ`` and
  ``H_out = ∂²l/∂outputs²`` (positive semi-definite when the loss is convex in the outputs:
  cross-entropy, squared error);
* :class:`EmpiricalFisher` — ``g(z) g(z)ᵀ`` with ``g(z) = ∇_θ l(z, θ)`` (positive
  semi-definite).

Products never form the matrix: one pass over the batches per :meth:`~CurvatureOperator.matmat`,
with the ``k`` columns of a ``[P, k]`` block batched by ``torch.func.vmap`` (memory ``≈ k ×`` one
forward/backward). :meth:`~CurvatureOperator.dense` builds the explicit matrix from ``P``
products and is meant for small models only.

The model is evaluated functionally at ``state`` in eval mode (see
:class:`~traintrace.features.gradients.GradientComputer`); the user's model is not modified.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from traintrace.data import batch_size_of, to_plain
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError, TraintraceError
from traintrace.features.gradients import GradientComputer, padding_rows_constant
from traintrace.features.params import Layers, ParameterLayout
from traintrace.task import Task

__all__ = [
    "CURVATURES",
    "Curvature",
    "CurvatureOperator",
    "EmpiricalFisher",
    "GaussNewton",
    "Hessian",
    "MatrixOperator",
    "ModelCurvatureOperator",
    "curvature_operator",
]

_NONFINITE_ADVICE = (
    "Check the checkpoint for NaN/inf weights, the inputs for NaN/inf and the loss for log(0) or "
    "overflow; in float32 try the model in float64 (model.double()) or an earlier checkpoint if "
    "training itself diverged."
)


def _check_damping(damping: float) -> float:
    try:
        value = float(damping)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"damping must be a non-negative number, got {damping!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(
            f"damping must be a finite number >= 0 (it adds damping·I to the curvature), got "
            f"{damping!r}"
        )
    return value


class CurvatureOperator(abc.ABC):
    """A symmetric ``P × P`` linear operator on flat parameter vectors (abstract).

    Subclasses implement :meth:`matvec` or :meth:`matmat` (each default calls the other), and set
    :attr:`dim`, :attr:`dtype`, :attr:`device` and :attr:`damping`. Damping is *included* in every
    product: ``A v = C v + λ v``.
    """

    #: Length ``P`` of the vectors the operator acts on.
    dim: int
    #: dtype and device of the products (inputs are cast to them).
    dtype: torch.dtype
    device: torch.device
    #: ``λ`` in ``A = C + λ I`` (already included in every product).
    damping: float = 0.0

    def matvec(self, vector: Tensor) -> Tensor:
        """``A v`` for ``v`` of shape ``[P]``; returns ``[P]``."""
        if vector.ndim != 1 or vector.shape[0] != self.dim:
            raise ConfigurationError(
                f"matvec expects a vector of shape [{self.dim}], got {tuple(vector.shape)}"
            )
        return self.matmat(vector.unsqueeze(1)).squeeze(1)

    def matmat(self, matrix: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``[P, k]``; returns ``[P, k]`` (default: one matvec per
        column)."""
        matrix = self._check_block(matrix)
        if type(self).matvec is CurvatureOperator.matvec:
            raise NotImplementedError(f"{type(self).__name__} must implement matvec or matmat")
        cols = [self.matvec(matrix[:, j]) for j in range(matrix.shape[1])]
        if not cols:
            return matrix.clone()
        return torch.stack(cols, dim=1)

    def dense(self, chunk_size: int = 64) -> Tensor:
        """The explicit matrix ``A`` (``[P, P]``), from ``A I`` in blocks of ``chunk_size`` columns.

        Cost: ``P / chunk_size`` calls of :meth:`matmat`; memory ``P²``. For small models only.
        """
        if chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be >= 1, got {chunk_size}")
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        blocks = [
            self.matmat(eye[:, start : start + chunk_size])
            for start in range(0, self.dim, chunk_size)
        ]
        return torch.cat(blocks, dim=1)

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def _check_block(self, matrix: Tensor) -> Tensor:
        if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != self.dim:
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ConfigurationError(
                f"{type(self).__name__}.matmat expects a matrix of shape [{self.dim}, k], got "
                f"{shape}"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise ConfigurationError(
                f"the vectors given to {type(self).__name__} contain NaN or inf; the curvature "
                "product of a non-finite vector is meaningless (check the gradients you pass in)"
            )
        return matrix.to(dtype=self.dtype, device=self.device)


class MatrixOperator(CurvatureOperator):
    """An explicit symmetric matrix as an operator: ``A = M + λ I``.

    Args:
        matrix: ``[P, P]`` symmetric matrix ``M`` (not checked for symmetry beyond a cheap test).
        damping: ``λ >= 0``.

    Useful for tests, for curvature computed elsewhere, and for small problems.
    """

    def __init__(self, matrix: Tensor, *, damping: float = 0.0) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ConfigurationError(
                f"MatrixOperator needs a square matrix, got shape {tuple(matrix.shape)}"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise NonFiniteGradientError(
                "the matrix given to MatrixOperator contains NaN or inf. " + _NONFINITE_ADVICE
            )
        scale = float(matrix.abs().max()) if matrix.numel() else 0.0
        asym = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
        if asym > 1e-6 * max(scale, 1e-30):
            raise ConfigurationError(
                f"MatrixOperator needs a symmetric matrix; max |M - Mᵀ| = {asym:.3g} "
                f"(max |M| = {scale:.3g}). Symmetrize it: (M + M.T) / 2"
            )
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.damping = _check_damping(damping)

    def __repr__(self) -> str:
        return f"MatrixOperator(P={self.dim}, damping={self.damping:g})"

    def matmat(self, matrix: Tensor) -> Tensor:
        matrix = self._check_block(matrix)
        return self.matrix @ matrix + self.damping * matrix

    def dense(self, chunk_size: int = 64) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return self.matrix + self.damping * eye


class ModelCurvatureOperator(CurvatureOperator):
    """Base of the operators defined by a model, a task and data: ``A = (1/N) Σ_i C(z_i) + λI``.

    Args:
        model: the network (its own parameters are not used; ``state`` is).
        task: how to read batches and the per-example training loss.
        state: a full state dict of ``model`` (``model.state_dict()`` or
            ``tt.Checkpoint(...).state_for(model)``), the point ``θ`` where curvature is taken.
        batches: a re-iterable of batches (a ``DataLoader`` with any batch size, or a list of
            batches). Every product makes one full pass; ``N`` is the number of examples seen.
        layers: which parameters (see :func:`~traintrace.features.params.select_parameters`).
        damping: ``λ >= 0``, added as ``λ I`` to every product.
        cache_batches: move every batch to the device once and keep the list (fast when a solver
            needs many products on a small data set; memory = the whole data set).

    Subclasses implement :meth:`_batch_sum`, the *sum* over a batch's examples of ``C(z) V``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        state: Mapping[str, Tensor],
        batches: Iterable[Any],
        *,
        layers: Layers = None,
        damping: float = 0.0,
        cache_batches: bool = False,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"task must be a traintrace Task (e.g. tt.Classification()), got "
                f"{type(task).__name__}"
            )
        if isinstance(batches, (Tensor, Mapping)) or (
            isinstance(batches, tuple) and batches and all(isinstance(b, Tensor) for b in batches)
        ):
            raise ConfigurationError(
                f"batches must be a re-iterable of batches (a DataLoader or a list of batches), "
                f"got a single {type(batches).__name__}; wrap one batch in a list: [batch]"
            )
        if isinstance(batches, Iterator):
            raise ConfigurationError(
                "batches is a one-shot iterator (generator); every product makes a full pass, so "
                "give a DataLoader or a list of batches"
            )
        self.model = model
        self.task = task
        self.computer = GradientComputer(model, task, layers)
        self.layout: ParameterLayout = self.computer.layout
        self.state = dict(state)
        self.params = self.computer.selected_state(self.state)
        dtypes = {p.dtype for p in self.params.values()}
        if len(dtypes) != 1:
            raise ConfigurationError(
                f"the selected parameters have mixed dtypes {sorted(map(str, dtypes))}; curvature "
                "products need one dtype: cast the model (model.float() or model.double())"
            )
        first = next(iter(self.params.values()))
        self.dtype = first.dtype
        self.device = first.device
        self.dim = self.layout.numel
        self.damping = _check_damping(damping)
        self.num_examples: int | None = None
        self._batches: Iterable[Any] = batches
        self._cached = False
        self._use_vmap = True
        if cache_batches:
            self._batches = [to_plain(b, self.device) for b in batches]
            self._cached = True
            self.num_examples = sum(batch_size_of(b) for b in self._batches)
            if self.num_examples == 0:
                raise ConfigurationError("batches holds no examples")

    def __repr__(self) -> str:
        n = "?" if self.num_examples is None else self.num_examples
        return f"{type(self).__name__}(P={self.dim}, N={n}, damping={self.damping:g})"

    # -- data ------------------------------------------------------------------------------------
    @property
    def num_batches(self) -> int | None:
        """Batches in one pass (``len`` of the batches), or None when they have no length."""
        try:
            return len(self._batches)  # type: ignore[arg-type]
        except TypeError:
            return None

    def iter_batches(self) -> Iterator[Any]:
        """One pass over the batches, each as plain tensors on :attr:`device`."""
        for batch in self._batches:
            yield batch if self._cached else to_plain(batch, self.device)

    # -- products --------------------------------------------------------------------------------
    def matmat(self, matrix: Tensor) -> Tensor:
        """``A V = (1/N) Σ_i C(z_i) V + λ V`` for ``V: [P, k]``; one pass over the batches."""
        matrix = self._check_block(matrix)
        if matrix.shape[1] == 0:
            return matrix.clone()
        total = torch.zeros_like(matrix)
        count = 0
        with padding_rows_constant(self.model):  # jvp and vjp differentiate the same function
            for batch in self.iter_batches():
                size = batch_size_of(batch)
                if size == 0:
                    continue
                total += self._batch_sum(batch, matrix, offset=count)
                count += size
        if count == 0:
            raise ConfigurationError(f"batches holds no examples; {type(self).__name__} is empty")
        self.num_examples = count
        out = total / count + self.damping * matrix
        self._check_finite(out)
        return out

    def batch_matmat(self, matrix: Tensor, batch: Any) -> Tensor:
        """``A_B V = (1/|B|) Σ_{i∈B} C(z_i) V + λ V`` on one (plain) batch only.

        Used by stochastic solvers (LiSSA with mini-batches). ``batch`` comes from
        :meth:`iter_batches`.
        """
        matrix = self._check_block(matrix)
        size = batch_size_of(batch)
        if size == 0:
            raise ConfigurationError("batch_matmat got an empty batch")
        with padding_rows_constant(self.model):
            out = self._batch_sum(batch, matrix, offset=0) / size + self.damping * matrix
        self._check_finite(out)
        return out

    @abc.abstractmethod
    def _batch_sum(self, batch: Any, matrix: Tensor, offset: int) -> Tensor:
        """``Σ_{i in batch} C(z_i) V`` for ``V: [P, k]`` -> ``[P, k]``."""

    def _check_finite(self, out: Tensor) -> None:
        if bool(torch.isfinite(out).all()):
            return
        bad = [
            n for n, sl in self.layout.slices().items() if not bool(torch.isfinite(out[sl]).all())
        ]
        raise NonFiniteGradientError(
            f"{type(self).__name__} product is non-finite (NaN/inf) in parameters {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}. " + _NONFINITE_ADVICE
        )

    # -- helpers for subclasses ------------------------------------------------------------------
    def _tangents(self, matrix: Tensor) -> dict[str, Tensor]:
        """``[P, k]`` -> ``{name: [k, *shape]}``."""
        return self.layout.unflatten(matrix.T)

    def _flat(self, tangents: Mapping[str, Tensor]) -> Tensor:
        """``{name: [k, *shape]}`` -> ``[P, k]``."""
        return self.layout.flatten(tangents, batch_dims=1).T

    def _map_columns(
        self, fn: Callable[[dict[str, Tensor]], dict[str, Tensor]], tangents: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Apply a per-column product to ``k`` stacked tangents (vmap, or a loop as fallback)."""
        k = next(iter(tangents.values())).shape[0]
        if k == 1:
            out = fn({n: t[0] for n, t in tangents.items()})
            return {n: out[n].unsqueeze(0) for n in self.layout.names}
        if self._use_vmap:
            try:
                return vmap(fn)(tangents)
            except TraintraceError:
                raise
            except RuntimeError as exc:
                warnings.warn(
                    f"torch.func.vmap could not batch {type(self).__name__} products "
                    f"({str(exc).splitlines()[0]}); falling back to one product per column "
                    "(exact, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._use_vmap = False
        cols = [fn({n: t[j] for n, t in tangents.items()}) for j in range(k)]
        return {n: torch.stack([c[n] for c in cols]) for n in self.layout.names}


class Hessian(ModelCurvatureOperator):
    """The damped Hessian of the mean training loss: ``H = (1/N) Σ_i ∇²_θ l(z_i, θ) + λ I``.

    Args:
        mode: ``"reverse"`` — double backprop (reverse-over-reverse: ``vjp`` of ``grad``; the
            graph of the gradient is built once per batch and reused for every column);
            ``"forward"`` — forward-over-reverse (``jvp`` of ``grad``; usually less memory).
            Both give the same matrix up to rounding.
        (others as in :class:`ModelCurvatureOperator`.)

    Cost per product: about 2–4× a forward+backward pass over the data, per column (batched).
    The Hessian of a non-convex model is indefinite in general: inverse solvers need damping
    ``λ > −λ_min(H)`` (or use :class:`GaussNewton`).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        state: Mapping[str, Tensor],
        batches: Iterable[Any],
        *,
        layers: Layers = None,
        damping: float = 0.0,
        mode: Literal["reverse", "forward"] = "reverse",
        cache_batches: bool = False,
    ) -> None:
        if mode not in ("reverse", "forward"):
            raise ConfigurationError(f"mode must be 'reverse' or 'forward', got {mode!r}")
        self.mode = mode
        super().__init__(
            model,
            task,
            state,
            batches,
            layers=layers,
            damping=damping,
            cache_batches=cache_batches,
        )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", mode={self.mode!r})"

    def _batch_sum(self, batch: Any, matrix: Tensor, offset: int) -> Tensor:
        losses = self.computer.function_of_params(self.state, batch, kind="loss")

        def total(params: Mapping[str, Tensor]) -> Tensor:
            return losses(params).sum()

        gradient = grad(total)
        if self.mode == "reverse":
            _, pullback = vjp(gradient, self.params)

            def column(t: dict[str, Tensor]) -> dict[str, Tensor]:
                return pullback(t)[0]  # Hᵀ t = H t (symmetric)

        else:

            def column(t: dict[str, Tensor]) -> dict[str, Tensor]:
                return jvp(gradient, (self.params,), (t,))[1]

        return self._flat(self._map_columns(column, self._tangents(matrix)))


class GaussNewton(ModelCurvatureOperator):
    """The damped generalized Gauss–Newton matrix ``G = (1/N) Σ_i J_iᵀ H_i J_i + λ I``.

    ``J_i = ∂ outputs(x_i, θ) / ∂θ`` (the model's prediction tensor from ``task.forward``) and
    ``H_i = ∂² l / ∂ outputs²`` (the Hessian of ``task.loss`` w.r.t. the outputs). It drops the
    second-derivative-of-the-network term of the Hessian, so it is positive semi-definite when
    the loss is convex in the outputs (cross-entropy, squared error); for cross-entropy it equals
    the true Fisher. Product: ``J v`` (jvp), ``H_out u`` (jvp of grad in output space),
    ``Jᵀ w`` (vjp); cost ≈ 3 forward+backward passes per column.
    """

    def _batch_sum(self, batch: Any, matrix: Tensor, offset: int) -> Tensor:
        forward = self.computer.outputs_of_params(self.state, batch)
        outputs, pullback = vjp(forward, self.params)
        outputs = outputs.detach()
        task = self.task

        def loss_of_outputs(out: Tensor) -> Tensor:
            return task.loss(out, batch).sum()

        output_grad = grad(loss_of_outputs)

        def column(t: dict[str, Tensor]) -> dict[str, Tensor]:
            jt = jvp(forward, (self.params,), (t,))[1]
            hjt = jvp(output_grad, (outputs,), (jt,))[1]
            return pullback(hjt)[0]

        return self._flat(self._map_columns(column, self._tangents(matrix)))


class EmpiricalFisher(ModelCurvatureOperator):
    """The damped empirical Fisher ``F = (1/N) Σ_i g_i g_iᵀ + λ I``, ``g_i = ∇_θ l(z_i, θ)``.

    Products use per-example gradients without forming ``F``: ``F V = Gᵀ (G V) / N + λ V`` with
    ``G = [g_1 … g_N]ᵀ``, one batch of gradients (``[B, P]``) at a time. Cost per product: one
    vmapped per-example backward pass over the data (independent of ``k``), plus ``O(N P k)``.

    Args:
        cache_gradients: keep all ``N × P`` per-example gradients in memory after the first pass
            (products then cost ``O(N P k)`` only). Only for small ``N × P``.
        (others as in :class:`ModelCurvatureOperator`.)

    Positive semi-definite; its rank is at most ``N``, so inverse solvers need ``λ > 0``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        state: Mapping[str, Tensor],
        batches: Iterable[Any],
        *,
        layers: Layers = None,
        damping: float = 0.0,
        cache_batches: bool = False,
        cache_gradients: bool = False,
    ) -> None:
        super().__init__(
            model,
            task,
            state,
            batches,
            layers=layers,
            damping=damping,
            cache_batches=cache_batches,
        )
        self.cache_gradients = cache_gradients
        self._gradients: Tensor | None = None

    def gradients(self, max_examples: int | None = None) -> Tensor:
        """Per-example gradients ``G`` (``[m, P]``) of the first ``m = max_examples`` examples
        (all ``N`` when None), in data order. Memory ``m × P``."""
        if max_examples is not None and max_examples < 1:
            raise ConfigurationError(f"max_examples must be >= 1 or None, got {max_examples}")
        if self._gradients is not None:
            return self._gradients[:max_examples] if max_examples else self._gradients
        rows: list[Tensor] = []
        count = 0
        for batch in self.iter_batches():
            g = self.computer.per_example(
                self.state, batch, offset=count, where="the empirical Fisher"
            )
            if max_examples is not None:
                g = g[: max_examples - count]
            rows.append(g)
            count += g.shape[0]
            if max_examples is not None and count >= max_examples:
                break
        if count == 0:
            raise ConfigurationError("batches holds no examples; EmpiricalFisher is empty")
        out = torch.cat(rows)
        if self.cache_gradients and max_examples is None:
            self._gradients = out
            self.num_examples = count
        return out

    def matmat(self, matrix: Tensor) -> Tensor:
        if self.cache_gradients:
            matrix = self._check_block(matrix)
            gs = self.gradients()
            out = gs.T @ (gs @ matrix) / gs.shape[0] + self.damping * matrix
            self._check_finite(out)
            return out
        return super().matmat(matrix)

    def _batch_sum(self, batch: Any, matrix: Tensor, offset: int) -> Tensor:
        g = self.computer.per_example(
            self.state, batch, offset=offset, where="the empirical Fisher"
        )
        return g.T @ (g @ matrix)


#: Names of the model curvatures accepted by ``curvature=`` arguments across traintrace.
Curvature = Literal["hessian", "ggn", "fisher"]

#: The model curvatures by name.
CURVATURES: dict[str, type[ModelCurvatureOperator]] = {
    "hessian": Hessian,
    "ggn": GaussNewton,
    "fisher": EmpiricalFisher,
}


def curvature_operator(
    curvature: Curvature,
    model: nn.Module,
    task: Task,
    state: Mapping[str, Tensor],
    batches: Iterable[Any],
    *,
    layers: Layers = None,
    damping: float = 0.0,
    allowed: tuple[str, ...] = ("hessian", "ggn", "fisher"),
) -> ModelCurvatureOperator:
    """The damped curvature operator named ``curvature`` (``"hessian"``, ``"ggn"``, ``"fisher"``).

    Raises:
        ConfigurationError: for a name outside ``allowed``, saying what each one means.
    """
    if curvature not in allowed:
        meanings = {
            "hessian": "'hessian': the exact Hessian of the mean training loss, indefinite in general",
            "ggn": "'ggn': the generalized Gauss–Newton matrix, positive semi-definite",
            "fisher": "'fisher': the empirical Fisher, positive semi-definite",
        }
        raise ConfigurationError(
            f"curvature must be one of {list(allowed)}, got {curvature!r} ("
            + "; ".join(meanings[a] for a in allowed)
            + ")"
        )
    return CURVATURES[curvature](model, task, state, batches, layers=layers, damping=damping)
