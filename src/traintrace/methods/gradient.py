"""Gradient estimators as compositions: featurizer (R) × preconditioner (P) × checkpoint weights (w).

    score(z, z') = Σ_c w_c · ⟨P_c ∇f(z', θ_c), R ∇l(z, θ_c)⟩          [n_query, n_train]

**Sign:** positive = the training example helps the query (its measurement is oriented so lower
is better). Every gradient estimator is one :class:`GradientEstimator` with three visible parts:

* the featurizer ``R`` — :class:`~traintrace.methods.streaming.ExactStream` (exact, streamed
  through the engine, nothing stored) or :class:`~traintrace.methods.stored.ProjectedStore`
  (projected features in an on-disk store, for many query sets later);
* the preconditioners ``P_c`` (:mod:`traintrace.methods.preconditioners`);
* the checkpoint weights ``w_c`` (learning rates for TracIn, ``1`` for an influence function,
  ``1/M`` over TRAK's ensemble).

``fit``, ``score``, ``top_k`` and ``self_influence`` are written once here; an estimator class
only builds its three parts (and any preconditioner that needs the data: :meth:`_before_fit`,
:meth:`_after_fit`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from traintrace.checkpoints import Checkpoint
from traintrace.data import as_loader
from traintrace.exceptions import ConfigurationError
from traintrace.methods.base import Data, Estimator
from traintrace.methods.preconditioners import Identity, Preconditioner
from traintrace.methods.streaming import (
    ExactStream,
    Normalize,
    ScoreJournal,
    check_normalize,
    journal_for,
)
from traintrace.retrieval.topk import TopK, check_k
from traintrace.task import Task, require_task
from traintrace.validation import positive_int, require_length

__all__ = ["GradientEstimator"]


class GradientEstimator(Estimator):
    """The shared implementation of every gradient estimator (module docs for the formula).

    Args:
        model: the network, evaluated functionally at each checkpoint in eval mode (not
            modified).
        task: training loss and query measurement.
        checkpoints: the states ``θ_c``.
        featurizer: ``R`` (an :class:`ExactStream` or a :class:`ProjectedStore`).
        preconditioners: ``P_c``, one per checkpoint.
        weights: ``w_c``, one per checkpoint.
        normalize, layerwise: renormalized variants (:func:`check_normalize`).
        batch_size, collate_fn: how Datasets are batched.
        query_block: queries preconditioned and streamed together.
        progress: tqdm progress bars.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        *,
        featurizer: Any,
        preconditioners: Sequence[Preconditioner],
        weights: Sequence[float],
        normalize: Normalize | bool = False,
        layerwise: bool = False,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        query_block: int = 1024,
        progress: bool = True,
    ) -> None:
        require_task(task)
        if len(preconditioners) != len(checkpoints) or len(weights) != len(checkpoints):
            raise ConfigurationError(
                f"{len(checkpoints)} checkpoints need as many preconditioners and weights, got "
                f"{len(preconditioners)} and {len(weights)}"
            )
        self.model = model
        self.task = task
        self.checkpoints = list(checkpoints)
        self.featurizer = featurizer
        self.preconditioners = list(preconditioners)
        self.weights = [float(w) for w in weights]
        self.normalize, self.layerwise = check_normalize(normalize, layerwise)
        self.batch_size = positive_int("batch_size", batch_size)
        self.collate_fn = collate_fn
        self.query_block = positive_int("query_block", query_block)
        self.progress = progress

    # -- the parts -------------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        """Whether scores are streamed exactly (no stored features)."""
        return isinstance(self.featurizer, ExactStream)

    @property
    def parameter_names(self) -> list[str]:
        """The differentiated parameters, in layout order."""
        return self.featurizer.names

    @property
    def coverage(self) -> dict[str, str]:
        """Which path (hooks, projection, exact ``vmap``) each parameter's gradients take."""
        return dict(self.featurizer.coverage)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def checkpoint_names(self) -> list[str]:
        return [
            c.name if c.name.startswith("checkpoint") else f"checkpoint {c.name}"
            for c in self.checkpoints
        ]

    def state(self, c: int) -> dict[str, Tensor]:
        """The full state of checkpoint ``c`` for the model (loaded on demand)."""
        return self.checkpoints[c].state_for(self.model)

    def _loader(self, data: Data) -> DataLoader:
        return as_loader(data, self.batch_size, self.collate_fn)

    # -- two phases ------------------------------------------------------------------------------
    def _before_fit(self, loader: DataLoader, n: int) -> None:
        """Preconditioners built before the training features (an inverse curvature)."""

    def _after_fit(self, loader: DataLoader, n: int) -> None:
        """Preconditioners built from the stored features (TRAK's ``ΦᵀΦ``)."""

    def fit(self, train: Data | None = None) -> Any:
        """Prepare ``P`` and ``R`` on the training set; returns ``self``.

        Example ``i`` is ``train[i]``; anything that reorders examples is refused. ``train=None``
        reopens a complete store written by an earlier ``fit`` with the same settings (a new
        process that only queries): nothing is recomputed, the data is not needed.
        """
        if train is None:
            reopen = getattr(self.featurizer, "reopen", None)
            if reopen is None or any(not isinstance(p, Identity) for p in self.preconditioners):
                raise ConfigurationError(
                    f"{type(self).__name__}.fit() needs the training data; only an estimator "
                    "with a projected store (projection= or store=) and no data-dependent "
                    "preconditioner can be reopened from its store without it"
                )
            self.n_train_ = reopen(self)
            return self
        loader = self._loader(train)
        n = require_length(loader, "the training data set")
        self.n_train_ = n
        try:
            self._before_fit(loader, n)
            self.featurizer.fit(self, loader, n)
            self._after_fit(loader, n)
        except BaseException:
            del self.n_train_
            raise
        return self

    def _score_blocks(self, queries: Data, journal: ScoreJournal | None = None) -> Iterator[Tensor]:
        self._check_fitted()
        loader = self._loader(queries)
        if journal is None:
            yield from self.featurizer.score_blocks(self, loader)
        else:  # only the exact stream journals (_journal refuses the others)
            yield from self.featurizer.score_blocks(self, loader, journal)

    def _journal(
        self, resume: str | os.PathLike[str], kind: str, k: int | None, interval: float
    ) -> ScoreJournal:
        if not isinstance(self.featurizer, ExactStream):
            raise ConfigurationError(
                f"resume= makes the exact streamed scores resumable; {type(self).__name__} with "
                f"a {type(self.featurizer).__name__} featurizer keeps its training side in "
                "memory or in a store already (a query set is one read of it): drop resume="
            )
        if not (isinstance(interval, (int, float)) and interval >= 0):
            raise ConfigurationError(f"resume_interval must be >= 0 seconds, got {interval!r}")
        return journal_for(self, resume, kind, k, float(interval))

    def score(
        self,
        queries: Data,
        *,
        resume: str | os.PathLike[str] | None = None,
        resume_interval: float = 60.0,
    ) -> Tensor:
        """Attribution scores ``[n_query, n_train]``; positive = the training example helps.

        ``resume=dir`` (exact streamed scores) journals the work in ``dir``: finished query
        blocks and, every ``resume_interval`` seconds and after each checkpoint's pass, the
        partial sums of the current one with the position reached. Run the same call again
        after an interruption (even ``kill -9``) and it continues from there; the directory
        refuses another computation (:class:`~traintrace.StoreMismatchError`): other settings,
        checkpoints, training data or queries. See :class:`~traintrace.methods.streaming.
        ScoreJournal`.
        """
        self._check_fitted()
        journal = None if resume is None else self._journal(resume, "score", None, resume_interval)
        return self._stacked(self._score_blocks(queries, journal))

    def top_k(
        self,
        queries: Data,
        k: int = 10,
        *,
        method: Literal["exact", "auto", "faiss"] = "exact",
        resume: str | os.PathLike[str] | None = None,
        resume_interval: float = 60.0,
    ) -> TopK:
        """The ``k`` strongest proponents and opponents of each query, ``[n_query, k]`` each.

        ``.proponents`` are the largest scores (largest first), ``.opponents`` the most negative
        (most negative first); exact unless ``method="faiss"`` is asked for on stored features
        (then it states its index size and expected recall). ``resume=dir``: resumable after an
        interruption, as in :meth:`score` (the running top-k is journaled).
        """
        self._check_fitted()
        check_k(k, self.n_train_)  # before any query gradient is computed
        loader = self._loader(queries)
        if resume is None:
            return self.featurizer.top_k(self, loader, k, method)
        journal = self._journal(resume, "top_k", k, resume_interval)
        return self.featurizer.top_k(self, loader, k, method, journal)

    def self_influence(self) -> Tensor:
        """``Σ_c w_c ∇l(z, θ_c)ᵀ P_c ∇l(z, θ_c)`` for every training example, ``[n_train]``.

        High values flag mislabeled and rare examples. Equals ``diag(score(train, train))`` when
        the measurement is the loss.

        Raises:
            ConfigurationError: for normalized variants, whose self-score is a constant or a
                ranking by curvature alone: use ``normalize=False`` for self-influence.
        """
        self._check_fitted()
        if self.normalize:
            raise ConfigurationError(
                f"self_influence() of a normalized {type(self).__name__} "
                f"(normalize={self.normalize!r}) ranks nothing: every gradient's cosine with "
                f"itself is 1. Use tt.{type(self).__name__}(..., normalize=False) for "
                "self-influence rankings"
            )
        return self.featurizer.self_influence(self)
