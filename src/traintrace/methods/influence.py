"""Influence functions (Koh & Liang, ICML 2017) with every practical inverse-curvature."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

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
from traintrace.data import as_loader, dataset_length
from traintrace.exceptions import ConfigurationError
from traintrace.features.engine import ExactGradients
from traintrace.features.params import Layers
from traintrace.methods.base import Data, Estimator
from traintrace.methods.streaming import (
    InverseCurvature,
    Normalize,
    check_normalize,
    stream_scores,
    stream_self_influence,
    stream_top_k,
    train_sq_norms,
)
from traintrace.retrieval.topk import TopK, check_k
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

    **How it is computed** (:mod:`traintrace.methods.streaming`): the estimator is the engine's
    exact featurizer × the preconditioner ``P = (1/n)(C + λI)⁻¹``
    (:class:`~traintrace.methods.streaming.InverseCurvature`) × one checkpoint of weight 1.
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
        damping: float | None = None,
        curvature: Curvature = "hessian",
        layers: Layers = None,
        curvature_data: Data | None = None,
        normalize: Normalize | bool = False,
        layerwise: bool = False,
        batch_size: int = 64,
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
        if damping is not None and not damping >= 0:
            raise ConfigurationError(f"damping must be >= 0, got {damping}")
        if isinstance(hessian, KFAC) and damping is not None and hessian.damping != damping:
            default = KFAC.__dataclass_fields__["damping"].default
            if hessian.damping != default:
                raise ConfigurationError(
                    f"damping given twice: InfluenceFunction(damping={damping}) and "
                    f"{type(hessian).__name__}(damping={hessian.damping}); give it in one place"
                )
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        if query_block < 1:
            raise ConfigurationError(f"query_block must be >= 1, got {query_block}")
        self.model = model
        self.task = task
        self.checkpoint = checkpoint
        self.hessian = hessian if isinstance(hessian, KFAC) else make_solver(hessian)
        self.damping = damping
        self.curvature = curvature
        self.layers = layers
        self.curvature_data = curvature_data
        self.normalize, self.layerwise = check_normalize(normalize, layerwise)
        self.batch_size = batch_size
        self.query_block = query_block
        self.progress = progress
        self._engine = ExactGradients(model, task, layers)

    @property
    def parameter_names(self) -> list[str]:
        """The differentiated parameters, in layout order."""
        return list(self._engine.names)

    @property
    def coverage(self) -> dict[str, str]:
        """Which path (hooks or exact ``vmap``) each parameter's training gradients take."""
        return self._engine.coverage

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
        """Build the inverse curvature (from ``curvature_data``, default ``train``). Returns ``self``.

        No training gradient is computed or stored here; with ``normalize=`` one capture pass
        records the per-layer training-gradient norms.
        """
        loader = as_loader(train, self.batch_size)
        n = dataset_length(loader)
        if n is None:
            raise ConfigurationError(
                "InfluenceFunction needs a training set with a length (a map-style Dataset)"
            )
        if n == 0:
            raise ConfigurationError("the training data set is empty")
        curv_loader = (
            loader
            if self.curvature_data is None
            else as_loader(self.curvature_data, self.batch_size)
        )
        state = self.checkpoint.state_for(self.model)
        self.inverse_ = self._inverse(state, curv_loader)
        self.preconditioner_ = InverseCurvature(self.inverse_, 1.0 / n)
        self._train_loader = loader
        self.train_sq_norms_: list[Tensor] | None = None
        if self.normalize:
            self.train_sq_norms_ = [
                train_sq_norms(
                    self._engine,
                    state,
                    loader,
                    self._device(),
                    n=n,
                    where=self._name(),
                    progress=self.progress,
                )
            ]
        self.n_train_ = n
        return self

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _name(self) -> str:
        return f"checkpoint {self.checkpoint.name}"

    def _stream_args(self) -> dict[str, Any]:
        return {
            "engine": self._engine,
            "states": lambda _c: self.checkpoint.state_for(self.model),
            "weights": [1.0],
            "preconditioners": [self.preconditioner_],
            "names": [self._name()],
            "train": self._train_loader,
            "device": self._device(),
            "n": self.n_train_,
        }

    def _score_blocks(self, queries: Data) -> Iterator[Tensor]:
        self._check_fitted()
        yield from stream_scores(
            queries=as_loader(queries, self.batch_size),
            query_block=self.query_block,
            normalize=self.normalize,
            layerwise=self.layerwise,
            train_norms=self.train_sq_norms_,
            progress=self.progress,
            **self._stream_args(),
        )

    def top_k(self, queries: Data, k: int = 10) -> TopK:
        """The ``k`` strongest proponents and opponents of each query, ``[n_query, k]`` each.

        Exact and streamed: memory ``[m, k]`` plus one training batch (module docs).
        """
        self._check_fitted()
        check_k(k, self.n_train_)
        return stream_top_k(
            queries=as_loader(queries, self.batch_size),
            k=k,
            query_block=self.query_block,
            normalize=self.normalize,
            layerwise=self.layerwise,
            train_norms=self.train_sq_norms_,
            progress=self.progress,
            **self._stream_args(),
        )

    def self_influence(self) -> Tensor:
        """``(1/n) ∇l(z)ᵀ (C + λI)⁻¹ ∇l(z)`` for every training example, ``[n_train]``.

        Large values flag examples the model bends to fit (mislabeled, rare). Cost: one pass
        over the training set; Arnoldi uses ``r`` engine contractions per example (no
        per-example gradient), the other inverses form each batch's gradients (``B × P``) and
        apply the inverse (``n`` iterative solves for CG and LiSSA).

        Raises:
            ConfigurationError: with ``normalize=`` (a renormalized self-score ranks by
                ``‖g‖`` only through the curvature; use ``normalize=False``).
        """
        self._check_fitted()
        if self.normalize:
            raise ConfigurationError(
                "self_influence() of a renormalized InfluenceFunction is not a ranking of "
                "suspicious examples; use tt.InfluenceFunction(..., normalize=False)"
            )
        return stream_self_influence(progress=self.progress, **self._stream_args())
