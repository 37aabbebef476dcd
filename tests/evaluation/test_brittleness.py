"""Brittleness on a 1-nearest-neighbour classifier where the answer is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

import traintrace as tt
from traintrace.evaluation.brittleness import brittleness
from traintrace.methods.retraining import Retrainer

# 1-D training points and labels.
X = np.array([0.0, 0.3, -0.35, 5.0, 5.2, -5.0])
Y = np.array([1, 0, 0, 1, 1, 0])
# Query A (0.05): nearest is example 0 (class 1); without it example 1 (class 0) → flips at k=1.
# Query B (5.1): examples 3 and 4 (class 1) are nearest; without both, example 1 (distance 4.8,
#   class 0) beats example 0 (5.1) → flips at k=2 when the scores rank 3 and 4 first.
# Query C (−5.1): nearest is example 5 (class 0); its scores (a bad estimator) rank 3 and 4
#   first, whose removal changes nothing → never flips within the schedule.
XQ = np.array([0.05, 5.1, -5.1])
SCORES = np.array(
    [
        [0.9, -0.5, -0.4, 0.1, 0.1, 0.0],
        [0.0, -0.3, -0.1, 0.8, 0.7, 0.1],
        [0.0, 0.1, 0.2, 0.9, 0.8, 0.3],
    ]
)


def train_1nn(indices, seed):
    return X[indices], Y[indices]


def predict(model):
    xs, ys = model
    return ys[np.abs(XQ[:, None] - xs[None, :]).argmin(axis=1)]


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, indices, seed):
        self.calls += 1
        return train_1nn(indices, seed)


def test_brittleness_finds_the_constructed_flips():
    train = Counting()
    engine = Retrainer(train, predict, executor=None, progress=False)
    result = brittleness(SCORES, engine, schedule=(1, 2))
    assert result.k == [1, 2, None]
    np.testing.assert_array_equal(result.original, [1, 1, 0])
    np.testing.assert_array_equal(result.flip_rate, [[1.0, np.nan], [0.0, 1.0], [0.0, 0.0]])
    assert result.flipped_fraction == pytest.approx(2 / 3)
    # 1 full run; k=1: remove {0} (A) and {3} (B and C share it: run once); k=2: {3, 4} once
    assert train.calls == 1 + 2 + 1


def test_a_wrong_top_proponent_does_not_flip():
    scores = SCORES.copy()
    scores[0] = [0.1, 0.9, 0.0, 0.0, 0.0, 0.0]  # ranks example 1 (the other class) first
    engine = Retrainer(train_1nn, predict, executor=None, progress=False)
    result = brittleness(scores, engine, queries=[0], schedule=(1,), original=[1, 1, 0])
    assert result.k == [None]
    np.testing.assert_array_equal(result.queries, [0])


def test_default_schedule_and_errors():
    engine = Retrainer(train_1nn, predict, executor=None, progress=False)
    assert brittleness(SCORES, engine, queries=[1]).schedule == (1, 2, 3)  # max_k = n // 2
    with pytest.raises(tt.ConfigurationError, match="ascending"):
        brittleness(SCORES, engine, schedule=(2, 1))
    with pytest.raises(tt.ConfigurationError, match="queries"):
        brittleness(SCORES, engine, queries=[3])
