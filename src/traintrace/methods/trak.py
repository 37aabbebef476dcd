"""TRAK (Park, Georgiev, Ilyas, Leclerc, Madry, ICML 2023): projected gradients, (ΦᵀΦ)⁻¹, ensembles."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import nn
from torch.utils.data import DataLoader

from traintrace.checkpoints import Checkpoint
from traintrace.data import progress_batches
from traintrace.exceptions import ConfigurationError
from traintrace.features.params import Layers
from traintrace.features.projections import Projection
from traintrace.methods.gradient import GradientEstimator
from traintrace.methods.preconditioners import Gram, Identity
from traintrace.methods.tracin import checkpoint_list, stored_featurizer
from traintrace.task import Task

__all__ = ["TRAK"]

#: the default projection's kind: dense Gaussian while it is affordable (``P · k`` multiply-adds
#: per example at most this), the hook-based Kronecker projection beyond
_GAUSSIAN_BUDGET = 2**30
#: the default width: ``k = clip(2^floor(log2(n / _EXAMPLES_PER_FEATURE)), _MIN_K, _MAX_K)``
_EXAMPLES_PER_FEATURE = 8
_MIN_K, _MAX_K = 32, 2048


def default_projection(n_train: int, n_params: int, seed: int = 0) -> Projection:
    """TRAK's default projection for ``n_train`` examples and ``n_params`` parameters.

    Width ``k = clip(2^⌊log2(n / 8)⌋, 32, 2048)`` (a power of two near ``n / 8``: ``ΦᵀΦ`` is
    estimated from ``n`` rows, so a width near ``n`` leaves it rank-deficient and the damping
    decides the scores); kind ``"gaussian"`` when ``n_params · k ≤ 2^30`` multiply-adds per
    example, else ``"kronecker"`` (cheaper for large models, noisier at the same width).
    """
    k = 2 ** max(0, math.floor(math.log2(max(1, n_train) / _EXAMPLES_PER_FEATURE)))
    k = int(min(_MAX_K, max(_MIN_K, k)))
    kind = "gaussian" if n_params * k <= _GAUSSIAN_BUDGET else "kronecker"
    return Projection(dim=k, kind=kind, seed=seed)


class TRAK(GradientEstimator):
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
        projection: ``"auto"`` (default): chosen at ``fit`` from the training-set size ``n``
            and the parameter count ``P`` by :func:`default_projection` — Gaussian, width
            ``clip(2^⌊log2(n/8)⌋, 32, 2048)``, Kronecker when ``P · k > 2^30`` — and stored as
            ``projection_``. An int ``k``: ``Projection(dim=k)`` (Kronecker, as everywhere in
            traintrace); or a :class:`~traintrace.Projection`. TRAK needs a projection:
            ``ΦᵀΦ`` is ``k × k``. Measured (``benchmarks/lds_peers.py``, LDS over 64 half
            subsets × 2 seeds, 5 models, ``n = 1000``, so the default is Gaussian ``k = 64``):
            digits MLP, Gaussian k = 16 / 32 / 64 / 128 / 256 / 512: 0.488 / 0.577 / **0.619**
            / 0.548 / 0.378 / 0.177, Kronecker 64 / 128 / 512: 0.550 / 0.497 / 0.213 (the old
            default, Kronecker 2048 > n: 0.099); MNIST CNN, Gaussian 16 / 32 / 64 / 128 / 512:
            0.102 / **0.108** / 0.092 / 0.078 / 0.019, Kronecker 64: 0.094 (s.e. ≈ 0.013).
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

    Composition (:class:`~traintrace.methods.gradient.GradientEstimator`): ``R`` = the projected
    store, ``P_m = (Φ_mᵀΦ_m + λI)⁻¹`` (:class:`~traintrace.methods.preconditioners.Gram`) or
    ``I``, ``w_m = 1/M``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        *,
        projection: Projection | int | Literal["auto"] = "auto",
        damping: float | None = None,
        preconditioner: Literal["inverse", "identity"] = "inverse",
        layers: Layers = None,
        store: str | os.PathLike[str] | None = None,
        overwrite_store: bool = False,
        store_dtype: Literal["float16", "float32", "float64"] | None = None,
        chunk_size: int | None = None,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        query_block: int = 1024,
        max_disk_gib: float = 256.0,
        progress: bool = True,
        **removed: Any,
    ) -> None:
        checkpoints = checkpoint_list(checkpoints, "TRAK")
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
        if "normalize" in removed:
            raise ConfigurationError("TRAK has no cosine variant (normalize=)")
        if removed:
            raise ConfigurationError(f"TRAK got unexpected arguments {sorted(removed)}")
        self.projection = "auto" if projection == "auto" else Projection.coerce(projection)
        self._store_options = dict(
            store=store,
            overwrite_store=overwrite_store,
            store_dtype=store_dtype,
            chunk_size=chunk_size,
            max_disk_gib=max_disk_gib,
        )
        self.damping = damping
        self.preconditioner = preconditioner
        featurizer, preconds = self._parts(
            model,
            task,
            layers,
            self.projection if self.projection != "auto" else Projection(64),
            len(checkpoints),
        )
        super().__init__(
            model,
            task,
            checkpoints,
            featurizer=featurizer,
            preconditioners=preconds,
            weights=[1.0 / len(checkpoints)] * len(checkpoints),
            batch_size=batch_size,
            collate_fn=collate_fn,
            query_block=query_block,
            progress=progress,
        )
        self.layers = layers
        self.projection_ = None if self.projection == "auto" else self.projection

    def _parts(
        self, model: nn.Module, task: Task, layers: Layers, projection: Projection, m: int
    ) -> tuple[Any, list[Any]]:
        featurizer = stored_featurizer(model, task, layers, projection, **self._store_options)
        k = featurizer.width
        preconds: list[Any] = [
            Gram(k, self.damping) if self.preconditioner == "inverse" else Identity()
            for _ in range(m)
        ]
        return featurizer, preconds

    def _before_fit(self, loader: DataLoader, n: int) -> None:
        """Resolve ``projection="auto"`` now that ``n`` is known."""
        if self.projection != "auto":
            return
        params = dict(self.model.named_parameters())
        n_params = sum(params[name].numel() for name in self.parameter_names)
        self.projection_ = default_projection(n, n_params)
        self.featurizer, self.preconditioners = self._parts(
            self.model, self.task, self.layers, self.projection_, len(self.checkpoints)
        )

    @property
    def lrs(self) -> list[float]:
        """The checkpoint weights ``1/M`` (kept for code that reads ``.lrs``)."""
        return list(self.weights)

    def _measurement_is_loss(self) -> bool:
        return getattr(self.task, "measurement_kind", None) == "loss"

    def _after_fit(self, loader: DataLoader, n: int) -> None:
        """Build ``(Φ_mᵀΦ_m + λI)⁻¹`` per model from the store (or a Φ pass)."""
        if self.preconditioner == "identity":
            return
        k = self.featurizer.width
        if k >= n:
            warnings.warn(
                f"TRAK: {k} features for {n} training examples: ΦᵀΦ has rank at most "
                f"{n}, so (ΦᵀΦ + λI)⁻¹ is governed by the damping in its null space "
                "and scores degrade; use a projection well below the number of examples",
                RuntimeWarning,
                stacklevel=3,
            )
        self.dampings_ = []
        for c, gram in enumerate(self.preconditioners):
            assert isinstance(gram, Gram)
            gram.reset()
            if self._measurement_is_loss():  # Φ = G: read it back from the store
                for _, rows in self.store_.iter_chunks(c):
                    gram.accumulate(rows)
            else:
                state = self.state(c)
                for offset, batch in progress_batches(
                    loader, self.device, f"TRAK Φᵀ Φ ({self.checkpoints[c].name})", self.progress
                ):
                    gram.accumulate(
                        self.featurizer.features.features(
                            state,
                            batch,
                            "measurement",
                            offset=offset,
                            where=f"{self.checkpoint_names[c]} (Φ)",
                        )
                    )
            self.dampings_.append(gram.finish(self.checkpoint_names[c], n))
