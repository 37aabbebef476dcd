"""Local ensembles (Madras, Atwood, D'Amour, "Detecting Extrapolation with Local Ensembles",
ICLR 2020).

Directions in parameter space with (near-)zero training-loss curvature are *underspecified*:
moving along them leaves the training loss unchanged, so an ensemble of equally good models
differs only there. A test prediction whose gradient points along those directions varies
across that ensemble — the model extrapolates. With the top-``m`` eigenvectors ``U`` of the
training-loss Hessian (found by Lanczos with Hessian-vector products only), the score is the
norm of the prediction gradient in the complement of their span.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature import top_eigenpairs
from traintrace.curvature.lanczos import ProgressOperator
from traintrace.curvature.operators import curvature_operator
from traintrace.data import as_loader, progress_batches
from traintrace.exceptions import ConfigurationError
from traintrace.features.gradients import GradientComputer
from traintrace.features.params import Layers
from traintrace.methods.base import Data
from traintrace.task import Task, require_task

__all__ = ["LocalEnsembles"]


class _PredictedOutput(Task):
    """The user's task, with the measurement replaced by the largest model output per example."""

    def __init__(self, base: Task) -> None:
        self.base = base
        self.label_key = base.label_key

    def split(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
        return self.base.split(batch)

    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        return self.base.forward(model, batch)

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        return self.base.loss(outputs, batch)

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        return outputs.reshape(outputs.shape[0], -1).max(dim=1).values


class LocalEnsembles:
    """Extrapolation score ``‖(I − U Uᵀ) ∇f(x')‖`` from the top-``m`` training-curvature
    eigenvectors ``U``.

    ``U`` (``[P, m]``, orthonormal) holds the ``m`` eigenvectors of largest ``|eigenvalue|`` of
    ``A = (1/N) Σ_i C(z_i) + λI`` over the training set at the checkpoint (``C`` the Hessian or
    the GGN of the training loss), from Lanczos. ``∇f(x')`` is the gradient with respect to the
    selected parameters of the query's prediction:

    * ``prediction="output"`` (default, needs no label): the model's largest output — for a
      classifier the logit of the predicted class, for a one-output regressor its prediction;
    * ``prediction="measurement"``: the task's measurement (the query's loss by default, or
      ``Classification(measurement="margin")``).

    A large score means the prediction changes along directions the training data does not
    constrain: the query is out of distribution / the model extrapolates there (useful for
    OOD detection and active learning). Scores have no sign; compare them between queries of one
    model. ``rank`` should sit at a gap of the spectrum; :attr:`eigenvalues_` shows it.

    Args:
        model, task, checkpoint: the network, its loss and the parameters ``θ``.
        train: the training set (Dataset or a non-shuffling DataLoader).
        rank: ``m``, the number of eigenvectors removed.
        curvature: ``"hessian"`` (the paper's choice) or ``"ggn"`` (positive semi-definite).
        layers: parameters to use (see :func:`~traintrace.features.params.select_parameters`).
        damping: ``λ`` added to the curvature. It shifts every eigenvalue and leaves the
            eigenvectors unchanged, so it only matters when negative eigenvalues compete with
            positive ones for the top ``|λ|`` (an indefinite Hessian).
        iterations: Lanczos steps (default ``min(P, max(2m, m + 20))``); ``P`` gives exact
            eigenvectors. :attr:`eigen_residuals_` says how converged they are.
        prediction: ``"output"`` or ``"measurement"`` (see above).
        batch_size: used when a Dataset is given.
        seed: Lanczos start vector seed.
        progress: show progress bars.

    Attributes (after :meth:`fit`, which :meth:`score` calls when needed):
        eigenvalues_: ``[m]`` by decreasing ``|λ|`` (damping included).
        eigenvectors_: ``U``, ``[P, m]``.
        eigen_residuals_: ``[m]`` relative residuals ``‖A u_j − λ_j u_j‖ / |λ_j|``.

    Cost: ``fit`` is ``iterations + 1`` curvature products (each one pass over the training
    set, ~2–4 forward+backward passes) plus ``O(iterations² · P)``; memory ``iterations × P``
    during Lanczos and ``m × P`` after. ``score`` is one per-example gradient per query and
    ``O(m P)`` per query.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint,
        train: Data,
        *,
        rank: int = 10,
        curvature: Literal["hessian", "ggn"] = "hessian",
        layers: Layers = None,
        damping: float = 0.0,
        iterations: int | None = None,
        prediction: Literal["output", "measurement"] = "output",
        batch_size: int = 64,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        require_task(task)
        if not isinstance(rank, int) or rank < 1:
            raise ConfigurationError(f"rank must be an integer >= 1, got {rank!r}")
        if prediction not in ("output", "measurement"):
            raise ConfigurationError(
                f"prediction must be 'output' (the largest model output, no label needed) or "
                f"'measurement' (the task's measurement), got {prediction!r}"
            )
        self.model = model
        self.task = task
        self.checkpoint = checkpoint
        self.state = require_checkpoint(checkpoint).state_for(model)
        self.train = train
        self.rank = rank
        self.curvature = curvature
        self.layers = layers
        self.damping = damping
        self.iterations = iterations
        self.prediction = prediction
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.operator = curvature_operator(
            curvature,
            model,
            task,
            self.state,
            as_loader(train, batch_size),
            layers=layers,
            damping=damping,
            allowed=("hessian", "ggn"),
        )
        if rank >= self.operator.dim:
            raise ConfigurationError(
                f"rank={rank} is not below the number of parameters P={self.operator.dim}; "
                "the complement would be empty"
            )
        query_task = _PredictedOutput(task) if prediction == "output" else task
        self._grads = GradientComputer(model, query_task, layers)

    def fit(self) -> LocalEnsembles:
        """Find the top-``m`` eigenpairs of the training curvature. Returns ``self``."""
        m, p = self.rank, self.operator.dim
        iterations = (
            min(p, max(2 * m, m + 20)) if self.iterations is None else min(self.iterations, p)
        )
        if iterations < m:
            raise ConfigurationError(f"iterations ({self.iterations}) must be >= rank ({m})")
        with tqdm(
            total=iterations + 1,
            desc=f"local ensembles ({self.curvature})",
            unit="product",
            disable=not self.progress,
        ) as bar:
            values, vectors = top_eigenpairs(
                ProgressOperator(self.operator, bar), m, iterations, by="magnitude", seed=self.seed
            )
            residual = self.operator.matmat(vectors) - vectors * values
            bar.update(1)
        self.eigenvalues_ = values
        self.eigenvectors_ = vectors
        self.eigen_residuals_ = residual.norm(dim=0) / values.abs().clamp_min(1e-300)
        return self

    def query_gradients(self, queries: Data) -> Tensor:
        """``∇f(x')`` per query, ``[n_query, P]`` (the gradients the score projects)."""
        loader = as_loader(queries, self.batch_size)
        device = self.operator.device
        rows = []
        for offset, batch in progress_batches(
            loader, device, "local ensembles score", self.progress
        ):
            rows.append(
                self._grads.per_example(
                    self.state, batch, "measurement", offset=offset, where="query"
                )
            )
        if not rows:
            raise ConfigurationError("no queries: the query data set is empty")
        return torch.cat(rows)

    def score(self, queries: Data) -> Tensor:
        """Extrapolation scores ``‖(I − U Uᵀ) ∇f(x')‖``, ``[n_query]`` (larger = extrapolating)."""
        if not hasattr(self, "eigenvectors_"):
            self.fit()
        g = self.query_gradients(queries).to(self.eigenvectors_.dtype)
        u = self.eigenvectors_
        return (g - (g @ u) @ u.T).norm(dim=1)
