"""Influence functions (Koh & Liang, ICML 2017) with every practical inverse-curvature."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature import (
    KFAC,
    MFAC,
    InverseOperator,
    KroneckerInverse,
    LowRankInverse,
    Solver,
    make_solver,
)
from traintrace.curvature.operators import CURVATURES, Curvature, curvature_operator
from traintrace.data import as_loader, dataset_length, iterate_batches
from traintrace.exceptions import ConfigurationError
from traintrace.features.gradients import GradientComputer, stack_gradients
from traintrace.features.params import Layers
from traintrace.methods.base import Data, Estimator
from traintrace.task import Task, require_task

__all__ = ["InfluenceFunction"]


class InfluenceFunction(Estimator):
    """Influence of removing a training example on a query's measurement.

    ``score(z, z') = (1/n) · ∇f(z', θ)ᵀ (C + λI)⁻¹ ∇l(z, θ)``

    at the final parameters ``θ`` (one checkpoint), where ``n`` is the number of training
    examples, ``C`` the curvature of the *mean* training loss (``(1/n) Σ_i ∇²l(z_i)`` for
    ``curvature="hessian"``; the Gauss–Newton matrix or the empirical Fisher otherwise), ``λ``
    the damping and ``f`` the task's measurement oriented so that lower is better.

    **Scale:** the score is Koh & Liang's first-order estimate of the change in the query's
    (oriented) measurement when ``z`` is *removed* and the model retrained: ``f_{-z}(z') − f(z')
    ≈ score``, i.e. ``−(1/n) · I_up,loss``. **Sign:** positive = the training example *helps*
    the query (removing it would raise the query's loss). ``[n_query, n_train]``.

    If training minimized ``mean loss + (μ/2)‖θ‖²`` (L2 / weight decay), ``damping=μ`` makes
    ``C + λI`` the exact Hessian of that objective.

    Args:
        model: the network, evaluated functionally at ``checkpoint`` in eval mode.
        task: training loss and query measurement.
        checkpoint: the trained parameters (``tt.Checkpoint(state_or_path)``; no lr needed).
        hessian: the inverse-curvature method — ``tt.Exact()``, ``tt.CG()``, ``tt.LiSSA()``,
            ``tt.Arnoldi(rank=...)``, ``tt.KFAC()``, ``tt.EKFAC()``, ``tt.MFAC()`` or one of the
            names ``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"mfac"``.
        damping: ``λ >= 0``. ``None``: 0 for the matrix-free solvers, the config's own damping
            for K-FAC/EK-FAC; M-FAC requires ``λ > 0``.
        curvature: ``"hessian"`` (default; can be indefinite for non-convex models — the exact
            and CG paths then raise and ask for damping), ``"ggn"`` (positive semi-definite) or
            ``"fisher"`` (empirical Fisher). M-FAC always uses the empirical Fisher and
            K-FAC/EK-FAC their own Kronecker-factored Fisher.
        layers: parameters to differentiate (``None`` all, ``"last"``, module names).
        curvature_data: data the curvature is averaged over (default: the training set).
        batch_size: used when Datasets are given.
        max_feature_gib: limit on the in-memory training features.
        progress: tqdm progress bars.

    Cost (``P`` parameters, ``n`` training examples):

    ========== ========================================= ====================================
    hessian    fit                                       per query / self-influence per example
    ========== ========================================= ====================================
    Exact      ``P`` Hessian-vector passes + ``O(P³)``   ``O(P²)``
    CG         none beyond gradients                     up to ``max_iter`` passes over data
    LiSSA      ~20 passes to pick the scale              ``depth × repeats`` products
    Arnoldi    ``iterations`` passes; stores ``n × r``   ``O(P r)``; self-influence ``O(r)``
    KFAC/EKFAC one (two) passes + per-layer ``eigh``     per-layer matrix products
    MFAC       ``m`` gradients + ``O(m² P)``             ``O(m P)``
    ========== ========================================= ====================================

    Every path also stores the ``n × P`` training gradients, except Arnoldi, which keeps only
    their ``r`` coordinates in its eigenbasis, so per-example scoring cost does not grow with
    ``P`` after ``fit``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint,
        *,
        hessian: Solver | KFAC | str = "exact",
        damping: float | None = None,
        curvature: Curvature = "hessian",
        layers: Layers = None,
        curvature_data: Data | None = None,
        batch_size: int = 64,
        max_feature_gib: float = 4.0,
        progress: bool = True,
    ) -> None:
        require_checkpoint(checkpoint)
        require_task(task)
        if curvature not in CURVATURES:
            raise ConfigurationError(
                f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}"
            )
        if damping is not None and not damping >= 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}")
        self.model = model
        self.task = task
        self.checkpoint = checkpoint
        self.hessian = hessian if isinstance(hessian, KFAC) else make_solver(hessian)
        self.damping = damping
        self.curvature = curvature
        self.layers = layers
        self.curvature_data = curvature_data
        self.batch_size = batch_size
        self.max_feature_gib = max_feature_gib
        self.progress = progress
        self._grads = GradientComputer(model, task, layers)

    @property
    def parameter_names(self) -> list[str]:
        """The differentiated parameters, in feature order."""
        return list(self._grads.names)

    def _inverse(
        self, state: dict[str, Tensor], loader: torch.utils.data.DataLoader
    ) -> InverseOperator | KroneckerInverse:
        if isinstance(self.hessian, KFAC):
            config = self.hessian
            if self.damping is not None:
                config = dataclasses.replace(config, damping=self.damping)
            return config.prepare(
                self.model, self.task, state, loader, self.layers, progress=self.progress
            )
        damping = 0.0 if self.damping is None else self.damping
        kind = "fisher" if isinstance(self.hessian, MFAC) else self.curvature
        operator = curvature_operator(
            kind, self.model, self.task, state, loader, layers=self.layers, damping=damping
        )
        return self.hessian.prepare(operator)

    def fit(self, train: Data) -> InfluenceFunction:
        """Build the inverse curvature and keep the training gradients. Returns ``self``."""
        loader = as_loader(train, self.batch_size)
        curv_loader = (
            loader
            if self.curvature_data is None
            else as_loader(self.curvature_data, self.batch_size)
        )
        state = self.checkpoint.state_for(self.model)
        inverse = self._inverse(state, curv_loader)
        n = dataset_length(loader)
        low_rank = isinstance(inverse, LowRankInverse)
        width = inverse.rank if low_rank else self._grads.layout.numel
        if n is not None:
            self._check_feature_memory(n, width)
        bar = tqdm(
            total=len(loader) if n is not None else None,
            desc="influence: training gradients",
            unit="batch",
            disable=not self.progress,
        )
        features = stack_gradients(
            self._grads,
            state,
            loader,
            where=f"checkpoint {self.checkpoint.name}",
            transform=inverse.project if low_rank else None,
            width=width,
            on_rows=lambda count: self._check_feature_memory(count, width),
            progress=bar,
        )
        bar.close()
        self.inverse_ = inverse
        self.state_ = state
        self.train_features_ = features
        self.n_train_ = int(features.shape[0])
        return self

    def _query_side(self, q: Tensor) -> Tensor:
        """``(1/n) (C + λI)⁻¹ q`` for query gradients ``[b, P]`` (Arnoldi: in its eigenbasis)."""
        inverse = self.inverse_
        if isinstance(inverse, LowRankInverse):
            return inverse.project(q) / inverse.eigenvalues / self.n_train_
        return inverse.solve(q).to(q.dtype) / self.n_train_

    def _score_blocks(self, queries: Data) -> Iterator[Tensor]:
        loader = as_loader(queries, self.batch_size)
        device = next(self.model.parameters()).device
        for offset, batch in tqdm(
            iterate_batches(loader, device),
            total=len(loader) if dataset_length(loader) is not None else None,
            desc="influence: queries",
            unit="batch",
            disable=not self.progress,
            leave=False,
        ):
            q = self._grads.per_example(
                self.state_, batch, "measurement", offset=offset, where="query"
            )
            yield self._query_side(q) @ self.train_features_.to(q.dtype).T

    def self_influence(self, chunk_size: int = 256) -> Tensor:
        """``(1/n) ∇l(z)ᵀ (C + λI)⁻¹ ∇l(z)`` for every training example, ``[n_train]``.

        Large values flag examples the model bends to fit (mislabeled, rare). Cost: one inverse
        application per training example (batched by ``chunk_size``): cheap for Exact, K-FAC,
        M-FAC and Arnoldi (``O(r)`` each from the stored coordinates), ``n`` solves for CG and
        LiSSA.
        """
        self._check_fitted()
        feats = self.train_features_
        if isinstance(self.inverse_, LowRankInverse):
            return (feats**2 / self.inverse_.eigenvalues).sum(dim=1) / self.n_train_
        out = torch.empty(self.n_train_, dtype=feats.dtype, device=feats.device)
        for start in tqdm(
            range(0, self.n_train_, chunk_size),
            desc="influence: self-influence",
            unit="chunk",
            disable=not self.progress,
            leave=False,
        ):
            rows = feats[start : start + chunk_size]
            out[start : start + chunk_size] = (self._query_side(rows) * rows).sum(dim=1)
        return out
