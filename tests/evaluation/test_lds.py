"""LDS against a hand computation, reusable subset measurements, and the sign convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import traintrace as tt
from traintrace.evaluation.lds import SubsetMeasurements, lds, sample_subsets
from traintrace.methods.retraining import Retrainer

# 3 queries, 6 training examples, 4 subsets of 3 examples.
SCORES = np.array(
    [
        [0.5, 0.1, -0.2, 0.3, 0.0, 0.4],
        [-0.1, 0.2, 0.6, -0.3, 0.1, 0.0],
        [0.3, -0.2, 0.1, 0.0, 0.4, -0.5],
    ]
)
SUBSETS = np.array([[0, 1, 2], [3, 4, 5], [0, 3, 5], [1, 2, 4]])
MEASUREMENTS = np.array(  # [subset, query], oriented: lower is better (a loss)
    [
        [2.0, 1.0, 0.9],
        [1.5, 3.0, 0.1],
        [1.0, 2.0, 0.4],
        [2.5, 0.5, 0.7],
    ]
)
# By hand. Subset sums of the scores, per query, subsets S0..S3:
#   q0: 0.4, 0.7, 1.2, -0.1  → predicted loss −sum ranks [3, 2, 1, 4]; measured ranks [3, 2, 1, 4]
#       → ρ = 1
#   q1: 0.7, -0.2, -0.4, 0.9 → ranks [2, 3, 4, 1]; measured [2, 4, 3, 1]; Σd² = 2
#       → ρ = 1 − 6·2 / (4·15) = 0.8
#   q2: 0.2, -0.1, -0.2, 0.3 → ranks [2, 3, 4, 1]; measured [4, 1, 2, 3]; Σd² = 16
#       → ρ = 1 − 6·16 / 60 = −0.6
EXPECTED = np.array([1.0, 0.8, -0.6])


def test_lds_equals_a_hand_computation():
    result = lds(SCORES, subsets=SUBSETS, measurements=MEASUREMENTS)
    np.testing.assert_allclose(result.per_query, EXPECTED, atol=1e-12)
    assert result.score == pytest.approx(0.4)
    # independently with scipy, straight from the definition
    for q in range(3):
        predicted_loss = [-SCORES[q, s].sum() for s in SUBSETS]
        rho = spearmanr(predicted_loss, MEASUREMENTS[:, q]).statistic
        assert result.per_query[q] == pytest.approx(rho)


def test_lds_accepts_masks_tensors_and_one_query():
    masks = np.zeros((4, 6), dtype=bool)
    np.put_along_axis(masks, SUBSETS, True, axis=1)
    by_mask = lds(
        torch.tensor(SCORES, dtype=torch.float32), subsets=masks, measurements=MEASUREMENTS
    )
    np.testing.assert_allclose(by_mask.per_query, EXPECTED, atol=1e-6)
    one = lds(SCORES[1], subsets=SUBSETS, measurements=MEASUREMENTS[:, 1])
    assert one.score == pytest.approx(0.8)


def test_constant_query_is_nan_and_left_out_of_the_mean():
    scores = SCORES.copy()
    scores[2] = 0.25  # every subset sums to 0.75: no ranking
    result = lds(scores, subsets=SUBSETS, measurements=MEASUREMENTS)
    assert np.isnan(result.per_query[2])
    assert result.score == pytest.approx(0.9)


def test_subset_measurements_save_load_and_reuse(tmp_path: Path):
    bench = SubsetMeasurements(
        subsets=SUBSETS, measurements=MEASUREMENTS, seeds=np.zeros((4, 1), np.int64), n_train=6
    )
    bench.save(tmp_path / "bench.npz")
    loaded = SubsetMeasurements.load(tmp_path / "bench.npz")
    np.testing.assert_array_equal(loaded.subsets, SUBSETS)
    assert loaded.n_train == 6 and loaded.num_subsets == 4 and loaded.n_query == 3
    np.testing.assert_allclose(loaded.lds(SCORES).per_query, EXPECTED, atol=1e-12)
    assert lds(-SCORES, loaded).score == pytest.approx(-0.4)  # another "estimator"
    with pytest.raises(tt.ConfigurationError, match="6 examples"):
        loaded.lds(np.zeros((3, 7)))


class Additive:
    """measure_fn: query losses Σ_{i∈S} beta[:, i]."""

    def __init__(self, beta):
        self.beta = beta
        self.calls = 0

    def __call__(self, indices, seed):
        self.calls += 1
        return self.beta[:, indices].sum(axis=1)


def test_compute_through_the_engine_and_the_sign_convention(tmp_path: Path):
    rng = np.random.default_rng(0)
    beta = rng.normal(size=(2, 20))  # beta > 0: including the example raises the loss (hurts)
    game = Additive(beta)
    engine = Retrainer(
        measure_fn=game, executor=None, progress=False, cache_dir=tmp_path, experiment="additive"
    )
    bench = SubsetMeasurements.compute(engine, 20, num_subsets=8, alpha=0.5, seed=3)
    assert bench.subsets.shape == (8, 10) and bench.measurements.shape == (8, 2)
    assert bench.experiment == "additive" and game.calls == 8
    np.testing.assert_allclose(
        bench.measurements, np.stack([beta[:, s].sum(axis=1) for s in bench.subsets])
    )
    # helps = −beta is the exact linear datamodel: LDS 1; the opposite sign gives −1
    assert bench.lds(-beta).score == pytest.approx(1.0)
    assert bench.lds(beta).score == pytest.approx(-1.0)
    # recomputing loads every run from the cache
    again = SubsetMeasurements.compute(engine, 20, num_subsets=8, alpha=0.5, seed=3)
    assert game.calls == 8
    np.testing.assert_array_equal(again.measurements, bench.measurements)


def test_seeds_per_subset_are_averaged():
    def noisy(indices, seed):
        return np.array([float(len(indices)) + (seed % 7)])

    engine = Retrainer(measure_fn=noisy, executor=None, progress=False)
    bench = SubsetMeasurements.compute(engine, 10, num_subsets=3, seeds_per_subset=4)
    assert bench.seeds.shape == (3, 4)
    np.testing.assert_allclose(bench.measurements[:, 0], 5 + (bench.seeds % 7).mean(axis=1))


def test_sample_subsets_and_errors():
    a = sample_subsets(10, 5, alpha=0.3, seed=1)
    assert a.shape == (5, 3) and (np.diff(a, axis=1) > 0).all()
    np.testing.assert_array_equal(a, sample_subsets(10, 5, alpha=0.3, seed=1))
    with pytest.raises(tt.ConfigurationError, match="alpha"):
        sample_subsets(10, 5, alpha=1.0)
    with pytest.raises(tt.ConfigurationError, match="measurements must be"):
        lds(SCORES, subsets=SUBSETS, measurements=MEASUREMENTS[:, :2])
    with pytest.raises(tt.ConfigurationError, match="at least 3 subsets"):
        lds(SCORES, subsets=SUBSETS[:2], measurements=MEASUREMENTS[:2])
    with pytest.raises(tt.ConfigurationError, match="twice"):
        lds(SCORES, subsets=np.array([[0, 0, 1]] * 4), measurements=MEASUREMENTS)
    with pytest.raises(tt.ConfigurationError, match="benchmark"):
        lds(SCORES)
