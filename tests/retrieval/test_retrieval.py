"""Exact streaming top-k and the FAISS index against the dense score matrix.

Expected values: ``S = Σ_c w_c Q_c F_cᵀ`` (or with rows unit-normalized per checkpoint) formed
densely with ``@``, and its ``torch.topk``. Data are random Gaussians, so ties do not occur.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from traintrace.exceptions import (
    ConfigurationError,
    NonFiniteGradientError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
)
from traintrace.features import store as store_module
from traintrace.features.store import FeatureStore
from traintrace.retrieval import exact as exact_module
from traintrace.retrieval.exact import _block_rows, exact_top_k, iter_scores, score
from traintrace.retrieval.faiss_index import (
    ApproximateSearchWarning,
    ApproximateTopK,
    FaissIndex,
    top_k,
)
from traintrace.retrieval.topk import TopK

# faiss is an optional dependency (installed by the dev extra); the exact search needs none
needs_faiss = pytest.mark.skipif(
    importlib.util.find_spec("faiss") is None, reason="faiss not installed (pip install faiss-cpu)"
)

WEIGHTS = [0.5, 2.0, 0.1]


def dense(features: list[torch.Tensor], queries: list[torch.Tensor], weights, normalize=False):
    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True) if normalize else x

    return sum(w * unit(q) @ unit(f).T for w, q, f in zip(weights, queries, features, strict=True))


def make_store(path: Path, features: list[torch.Tensor], dtype: str = "float32") -> FeatureStore:
    n, width = features[0].shape
    store = FeatureStore.open(
        path, {"test": 1}, n=n, width=width, checkpoints=len(features), chunk_size=64, dtype=dtype
    )
    for c, f in enumerate(features):
        for i, (start, stop) in enumerate(store.chunks()):
            store.write_chunk(c, i, f[start:stop])
    return store


def clustered(n: int, width: int, checkpoints: int, seed: int = 0) -> list[torch.Tensor]:
    """Gradient-like features: a few dozen directions, per-example noise and scale."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(40, width, generator=g) * 3
    label = torch.randint(0, 40, (n,), generator=g)
    return [centers[label] + torch.randn(n, width, generator=g) for _ in range(checkpoints)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[FeatureStore, list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(300, 16, generator=g) * (1 + c) for c in range(3)]
    queries = [torch.randn(9, 16, generator=g) for _ in range(3)]
    return make_store(tmp_path_factory.mktemp("r") / "s", features), features, queries


def assert_topk_equal(got: TopK, expected_scores: torch.Tensor, k: int, atol: float = 1e-4):
    top = torch.topk(expected_scores, k, dim=1)
    bottom = torch.topk(expected_scores, k, dim=1, largest=False)
    assert torch.equal(got.proponents.indices, top.indices)
    assert torch.equal(got.opponents.indices, bottom.indices)
    torch.testing.assert_close(got.proponents.scores, top.values, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got.opponents.scores, bottom.values, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rows", [None, 7, 1000])
def test_exact_streaming_equals_dense_topk(data, normalize, rows) -> None:
    store, features, queries = data
    weights = [0.5, -2.0, 0.1]  # the exact search takes any sign
    expected = dense(features, queries, weights, normalize)
    got = exact_top_k(store, queries, weights, 5, normalize=normalize, rows=rows)
    assert got.proponents.indices.shape == (9, 5)
    assert_topk_equal(got, expected, 5)
    in_memory = exact_top_k(features, torch.stack(queries), weights, 5, normalize=normalize)
    assert torch.equal(in_memory.proponents.indices, got.proponents.indices)
    torch.testing.assert_close(score(store, queries, weights, normalize=normalize), expected)


def test_streaming_scores_and_checks(data) -> None:
    store, features, queries = data
    expected = dense(features, queries, WEIGHTS)
    out = torch.full((9, 300), float("nan"))
    score(store, queries, WEIGHTS, out=out, rows=50)
    torch.testing.assert_close(out, expected)
    starts = [start for start, _ in iter_scores(store, queries, WEIGHTS, rows=128)]
    assert starts == [0, 128, 256]
    k_all = exact_top_k(store, queries, WEIGHTS, 300, rows=11)  # k = n: a full sort
    assert torch.equal(k_all.proponents.indices, expected.argsort(dim=1, descending=True))
    with pytest.raises(ConfigurationError, match="larger than the training set"):
        exact_top_k(store, queries, WEIGHTS, 301)
    with pytest.raises(ConfigurationError, match="3 checkpoints but 2 query"):
        exact_top_k(store, queries[:2], WEIGHTS, 3)
    with pytest.raises(ConfigurationError, match=r"\[m, 16\]"):
        exact_top_k(store, [q[:, :4] for q in queries], WEIGHTS, 3)


def test_float16_store_and_incomplete_store(tmp_path: Path, data) -> None:
    _, features, queries = data
    half = make_store(tmp_path / "h", features, dtype="float16")
    stored = [f.half().float() for f in features]
    assert_topk_equal(exact_top_k(half, queries, WEIGHTS, 4), dense(stored, queries, WEIGHTS), 4)
    partial = FeatureStore.open(tmp_path / "p", {}, n=300, width=16, checkpoints=3, chunk_size=64)
    partial.write_chunk(0, 0, features[0][:64])
    with pytest.raises(StoreIncompleteError, match="resume"):
        exact_top_k(partial, queries, WEIGHTS, 3)
    if importlib.util.find_spec("faiss") is not None:
        with pytest.raises(StoreIncompleteError):
            FaissIndex.build(partial, WEIGHTS)


@needs_faiss
@pytest.mark.parametrize("normalize", [False, True])
def test_faiss_flat_equals_exact(data, normalize) -> None:
    store, _features, queries = data
    exact = exact_top_k(store, queries, WEIGHTS, 6, normalize=normalize)
    index = FaissIndex.build(store, WEIGHTS, normalize=normalize, kind="flat", rows=50)
    got = index.search(queries, 6)
    assert torch.equal(got.proponents.indices, exact.proponents.indices)
    assert torch.equal(got.opponents.indices, exact.opponents.indices)
    torch.testing.assert_close(got.proponents.scores, exact.proponents.scores, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got.opponents.scores, exact.opponents.scores, atol=1e-4, rtol=1e-5)


@needs_faiss
def test_faiss_refuses_negative_weights(data) -> None:
    store, _, _ = data
    with pytest.raises(ConfigurationError, match=r"w_1=-2\.0"):
        FaissIndex.build(store, [0.5, -2.0, 0.1])


def recall(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(
        len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approximate, exact, strict=True)
    )
    return hits / exact.numel()


@needs_faiss
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
@pytest.mark.parametrize("normalize", [False, True])
def test_approximate_recall(tmp_path_factory, kind, normalize) -> None:
    """recall@10 >= 0.9 for proponents and opponents with the default parameters."""
    both = clustered(4020, 32, 2)  # the last 20 examples are the queries
    features, queries = [f[:4000] for f in both], [f[4000:] for f in both]
    weights = [0.3, 0.7]
    exact = exact_top_k(features, queries, weights, 10, normalize=normalize)
    got = FaissIndex.build(features, weights, kind=kind, normalize=normalize).search(queries, 10)
    assert recall(got.proponents.indices, exact.proponents.indices) >= 0.9
    assert recall(got.opponents.indices, exact.opponents.indices) >= 0.9


@needs_faiss
def test_save_load_and_cached_index(tmp_path: Path, data) -> None:
    store, _features, queries = data
    index = FaissIndex.build(store, WEIGHTS, kind="flat")
    path = index.save(tmp_path / "flat.faiss")
    loaded = FaissIndex.load(path, store)
    assert torch.equal(
        loaded.search(queries, 3).proponents.indices, index.search(queries, 3).proponents.indices
    )
    other = FeatureStore.open(
        tmp_path / "other", {"test": 2}, n=300, width=16, checkpoints=3, chunk_size=64
    )
    with pytest.raises(StoreMismatchError, match="fingerprint"):
        FaissIndex.load(path, other)

    exact = exact_top_k(store, queries, WEIGHTS, 4)
    flat = top_k(store, queries, WEIGHTS, 4, method="faiss", kind="flat")  # index built, saved
    assert isinstance(flat, ApproximateTopK) and "exact" in flat.index
    assert torch.equal(flat.proponents.indices, exact.proponents.indices)
    saved = FaissIndex.default_path(store, "flat", False)
    stamp = saved.stat().st_mtime_ns
    top_k(store, queries, WEIGHTS, 4, method="faiss", kind="flat")
    assert saved.stat().st_mtime_ns == stamp  # reused, not rebuilt
    with pytest.raises(ConfigurationError, match="normalize=False"):
        top_k(store, queries, WEIGHTS, 4, normalize=True, index=index)
    # a damaged index file is refused by load, and rebuilt by top_k
    raw = bytearray(saved.read_bytes())
    raw[-200:-100] = bytes(100)
    saved.write_bytes(bytes(raw))
    with pytest.raises(StoreCorruptError, match=r"index-flat\.faiss does not match its checksum"):
        FaissIndex.load(saved, store)
    again = top_k(store, queries, WEIGHTS, 4, method="faiss", kind="flat")
    assert torch.equal(again.proponents.indices, exact.proponents.indices)
    assert FaissIndex.load(saved, store).n == 300


@needs_faiss
@pytest.mark.parametrize("method", ["exact", "auto", None])
def test_top_k_is_exact_unless_faiss_is_asked_for(tmp_path: Path, method, recwarn) -> None:
    """ "auto" (an alias of "exact") and the default never build an index, whatever the size."""
    both = clustered(1020, 8, 2)
    store = make_store(tmp_path / "s", [f[:1000] for f in both])
    queries = [f[1000:] for f in both]
    weights = [0.3, 0.7]
    expected = dense([f[:1000] for f in both], queries, weights)
    got = top_k(store, queries, weights, 7, **({} if method is None else {"method": method}))
    assert type(got) is TopK
    assert_topk_equal(got, expected, 7)
    assert not list(store.path.glob("index-*")) and len(recwarn) == 0
    with pytest.raises(ConfigurationError, match="'exact' \\(the default\\)"):
        top_k(store, queries, weights, 7, method="approximate")


@needs_faiss
def test_faiss_states_size_and_recall_and_verifies_it(tmp_path: Path) -> None:
    both = clustered(4020, 32, 2)
    features, queries = [f[:4000] for f in both], [f[4000:] for f in both]
    weights = [0.3, 0.7]
    exact = exact_top_k(features, queries, weights, 10)
    with pytest.warns(
        ApproximateSearchWarning, match=r"'ivf' index of 4,000 × 64 values \(1\.0 MiB in RAM\)"
    ):
        got = top_k(features, queries, weights, 10, method="faiss", verify_recall=8, seed=3)
    assert isinstance(got, ApproximateTopK) and "expected recall@10" in got.index
    sample = got.recall_queries
    assert sample is not None and len(sample) == 8 and len(set(sample.tolist())) == 8
    assert got.recall is not None
    assert got.recall["proponents"] == recall(
        got.proponents.indices[sample], exact.proponents.indices[sample]
    )
    assert got.recall["opponents"] == recall(
        got.opponents.indices[sample], exact.opponents.indices[sample]
    )
    # a starved IVF index on structureless data: recall measured low, and said so
    noise = [torch.randn(4000, 32, generator=torch.Generator().manual_seed(c)) for c in range(2)]
    poor = FaissIndex.build(noise, weights, kind="ivf", nlist=100, nprobe=1)
    with pytest.warns(ApproximateSearchWarning) as caught:
        low = top_k(noise, queries, weights, 10, index=poor, verify_recall=20)
    assert "nprobe=1 of nlist=100" in str(caught[0].message)
    assert "below min_recall=0.9" in str(caught[-1].message)
    assert low.recall is not None and low.recall["proponents"] < 0.9
    truth = exact_top_k(noise, queries, weights, 10)
    assert low.recall["proponents"] == recall(low.proponents.indices, truth.proponents.indices)
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigurationError, match="verify_recall"):
            top_k(noise, queries, weights, 10, method="faiss", verify_recall=bad)


def test_non_finite_queries_and_overflowing_scores_are_refused(data) -> None:
    store, features, queries = data
    nan = [q.clone() for q in queries]
    nan[1][4, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"checkpoint 1.*query 4"):
        exact_top_k(store, nan, WEIGHTS, 3)
    huge = [f * 1e20 for f in features]  # finite, but the inner products overflow float32
    with pytest.raises(NonFiniteGradientError, match=r"overflow torch\.float32"):
        exact_top_k(huge, [q * 1e20 for q in queries], WEIGHTS, 3)
    with pytest.raises(ConfigurationError, match="finite"):
        exact_top_k(store, queries, [0.5, float("inf"), 0.1], 3)
    # float64 holds them
    got = exact_top_k(
        [f.double() * 1e20 for f in features], [q.double() * 1e20 for q in queries], WEIGHTS, 3
    )
    assert torch.isfinite(got.proponents.scores).all()


def test_default_blocks_are_whole_checksummed_pieces(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "DEFAULT_PIECE_BYTES", 24 * 16 * 4)  # 24-row pieces
    monkeypatch.setattr(exact_module, "BLOCK_VALUES", 100 * 32)  # 100-row blocks of 2 × 16
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(300, 16, generator=g) for _ in range(2)]
    store = make_store(tmp_path / "s", features)
    assert store.piece_rows == 24
    assert _block_rows(store, 5, None) == 96  # 100 rounded down to whole pieces
    assert _block_rows(store, 5, 7) == 7  # asked for: kept (verification reads the rest)
    queries = [torch.randn(5, 16, generator=g) for _ in range(2)]
    assert_topk_equal(
        exact_top_k(store, queries, WEIGHTS[:2], 4), dense(features, queries, WEIGHTS[:2]), 4
    )
    assert_topk_equal(
        exact_top_k(store, queries, WEIGHTS[:2], 4, rows=7),
        dense(features, queries, WEIGHTS[:2]),
        4,
    )


def test_rows_wider_than_a_block_are_read_one_at_a_time(data, monkeypatch) -> None:
    """checkpoints × width above BLOCK_VALUES (e.g. 4 checkpoints of a 1.1M-parameter model)."""
    store, features, queries = data
    monkeypatch.setattr(exact_module, "BLOCK_VALUES", 10)  # < 3 × 16 values per row
    assert _block_rows(store, 9, None) == 1
    expected = dense(features, queries, WEIGHTS)
    torch.testing.assert_close(score(store, queries, WEIGHTS), expected)
    assert_topk_equal(exact_top_k(store, queries, WEIGHTS, 3), expected, 3)


@needs_faiss
def test_blocks_of_queries_merged_stay_approximate_with_their_recall(data) -> None:
    store, _features, queries = data
    blocks = [[q[:3] for q in queries], [q[3:] for q in queries]]
    parts = [
        top_k(store, b, WEIGHTS, 4, method="faiss", kind="flat", verify_recall=2) for b in blocks
    ]
    merged = TopK.concat(parts)
    whole = exact_top_k(store, queries, WEIGHTS, 4)
    assert isinstance(merged, ApproximateTopK) and merged.index == parts[0].index
    assert torch.equal(merged.proponents.indices, whole.proponents.indices)
    assert merged.recall_queries.tolist() == [
        *parts[0].recall_queries.tolist(),
        *(parts[1].recall_queries + 3).tolist(),
    ]
    assert merged.recall == {"proponents": 1.0, "opponents": 1.0}  # a flat index is exact
    exact_parts = [exact_top_k(store, b, WEIGHTS, 4) for b in blocks]
    assert type(TopK.concat(exact_parts)) is TopK  # exact blocks stay exact
