"""FAISS inner-product index over stored features, and :func:`top_k` (exact unless FAISS is asked for).

**One inner product = the whole TracIn sum.** Each training example ``i`` is indexed as the
concatenation over checkpoints ``x_i = [√w_0 F_0[i], …, √w_{C−1} F_{C−1}[i]]`` and each query
as ``y = [√w_0 Q_0, …]``, so ``⟨y, x_i⟩ = Σ_c w_c ⟨Q_c, F_c[i]⟩`` exactly. This needs
``w_c >= 0`` (learning rates are); a negative weight is refused — use the exact search.

**Cosine (GAS) variant** (``normalize=True``): every block is unit-normalized *per checkpoint*,
``x_i = [√w_c F_c[i] / ‖F_c[i]‖]_c`` (likewise the query), so ``⟨y, x_i⟩ = Σ_c w_c cos_c``
exactly — the same score as :func:`~traintrace.retrieval.exact.exact_top_k` with
``normalize=True``; it is *not* the cosine of the concatenated vectors.

**Opponents** are found by searching with the negated query (the largest ``⟨−y, x⟩`` are the
most negative scores).

Index kinds (``d = C × width`` dimensions, ``n`` training examples):

- ``"flat"`` — ``IndexFlatIP``: exact, a brute-force scan (same cost as the exact streaming
  search, but everything in RAM: ``4 n d`` bytes).
- ``"ivf"`` — ``IndexIVFFlat`` (inner-product metric): k-means into ``nlist`` lists (default
  ``≈ 4√n``, at most ``n / 39``), trained on ``train_rows`` sampled rows (default
  ``min(n, 64 × nlist)``); a search scans the ``nprobe`` lists nearest the query (default
  ``max(1, nlist // 8)``), about ``nprobe / nlist`` of the flat cost. Higher ``nprobe`` =
  higher recall. Holds ``4 n d`` bytes.
- ``"hnsw"`` — ``IndexHNSWFlat`` (inner-product metric): graph with ``hnsw_m`` links per node
  (default 32), ``ef_construction`` (default 80) when adding, ``ef_search`` (default
  ``max(256, 4k)``) when searching. No training; slower to build, fast to search. Holds about
  ``4 n d + 8 n hnsw_m`` bytes. Opponents are its weak side: the most negative inner products
  lie on the far rim of the data, which greedy graph search reaches less reliably (raise
  ``ef_search`` / ``hnsw_m`` if opponents matter).

Approximate kinds trade recall for speed: measure recall@k against the exact search on a sample
of your queries (``top_k(..., method="faiss", verify_recall=32)``; the tests require ≥ 0.9
recall@10 on clustered data with the defaults). :func:`top_k` never picks an index on its own.
``faiss`` is an optional dependency (``pip install faiss-cpu``), imported only when used.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from traintrace.exceptions import (
    ConfigurationError,
    StoreCorruptError,
    StoreMismatchError,
    TraintraceError,
)
from traintrace.features.store import FeatureStore, file_checksum
from traintrace.retrieval.exact import (
    FeatureSource,
    TrainFeatures,
    _block_rows,
    _check_queries,
    as_feature_source,
    exact_top_k,
)
from traintrace.retrieval.topk import Ranking, TopK, check_k

__all__ = [
    "ApproximateSearchWarning",
    "ApproximateTopK",
    "FaissIndex",
    "IndexKind",
    "top_k",
]

_LOG = logging.getLogger(__name__)

IndexKind = Literal["flat", "ivf", "hnsw"]
_KINDS = ("flat", "ivf", "hnsw")
_EPS = 1e-30


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "the FAISS index needs the optional dependency faiss: pip install faiss-cpu "
            "(or pip install 'traintrace[faiss]'); or use method='exact'"
        ) from None
    return faiss


def _check_weights(weights: Sequence[float]) -> list[float]:
    weights = [float(w) for w in weights]
    negative = [(c, w) for c, w in enumerate(weights) if not w >= 0]
    if negative:
        raise ConfigurationError(
            f"the FAISS index concatenates √w_c · F_c, so weights must be >= 0; got "
            f"{', '.join(f'w_{c}={w}' for c, w in negative)}. Use method='exact' for other weights."
        )
    return weights


def _concat(
    blocks: Sequence[Tensor], norms: Sequence[Tensor] | None, weights: list[float]
) -> np.ndarray:
    """``[√w_c F_c (/ ‖F_c‖)]_c`` as a C-contiguous float32 array ``[rows, C × width]``."""
    parts = []
    for c, (block, w) in enumerate(zip(blocks, weights, strict=True)):
        scale = torch.full((block.shape[0], 1), math.sqrt(w), dtype=torch.float32)
        if norms is not None:
            scale = scale / norms[c].to(torch.float32).clamp_min(_EPS)[:, None]
        parts.append(block.to(torch.float32) * scale)
    return np.ascontiguousarray(torch.cat(parts, dim=1).numpy(), dtype=np.float32)


def _store_fingerprint(store: FeatureStore) -> str:
    """Changes with the store's metadata and with any chunk's checksums (its contents)."""
    return store.content_fingerprint()


class FaissIndex:
    """A FAISS inner-product index whose scores are the (weighted, optionally cosine) TracIn sum.

    Build with :meth:`build`, query with :meth:`search`, keep with :meth:`save` /
    :meth:`load`. See the module docstring for the construction and the index kinds.

    Attributes:
        kind, normalize, weights: how the index was built.
        n, width, checkpoints: shape of the indexed training features.
        params: the FAISS parameters used (``nlist``, ``nprobe``, ``hnsw_m``, ...).
    """

    def __init__(
        self,
        index: Any,
        *,
        kind: str,
        normalize: bool,
        weights: list[float],
        n: int,
        width: int,
        checkpoints: int,
        params: dict[str, Any],
        store_fingerprint: str | None,
    ) -> None:
        """Use :meth:`build` or :meth:`load`."""
        self.index = index
        self.kind = kind
        self.normalize = normalize
        self.weights = weights
        self.n = n
        self.width = width
        self.checkpoints = checkpoints
        self.params = params
        self.store_fingerprint = store_fingerprint

    def __repr__(self) -> str:
        return (
            f"FaissIndex(kind={self.kind!r}, n={self.n}, dim={self.checkpoints}×{self.width}, "
            f"normalize={self.normalize}, params={self.params})"
        )

    @classmethod
    def build(
        cls,
        train: TrainFeatures,
        weights: Sequence[float],
        *,
        normalize: bool = False,
        kind: IndexKind = "flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        train_rows: int | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int | None = None,
        seed: int = 0,
        rows: int | None = None,
    ) -> FaissIndex:
        """Index the training features, adding them block by block from the store.

        Args:
            train: a complete :class:`FeatureStore` or one ``[n, width]`` tensor per checkpoint.
            weights: ``w_c >= 0`` per checkpoint.
            normalize: cosine variant (per-checkpoint unit vectors, see the module docstring).
            kind: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate).
            nlist, nprobe, train_rows: IVF parameters (defaults in the module docstring).
            hnsw_m, ef_construction, ef_search: HNSW parameters.
            seed: seeds the IVF training sample and k-means.
            rows: training rows per block read from the store.
        """
        faiss = _faiss()
        if kind not in _KINDS:
            raise ConfigurationError(f"kind must be one of {_KINDS}, got {kind!r}")
        source = as_feature_source(train)
        weights = _check_weights(weights)
        if len(weights) != source.checkpoints:
            raise ConfigurationError(
                f"{len(weights)} weights for {source.checkpoints} checkpoints of training features"
            )
        n, dim = source.n, source.checkpoints * source.width
        params: dict[str, Any] = {}
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
            if not 1 <= nlist <= n:
                raise ConfigurationError(f"nlist must be in [1, n={n}], got {nlist}")
            nprobe = nprobe or max(1, nlist // 8)
            if not 1 <= nprobe <= nlist:
                raise ConfigurationError(f"nprobe must be in [1, nlist={nlist}], got {nprobe}")
            train_rows = min(n, train_rows or 64 * nlist)
            if train_rows < nlist:
                raise ConfigurationError(
                    f"train_rows={train_rows} is below nlist={nlist}: k-means needs at least one "
                    "row per list"
                )
            index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.extract_index_ivf(index)
            ivf.cp.seed = seed
            ivf.nprobe = nprobe
            index.train(cls._sample(source, weights, normalize, train_rows, seed, rows))
            params = {"nlist": nlist, "nprobe": nprobe, "train_rows": train_rows, "seed": seed}
        else:
            if hnsw_m < 2 or ef_construction < 1:
                raise ConfigurationError(
                    f"need hnsw_m >= 2 and ef_construction >= 1, got {hnsw_m}, {ef_construction}"
                )
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            params = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        block_rows = _block_rows(source, 1, rows)
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            index.add(cls._rows(source, weights, normalize, start, stop))
        return cls(
            index,
            kind=kind,
            normalize=normalize,
            weights=weights,
            n=n,
            width=source.width,
            checkpoints=source.checkpoints,
            params=params,
            store_fingerprint=_store_fingerprint(train)
            if isinstance(train, FeatureStore)
            else None,
        )

    @staticmethod
    def _rows(
        source: FeatureSource, weights: list[float], normalize: bool, start: int, stop: int
    ) -> np.ndarray:
        blocks = [source.read(c, start, stop) for c in range(source.checkpoints)]
        norms = (
            [source.norms(c, start, stop) for c in range(source.checkpoints)] if normalize else None
        )
        return _concat(blocks, norms, weights)

    @classmethod
    def _sample(
        cls,
        source: FeatureSource,
        weights: list[float],
        normalize: bool,
        count: int,
        seed: int,
        rows: int | None,
    ) -> np.ndarray:
        """``count`` random training rows (concatenated), read block by block."""
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(source.n, generator=generator)[:count].sort().values
        out = np.empty((count, source.checkpoints * source.width), dtype=np.float32)
        block_rows = _block_rows(source, 1, rows)
        filled = 0
        for start in range(0, source.n, block_rows):
            stop = min(start + block_rows, source.n)
            lo, hi = torch.searchsorted(chosen, torch.tensor([start, stop])).tolist()
            if hi > lo:
                block = cls._rows(source, weights, normalize, start, stop)
                out[filled : filled + hi - lo] = block[(chosen[lo:hi] - start).numpy()]
                filled += hi - lo
        return out

    def search(self, queries: Tensor | Sequence[Tensor], k: int) -> TopK:
        """Top-k proponents (largest scores) and opponents (most negative) per query.

        Args:
            queries: one ``[m, width]`` tensor per checkpoint (as for
                :func:`~traintrace.retrieval.exact.exact_top_k`).
            k: ``1 <= k <= n``.

        Raises:
            TraintraceError: an approximate index found fewer than ``k`` results for a query
                (raise ``nprobe`` / ``ef_search``, or use ``kind="flat"``).
        """
        check_k(k, self.n)
        qs, _ = _check_queries(self.checkpoints, self.width, queries, self.weights)
        norms = [q.norm(dim=1) for q in qs] if self.normalize else None
        y = _concat(qs, norms, self.weights)
        if self.kind == "hnsw":
            ef = self.params.get("ef_search") or max(256, 4 * k)
            self.index.hnsw.efSearch = max(ef, k)
        top = self._search(y, k)
        bottom = self._search(-y, k)
        return TopK(
            proponents=top,
            opponents=Ranking(bottom.indices, -bottom.scores),
        )

    def _search(self, y: np.ndarray, k: int) -> Ranking:
        scores, indices = self.index.search(np.ascontiguousarray(y), k)
        if (indices < 0).any():
            found = int((indices >= 0).sum(axis=1).min())
            raise TraintraceError(
                f"the {self.kind} index returned only {found} of k={k} neighbours for some "
                f"query ({self.params}); raise nprobe (IVF) or ef_search (HNSW), or use "
                "kind='flat'"
            )
        return Ranking(torch.from_numpy(indices.astype(np.int64)), torch.from_numpy(scores))

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def default_path(store: FeatureStore, kind: str, normalize: bool) -> Path:
        """Where :func:`top_k` keeps an index beside ``store``: ``<store>/index-<kind>[-cosine].faiss``."""
        return store.path / f"index-{kind}{'-cosine' if normalize else ''}.faiss"

    def _description(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "normalize": self.normalize,
            "weights": self.weights,
            "n": self.n,
            "width": self.width,
            "checkpoints": self.checkpoints,
            "params": self.params,
            "store_fingerprint": self.store_fingerprint,
        }

    def save(self, path: str | Path) -> Path:
        """Write the index to ``path`` and its description (with a checksum) to ``path`` + ``.json``."""
        faiss = _faiss()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        description = {**self._description(), "checksum": file_checksum(tmp)}
        tmp.replace(path)
        path.with_name(path.name + ".json").write_text(
            json.dumps(description, sort_keys=True, indent=2) + "\n", encoding="utf-8"
        )
        return path

    @classmethod
    def load(cls, path: str | Path, store: FeatureStore | None = None) -> FaissIndex:
        """Read an index written by :meth:`save`; with ``store``, refuse one built from another.

        Raises:
            StoreMismatchError: ``store``'s contents differ from the ones the index was built on.
            StoreCorruptError: the index file does not match the checksum recorded by :meth:`save`.
        """
        faiss = _faiss()
        path = Path(path)
        description = json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))
        expected = description.get("checksum")
        if not isinstance(expected, str):
            raise StoreCorruptError(
                f"{path}.json records no checksum of the index: delete {path} and its .json "
                "(it is rebuilt) or rebuild it with FaissIndex.build"
            )
        found = file_checksum(path, expected.split(":")[0])
        if found != expected:
            raise StoreCorruptError(
                f"the FAISS index {path} does not match its checksum ({found}, recorded "
                f"{expected}): it was damaged. Delete it and its .json (it is rebuilt) or rebuild "
                "it with FaissIndex.build."
            )
        if store is not None:
            found = _store_fingerprint(store)
            if description.get("store_fingerprint") != found:
                raise StoreMismatchError(
                    f"the index {path} was built from a feature store with metadata fingerprint "
                    f"{description.get('store_fingerprint')}, but {store.path} has {found}: the "
                    "store was rewritten since. Delete the index (it is rebuilt) or rebuild it "
                    "with FaissIndex.build."
                )
        return cls(
            faiss.read_index(str(path)),
            kind=description["kind"],
            normalize=description["normalize"],
            weights=[float(w) for w in description["weights"]],
            n=int(description["n"]),
            width=int(description["width"]),
            checkpoints=int(description["checkpoints"]),
            params=description["params"],
            store_fingerprint=description["store_fingerprint"],
        )


class ApproximateSearchWarning(UserWarning):
    """An approximate (FAISS) top-k was used, or its measured recall is below ``min_recall``."""


@dataclass(frozen=True)
class ApproximateTopK(TopK):
    """A :class:`~traintrace.retrieval.topk.TopK` found with a FAISS index.

    Attributes:
        index: a description of the index (kind, size, parameters).
        recall: measured recall@k against the exact search on ``recall_queries`` sampled
            queries, ``{"proponents": r, "opponents": r}`` (``None`` unless ``verify_recall``).
        recall_queries: indices of the queries the recall was measured on.
    """

    index: str = ""
    recall: dict[str, float] | None = None
    recall_queries: Tensor | None = None


def _describe(index: FaissIndex, k: int) -> str:
    """Size and expected recall of ``index`` in words."""
    dim = index.checkpoints * index.width
    size = 4 * index.n * dim + (8 * index.n * index.params.get("hnsw_m", 0))
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    what = f"a FAISS {index.kind!r} index of {index.n:,} × {dim:,} values ({shown} in RAM)"
    if index.kind == "flat":
        return f"{what}: exact (a brute-force scan, recall 1)"
    if index.kind == "ivf":
        p, lists = index.params["nprobe"], index.params["nlist"]
        search = f"nprobe={p} of nlist={lists} lists, ~{p / lists:.0%} of the rows scanned"
    else:
        ef = max(index.params.get("ef_search") or max(256, 4 * k), k)
        search = f"hnsw_m={index.params['hnsw_m']}, ef_search={ef}"
    return (
        f"{what}, approximate ({search}): expected recall@10 >= 0.9 on clustered gradient "
        "features with the defaults (the test suite's data), unknown for yours; pass "
        "verify_recall=<queries> to measure it against the exact search"
    )


def _recall(approximate: Tensor, exact: Tensor) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k found."""
    hits = sum(
        len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact, strict=True)
    )
    return hits / max(exact.numel(), 1)


def top_k(
    train: TrainFeatures,
    queries: Tensor | Sequence[Tensor],
    weights: Sequence[float],
    k: int,
    *,
    normalize: bool = False,
    method: Literal["exact", "faiss", "auto"] = "exact",
    kind: IndexKind = "ivf",
    index: FaissIndex | None = None,
    verify_recall: int | None = None,
    min_recall: float = 0.9,
    seed: int = 0,
) -> TopK:
    """Top-k proponents and opponents of ``S = Σ_c w_c ⟨Q_c, F_c⟩`` (or its cosine variant).

    Scores ``S [m, n]`` (query × train); a positive score means the training example helps
    the query. Proponents: the ``k`` largest per query (largest first); opponents: the ``k``
    smallest (most negative first). Results are ``[m, k]``.

    **Exact unless asked otherwise.** ``method="exact"`` (the default) streams over the
    training features once (cost ``O(m n C width)``, memory flat in ``n``) and is always
    exact. ``"auto"`` is accepted as an alias of ``"exact"`` (it used to switch to an
    approximate index silently above 2^30 values; it no longer does). ``"faiss"`` searches a
    FAISS index of ``kind`` (built beside a :class:`FeatureStore` and reused); an
    approximate kind (``"ivf"``, ``"hnsw"``) can miss true neighbours, so this emits an
    :class:`ApproximateSearchWarning` stating the index size and expected recall, and returns
    an :class:`ApproximateTopK`.

    Args:
        train, queries, weights, normalize: as :func:`~traintrace.retrieval.exact.exact_top_k`.
        k: neighbours per query (``1 <= k <= n``).
        method: ``"exact"`` (default), ``"faiss"``, or ``"auto"`` (= ``"exact"``).
        kind: the index for ``method="faiss"`` (default ``"ivf"``).
        index: a prebuilt :class:`FaissIndex` to use (implies ``method="faiss"``; it must
            match ``weights``/``normalize``).
        verify_recall: with FAISS, measure recall@k against the exact search on this many
            queries (sampled with ``seed``; costs one exact pass over the training features
            for them) and attach it as ``.recall``; below ``min_recall`` a warning says so.
        min_recall: the recall below which ``verify_recall`` warns.
        seed: seeds the sample of queries for ``verify_recall``.

    Raises:
        ConfigurationError: an unknown ``method``, a bad ``verify_recall`` / ``min_recall``,
            or an ``index`` built for other weights.
    """
    if method not in ("auto", "exact", "faiss"):
        raise ConfigurationError(
            f"method must be 'exact' (the default), 'faiss' (an approximate index, opt-in) or "
            f"'auto' (an alias of 'exact'), got {method!r}"
        )
    if verify_recall is not None and (
        isinstance(verify_recall, bool) or not isinstance(verify_recall, int) or verify_recall < 1
    ):
        raise ConfigurationError(
            f"verify_recall must be a number of queries >= 1 (or None), got {verify_recall!r}"
        )
    if not 0.0 <= float(min_recall) <= 1.0:
        raise ConfigurationError(f"min_recall must be in [0, 1], got {min_recall!r}")
    weights = [float(w) for w in weights]
    if index is not None:
        if index.weights != weights or index.normalize != normalize:
            raise ConfigurationError(
                f"the given index was built with weights={index.weights}, "
                f"normalize={index.normalize}; this call asks for weights={weights}, "
                f"normalize={normalize}. Rebuild the index or change the call."
            )
    elif method != "faiss":
        return exact_top_k(train, queries, weights, k, normalize=normalize)
    else:
        index = _cached_index(train, weights, normalize, kind)
    description = _describe(index, k)
    _LOG.info("top_k: %s", description)
    if index.kind != "flat":
        warnings.warn(f"approximate top-k: {description}", ApproximateSearchWarning, stacklevel=2)
    found = index.search(queries, k)
    recall, sample = None, None
    if verify_recall is not None:
        qs, _ = _check_queries(index.checkpoints, index.width, queries, weights)
        m = qs[0].shape[0]
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randperm(m, generator=generator)[: min(verify_recall, m)].sort().values
        exact = exact_top_k(train, [q[sample] for q in qs], weights, k, normalize=normalize)
        recall = {
            "proponents": _recall(found.proponents.indices[sample], exact.proponents.indices),
            "opponents": _recall(found.opponents.indices[sample], exact.opponents.indices),
        }
        if min(recall.values()) < min_recall:
            warnings.warn(
                f"measured recall@{k} of the {index.kind!r} index on {len(sample)} queries: "
                f"proponents {recall['proponents']:.3f}, opponents {recall['opponents']:.3f}, "
                f"below min_recall={min_recall}. Use method='exact', kind='flat', or raise "
                "nprobe (IVF) / ef_search (HNSW) with FaissIndex.build.",
                ApproximateSearchWarning,
                stacklevel=2,
            )
    return ApproximateTopK(
        proponents=found.proponents,
        opponents=found.opponents,
        index=description,
        recall=recall,
        recall_queries=sample,
    )


def _cached_index(
    train: TrainFeatures, weights: list[float], normalize: bool, kind: IndexKind
) -> FaissIndex:
    if not isinstance(train, FeatureStore):
        return FaissIndex.build(train, weights, normalize=normalize, kind=kind)
    path = FaissIndex.default_path(train, kind, normalize)
    if path.exists():
        try:
            cached = FaissIndex.load(path, train)
        except (StoreMismatchError, OSError, ValueError, KeyError, RuntimeError):
            cached = None  # stale or damaged: rebuilt below
        if cached is not None and cached.weights == weights:
            return cached
    built = FaissIndex.build(train, weights, normalize=normalize, kind=kind)
    built.save(path)
    return built
