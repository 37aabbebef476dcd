"""The stored featurizer: projected training features in an on-disk store, queried many times.

``fit`` writes ``R ∇l(z, θ_c)`` for every training example and checkpoint into a
:class:`~traintrace.FeatureStore` (resumable chunk by chunk; ``torchrun`` ranks share the
chunks); queries touch only the cheap side: ``P_c R ∇f(z', θ_c)`` per block, then one streaming
read of the store (``retrieval.exact``), or a FAISS index when asked. Choose it to serve many
query sets later; the exact engine (:class:`~traintrace.methods.streaming.ExactStream`) is the
choice when the queries are known up front.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from traintrace.checkpoints import model_fingerprint
from traintrace.data import DataHasher, batch_size_of, iterate_batches, progress_batches
from traintrace.exceptions import ConfigurationError, FeatureMemoryError, StoreMismatchError
from traintrace.features.projections import ProjectedGradients
from traintrace.features.store import FeatureStore, TemporaryStoreDir, temporary_store_dir
from traintrace.methods.preconditioners import Identity
from traintrace.retrieval import exact as exact_retrieval
from traintrace.retrieval.faiss_index import top_k as retrieval_top_k
from traintrace.retrieval.topk import TopK

if TYPE_CHECKING:
    from traintrace.methods.gradient import GradientEstimator

__all__ = ["FeatureServing", "ProjectedStore", "distributed_rank"]

_GIB = 2**30
StoreDtype = Literal["float16", "float32", "float64"]


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


class FeatureServing:
    """Queries against training features held by the featurizer: written once here.

    A subclass gives the training rows (:meth:`_train_rows`: an on-disk store or in-memory
    ``[n, width]`` tensors per checkpoint, whatever :mod:`traintrace.retrieval` reads) and one
    batch's query features at one checkpoint (:meth:`_query_features`); queries are featurized in
    blocks of ``est.query_block``, preconditioned (``P_c``, ``apply_features``) and scored by one
    streaming pass over the training rows (or a FAISS index when asked for).
    """

    def _train_rows(self, est: GradientEstimator) -> Any:
        raise NotImplementedError

    def _query_features(
        self, est: GradientEstimator, c: int, state: dict[str, Tensor], batch: Any, offset: int
    ) -> Tensor:
        raise NotImplementedError

    def _query_blocks(self, est: GradientEstimator, queries: DataLoader) -> Iterator[list[Tensor]]:
        """Per-checkpoint preconditioned query features ``[m, width]`` (on the CPU) per block."""
        states = [est.state(c) for c in range(len(est.checkpoints))]
        pending: list[list[Tensor]] = [[] for _ in states]
        count = 0
        for offset, batch in progress_batches(
            queries, est.device, f"{type(est).__name__} queries", est.progress
        ):
            for c, state in enumerate(states):
                pending[c].append(self._query_features(est, c, state, batch, offset))
            count += batch_size_of(batch)
            if count >= est.query_block:
                yield self._prepared(est, pending)
                pending, count = [[] for _ in states], 0
        if count:
            yield self._prepared(est, pending)

    @staticmethod
    def _prepared(est: GradientEstimator, pending: list[list[Tensor]]) -> list[Tensor]:
        return [
            p.apply_features(torch.cat(q)).cpu()
            for p, q in zip(est.preconditioners, pending, strict=True)
        ]

    def score_blocks(self, est: GradientEstimator, queries: DataLoader) -> Iterator[Tensor]:
        """Exact score blocks ``[m_block, n]``: ``Σ_c w_c ⟨P_c φ_c(z'), φ_c(z)⟩`` (cosine when
        ``est.normalize == "cosine"``)."""
        for qs in self._query_blocks(est, queries):
            yield exact_retrieval.score(
                self._train_rows(est), qs, est.weights, normalize=est.normalize == "cosine"
            )

    def top_k(self, est: GradientEstimator, queries: DataLoader, k: int, method: str) -> TopK:
        """Exact top-``k`` by streaming blocks of training rows, or FAISS with ``"faiss"``."""
        parts = [
            retrieval_top_k(
                self._train_rows(est),
                qs,
                est.weights,
                k,
                normalize=est.normalize == "cosine",
                method=method,  # type: ignore[arg-type]
            )
            for qs in self._query_blocks(est, queries)
        ]
        return TopK.concat(parts)


class ProjectedStore(FeatureServing):
    """``R`` = a projection (or none), with the training features kept in a store.

    Args:
        features: the :class:`~traintrace.ProjectedGradients` map ``g ↦ R g``.
        store: the store directory (``None``: a temporary one, removed with the estimator).
        overwrite_store: replace a store written with other settings instead of refusing it.
        store_dtype: ``"float32"``, ``"float16"`` (half the disk) or ``"float64"``.
        chunk_size: training examples per chunk (the unit of resumption and of ``torchrun``
            work sharing).
        max_disk_gib: refuse, before any work, a store larger than this.

    Cost: ``fit`` is one forward+backward per training example per checkpoint and
    ``C × n × width`` numbers on disk; a query block costs one forward+backward per query and
    checkpoint plus one streaming read of the store.
    """

    kind = "store"

    def __init__(
        self,
        features: ProjectedGradients,
        *,
        store: str | os.PathLike[str] | None,
        overwrite_store: bool,
        store_dtype: StoreDtype,
        chunk_size: int | None,
        max_disk_gib: float,
    ) -> None:
        self.features = features
        self.store_path = store
        self.overwrite_store = overwrite_store
        self.store_dtype = store_dtype
        self.chunk_size = chunk_size
        self.max_disk_gib = max_disk_gib
        self._tmpdir: TemporaryStoreDir | None = None

    @property
    def names(self) -> list[str]:
        return list(self.features.names)

    @property
    def coverage(self) -> dict[str, str]:
        return dict(self.features.coverage)

    @property
    def width(self) -> int:
        return self.features.width

    def describe(self) -> dict[str, Any]:
        return self.features.describe()

    # -- fit -------------------------------------------------------------------------------------
    def _settings(self, est: GradientEstimator, n: int) -> dict[str, Any]:
        settings = self._settings_without_data(est)
        # the data's content is checked chunk by chunk (a hash recorded with every chunk while
        # featurizing, compared on resume): no separate pass over the data here
        settings["data"] = {"n": n}
        return settings

    def _settings_without_data(self, est: GradientEstimator) -> dict[str, Any]:
        return {
            "estimator": type(est).__name__,
            "model": model_fingerprint(est.model),
            "task": repr(est.task),
            "features": self.features.describe(),
            "checkpoints": [
                {"name": c.name, "weight": w, "fingerprint": c.fingerprint(est.model)}
                for c, w in zip(est.checkpoints, est.weights, strict=True)
            ],
        }

    def _open(
        self, est: GradientEstimator, loader: DataLoader, n: int, rank: int, world: int
    ) -> FeatureStore:
        width = self.width
        itemsize = {"float16": 2, "float32": 4, "float64": 8}[self.store_dtype]
        count = len(est.checkpoints)
        need = n * width * count * itemsize / _GIB
        if need > self.max_disk_gib:
            raise FeatureMemoryError(
                f"{type(est).__name__} would store {n} examples × {width} features × {count} "
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
            # removed with the estimator or at exit; a killed process's is removed next start
            self._tmpdir = temporary_store_dir()
            path = os.path.join(self._tmpdir.name, "store")
        else:
            path = os.fspath(self.store_path)
        parent = os.path.dirname(os.path.abspath(path)) or "."
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free / _GIB
        if need > free and not os.path.exists(path):
            raise FeatureMemoryError(
                f"the feature store needs {need:.2f} GiB but only {free:.2f} GiB are free at "
                f"{path}; use a projection, store_dtype='float16' or another store path"
            )
        return FeatureStore.open(
            path,
            self._settings(est, n),
            n=n,
            width=width,
            checkpoints=count,
            dtype=self.store_dtype,
            chunk_size=self.chunk_size,
            overwrite=self.overwrite_store and rank == 0,
            rank=rank,
            world_size=world,
            durable=self.store_path is not None,  # a temporary store need not survive power loss
        )

    def fit(self, est: GradientEstimator, loader: DataLoader, n: int) -> None:
        """Featurize the training set at every checkpoint into the store (resumable).

        Every chunk's examples are hashed while they are featurized (their bytes, dtypes and
        shapes) and the hash is recorded with the chunk; a resume re-hashes the examples of the
        finished chunks and refuses the store if any changed (relabelled examples, edited
        inputs), naming the chunk and both hashes.
        """
        rank, world = distributed_rank()
        if world > 1 and self.overwrite_store:
            if rank == 0:
                self._open(est, loader, n, rank, world).close()
            dist.barrier()
        store = self._open(est, loader, n, rank, world)
        try:
            self._featurize(est, store, loader, rank, world)
        except BaseException:
            store.close()  # release the writer lock now, not when the object is collected
            raise
        est.store_ = store

    def reopen(self, est: GradientEstimator) -> int:
        """Open a complete store without the training data (a new process, queries only).

        Every setting but the data is checked against the store (model structure, task,
        projection, checkpoints and their weights); the data's fingerprint and size are taken
        from the store, which recorded them when it was written. Returns ``n``.
        """
        if self.store_path is None or not os.path.exists(
            os.path.join(self.store_path, "meta.json")
        ):
            raise ConfigurationError(
                f"fit() without training data reopens an existing store, but {self.store_path!r} "
                "holds none: pass store= the folder a previous fit wrote, or pass the data"
            )
        meta = FeatureStore._read_meta(Path(self.store_path))
        layout = meta["layout"]
        n = int(layout["n"])
        settings = self._settings_without_data(est)
        settings["data"] = meta["settings"].get("data")
        store = FeatureStore.open(
            self.store_path,
            settings,
            n=n,
            width=self.width,
            checkpoints=len(est.checkpoints),
            dtype=self.store_dtype,
            chunk_size=int(layout["chunk_size"]),
        )
        store.require_complete()
        est.store_ = store
        return n

    def _chunk_hash(self, est: GradientEstimator, loader: DataLoader, start: int, stop: int) -> str:
        hasher = DataHasher()
        for batch in _chunk_loader(loader, start, stop, est.batch_size):
            hasher.update(batch)
        return hasher.hexdigest()

    def _check_done_chunks(
        self, est: GradientEstimator, store: FeatureStore, loader: DataLoader
    ) -> None:
        """Refuse a resume whose finished chunks were computed on other data."""
        chunks = store.chunks()
        checked: dict[int, str] = {}
        for c in range(len(est.checkpoints)):
            for i in store.done(c):
                recorded = store.chunk_data_hash(c, i)
                if recorded is None:
                    continue  # written without hashes
                if i not in checked:
                    checked[i] = self._chunk_hash(est, loader, *chunks[i])
                if checked[i] != recorded:
                    start, stop = chunks[i]
                    raise StoreMismatchError(
                        f"the training examples {start}..{stop - 1} differ from those the store "
                        f"{store.path} was computed on (data hash of chunk {i}: stored "
                        f"{recorded}, now {checked[i]}): the data changed since the first fit "
                        "(relabelled or edited examples). Pass overwrite_store=True to recompute, "
                        "or use another store path"
                    )

    def _featurize(
        self, est: GradientEstimator, store: FeatureStore, loader: DataLoader, rank: int, world: int
    ) -> None:
        self._check_done_chunks(est, store, loader)
        chunks = store.chunks()
        work = [(c, i) for c in range(len(est.checkpoints)) for i in store.pending(c)]
        bar = tqdm(
            total=sum(chunks[i][1] - chunks[i][0] for _, i in work),
            desc=f"{type(est).__name__} fit{f' (rank {rank}/{world})' if world > 1 else ''}",
            unit="ex",
            disable=not est.progress,
        )
        state_of: dict[int, dict[str, Tensor]] = {}
        for c, i in work:
            if c not in state_of:
                state_of.clear()  # one checkpoint's state in memory at a time
                state_of[c] = est.state(c)
            start, stop = chunks[i]
            rows = []
            hasher = DataHasher()
            for offset, batch in iterate_batches(
                _chunk_loader(loader, start, stop, est.batch_size), est.device
            ):
                hasher.update(batch)
                rows.append(
                    self.features.features(
                        state_of[c],
                        batch,
                        "loss",
                        offset=start + offset,
                        where=est.checkpoint_names[c],
                    )
                )
                bar.update(batch_size_of(batch))
            store.write_chunk(c, i, torch.cat(rows), data_hash=hasher.hexdigest())
        bar.close()
        if world > 1:
            dist.barrier()
        store.finalize()
        store.require_complete()

    # -- queries ---------------------------------------------------------------------------------
    def _train_rows(self, est: GradientEstimator) -> FeatureStore:
        return est.store_

    def _query_features(
        self, est: GradientEstimator, c: int, state: dict[str, Tensor], batch: Any, offset: int
    ) -> Tensor:
        where = f"{est.checkpoint_names[c]} (query)"
        return self.features.features(state, batch, "measurement", offset=offset, where=where)

    def self_influence(self, est: GradientEstimator) -> Tensor:
        """``Σ_c w_c gᵀ P_c g`` from the stored rows (``P = I``: the stored norms only)."""
        store = est.store_
        if all(isinstance(p, Identity) for p in est.preconditioners):
            total = torch.zeros(est.n_train_, dtype=store.read_dtype)
            for c, w in enumerate(est.weights):
                total += w * store.norms(c) ** 2
            return total
        out = torch.zeros(est.n_train_, dtype=torch.float64)
        for c, (w, p) in enumerate(zip(est.weights, est.preconditioners, strict=True)):
            for start, rows in store.iter_chunks(c):
                out[start : start + len(rows)] += w * p.quadratic_features(rows)
        return out.to(store.read_dtype)
