"""Exact streaming scores and top-k over stored training features (the TracIn sum).

For queries with per-checkpoint features ``Q_c [m, width]``, training features ``F_c [n, width]``
and checkpoint weights ``w_c`` (learning rates for TracIn), the scores are::

    S = Σ_c w_c · Q_c F_cᵀ                                   [m, n]   (query × train)
    S = Σ_c w_c · (Q_c / ‖Q_c‖) (F_c / ‖F_c‖)ᵀ                cosine variant (GAS)

computed over blocks of training rows: each block is read once (all checkpoints), turned into an
``[m, rows]`` block of scores by matrix products, and merged into a running top-k. Memory is
``O(m × (k + rows) + 2 × C × rows × width)`` (the next block is read while one is scored),
never ``m × n``; the store is read once per call.

**Sign:** a positive score means the training example helps the query; proponents are the
largest scores (largest first), opponents the smallest (most negative first).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from torch import Tensor

from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.store import FeatureStore
from traintrace.retrieval.topk import Ranking, TopK, check_k

__all__ = [
    "BLOCK_VALUES",
    "FeatureSource",
    "RunningTopK",
    "TrainFeatures",
    "as_feature_source",
    "exact_top_k",
    "iter_scores",
    "score",
]

#: Default block of training rows: about this many values per read (all checkpoints together)
#: and per block of scores, i.e. ``rows = max(1, BLOCK_VALUES // max(checkpoints × width, m))``
#: (16 MiB of float32; two blocks are held, one being read while the other is scored), rounded
#: down to whole checksummed pieces of a store (see ``FeatureStore.piece_rows``).
BLOCK_VALUES = 2**22
_EPS = 1e-30

#: Training features: a :class:`FeatureStore`, or one ``[n, width]`` tensor per checkpoint.
TrainFeatures = FeatureStore | Sequence[Tensor]


class FeatureSource(Protocol):
    """Per-checkpoint training features readable in row blocks (what retrieval needs)."""

    n: int
    width: int
    checkpoints: int

    def read(
        self, checkpoint: int, start: int = 0, stop: int | None = None, *, out: Tensor | None = None
    ) -> Tensor:
        """Rows ``[start, stop)`` (float32 or wider); may fill and return ``out`` (a buffer)."""
        ...

    def norms(self, checkpoint: int, start: int = 0, stop: int | None = None) -> Tensor: ...


class _InMemory:
    """Per-checkpoint tensors ``[n, width]`` behind the :class:`FeatureSource` interface."""

    def __init__(self, features: Sequence[Tensor]) -> None:
        features = list(features)
        if not features:
            raise ConfigurationError(
                "no training features: give one [n, width] tensor per checkpoint"
            )
        first = features[0]
        for c, f in enumerate(features):
            if not isinstance(f, Tensor) or f.ndim != 2 or f.shape != first.shape:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ConfigurationError(
                    f"training features must be [n, width] tensors of one shape per checkpoint; "
                    f"checkpoint {c} is {shape}, checkpoint 0 is {tuple(first.shape)}"
                )
        self._features = features
        self._norms: list[Tensor | None] = [None] * len(features)
        self.n, self.width = int(first.shape[0]), int(first.shape[1])
        self.checkpoints = len(features)

    def read(
        self, checkpoint: int, start: int = 0, stop: int | None = None, *, out: Tensor | None = None
    ) -> Tensor:
        return self._features[checkpoint][start:stop]  # a view: no copy into ``out`` needed

    def norms(self, checkpoint: int, start: int = 0, stop: int | None = None) -> Tensor:
        norms = self._norms[checkpoint]
        if norms is None:
            norms = self._norms[checkpoint] = self._features[checkpoint].norm(dim=1)
        return norms[start:stop]


def as_feature_source(train: TrainFeatures | FeatureSource) -> FeatureSource:
    """A :class:`FeatureStore` (checked complete), a list of per-checkpoint tensors, or any
    object with the :class:`FeatureSource` interface (e.g. a recorder's accumulator on disk)."""
    if isinstance(train, FeatureStore):
        train.require_complete()
        return train
    if all(hasattr(train, a) for a in ("n", "width", "checkpoints", "read", "norms")):
        return train  # type: ignore[return-value]
    if isinstance(train, Tensor):
        raise ConfigurationError(
            "give training features as a list with one [n, width] tensor per checkpoint "
            f"(got a single tensor of shape {tuple(train.shape)}; wrap it as [features])"
        )
    return _InMemory(train)


def _check_queries(
    checkpoints: int, width: int, queries: Tensor | Sequence[Tensor], weights: Sequence[float]
) -> tuple[list[Tensor], list[float]]:
    """Queries as a list of ``[m, width]`` tensors (float32 or wider), weights as floats."""
    if isinstance(queries, Tensor):
        if queries.ndim == 2 and checkpoints == 1:
            queries = [queries]
        elif queries.ndim == 3:
            queries = list(queries.unbind(0))
        else:
            raise ConfigurationError(
                f"queries must be one [m, width] tensor per checkpoint (a list or a [C, m, width] "
                f"tensor) for {checkpoints} checkpoints, got shape {tuple(queries.shape)}"
            )
    queries = list(queries)
    weights = [float(w) for w in weights]
    if len(queries) != checkpoints or len(weights) != checkpoints:
        raise ConfigurationError(
            f"the training features have {checkpoints} checkpoints but "
            f"{len(queries)} query feature tensors and {len(weights)} weights were given"
        )
    m = None
    for c, q in enumerate(queries):
        if not isinstance(q, Tensor) or q.ndim != 2 or q.shape[1] != width:
            shape = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
            raise ConfigurationError(
                f"query features of checkpoint {c} must be [m, {width}], got {shape}"
            )
        if m is not None and q.shape[0] != m:
            raise ConfigurationError(
                f"every checkpoint needs the same queries: {m} rows at checkpoint 0, "
                f"{q.shape[0]} at checkpoint {c}"
            )
        m = q.shape[0]
    if not m:
        raise ConfigurationError("no queries: the query features have 0 rows")
    bad = [(c, w) for c, w in enumerate(weights) if not math.isfinite(w)]
    if bad:
        raise ConfigurationError(
            f"weights must be finite, got {', '.join(f'w_{c}={w}' for c, w in bad)}"
        )
    dtype = torch.promote_types(queries[0].dtype, torch.float32)
    out = [q.detach().to(dtype) for q in queries]
    for c, q in enumerate(out):
        if not bool(torch.isfinite(q.sum())) and not bool(torch.isfinite(q).all()):
            rows = (~torch.isfinite(q)).any(dim=1).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"query features of checkpoint {c} hold NaN or infinity in {len(rows)} of {m} "
                f"queries (the first: query {rows[0]}); their scores would be meaningless. "
                "Check those queries' inputs, or compute in float64."
            )
    return out, weights


def _block_rows(source: FeatureSource, m: int, rows: int | None) -> int:
    if rows is None:
        # at least one row, however wide (C × width beyond BLOCK_VALUES: a block is one row)
        rows = max(1, BLOCK_VALUES // max(source.checkpoints * source.width, m, 1))
        piece = getattr(source, "piece_rows", 1)
        if rows > piece:  # whole checksummed pieces: no piece is read twice to verify it
            rows -= rows % piece
    if isinstance(rows, bool) or not isinstance(rows, int):
        raise ConfigurationError(f"rows must be an integer >= 1, got {rows!r}")
    if rows < 1:
        raise ConfigurationError(f"rows must be >= 1, got {rows}")
    return max(1, min(rows, source.n))


def _read_blocks(
    source: FeatureSource, rows: int, with_norms: bool
) -> Iterator[tuple[int, int, list[Tensor], list[Tensor] | None]]:
    """``(start, stop, features per checkpoint, norms per checkpoint)`` for consecutive blocks.

    The next block is read by a background thread while the caller computes on this one
    (reads release the GIL, as do matrix products), into the other of two buffers: memory is
    two blocks, and a yielded block is valid until the next one is requested.
    """
    # in-memory features are returned as views: no buffers needed
    buffers = (
        None
        if isinstance(source, _InMemory)
        else [
            torch.empty(
                source.checkpoints, rows, source.width, dtype=getattr(source, "read_dtype", None)
            )
            for _ in range(2)
        ]
    )

    def load(slot: int, start: int) -> tuple[int, int, list[Tensor], list[Tensor] | None]:
        stop = min(start + rows, source.n)
        feats = [
            source.read(
                c, start, stop, out=None if buffers is None else buffers[slot][c, : stop - start]
            )
            for c in range(source.checkpoints)
        ]
        norms = (
            [source.norms(c, start, stop) for c in range(source.checkpoints)]
            if with_norms
            else None
        )
        return start, stop, feats, norms

    starts = list(range(0, source.n, rows))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="traintrace-read") as pool:
        pending = pool.submit(load, 0, starts[0])
        for j in range(len(starts)):
            current = pending.result()
            if j + 1 < len(starts):
                pending = pool.submit(load, (j + 1) % 2, starts[j + 1])
            yield current


def _scored_blocks(
    source: FeatureSource,
    queries: list[Tensor],
    weights: list[float],
    normalize: bool,
    rows: int,
) -> Iterator[tuple[int, Tensor]]:
    if normalize:
        queries = [q / q.norm(dim=1, keepdim=True).clamp_min(_EPS) for q in queries]
    m, dtype = queries[0].shape[0], queries[0].dtype
    product = torch.empty(m * rows if normalize else 0, dtype=dtype)  # reused per checkpoint
    for start, stop, feats, norms in _read_blocks(source, rows, normalize):
        block = torch.zeros(m, stop - start, dtype=dtype)
        for c, (q, w) in enumerate(zip(queries, weights, strict=True)):
            f = feats[c].to(dtype)
            if norms is not None:
                term = torch.mm(q, f.T, out=product[: m * (stop - start)].view(m, -1))
                inv = norms[c].to(dtype).clamp_min(_EPS).reciprocal_()
                block.addcmul_(term, inv.mul_(w)[None, :])
            else:
                # F·Qᵀ (long side first) streams F row-major: faster than Q·Fᵀ for few queries
                block.add_(torch.mm(f, q.T).T, alpha=w)
        if not bool(torch.isfinite(block.sum(dtype=torch.float64))) and not bool(
            torch.isfinite(block).all()
        ):
            _overflow(block, start, dtype)
        yield start, block


def _overflow(block: Tensor, start: int, dtype: torch.dtype) -> None:
    """Raise for a block of scores that holds NaN or infinity (finite inputs overflowed)."""
    q, i = (~torch.isfinite(block)).nonzero()[0].tolist()
    raise NonFiniteGradientError(
        f"the score of query {q} (of this call) with training example {start + i} is "
        f"{float(block[q, i])}: "
        f"the training features hold NaN/infinity, or the inner products overflow {dtype} "
        "(finite but huge features, e.g. inputs or gradients around 1e19 or more). Rescale "
        "the inputs, or compute in float64 (a float64 model and store_dtype='float64'); no "
        "scores are returned."
    )


def iter_scores(
    train: TrainFeatures,
    queries: Tensor | Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    rows: int | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(start, S[:, start : start + rows])`` blocks of the score matrix, left to right.

    Args:
        train: a complete :class:`FeatureStore`, or one ``[n, width]`` tensor per checkpoint.
        queries: query features, one ``[m, width]`` tensor per checkpoint (list, or
            ``[C, m, width]``; a single ``[m, width]`` tensor when ``C == 1``).
        weights: ``w_c`` per checkpoint (any sign).
        normalize: cosine variant (per checkpoint, using the stored norms).
        rows: training rows per block (default: see ``BLOCK_VALUES``).
    """
    source = as_feature_source(train)
    qs, ws = _check_queries(source.checkpoints, source.width, queries, weights)
    return _scored_blocks(source, qs, ws, normalize, _block_rows(source, qs[0].shape[0], rows))


def score(
    train: TrainFeatures,
    queries: Tensor | Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    out: Tensor | None = None,
    rows: int | None = None,
) -> Tensor:
    """The dense score matrix ``S [m, n]`` (query × train), written block by block into ``out``.

    ``out`` may be any ``[m, n]`` tensor (e.g. ``torch.from_numpy`` of a writable memmap, so
    the matrix never sits in RAM); by default a new tensor. Arguments as :func:`iter_scores`.
    """
    source = as_feature_source(train)
    qs, ws = _check_queries(source.checkpoints, source.width, queries, weights)
    m = qs[0].shape[0]
    if out is None:
        out = torch.empty(m, source.n, dtype=qs[0].dtype)
    elif tuple(out.shape) != (m, source.n):
        raise ConfigurationError(f"out must have shape {(m, source.n)}, got {tuple(out.shape)}")
    for start, block in _scored_blocks(source, qs, ws, normalize, _block_rows(source, m, rows)):
        out[:, start : start + block.shape[1]] = block
    return out


class RunningTopK:
    """The ``k`` largest and ``k`` smallest values per row over column blocks seen so far."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.top: tuple[Tensor, Tensor] | None = None  # (values, indices), largest first
        self.bottom: tuple[Tensor, Tensor] | None = None  # smallest first

    def _merge(
        self, kept: tuple[Tensor, Tensor] | None, block: Tensor, idx: Tensor, largest: bool
    ) -> tuple[Tensor, Tensor]:
        if kept is None:
            values, indices = block, idx.expand(block.shape[0], -1)
        else:
            values = torch.cat([kept[0], block], dim=1)
            indices = torch.cat([kept[1], idx.expand(block.shape[0], -1)], dim=1)
        best = torch.topk(values, min(self.k, values.shape[1]), dim=1, largest=largest)
        return best.values, torch.gather(indices, 1, best.indices)

    def update(self, start: int, block: Tensor) -> None:
        """Merge the scores of columns ``start .. start + block.shape[1]`` (``[m, B]``)."""
        block = block.cpu()
        idx = torch.arange(start, start + block.shape[1])[None, :]
        self.top = self._merge(self.top, block, idx, largest=True)
        self.bottom = self._merge(self.bottom, block, idx, largest=False)

    def result(self) -> TopK:
        if self.top is None or self.bottom is None:
            raise ConfigurationError("no training rows were scored")
        return TopK(
            proponents=Ranking(self.top[1].contiguous(), self.top[0].contiguous()),
            opponents=Ranking(self.bottom[1].contiguous(), self.bottom[0].contiguous()),
        )


def exact_top_k(
    train: TrainFeatures,
    queries: Tensor | Sequence[Tensor],
    weights: Sequence[float],
    k: int,
    *,
    normalize: bool = False,
    rows: int | None = None,
) -> TopK:
    """Exact top-k proponents and opponents per query, streaming over the training rows.

    Equals ``torch.topk`` of the dense ``[m, n]`` score matrix (see the module docstring)
    without ever forming it: memory ``O(m × (k + rows))`` plus one block of training rows.

    Args: as :func:`iter_scores`, and ``k`` (``1 <= k <= n``).

    Returns:
        :class:`~traintrace.retrieval.topk.TopK`: ``[m, k]`` indices and scores, proponents
        largest first, opponents most negative first.
    """
    source = as_feature_source(train)
    check_k(k, source.n)
    qs, ws = _check_queries(source.checkpoints, source.width, queries, weights)
    running = RunningTopK(k)
    for start, block in _scored_blocks(
        source, qs, ws, normalize, _block_rows(source, qs[0].shape[0], rows)
    ):
        running.update(start, block)
    return running.result()
