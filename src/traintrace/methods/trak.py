"""TRAK (Park, Georgiev, Ilyas, Leclerc, Madry, ICML 2023): projected gradients, (ΦᵀΦ)⁻¹, ensembles."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint
from traintrace.data import as_loader, iterate_batches
from traintrace.exceptions import ConfigurationError, NotPositiveDefiniteError
from traintrace.features.params import Layers
from traintrace.features.projections import Projection
from traintrace.methods.base import Data
from traintrace.methods.tracin import TracIn
from traintrace.task import Task

__all__ = ["TRAK"]


class TRAK(TracIn):
    """TRAK: ``score(z_i, z') = (1/M) Σ_m q_m(z')ᵀ (Φ_mᵀ Φ_m + λI)⁻¹ g_m(z_i)``.

    ``m`` runs over ``M`` independently trained models (one checkpoint each: the ensemble),
    ``g_m(z) = R ∇l(z, θ_m)`` is the projected training-loss gradient, ``q_m(z') = R ∇f(z',
    θ_m)`` the projected gradient of the query's oriented measurement, and ``Φ_m`` stacks
    ``R ∇f(z_i, θ_m)`` over the training set — the measurement's gradients at the training
    points, as in the paper, whose output function is the logit margin
    (``tt.Classification("margin")``). For cross-entropy ``∇l = −(1 − p_y) ∇margin``, so
    ``g`` already carries TRAK's ``Q = diag(1 − p)`` reweighting.

    **Sign:** positive = the training example helps the query (raises its margin / lowers its
    loss). ``[n_query, n_train]``. With ``preconditioner="identity"`` and one model this is
    projected TracIn at that checkpoint with ``η = 1``.

    Args:
        model: the network (architecture); evaluated functionally at each checkpoint.
        task: training loss and query measurement (the paper: ``Classification("margin")``).
        checkpoints: the final parameters of each independently trained model (their ``lr`` is
            ignored: every model weighs ``1/M``).
        projection: ``k`` (Kronecker projection to about ``k`` features) or a
            :class:`~traintrace.Projection`. TRAK needs a projection: ``ΦᵀΦ`` is ``k × k``.
        damping: ``λ``; ``None`` uses ``1e-6 · trace(ΦᵀΦ)/k`` (keeps the solve well posed when
            ``n`` is not much larger than ``k``).
        preconditioner: ``"inverse"`` (TRAK) or ``"identity"`` (no ``(ΦᵀΦ)⁻¹``: projected
            TracIn averaged over models).
        layers, store, overwrite_store, store_dtype, chunk_size, batch_size, query_block,
        progress: as :class:`~traintrace.TracIn` (the training features ``g_m`` go to the same
        kind of resumable store).

    Cost: ``fit`` is two forward+backward passes per training example per model (loss
    gradients, stored; measurement gradients, folded into the ``k × k`` matrix ``ΦᵀΦ`` and not
    stored — one pass when the measurement is the loss) plus a ``k³`` factorization per model;
    queries are TracIn's plus a ``k × k`` product per query and model.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        *,
        projection: Projection | int = 2048,
        damping: float | None = None,
        preconditioner: Literal["inverse", "identity"] = "inverse",
        layers: Layers = None,
        **kwargs: object,
    ) -> None:
        if isinstance(checkpoints, Checkpoint):
            checkpoints = [checkpoints]
        if projection is None:
            raise ConfigurationError(
                "TRAK needs a projection (projection=k): its preconditioner ΦᵀΦ is k × k"
            )
        if preconditioner not in ("inverse", "identity"):
            raise ConfigurationError(
                f"preconditioner must be 'inverse' or 'identity', got {preconditioner!r}"
            )
        if damping is not None and not damping >= 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}")
        if "normalize" in kwargs:
            raise ConfigurationError("TRAK has no cosine variant (normalize=)")
        models = [dataclasses.replace(c, lr=1.0 / len(checkpoints)) for c in checkpoints or []]
        super().__init__(model, task, models, layers=layers, projection=projection, **kwargs)  # type: ignore[arg-type]
        self.damping = damping
        self.preconditioner = preconditioner

    def _measurement_is_loss(self) -> bool:
        return getattr(self.task, "measurement_kind", None) == "loss"

    def fit(self, train: Data) -> TRAK:
        """Store ``g_m`` for every model (resumable), then build ``(Φ_mᵀΦ_m + λI)⁻¹``."""
        super().fit(train)
        if self.preconditioner == "identity":
            self.preconditioners_ = None
            return self
        loader = as_loader(train, self.batch_size, self.collate_fn)
        device = next(self.model.parameters()).device
        k = self._features.width
        if k >= self.n_train_:
            warnings.warn(
                f"TRAK: {k} features for {self.n_train_} training examples: ΦᵀΦ has rank at most "
                f"{self.n_train_}, so (ΦᵀΦ + λI)⁻¹ is governed by the damping in its null space "
                "and scores degrade; use a projection well below the number of examples",
                RuntimeWarning,
                stacklevel=2,
            )
        inverses = []
        for c, ckpt in enumerate(self.checkpoints):
            kernel = torch.zeros(k, k, dtype=torch.float64)
            if self._measurement_is_loss():  # Φ = G: read it back from the store
                for _, rows in self.store_.iter_chunks(c):
                    kernel += rows.double().T @ rows.double()
            else:
                state = ckpt.state_for(self.model)
                for offset, batch in tqdm(
                    iterate_batches(loader, device),
                    desc=f"TRAK Φᵀ Φ ({ckpt.name})",
                    unit="batch",
                    disable=not self.progress,
                    leave=False,
                ):
                    phi = (
                        self._features.features(
                            state, batch, "measurement", offset=offset, where=f"{ckpt.name} (Φ)"
                        )
                        .double()
                        .cpu()
                    )
                    kernel += phi.T @ phi
            damping = self.damping
            if damping is None:
                damping = 1e-6 * float(kernel.diagonal().sum()) / k
            kernel.diagonal().add_(damping)
            factor, info = torch.linalg.cholesky_ex(kernel)
            if int(info) != 0:
                raise NotPositiveDefiniteError(
                    f"TRAK: ΦᵀΦ + λI (λ={damping:g}) is not positive definite for {ckpt.name}; "
                    f"with {self.n_train_} training examples and k={k} features, use a smaller "
                    "projection or damping > 0"
                )
            inverses.append(torch.cholesky_inverse(factor))
        self.preconditioners_ = inverses
        return self

    def _prepare_queries(self, qs: list[Tensor]) -> list[Tensor]:
        if self.preconditioners_ is None:
            return qs
        return [
            (q.cpu().double() @ a).to(q.dtype)
            for q, a in zip(qs, self.preconditioners_, strict=True)
        ]

    def self_influence(self) -> Tensor:
        """``(1/M) Σ_m g_m(z)ᵀ (Φ_mᵀΦ_m + λI)⁻¹ g_m(z)`` (loss gradients on both sides), ``[n]``.

        Cost: one read of the store and a ``k × k`` product per example and model.
        """
        self._check_fitted()
        if self.preconditioners_ is None:
            return super().self_influence()
        out = torch.zeros(self.n_train_, dtype=torch.float64)
        for c, (lr, a) in enumerate(zip(self.lrs, self.preconditioners_, strict=True)):
            for start, rows in self.store_.iter_chunks(c):
                g = rows.double()
                out[start : start + len(g)] += lr * ((g @ a) * g).sum(dim=1)
        return out.to(self.store_.read_dtype)
