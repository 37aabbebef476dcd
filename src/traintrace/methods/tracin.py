"""TracIn (Pruthi et al., NeurIPS 2020) and its cosine variant GAS (Hammoudeh & Lowd, CCS 2022)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from traintrace.checkpoints import Checkpoint, model_fingerprint
from traintrace.data import (
    as_loader,
    batch_size_of,
    dataset_fingerprint,
    dataset_length,
    iterate_batches,
)
from traintrace.exceptions import ConfigurationError, FeatureMemoryError
from traintrace.features.engine import ExactGradients
from traintrace.features.params import Layers
from traintrace.features.projections import ProjectedGradients, Projection
from traintrace.features.store import FeatureStore
from traintrace.methods.base import Data, Estimator
from traintrace.methods.streaming import (
    Identity,
    Normalize,
    check_normalize,
    stream_scores,
    stream_top_k,
    train_sq_norms,
)
from traintrace.retrieval import exact as exact_retrieval
from traintrace.retrieval.faiss_index import top_k as retrieval_top_k
from traintrace.retrieval.topk import Ranking, TopK, check_k
from traintrace.task import Task, require_task

__all__ = ["TracIn", "distributed_rank"]

_GIB = 2**30


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under ``torchrun`` / an initialized process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _chunk_loader(loader: DataLoader, start: int, stop: int, batch_size: int) -> DataLoader:
    """The examples ``[start, stop)`` of ``loader``'s data set, batched like ``loader``."""
    return DataLoader(
        Subset(loader.dataset, range(start, stop)),
        batch_size=loader.batch_size or batch_size,
        shuffle=False,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


class TracIn(Estimator):
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
    exact *streaming* path: ``fit`` makes one capture pass per checkpoint (the training-gradient
    norms, ``[layers, n]`` numbers), and every ``score`` / ``top_k`` call captures the queries and
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
        max_disk_gib: refuse (before any work) a store larger than this.
        progress: show tqdm progress bars.

    Distributed: under ``torchrun`` (an initialized ``torch.distributed`` process group), every
    rank runs ``fit`` with the same arguments and a shared ``store`` path; each featurizes its
    share of the chunks, and the store is finalized after a barrier. The result is the same
    store one process would write.

    Cost: ``fit`` is one forward+backward per training example per checkpoint (vmapped exact
    gradients, or hooks for the Kronecker projection), and ``C × n × width`` numbers on disk,
    nothing growing with ``n`` in memory. ``score``/``top_k`` cost one forward+backward per query
    per checkpoint plus one streaming read of the store per block of up to ``query_block``
    queries. ``self_influence`` reads only the stored norms.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
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
        query_block: int = 1024,
        max_disk_gib: float = 256.0,
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
        self.normalize, self.layerwise = check_normalize(normalize, layerwise)
        self.projection = Projection.coerce(projection)
        self.streaming = self.projection is None and store is None
        self.store_path = store
        self.overwrite_store = overwrite_store
        param = next(model.parameters())
        default_dtype = "float64" if param.dtype == torch.float64 else "float32"
        self.store_dtype = store_dtype or default_dtype
        self.chunk_size = chunk_size
        self.batch_size = batch_size
        self.query_block = query_block
        self.max_disk_gib = max_disk_gib
        self.progress = progress
        if not self.streaming and (self.normalize == "train" or self.layerwise):
            raise ConfigurationError(
                "normalize='train' and layerwise=True need the exact streaming path "
                "(projection=None, store=None); the store path supports normalize='cosine'"
            )
        if self.streaming:
            self._engine = ExactGradients(model, task, layers)
        else:
            self._features = ProjectedGradients(model, task, layers, self.projection)
        self.lrs = [c.learning_rate for c in self.checkpoints]
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def parameter_names(self) -> list[str]:
        """The differentiated parameters, in feature order."""
        return list(self._engine.names if self.streaming else self._features.names)

    @property
    def coverage(self) -> dict[str, str]:
        """Which path (hooks, Kronecker projection, exact ``vmap``) each parameter took."""
        return dict(self._engine.coverage if self.streaming else self._features.coverage)

    def _states(self) -> list[dict[str, Tensor]]:
        return [c.state_for(self.model) for c in self.checkpoints]

    def _settings(self, loader: DataLoader, n: int) -> dict[str, Any]:
        return {
            "estimator": type(self).__name__,
            "model": model_fingerprint(self.model),
            "task": repr(self.task),
            "features": self._features.describe(),
            "checkpoints": [
                {"name": c.name, "lr": c.learning_rate, "fingerprint": c.fingerprint(self.model)}
                for c in self.checkpoints
            ],
            "data": {"n": n, "fingerprint": dataset_fingerprint(loader.dataset)},
        }

    def _feature_width(self) -> int:
        """Columns of the stored training features."""
        return self._features.width

    def _train_features(
        self, state: dict[str, Tensor], batch: Any, offset: int, where: str
    ) -> Tensor:
        """The stored features of a batch of training examples: ``R ∇l(z)``."""
        return self._features.features(state, batch, "loss", offset=offset, where=where)

    def _open_store(self, loader: DataLoader, n: int, rank: int, world: int) -> FeatureStore:
        width = self._feature_width()
        itemsize = {"float16": 2, "float32": 4, "float64": 8}[self.store_dtype]
        need = n * width * len(self.checkpoints) * itemsize / _GIB
        if need > self.max_disk_gib:
            raise FeatureMemoryError(
                f"{type(self).__name__} would store {n} examples × {width} features × {len(self.checkpoints)} "
                f"checkpoints = {need:.2f} GiB, above max_disk_gib={self.max_disk_gib}. Use a "
                "projection (projection=4096), layers='last', fewer checkpoints, "
                "store_dtype='float16', or raise max_disk_gib."
            )
        if self.store_path is None:
            if world > 1:
                raise ConfigurationError(
                    "under torchrun every rank must write the same store: pass store='path' "
                    "(a directory all ranks can reach)"
                )
            self._tmpdir = tempfile.TemporaryDirectory(prefix="traintrace-store-")
            path = os.path.join(self._tmpdir.name, "store")
        else:
            path = os.fspath(self.store_path)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path)) or ".").free / _GIB
        if need > free and not os.path.exists(path):
            raise FeatureMemoryError(
                f"the feature store needs {need:.2f} GiB but only {free:.2f} GiB are free at "
                f"{path}; use a projection, store_dtype='float16' or another store path"
            )
        return FeatureStore.open(
            path,
            self._settings(loader, n),
            n=n,
            width=width,
            checkpoints=len(self.checkpoints),
            dtype=self.store_dtype,
            chunk_size=self.chunk_size,
            overwrite=self.overwrite_store and rank == 0,
            rank=rank,
            world_size=world,
            durable=self.store_path is not None,  # a temporary store need not survive power loss
        )

    def fit(self, train: Data) -> TracIn:
        """Featurize the training set at every checkpoint into the store. Returns ``self``.

        Resumable: chunks already in the store are skipped (a killed run loses at most the
        chunks in flight). Example ``i`` is the ``i``-th example of the data set; a shuffled
        DataLoader is refused.
        """
        loader = as_loader(train, self.batch_size)
        n = dataset_length(loader)
        if n is None:
            raise ConfigurationError(
                f"{type(self).__name__} needs a data set with a length (a map-style Dataset) to "
                "lay out its store"
            )
        if n == 0:
            raise ConfigurationError("the training data set is empty")
        if self.streaming:
            return self._fit_streaming(loader, n)
        rank, world = distributed_rank()
        if world > 1 and self.overwrite_store:
            if rank == 0:
                self._open_store(loader, n, rank, world)
            dist.barrier()
        store = self._open_store(loader, n, rank, world)
        chunks = store.chunks()
        work = [(c, i) for c in range(len(self.checkpoints)) for i in store.pending(c)]
        bar = tqdm(
            total=sum(chunks[i][1] - chunks[i][0] for _, i in work),
            desc=f"{type(self).__name__} fit{f' (rank {rank}/{world})' if world > 1 else ''}",
            unit="ex",
            disable=not self.progress,
        )
        state_of: dict[int, dict[str, Tensor]] = {}
        device = next(self.model.parameters()).device
        for c, i in work:
            if c not in state_of:
                state_of.clear()  # one checkpoint's state in memory at a time
                state_of[c] = self.checkpoints[c].state_for(self.model)
            start, stop = chunks[i]
            rows = []
            for offset, batch in iterate_batches(
                _chunk_loader(loader, start, stop, self.batch_size), device
            ):
                rows.append(
                    self._train_features(
                        state_of[c],
                        batch,
                        start + offset,
                        f"checkpoint {self.checkpoints[c].name}",
                    )
                )
                bar.update(batch_size_of(batch))
            store.write_chunk(c, i, torch.cat(rows))
        bar.close()
        if world > 1:
            dist.barrier()
        store.finalize()
        store.require_complete()
        self.store_ = store
        self.n_train_ = n
        return self

    # -- the exact streaming path -----------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _state(self, c: int) -> dict[str, Tensor]:
        return self.checkpoints[c].state_for(self.model)

    def _names(self) -> list[str]:
        return [f"checkpoint {c.name}" for c in self.checkpoints]

    def _fit_streaming(self, loader: DataLoader, n: int) -> TracIn:
        """One capture pass per checkpoint: the per-layer training-gradient norms ``[U, n]``."""
        names = self._names()
        self.train_sq_norms_ = [
            train_sq_norms(
                self._engine,
                self._state(c),
                loader,
                self._device(),
                n=n,
                where=names[c],
                progress=self.progress,
            )
            for c in range(len(self.checkpoints))
        ]
        self._train_loader = loader
        self.n_train_ = n
        return self

    def _stream_args(self) -> dict[str, Any]:
        return {
            "engine": self._engine,
            "states": self._state,
            "weights": self.lrs,
            "preconditioners": [Identity() for _ in self.checkpoints],
            "names": self._names(),
            "train": self._train_loader,
            "device": self._device(),
            "n": self.n_train_,
            "query_block": self.query_block,
            "normalize": self.normalize,
            "layerwise": self.layerwise,
            "train_norms": self.train_sq_norms_,
            "progress": self.progress,
        }

    # -- queries ---------------------------------------------------------------------------------
    def _query_blocks(self, queries: Data) -> Iterator[list[Tensor]]:
        """Per-checkpoint query features ``[m, width]`` for blocks of up to ``query_block``."""
        self._check_fitted()
        loader = as_loader(queries, self.batch_size)
        device = next(self.model.parameters()).device
        states = self._states()  # C model states in memory while scoring
        pending: list[list[Tensor]] = [[] for _ in states]
        count = 0
        for offset, batch in tqdm(
            iterate_batches(loader, device),
            total=len(loader) if dataset_length(loader) is not None else None,
            desc="TracIn queries",
            unit="batch",
            disable=not self.progress,
            leave=False,
        ):
            for c, (ckpt, state) in enumerate(zip(self.checkpoints, states, strict=True)):
                pending[c].append(
                    self._features.features(
                        state, batch, "measurement", offset=offset, where=f"{ckpt.name} (query)"
                    )
                )
            count += batch_size_of(batch)
            if count >= self.query_block:
                yield [torch.cat(p) for p in pending]
                pending, count = [[] for _ in states], 0
        if count:
            yield [torch.cat(p) for p in pending]

    def _prepare_queries(self, qs: list[Tensor]) -> list[Tensor]:
        """Per-checkpoint query features as they enter the inner product (identity here)."""
        return qs

    def _stored_side(self, qs: list[Tensor]) -> list[Tensor]:
        """Prepared query features on the CPU, where the store's rows are read."""
        return [q.cpu() for q in self._prepare_queries(qs)]

    def _score_blocks(self, queries: Data) -> Iterator[Tensor]:
        if self.streaming:
            self._check_fitted()
            yield from stream_scores(
                queries=as_loader(queries, self.batch_size), **self._stream_args()
            )
            return
        for qs in self._query_blocks(queries):
            qs = self._stored_side(qs)
            yield exact_retrieval.score(self.store_, qs, self.lrs, normalize=bool(self.normalize))

    def top_k(
        self, queries: Data, k: int = 10, *, method: Literal["auto", "exact", "faiss"] = "auto"
    ) -> TopK:
        """The ``k`` strongest proponents and opponents of each query, ``[n_query, k]`` each.

        ``method``: ``"exact"`` streams over the store (memory flat in ``n``); ``"faiss"``
        searches an approximate FAISS index built beside the store (and reused); ``"auto"``
        picks exact for stores up to 2^30 values. ``.proponents`` are the largest scores
        (largest first), ``.opponents`` the most negative (most negative first).
        """
        self._check_fitted()
        check_k(k, self.n_train_)  # before any query gradient is computed
        if self.streaming:
            return stream_top_k(
                queries=as_loader(queries, self.batch_size), k=k, **self._stream_args()
            )
        parts = [
            retrieval_top_k(
                self.store_,
                self._stored_side(qs),
                self.lrs,
                k,
                normalize=bool(self.normalize),
                method=method,
            )
            for qs in self._query_blocks(queries)
        ]
        if not parts:
            raise ConfigurationError("no queries: the query data set is empty")
        return TopK(
            proponents=Ranking(
                torch.cat([p.proponents.indices for p in parts]),
                torch.cat([p.proponents.scores for p in parts]),
            ),
            opponents=Ranking(
                torch.cat([p.opponents.indices for p in parts]),
                torch.cat([p.opponents.scores for p in parts]),
            ),
        )

    def self_influence(self) -> Tensor:
        """``Σ_c η_c ‖R∇l(z, θ_c)‖²`` for every training example, ``[n_train]``.

        High self-influence flags mislabeled and rare examples (the training loss on both
        sides). Equals the diagonal of ``score(train, train)`` when the task's measurement is
        the loss. Cost: the norms recorded by ``fit`` (streaming) or one read of the stored
        norms.

        Raises:
            ConfigurationError: for the normalized variants, where every example's score with
                itself is the same constant (a cosine with itself is 1): it ranks nothing. Use
                an estimator with ``normalize=False`` for self-influence rankings.
        """
        self._check_fitted()
        if self.normalize:
            raise ConfigurationError(
                f"self_influence() of a normalized TracIn (normalize={self.normalize!r}) is a "
                "constant: every gradient's cosine with itself is 1. Rank by the self-influence "
                "of tt.TracIn(..., normalize=False) instead"
            )
        if self.streaming:
            total = torch.zeros(self.n_train_, dtype=self.train_sq_norms_[0].dtype)
            for lr, sq in zip(self.lrs, self.train_sq_norms_, strict=True):
                total += lr * sq.sum(0).cpu()
            return total
        store = self.store_
        total = torch.zeros(self.n_train_, dtype=store.read_dtype)
        for c, lr in enumerate(self.lrs):
            total += lr * store.norms(c) ** 2
        return total
