"""Influence functions (Koh & Liang, ICML 2017) with every practical inverse-curvature."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
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
from traintrace.data import as_loader
from traintrace.exceptions import ConfigurationError
from traintrace.features.params import Layers
from traintrace.methods.base import Data
from traintrace.methods.tracin import TracIn
from traintrace.task import Task, require_task

__all__ = ["InfluenceFunction"]


class InfluenceFunction(TracIn):
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

    The training gradients go to an on-disk :class:`~traintrace.FeatureStore` (``n × P``
    numbers; a temporary one unless ``store=`` is given — resumable, refused when written with
    other settings), so memory does not grow with ``n``; Arnoldi stores only their ``r``
    coordinates in its eigenbasis, so per-example scoring cost does not grow with ``P`` after
    ``fit``.

    ``store``, ``overwrite_store``, ``store_dtype``, ``chunk_size``, ``query_block``,
    ``max_disk_gib``: as :class:`~traintrace.TracIn`.
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
        progress: bool = True,
        **store_options: Any,
    ) -> None:
        require_checkpoint(checkpoint)
        require_task(task)
        if {"projection", "normalize"} & set(store_options):
            raise ConfigurationError(
                "InfluenceFunction works on exact gradients (the inverse curvature is applied in "
                "parameter space): projection= and normalize= are TracIn's options"
            )
        if curvature not in CURVATURES:
            raise ConfigurationError(
                f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}"
            )
        if damping is not None and not damping >= 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}")
        super().__init__(
            model,
            task,
            [dataclasses.replace(checkpoint, lr=1.0)],
            layers=layers,
            batch_size=batch_size,
            progress=progress,
            **store_options,
        )
        self.checkpoint = checkpoint
        self.hessian = hessian if isinstance(hessian, KFAC) else make_solver(hessian)
        self.damping = damping
        self.curvature = curvature
        self.curvature_data = curvature_data

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
        """Build the inverse curvature, then store the training gradients. Returns ``self``.

        The training gradients are written chunk by chunk (resumable); Arnoldi stores their
        coordinates in its eigenbasis instead.
        """
        loader = as_loader(train, self.batch_size)
        curv_loader = (
            loader
            if self.curvature_data is None
            else as_loader(self.curvature_data, self.batch_size)
        )
        state = self.checkpoint.state_for(self.model)
        self.inverse_ = self._inverse(state, curv_loader)
        super().fit(train)
        return self

    def _low_rank(self) -> LowRankInverse | None:
        inverse = getattr(self, "inverse_", None)
        return inverse if isinstance(inverse, LowRankInverse) else None

    def _feature_width(self) -> int:
        low_rank = self._low_rank()
        return low_rank.rank if low_rank is not None else super()._feature_width()

    def _train_features(
        self, state: dict[str, Tensor], batch: Any, offset: int, where: str
    ) -> Tensor:
        g = super()._train_features(state, batch, offset, where)
        low_rank = self._low_rank()
        return g if low_rank is None else low_rank.project(g).to(g.dtype)

    def _settings(self, loader: DataLoader, n: int) -> dict[str, Any]:
        settings = super()._settings(loader, n)
        low_rank = self._low_rank()
        if low_rank is not None:  # the stored coordinates depend on the eigenbasis
            settings["eigenbasis"] = {
                "solver": repr(self.hessian),
                "damping": self.damping,
                "curvature": self.curvature,
                "eigenvalues": [float(v) for v in low_rank.eigenvalues],
            }
        return settings

    def _query_side(self, q: Tensor) -> Tensor:
        """``(1/n) (C + λI)⁻¹ q`` for gradients ``[b, P]`` (Arnoldi: in its eigenbasis)."""
        low_rank = self._low_rank()
        if low_rank is not None:
            return (low_rank.project(q) / low_rank.eigenvalues / self.n_train_).to(q.dtype)
        return self.inverse_.solve(q).to(q.dtype) / self.n_train_

    def _prepare_queries(self, qs: list[Tensor]) -> list[Tensor]:
        return [self._query_side(q) for q in qs]

    def self_influence(self, chunk_size: int = 256) -> Tensor:
        """``(1/n) ∇l(z)ᵀ (C + λI)⁻¹ ∇l(z)`` for every training example, ``[n_train]``.

        Large values flag examples the model bends to fit (mislabeled, rare). Cost: one read of
        the store and one inverse application per training example (batched by
        ``chunk_size``): cheap for Exact, K-FAC, M-FAC and Arnoldi (``O(r)`` each from the
        stored coordinates), ``n`` iterative solves for CG and LiSSA.
        """
        self._check_fitted()
        out = torch.empty(self.n_train_, dtype=self.store_.read_dtype)
        bar = tqdm(
            total=self.n_train_,
            desc="influence: self-influence",
            unit="ex",
            disable=not self.progress,
            leave=False,
        )
        low_rank = self._low_rank()
        device = next(self.model.parameters()).device  # where the inverse lives
        for start, rows in self.store_.iter_chunks(0, chunk_size):
            if low_rank is not None:
                values = (rows**2 / low_rank.eigenvalues.cpu().to(rows.dtype)).sum(1)
                values = values / self.n_train_
            else:
                on_device = rows.to(device)
                values = (self._query_side(on_device) * on_device).sum(dim=1).cpu()
            out[start : start + len(rows)] = values
            bar.update(len(rows))
        bar.close()
        return out
