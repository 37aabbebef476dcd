"""Clustering training examples by the direction of their gradients (TracIn, Pruthi et al. 2020).

Two examples whose loss gradients point the same way are pushed the same way by training, so
gradient *directions* group examples by what they teach the model. Features are unit-normalized
(so a large gradient does not dominate) and compared by cosine distance ``1 − cos``.

With several checkpoints, the features are concatenated as ``√w_c · F_c / ‖F_c‖`` and the
result divided by ``√(Σ_c w_c)``; the cosine of two such unit vectors is exactly
``Σ_c w_c cos_c / Σ_c w_c`` — the (weight-averaged) GAS / cosine-TracIn similarity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from traintrace.exceptions import ConfigurationError
from traintrace.features.store import FeatureStore

__all__ = ["ClusterResult", "cluster", "unit_features"]

_EPS = 1e-30


@dataclass(frozen=True)
class ClusterResult:
    """Cluster assignment of the training examples.

    Attributes:
        labels: ``[n]`` int64 cluster of every training example, in ``[0, n_clusters)``.
        centers: ``[n_clusters, d]`` unit-vector centers (``"kmeans"``); ``None`` for
            ``"agglomerative"``, which has none.
        sizes: ``[n_clusters]`` number of examples per cluster.
        method: the algorithm used.
    """

    labels: Tensor
    centers: Tensor | None
    sizes: Tensor
    method: str


def _weights(weights: Sequence[float] | None, checkpoints: int) -> list[float]:
    if weights is None:
        if checkpoints > 1:
            raise ConfigurationError(
                f"features from {checkpoints} checkpoints need their weights (learning rates) "
                "to be combined: pass weights=[w_0, ...]"
            )
        return [1.0]
    weights = [float(w) for w in weights]
    if len(weights) != checkpoints:
        raise ConfigurationError(f"{len(weights)} weights for {checkpoints} checkpoints")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigurationError(f"weights must be >= 0 and not all zero, got {weights}")
    return weights


def _combine(blocks: Sequence[Tensor], weights: list[float]) -> Tensor:
    total = math.sqrt(sum(weights))
    parts = [
        b.to(torch.float32) * (math.sqrt(w) / total) / b.norm(dim=1, keepdim=True).clamp_min(_EPS)
        for b, w in zip(blocks, weights, strict=True)
    ]
    return torch.cat(parts, dim=1)


def unit_features(
    features: Tensor | Sequence[Tensor] | FeatureStore | Any,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Unit-norm rows ``[n, d]`` whose inner products are the (weighted) cosine similarities.

    Args:
        features: ``[n, d]`` tensor; one ``[n, width]`` tensor per checkpoint; a complete
            :class:`FeatureStore`; or a fitted estimator with a store (``store_``, e.g.
            :class:`~traintrace.TracIn`) or ``train_features_`` (a list per checkpoint), whose
            ``lrs`` are the default weights.
        weights: ``w_c >= 0`` per checkpoint (needed for more than one checkpoint).

    All rows are held in memory (``4 n d`` bytes). Rows with zero norm stay zero.
    """
    if getattr(features, "streaming", False):
        raise ConfigurationError(
            f"this {type(features).__name__} streams exact scores and keeps no training features "
            "to cluster; fit one with a projection (projection=4096) or a store= path, whose "
            "features are kept on disk"
        )
    if hasattr(features, "store_") or hasattr(features, "train_features_"):
        if weights is None:
            weights = getattr(features, "lrs", None)
        source = getattr(features, "store_", None)
        return unit_features(features.train_features_ if source is None else source, weights)
    if isinstance(features, Tensor):
        if features.ndim != 2:
            raise ConfigurationError(f"features must be [n, d], got {tuple(features.shape)}")
        return _combine([features], _weights(weights, 1) if weights is not None else [1.0])
    if isinstance(features, FeatureStore):
        features.require_complete()
        ws = _weights(weights, features.checkpoints)
        out = torch.empty(features.n, features.checkpoints * features.width)
        for start, stop in features.chunks():
            out[start:stop] = _combine(
                [features.read(c, start, stop) for c in range(features.checkpoints)], ws
            )
        return out
    if isinstance(features, Sequence) and features and all(isinstance(f, Tensor) for f in features):
        shapes = {tuple(f.shape) for f in features}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigurationError(
                f"per-checkpoint features must share one [n, width] shape, got {sorted(shapes)}"
            )
        return _combine(list(features), _weights(weights, len(features)))
    raise ConfigurationError(
        "features must be an [n, d] tensor, a list of per-checkpoint [n, width] tensors, a "
        f"FeatureStore or a fitted estimator with store_ or train_features_; got "
        f"{type(features).__name__}"
    )


def cluster(
    features: Tensor | Sequence[Tensor] | FeatureStore | Any,
    n_clusters: int,
    *,
    method: Literal["kmeans", "agglomerative"] = "kmeans",
    weights: Sequence[float] | None = None,
    seed: int = 0,
) -> ClusterResult:
    """Cluster training examples by cosine similarity of their gradient features.

    Args:
        features: see :func:`unit_features` (tensor, per-checkpoint list, store, estimator).
        n_clusters: number of clusters, ``1 <= n_clusters <= n``.
        method: ``"kmeans"`` — scikit-learn k-means on the unit vectors. For unit vectors
            ``‖a − b‖² = 2 (1 − cos(a, b))``, so assignments are by cosine; centers are means
            (not re-normalized during the iterations, unlike exact spherical k-means — an
            approximation that rarely changes assignments) and are returned unit-normalized.
            Cost ``O(n × d × n_clusters)`` per iteration, 10 restarts. ``"agglomerative"`` —
            average linkage on cosine distance ``1 − cos`` (scikit-learn); deterministic, but
            needs the ``n × n`` distance matrix (``8 n²`` bytes): small ``n`` only.
        weights: per-checkpoint weights (default: the estimator's ``lrs``).
        seed: k-means initialisation seed.
    """
    if method not in ("kmeans", "agglomerative"):
        raise ConfigurationError(f"method must be 'kmeans' or 'agglomerative', got {method!r}")
    x = unit_features(features, weights)
    n = x.shape[0]
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or not 1 <= n_clusters <= n:
        raise ConfigurationError(f"n_clusters must be an integer in [1, n={n}], got {n_clusters!r}")
    data = x.numpy().astype(np.float64)
    centers: Tensor | None = None
    if method == "kmeans":
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(data)
        labels = model.labels_
        centers = torch.from_numpy(np.asarray(model.cluster_centers_, dtype=np.float32))
        centers = centers / centers.norm(dim=1, keepdim=True).clamp_min(_EPS)
    else:
        from sklearn.cluster import AgglomerativeClustering

        labels = AgglomerativeClustering(
            n_clusters=n_clusters, metric="cosine", linkage="average"
        ).fit_predict(data)
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return ClusterResult(
        labels=labels_t,
        centers=centers,
        sizes=torch.bincount(labels_t, minlength=n_clusters),
        method=method,
    )
