"""Embedding nearest neighbours: the baseline attribution methods are compared against.

Each example is represented by the input of a chosen layer (by default the last layer with
parameters, i.e. the penultimate-layer embedding) at one checkpoint, and training examples are
ranked by cosine similarity to the query. It sees only representations, not labels or loss, so
it finds look-alikes rather than the examples that moved the prediction.

**Composition.** The one formula of :mod:`traintrace.methods.gradient`,
``score = Σ_c w_c ⟨P_c φ(z'), φ(z)⟩`` normalized to a cosine, with a featurizer that is not a
gradient: ``φ`` = the layer-input embedding (:class:`LayerInputs`, held in memory, ``n × d``),
``P = I``, ``w = 1``, ``normalize="cosine"``. Scores and top-k go through the same exact
streaming retrieval as stored gradient features (:mod:`traintrace.retrieval.exact`: blocks of
training rows merged into a running top-k; FAISS when asked for).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from traintrace.checkpoints import Checkpoint
from traintrace.data import progress_batches
from traintrace.exceptions import ConfigurationError
from traintrace.features.gradients import eval_mode, forward_at
from traintrace.features.params import module_by_name
from traintrace.methods.base import Data
from traintrace.methods.gradient import GradientEstimator
from traintrace.methods.preconditioners import Identity
from traintrace.methods.stored import FeatureServing
from traintrace.task import Task

__all__ = ["EmbeddingKNN", "LayerInputs"]


class LayerInputs(FeatureServing):
    """The featurizer ``φ(x)`` = the flattened input of one module (no gradient), in memory.

    Same interface as :class:`~traintrace.methods.streaming.ExactStream` and
    :class:`~traintrace.methods.stored.ProjectedStore` (``fit`` / ``score_blocks`` / ``top_k`` /
    ``self_influence``): ``fit`` keeps the training embeddings ``[n, d]`` per checkpoint
    (:attr:`GradientEstimator.train_features_`); a query block is one forward pass, ``P``
    applied to its embeddings (``apply_features``), then the exact streaming retrieval.

    Args:
        model: the network (evaluated functionally at the estimator's checkpoints, eval mode).
        task: reads batches and runs the model.
        layer: the module whose input is the embedding (``None``: the last with parameters).
    """

    kind = "embedding"

    def __init__(self, model: nn.Module, task: Task, layer: str | None) -> None:
        self.model = model
        self.task = task
        self.layer, self.module = module_by_name(model, layer)

    @property
    def names(self) -> list[str]:
        """No parameter is differentiated."""
        return []

    @property
    def coverage(self) -> dict[str, str]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"featurizer": "layer inputs", "layer": self.layer}

    def _forward(self, state: dict[str, Tensor], batch: Any) -> Tensor:
        """The embeddings ``[B, d]`` of one batch at ``state``."""
        captured: list[Tensor] = []

        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            captured.append(inputs[0].detach().flatten(1))

        handle = self.module.register_forward_pre_hook(hook)
        try:
            with eval_mode(self.model), torch.no_grad():
                forward_at(self.model, self.task, state, batch)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ConfigurationError(
                f"layer {self.layer!r} ran {len(captured)} times in one forward pass; its input "
                "is an example's embedding only if it runs once: pass layer= a module that runs "
                "once per forward pass"
            )
        return captured[0]

    def embed(
        self, state: dict[str, Tensor], loader: DataLoader, device: torch.device, progress: bool
    ) -> Iterator[Tensor]:
        """The embeddings ``[B, d]`` of every batch of ``loader`` at ``state``."""
        for _, batch in progress_batches(loader, device, "embedding", progress):
            yield self._forward(state, batch)

    def _embed_all(self, est: GradientEstimator, c: int, loader: DataLoader) -> Tensor:
        parts = list(self.embed(est.state(c), loader, est.device, est.progress))
        if not parts:
            raise ConfigurationError("the data set is empty")
        return torch.cat(parts)

    def fit(self, est: GradientEstimator, loader: DataLoader, n: int) -> None:
        est.train_features_ = [
            self._embed_all(est, c, loader).cpu() for c in range(len(est.checkpoints))
        ]

    def _train_rows(self, est: GradientEstimator) -> list[Tensor]:
        return est.train_features_

    def _query_features(
        self, est: GradientEstimator, c: int, state: dict[str, Tensor], batch: Any, offset: int
    ) -> Tensor:
        return self._forward(state, batch)

    def self_influence(self, est: GradientEstimator) -> Tensor:
        raise ConfigurationError(
            f"{type(est).__name__} has no self-influence: a similarity baseline ranks every "
            "example as its own nearest neighbour; use TracIn(...).self_influence()"
        )


class EmbeddingKNN(GradientEstimator):
    """Cosine similarity of layer-input embeddings: ``score(z, z') = cos(e(x), e(x'))``.

    Composition (module docs): ``R`` = the layer-input embedding (:class:`LayerInputs`, not a
    gradient), ``P = I``, ``w = 1``, ``normalize="cosine"``.

    Args:
        model: the network.
        task: reads batches and runs the model (labels are not used).
        checkpoint: the state to embed with (default: the model's current parameters).
        layer: module whose *input* is the embedding; default the last module with parameters
            (so the embedding is the penultimate layer's output).
        batch_size: used when a Dataset is given.
        collate_fn: how examples of a Dataset become a batch.
        query_block: queries embedded and searched together.
        progress: show a progress bar while the training set is embedded.

    Attributes (after :meth:`fit`):
        train_features_: ``[[n_train, d]]`` the training embeddings (one checkpoint).
        train_embeddings_: ``[n_train, d]`` the unit-normalized training embeddings.

    Sign/orientation: ``[n_query, n_train]``, larger = more similar; ``top_k(...).proponents``
    are the nearest neighbours (exact; ``method="faiss"`` builds an index on the embeddings).
    Cost: one forward pass per example; ``n_train × d`` in memory; a query block costs
    ``O(m n d)`` in blocks of training rows.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint | None = None,
        *,
        layer: str | None = None,
        batch_size: int = 256,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        query_block: int = 1024,
        progress: bool = False,
    ) -> None:
        if checkpoint is None:
            checkpoint = Checkpoint(model.state_dict(), name="current parameters")
        elif not isinstance(checkpoint, Checkpoint):
            raise ConfigurationError(
                f"checkpoint must be a traintrace.Checkpoint or None (the model's current "
                f"parameters), got {type(checkpoint).__name__}"
            )
        featurizer = LayerInputs(model, task, layer)  # R: φ(x) = the input of `layer`
        super().__init__(
            model,
            task,
            [checkpoint],
            featurizer=featurizer,
            preconditioners=[Identity()],  # P = I
            weights=[1.0],  # w = 1
            normalize="cosine",
            batch_size=batch_size,
            collate_fn=collate_fn,
            query_block=query_block,
            progress=progress,
        )
        self.checkpoint = checkpoint
        self.layer = featurizer.layer

    @property
    def train_embeddings_(self) -> Tensor:
        """The unit-normalized training embeddings ``[n_train, d]`` (computed on access)."""
        if not hasattr(self, "train_features_"):
            raise AttributeError("train_embeddings_ exists after fit(train)")
        return torch.nn.functional.normalize(self.train_features_[0], dim=1)

    def embed(self, data: Data) -> Tensor:
        """Embeddings ``[n, d]`` (the flattened input of :attr:`layer`), not normalized."""
        return self.featurizer._embed_all(self, 0, self._loader(data))

    def self_influence(self) -> Tensor:
        """Not defined for a similarity baseline (every example is its own nearest neighbour)."""
        self._check_fitted()
        return self.featurizer.self_influence(self)
