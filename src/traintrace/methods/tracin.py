"""TracIn (Pruthi et al., NeurIPS 2020) and its renormalized variants (Hammoudeh & Lowd, CCS 2022)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from traintrace.checkpoints import Checkpoint
from traintrace.exceptions import ConfigurationError
from traintrace.features.engine import ExactGradients
from traintrace.features.params import Layers
from traintrace.features.projections import ProjectedGradients, Projection
from traintrace.methods.gradient import GradientEstimator
from traintrace.methods.preconditioners import Identity
from traintrace.methods.stored import ProjectedStore, distributed_rank
from traintrace.methods.streaming import ExactStream, Normalize

__all__ = ["TracIn", "distributed_rank"]


def checkpoint_list(checkpoints: Any, what: str) -> list[Checkpoint]:
    """Validate a list of :class:`~traintrace.Checkpoint` (a single one is accepted)."""
    if isinstance(checkpoints, Checkpoint):
        checkpoints = [checkpoints]
    if not checkpoints:
        raise ConfigurationError(f"{what} needs at least one Checkpoint(state, lr=...)")
    for ckpt in checkpoints:
        if not isinstance(ckpt, Checkpoint):
            raise ConfigurationError(
                f"checkpoints must be traintrace.Checkpoint objects, got {type(ckpt).__name__}"
                "; wrap states as tt.Checkpoint(state_dict_or_path, lr=...)"
            )
    return list(checkpoints)


def stored_featurizer(
    model: nn.Module,
    task: Any,
    layers: Layers,
    projection: Projection | None,
    *,
    store: str | os.PathLike[str] | None,
    overwrite_store: bool,
    store_dtype: str | None,
    chunk_size: int | None,
    max_disk_gib: float,
) -> ProjectedStore:
    """A :class:`ProjectedStore` with the store dtype defaulting to the model's precision."""
    param = next(model.parameters())
    default = "float64" if param.dtype == torch.float64 else "float32"
    return ProjectedStore(
        ProjectedGradients(model, task, layers, projection),
        store=store,
        overwrite_store=overwrite_store,
        store_dtype=store_dtype or default,  # type: ignore[arg-type]
        chunk_size=chunk_size,
        max_disk_gib=max_disk_gib,
    )


class TracIn(GradientEstimator):
    """TracInCP: ``score(z, z') = Σ_c η_c · ⟨R ∇l(z, θ_c), R ∇f(z', θ_c)⟩``.

    ``c`` runs over the saved checkpoints ``θ_c`` with the learning rate ``η_c`` in force when
    each was saved, ``l`` is the training loss of training example ``z`` and ``f`` the task's
    query measurement (its loss, or the logit margin for unlabeled queries — the prediction
    variant), oriented so that lower is better. ``R`` is the projection (``projection=``):
    none (exact gradients) or a random projection with ``E[⟨Rg, Rg'⟩] = ⟨g, g'⟩``.

    **Sign:** positive = the training example *helps* the query (a gradient step on ``z`` lowers
    the query's loss / raises its margin). Proponents are the largest scores, opponents the most
    negative. **Orientation:** ``score`` returns ``[n_query, n_train]``.

    **Renormalized variants** (Hammoudeh & Lowd 2022), which stop examples with large gradients
    from dominating every ranking: ``normalize="cosine"`` (or ``True``; GAS) uses
    ``Σ_c η_c · cos(∇l(z, θ_c), ∇f(z', θ_c))``; ``normalize="train"`` divides each term by the
    training gradient norm ``‖∇l(z, θ_c)‖`` only; ``layerwise=True`` takes the division per layer
    (:attr:`~traintrace.features.engine.ExactGradients.units`) and sums the layers' terms
    (layer-wise GAS). A zero gradient norm gives a zero term. The projected store path supports
    ``normalize="cosine"`` only.

    **Two ways to serve queries.** ``projection=None`` and ``store=None`` (the default) is the
    exact *streaming* path: ``fit`` reads the training data once for its fingerprint (the
    training-gradient norms, ``[layers, n]`` numbers, come with the first streamed pass), and
    every ``score`` / ``top_k`` call captures the queries and
    streams the training set once per checkpoint and block of ``query_block`` queries
    (:mod:`traintrace.methods.streaming`); nothing of size ``n × P`` is formed or written. Choose
    it when the queries are known up front. With a ``projection`` (or a ``store``), ``fit``
    featurizes the training set once into the on-disk store and queries only touch the cheap
    side: choose it to ask many query sets later, interactively.

    Args:
        model: the network; evaluated functionally at each checkpoint in eval mode (dropout off,
            BatchNorm uses running statistics); the model object is not modified.
        task: loss and measurement (:class:`~traintrace.Classification`, ...).
        checkpoints: saved states with their learning rates.
        layers: parameters to differentiate — ``None`` (all), ``"last"`` (the last layer with
            parameters) or module names.
        normalize: ``False``, ``"train"`` or ``"cosine"`` (``True``): renormalized variants.
        layerwise: normalize per layer (streaming path).
        projection: ``None`` — exact (streamed without a store, or ``P`` features per example
            in the store when ``store=`` is given); an
            ``int`` ``k`` — the Kronecker-factored projection to about ``k`` features (one
            forward and one backward per example, never a full per-example gradient); or a
            :class:`~traintrace.Projection` (``kind="kronecker" | "gaussian" | "rademacher" |
            "sjlt"``). See :class:`~traintrace.features.projections.ProjectedGradients`.
        store: directory of the on-disk :class:`~traintrace.FeatureStore` holding the training
            features (resumable: a killed ``fit`` skips finished chunks; a store written with
            other settings is refused). ``None``: a temporary store, deleted with the estimator.
        overwrite_store: replace a store written with other settings instead of refusing it.
        store_dtype: ``"float32"`` (default), ``"float16"`` (half the disk) or ``"float64"``
            (default for float64 models: exact).
        chunk_size: training examples per store chunk (the unit of resumption and of work
            shared between ``torchrun`` ranks); default about 32 MiB of features.
        batch_size: batch size used when a Dataset (not a DataLoader) is given.
        collate_fn: how examples of a Dataset become a batch (e.g. Hugging Face
            ``DataCollatorWithPadding(tokenizer)`` for variable-length text).
        max_disk_gib: refuse (before any work) a store larger than this.
        progress: show tqdm progress bars.

    Distributed: under ``torchrun`` (an initialized ``torch.distributed`` process group), every
    rank runs ``fit`` with the same arguments and a shared ``store`` path; each featurizes its
    share of the chunks, and the store is finalized after a barrier. The result is the same
    store one process would write.

    Cost. Streaming: ``fit`` is one forward and one backward to the layer outputs per example and
    checkpoint (no weight gradient); each query block adds the same per checkpoint plus the
    per-layer contraction (factored: ``T·T_q·(d_in + d_out)`` per pair and layer);
    ``self_influence`` reads the norms ``fit`` recorded. Store: ``fit`` writes ``C × n × width``
    numbers; a query block is one forward+backward per query and checkpoint plus one streaming
    read of the store; ``self_influence`` reads the stored norms.

    Composition (:class:`~traintrace.methods.gradient.GradientEstimator`): ``R`` = the exact
    engine or the projected store, ``P_c = I``, ``w_c = η_c``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Any,
        checkpoints: Sequence[Checkpoint],
        *,
        layers: Layers = None,
        normalize: Normalize | bool = False,
        layerwise: bool = False,
        projection: Projection | int | None = None,
        store: str | os.PathLike[str] | None = None,
        overwrite_store: bool = False,
        store_dtype: Literal["float16", "float32", "float64"] | None = None,
        chunk_size: int | None = None,
        batch_size: int = 64,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        query_block: int = 1024,
        max_disk_gib: float = 256.0,
        progress: bool = True,
    ) -> None:
        checkpoints = checkpoint_list(checkpoints, "TracIn")
        self.projection = Projection.coerce(projection)
        if self.projection is None and store is None:
            featurizer: Any = ExactStream(ExactGradients(model, task, layers))
        else:
            featurizer = stored_featurizer(
                model,
                task,
                layers,
                self.projection,
                store=store,
                overwrite_store=overwrite_store,
                store_dtype=store_dtype,
                chunk_size=chunk_size,
                max_disk_gib=max_disk_gib,
            )
        self.lrs = [c.learning_rate for c in checkpoints]
        super().__init__(
            model,
            task,
            checkpoints,
            featurizer=featurizer,
            preconditioners=[Identity() for _ in checkpoints],
            weights=self.lrs,
            normalize=normalize,
            layerwise=layerwise,
            batch_size=batch_size,
            collate_fn=collate_fn,
            query_block=query_block,
            progress=progress,
        )
        self.layers = layers
        if not self.streaming and (self.normalize == "train" or self.layerwise):
            raise ConfigurationError(
                "normalize='train' and layerwise=True need the exact streaming path "
                "(projection=None, store=None); the store path supports normalize='cosine'"
            )
