"""Influence functions (Koh & Liang, ICML 2017) with every practical inverse-curvature."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from traintrace.checkpoints import Checkpoint, require_checkpoint
from traintrace.curvature import (
    KFAC,
    MFAC,
    InverseOperator,
    KroneckerInverse,
    Solver,
    make_solver,
)
from traintrace.curvature.operators import CURVATURES, Curvature, curvature_operator
from traintrace.exceptions import ConfigurationError
from traintrace.features.engine import ExactGradients
from traintrace.features.params import Layers
from traintrace.methods.base import Data
from traintrace.methods.gradient import GradientEstimator
from traintrace.methods.preconditioners import InverseCurvature
from traintrace.methods.streaming import ExactStream, Normalize
from traintrace.task import Task, require_task

__all__ = ["InfluenceFunction"]

_log = logging.getLogger("traintrace")

#: ``damping=`` names chosen from the data at ``fit`` (``"auto"`` is the default)
_AUTO_DAMPINGS = ("auto", "spectrum", "evidence")

#: Lanczos steps of the ``"spectrum"`` damping (the smallest eigenvalue converges slowly:
#: on a 1.8k-parameter MLP 24 steps found 2/3 of ``|λ_min|``, 100 steps all of it)
_SPECTRUM_ITERATIONS = 100


class InfluenceFunction(GradientEstimator):
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
        damping: ``λ >= 0`` (an explicit number always wins; M-FAC requires ``λ > 0``), or a
            rule that picks ``λ`` from the curvature data at ``fit`` and stores
            it as ``damping_`` (with how it was chosen in ``damping_reason_``, also logged at
            INFO level on the ``"traintrace"`` logger):

            * ``"auto"`` (default; also ``None``): ``"spectrum"`` for the matrix-free solvers
              (Exact, CG, LiSSA, Arnoldi, M-FAC); for K-FAC/EK-FAC the config's own damping
              (``KFAC.damping`` / ``damping_scale``).
            * ``"spectrum"``: ``λ = max(0, −λ_min) + 1e-3 · max(|λ_max|, |λ_min|)`` from 100
              Lanczos steps on the undamped curvature (the rule of ``tt.spectrum(...)
              .suggested_damping``): just enough to make an indefinite Hessian positive
              definite with its smallest eigenvalue near ``1e-3 · λ_max``. Cost: 100 curvature
              products (passes over the curvature data).
            * ``"evidence"``: the ``λ`` maximizing the linearized-Laplace evidence
              (:func:`~traintrace.select_damping`, Gauss–Newton, or the K-FAC/EK-FAC
              eigenvalues for those), with the search in ``damping_selection_``.

            Measured (``benchmarks/lds_peers.py``, LDS over 64 half subsets × 2 seeds; README
            "LDS beside the peers"), CG on the Hessian: on the digits MLP (SGD, P = 9.6k) the
            spectrum damping (λ ≈ 0.038) scores 0.772 ± 0.006, the best of the grid (0.01, 0.03
            and the evidence damping are not positive definite; 0.1 scores 0.694, 0.3 0.573);
            on the MNIST CNN (λ_min ≈ −1.34) it is the only positive definite point of the grid
            (0.029 ± 0.012; evidence, 0.03, 0.1, 0.3 all fail). The old default (0) is refused
            by every non-convex model: the Hessian is indefinite.
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

    **How it is computed** (:mod:`traintrace.methods.streaming`): ``R`` = the engine's exact
    featurizer, ``P = (1/n)(C + λI)⁻¹``
    (:class:`~traintrace.methods.preconditioners.InverseCurvature`), one checkpoint with
    ``w = 1`` (:class:`~traintrace.methods.gradient.GradientEstimator`).
    ``fit`` builds the inverse only. ``score`` / ``top_k`` form the ``m`` query gradients of a
    block (``m × P`` numbers), apply the inverse once, and stream the training set once through
    the per-layer contraction ``Σ_t r_tᵀ D c_t``: no training gradient is stored (nothing of size
    ``n × P``, in memory or on disk). ``self_influence`` streams the training set once more:
    Arnoldi from the ``r`` engine contractions with its eigenvectors, the other inverses by
    forming each batch's gradients and solving.

    **Renormalized influence** (RIF, Hammoudeh & Lowd 2022): ``normalize="train"`` divides each
    score by the training gradient norm ``‖∇l(z)‖``; ``"cosine"`` also by ``‖∇f(z')‖``;
    ``layerwise=True`` takes both per layer and sums the layers.

    ``query_block``: queries preconditioned and streamed together (memory ``query_block × P``).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint,
        *,
        hessian: Solver | KFAC | str = "exact",
        damping: float | Literal["auto", "spectrum", "evidence"] | None = "auto",
        curvature: Curvature = "hessian",
        layers: Layers = None,
        curvature_data: Data | None = None,
        normalize: Normalize | bool = False,
        layerwise: bool = False,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        query_block: int = 256,
        progress: bool = True,
        **removed: Any,
    ) -> None:
        require_checkpoint(checkpoint)
        require_task(task)
        if "projection" in removed:
            raise ConfigurationError(
                "InfluenceFunction works on exact gradients (the inverse curvature is applied in "
                "parameter space): projection= is TracIn's and TRAK's option"
            )
        if removed:
            raise ConfigurationError(
                f"InfluenceFunction got {sorted(removed)}: it no longer stores training gradients "
                "(scores are streamed exactly, nothing of size n × P is written), so store=, "
                "overwrite_store=, store_dtype=, chunk_size=, max_disk_gib= and max_feature_gib= "
                "do not apply; remove them"
            )
        if curvature not in CURVATURES:
            raise ConfigurationError(
                f"curvature must be one of {sorted(CURVATURES)}, got {curvature!r}"
            )
        if isinstance(damping, str):
            if damping not in _AUTO_DAMPINGS:
                raise ConfigurationError(
                    f"damping must be a number >= 0 or one of {list(_AUTO_DAMPINGS)} (chosen "
                    f"from the data at fit; 'auto' is the default), got {damping!r}"
                )
        elif damping is not None and not damping >= 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}")
        if (
            isinstance(hessian, KFAC)
            and isinstance(damping, (int, float))
            and hessian.damping != damping
            and hessian.damping != KFAC.__dataclass_fields__["damping"].default
        ):
            raise ConfigurationError(
                f"damping given twice: InfluenceFunction(damping={damping}) and "
                f"{type(hessian).__name__}(damping={hessian.damping}); give it in one place"
            )
        self.checkpoint = checkpoint
        self.hessian = hessian if isinstance(hessian, KFAC) else make_solver(hessian)
        self.damping = damping
        self.curvature = curvature
        self.layers = layers
        self.curvature_data = curvature_data
        super().__init__(
            model,
            task,
            [checkpoint],
            featurizer=ExactStream(ExactGradients(model, task, layers)),
            preconditioners=[InverseCurvature(None, scale=1.0)],  # the inverse is built by fit
            weights=[1.0],
            normalize=normalize,
            layerwise=layerwise,
            batch_size=batch_size,
            collate_fn=collate_fn,
            query_block=query_block,
            progress=progress,
        )

    def _inverse(
        self, state: dict[str, Tensor], loader: torch.utils.data.DataLoader
    ) -> InverseOperator | KroneckerInverse:
        if isinstance(self.hessian, KFAC):
            config = self.hessian
            if self.damping == "evidence":  # an absolute λ, whatever the config's scale
                config = dataclasses.replace(
                    config, damping=self.damping_, damping_scale="absolute"
                )
            elif self.damping_ is not None:
                config = dataclasses.replace(config, damping=self.damping_)
            return config.prepare(
                self.model, self.task, state, loader, self.layers, progress=self.progress
            )
        damping = 0.0 if self.damping_ is None else self.damping_
        kind = "fisher" if isinstance(self.hessian, MFAC) else self.curvature
        operator = curvature_operator(
            kind, self.model, self.task, state, loader, layers=self.layers, damping=damping
        )
        return self.hessian.prepare(operator)

    def _before_fit(self, loader: DataLoader, n: int) -> None:
        """Build ``(C + λI)⁻¹`` on ``curvature_data`` (default: the training set)."""
        curv_loader = loader if self.curvature_data is None else self._loader(self.curvature_data)
        state = self.checkpoint.state_for(self.model)
        self.damping_ = self.damping
        self.damping_reason_ = "given"
        rule = "auto" if self.damping is None else self.damping
        if rule == "auto":
            rule = None if isinstance(self.hessian, KFAC) else "spectrum"
            if rule is None:
                self.damping_ = None
                self.damping_reason_ = (
                    f"auto: the {type(self.hessian).__name__} config's damping="
                    f"{self.hessian.damping} ({self.hessian.damping_scale})"
                )
        if rule == "spectrum":
            self.damping_, self.damping_reason_ = self._spectrum_damping(state, curv_loader)
        if rule == "evidence":
            # the prior precision that maximizes the linearized-Laplace evidence (MacKay; Immer
            # et al. 2021) on the curvature data; on traintrace's scale (C + λI)
            from traintrace.curvature.laplace import select_damping

            kind: Any = self.hessian if isinstance(self.hessian, KFAC) else "ggn"
            if self.curvature == "fisher" and not isinstance(self.hessian, KFAC):
                kind = "fisher"
            self.damping_selection_ = select_damping(
                self.model,
                self.task,
                self.checkpoint,
                curv_loader,
                curvature=kind,
                layers=self.layers,
                batch_size=self.batch_size,
                progress=self.progress,
            )
            self.damping_ = float(self.damping_selection_.damping)
            self.damping_reason_ = (
                f"evidence: the linearized-Laplace evidence is largest at λ = {self.damping_:.4g}"
            )
        if isinstance(self.damping, str):
            _log.info("InfluenceFunction: damping %s (%s)", self.damping_, self.damping_reason_)
        self.inverse_ = self._inverse(state, curv_loader)
        precond = self.preconditioners[0]
        assert isinstance(precond, InverseCurvature)
        precond.reset(self.inverse_, 1.0 / n)

    def _spectrum_damping(self, state: dict[str, Tensor], loader: DataLoader) -> tuple[float, str]:
        """``max(0, −λ_min) + 1e-3 · max(|λ_max|, |λ_min|)`` of the undamped curvature."""
        from traintrace.applications.spectrum import _suggested_damping
        from traintrace.curvature.solvers import _eigenvalue_range

        kind = "fisher" if isinstance(self.hessian, MFAC) else self.curvature
        operator = curvature_operator(
            kind, self.model, self.task, state, loader, layers=self.layers, damping=0.0
        )
        lam_min, lam_max = _eigenvalue_range(
            operator, min(operator.dim, _SPECTRUM_ITERATIONS), seed=0
        )
        damping = _suggested_damping(lam_min, lam_max)
        if not damping > 0:  # a zero curvature: nothing to scale the damping by
            damping = 1e-3
        reason = (
            f"spectrum: max(0, −λ_min) + 1e-3·max|λ| with the {kind} curvature's λ_min = "
            f"{lam_min:.4g}, λ_max = {lam_max:.4g} (Lanczos, "
            f"{min(operator.dim, _SPECTRUM_ITERATIONS)} steps) → λ = {damping:.4g}"
        )
        return float(damping), reason

    @property
    def preconditioner_(self) -> InverseCurvature:
        """``P = (1/n)(C + λI)⁻¹`` (after ``fit``)."""
        self._check_fitted()
        return self.preconditioners[0]  # type: ignore[return-value]
