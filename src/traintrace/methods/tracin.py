"""TracIn (Pruthi et al., NeurIPS 2020) and its cosine variant GAS (Hammoudeh & Lowd, CCS 2022)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint
from traintrace.data import as_loader, dataset_length, iterate_batches
from traintrace.exceptions import ConfigurationError
from traintrace.features.gradients import GradientComputer, stack_gradients
from traintrace.features.params import Layers
from traintrace.methods.base import Data, Estimator
from traintrace.task import Task, require_task

__all__ = ["TracIn"]

_GIB = 2**30


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class TracIn(Estimator):
    """TracInCP: ``score(z, z') = Σ_c η_c · ⟨∇l(z, θ_c), ∇f(z', θ_c)⟩``.

    ``c`` runs over the saved checkpoints ``θ_c`` with the learning rate ``η_c`` in force when
    each was saved, ``l`` is the training loss of training example ``z`` and ``f`` the task's
    query measurement (its loss, or the logit margin for unlabeled queries — the prediction
    variant), oriented so that lower is better.

    **Sign:** positive = the training example *helps* the query (a gradient step on ``z`` lowers
    the query's loss / raises its margin). Proponents are the largest scores, opponents the most
    negative. **Orientation:** ``score`` returns ``[n_query, n_train]``.

    With ``normalize=True`` each checkpoint's term uses cosine similarity instead of the dot
    product (GAS, Hammoudeh & Lowd 2022): ``Σ_c η_c · cos(∇l(z, θ_c), ∇f(z', θ_c))``, which stops
    examples with large gradients from dominating every ranking.

    Args:
        model: the network; evaluated functionally at each checkpoint in eval mode (dropout off,
            BatchNorm uses running statistics); the model object is not modified.
        task: loss and measurement (:class:`~traintrace.Classification`, ...).
        checkpoints: saved states with their learning rates.
        layers: parameters to differentiate — ``None`` (all), ``"last"`` (the last layer with
            parameters: much cheaper, the common "TracIn-last" variant) or module names.
        normalize: cosine (GAS) variant.
        batch_size: batch size used when a Dataset (not a DataLoader) is given.
        max_feature_gib: limit on the in-memory training features (``n_train × P × C``
            values); exceeded ⇒ :class:`FeatureMemoryError` before any work is done.
        progress: show tqdm progress bars.

    Cost: ``fit`` is one vmapped forward+backward per training example per checkpoint and keeps
    ``C × n_train × P`` numbers in memory (``P`` = selected parameters). ``score`` costs one
    forward+backward per query per checkpoint plus ``C × n_query × n_train × P`` multiply-adds.
    ``self_influence`` is free after ``fit``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        *,
        layers: Layers = None,
        normalize: bool = False,
        batch_size: int = 64,
        max_feature_gib: float = 4.0,
        progress: bool = True,
    ) -> None:
        if isinstance(checkpoints, Checkpoint):
            checkpoints = [checkpoints]
        if not checkpoints:
            raise ConfigurationError("TracIn needs at least one Checkpoint(state, lr=...)")
        for ckpt in checkpoints:
            if not isinstance(ckpt, Checkpoint):
                raise ConfigurationError(
                    f"checkpoints must be traintrace.Checkpoint objects, got {type(ckpt).__name__}"
                    "; wrap states as tt.Checkpoint(state_dict_or_path, lr=...)"
                )
        require_task(task)
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.task = task
        self.checkpoints = list(checkpoints)
        self.layers = layers
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_feature_gib = max_feature_gib
        self.progress = progress
        self._grads = GradientComputer(model, task, layers)
        self.lrs = [c.learning_rate for c in self.checkpoints]

    @property
    def parameter_names(self) -> list[str]:
        """The differentiated parameters, in feature order."""
        return list(self._grads.names)

    def _states(self) -> list[dict[str, Tensor]]:
        return [c.state_for(self.model) for c in self.checkpoints]

    def fit(self, train: Data) -> TracIn:
        """Compute and keep the training-set gradients at every checkpoint. Returns ``self``.

        The training set is streamed one batch at a time; example ``i`` is the ``i``-th example
        in iteration order (a shuffled DataLoader is refused).
        """
        loader = as_loader(train, self.batch_size)
        n = dataset_length(loader)
        copies = len(self.checkpoints)
        if n is not None:
            self._check_feature_memory(n, self._grads.layout.numel, copies)
        total = len(loader) * copies if n is not None else None
        bar = tqdm(total=total, desc="TracIn fit", unit="batch", disable=not self.progress)
        features: list[Tensor] = []
        for ckpt, state in zip(self.checkpoints, self._states(), strict=True):
            matrix = stack_gradients(
                self._grads,
                state,
                loader,
                where=f"checkpoint {ckpt.name}",
                on_rows=lambda count: self._check_feature_memory(
                    count, self._grads.layout.numel, copies
                ),
                progress=bar,
            )
            if features and matrix.shape[0] != features[0].shape[0]:
                raise ConfigurationError(
                    f"the training data yielded {matrix.shape[0]} examples at checkpoint "
                    f"{ckpt.name} but {features[0].shape[0]} before: its order and length must "
                    "be fixed"
                )
            features.append(matrix)
        bar.close()
        self.train_norms_ = torch.stack([f.norm(dim=1) for f in features])
        if self.normalize:
            features = [
                f / n_.clamp_min(1e-30)[:, None]
                for f, n_ in zip(features, self.train_norms_, strict=True)
            ]
        self.train_features_ = features
        self.n_train_ = int(features[0].shape[0])
        return self

    def _score_blocks(self, queries: Data) -> Iterator[Tensor]:
        loader = as_loader(queries, self.batch_size)
        device = _device_of(self.model)
        states = self._states()
        for offset, batch in tqdm(
            iterate_batches(loader, device),
            total=len(loader) if dataset_length(loader) is not None else None,
            desc="TracIn score",
            unit="batch",
            disable=not self.progress,
            leave=False,
        ):
            block = None
            for ckpt, state, lr, feats in zip(
                self.checkpoints, states, self.lrs, self.train_features_, strict=True
            ):
                q = self._grads.per_example(
                    state,
                    batch,
                    "measurement",
                    offset=offset,
                    where=f"checkpoint {ckpt.name} (query)",
                )
                if self.normalize:
                    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
                term = lr * (q @ feats.T)
                block = term if block is None else block + term
            yield block

    def self_influence(self) -> Tensor:
        """``Σ_c η_c ‖∇l(z, θ_c)‖²`` for every training example, ``[n_train]``.

        High self-influence flags mislabeled and rare examples (the training loss on both
        sides). Equals the diagonal of ``score(train, train)`` when the task's measurement is
        the loss. With ``normalize=True`` every cosine with itself is 1, so this is the constant
        ``Σ_c η_c`` — use ``normalize=False`` for self-influence rankings. Cost: free after fit.
        """
        self._check_fitted()
        if self.normalize:
            return torch.full((self.n_train_,), float(sum(self.lrs)), dtype=self.train_norms_.dtype)
        lrs = torch.tensor(self.lrs, dtype=self.train_norms_.dtype)
        return (lrs[:, None] * self.train_norms_**2).sum(dim=0)
