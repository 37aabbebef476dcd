"""Embedding nearest neighbours: the baseline attribution methods are compared against.

Each example is represented by the input of a chosen layer (by default the last layer with
parameters, i.e. the penultimate-layer embedding) at one checkpoint, and training examples are
ranked by cosine similarity to the query. It sees only representations, not labels or loss, so
it finds look-alikes rather than the examples that moved the prediction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traintrace.checkpoints import Checkpoint
from traintrace.data import as_loader, iterate_batches
from traintrace.exceptions import ConfigurationError
from traintrace.features.gradients import eval_mode, forward_at
from traintrace.features.params import module_by_name
from traintrace.methods.base import Data, Estimator
from traintrace.task import Task

__all__ = ["EmbeddingKNN"]


class EmbeddingKNN(Estimator):
    """Cosine similarity of layer-input embeddings: ``score(z, z') = cos(e(x), e(x'))``.

    Args:
        model: the network.
        task: reads batches and runs the model (labels are not used).
        checkpoint: the state to embed with (default: the model's current parameters).
        layer: module whose *input* is the embedding; default the last module with parameters
            (so the embedding is the penultimate layer's output).
        batch_size: used when a Dataset is given.

    Sign/orientation: ``[n_query, n_train]``, larger = more similar; ``top_k(...).proponents``
    are the nearest neighbours. Cost: one forward pass per example; ``n_train × d`` in memory.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoint: Checkpoint | None = None,
        *,
        layer: str | None = None,
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.task = task
        self.checkpoint = checkpoint
        self.layer, self._module = module_by_name(model, layer)
        self.batch_size = batch_size

    def embed(self, data: Data) -> Tensor:
        """Embeddings ``[n, d]`` (the flattened input of :attr:`layer`)."""
        loader = as_loader(data, self.batch_size)
        device = next(self.model.parameters()).device
        state = self.checkpoint.state_for(self.model) if self.checkpoint is not None else None
        captured: list[Tensor] = []

        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            captured.append(inputs[0].detach().flatten(1))

        handle = self._module.register_forward_pre_hook(hook)
        try:
            with eval_mode(self.model), torch.no_grad():
                for _, batch in iterate_batches(loader, device):
                    if state is None:
                        self.task.forward(self.model, batch)
                    else:
                        forward_at(self.model, self.task, state, batch)
        finally:
            handle.remove()
        return torch.cat(captured)

    def fit(self, train: Data) -> EmbeddingKNN:
        """Embed the training set. Returns ``self``."""
        self.train_embeddings_ = F.normalize(self.embed(train), dim=1)
        self.n_train_ = int(self.train_embeddings_.shape[0])
        return self

    def _score_blocks(self, queries: Data) -> Iterator[Tensor]:
        q = F.normalize(self.embed(queries), dim=1)
        for start in range(0, q.shape[0], self.batch_size):
            yield q[start : start + self.batch_size] @ self.train_embeddings_.T

    def self_influence(self) -> Tensor:
        """Not defined for a similarity baseline (every example is its own nearest neighbour)."""
        raise ConfigurationError(
            "EmbeddingKNN has no self-influence; use TracIn(...).self_influence()"
        )
