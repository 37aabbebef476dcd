"""Clustering by gradient direction recovers planted clusters.

Expected values: the planted cluster of each example (adjusted Rand index 1), and cosine
similarities computed directly with ``torch.nn.functional.cosine_similarity``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from traintrace.applications.clustering import cluster, unit_features
from traintrace.exceptions import ConfigurationError
from traintrace.features.store import FeatureStore


def planted(n: int = 240, width: int = 20, clusters: int = 4, seed: int = 0):
    """Gradients along a few directions, with magnitudes spanning three orders and some noise."""
    g = torch.Generator().manual_seed(seed)
    directions = F.normalize(torch.randn(clusters, width, generator=g), dim=1)
    labels = torch.arange(n) % clusters
    magnitude = 10 ** (3 * torch.rand(n, 1, generator=g))
    noise = 0.1 * torch.randn(n, width, generator=g)
    return (directions[labels] + noise) * magnitude, labels


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_planted_clusters_are_recovered(method) -> None:
    features, labels = planted()
    result = cluster(features, 4, method=method)
    assert adjusted_rand_score(labels, result.labels) == pytest.approx(1.0)
    assert result.labels.shape == (240,) and result.labels.dtype == torch.int64
    assert result.sizes.tolist() == [60] * 4
    if method == "kmeans":
        assert result.centers is not None
        torch.testing.assert_close(result.centers.norm(dim=1), torch.ones(4))
    else:
        assert result.centers is None


def test_normalization_is_what_recovers_them() -> None:
    """Raw k-means groups by gradient size instead (so the test above can fail)."""
    features, labels = planted()
    raw = KMeans(4, n_init=10, random_state=0).fit_predict(features.numpy())
    assert adjusted_rand_score(labels, raw) < 0.5


def test_checkpoints_combine_as_weighted_cosine(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    per_checkpoint = [torch.randn(30, 8, generator=g) * (c + 1) for c in range(3)]
    weights = [0.5, 0.2, 1.3]
    x = unit_features(per_checkpoint, weights)
    expected = sum(
        w * F.cosine_similarity(f[:, None], f[None], dim=2)
        for w, f in zip(weights, per_checkpoint, strict=True)
    ) / sum(weights)
    torch.testing.assert_close(x @ x.T, expected, atol=1e-5, rtol=1e-5)

    store = FeatureStore.open(tmp_path / "s", {}, n=30, width=8, checkpoints=3, chunk_size=7)
    for c, f in enumerate(per_checkpoint):
        for i, (start, stop) in enumerate(store.chunks()):
            store.write_chunk(c, i, f[start:stop])
    torch.testing.assert_close(unit_features(store, weights), x)
    estimator = SimpleNamespace(train_features_=per_checkpoint, lrs=weights)
    torch.testing.assert_close(unit_features(estimator), x)
    with pytest.raises(ConfigurationError, match="weights"):
        unit_features(per_checkpoint)


def test_clusters_from_a_store_of_several_checkpoints(tmp_path: Path) -> None:
    a, labels = planted(seed=2)
    b, _ = planted(seed=2)
    b = b + 0.05 * b.norm(dim=1, keepdim=True) * torch.randn_like(b)
    store = FeatureStore.open(tmp_path / "s", {}, n=240, width=20, checkpoints=2, chunk_size=50)
    for c, f in enumerate([a, b]):
        for i, (start, stop) in enumerate(store.chunks()):
            store.write_chunk(c, i, f[start:stop])
    result = cluster(store, 4, weights=[0.1, 0.05])
    assert adjusted_rand_score(labels, result.labels) == pytest.approx(1.0)
    with pytest.raises(ConfigurationError, match="n_clusters"):
        cluster(a, 241)
    with pytest.raises(ConfigurationError, match="method"):
        cluster(a, 2, method="dbscan")


def test_cluster_accepts_a_fitted_tracin():
    from torch import nn
    from torch.utils.data import TensorDataset

    import traintrace as tt

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    ckpts = [tt.Checkpoint(model.state_dict(), lr=0.1), tt.Checkpoint(model.state_dict(), lr=0.2)]
    streaming = tt.TracIn(model, tt.Classification(), ckpts, progress=False)
    with pytest.raises(tt.ConfigurationError, match="projection"):
        tt.cluster(streaming.fit(TensorDataset(x, y)), n_clusters=3)
    est = tt.TracIn(model, tt.Classification(), ckpts, projection=12, progress=False)
    est.fit(TensorDataset(x, y))
    result = tt.cluster(est, n_clusters=3)
    assert result.labels.shape == (30,)
    direct = tt.cluster(est.store_, n_clusters=3, weights=est.lrs)
    assert torch.equal(torch.as_tensor(result.labels), torch.as_tensor(direct.labels))
