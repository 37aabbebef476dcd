"""Mislabel detection metric against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

import traintrace as tt


def test_recall_curve_and_auroc_by_hand():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.5, 0.0])
    flipped = np.array([1, 0, 0, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    det = tt.mislabel_detection(scores, flipped, fractions=(0.1, 0.2, 0.5))
    # ranking: idx 0(F) 2 4(F) 6 8 7 3(F) 5 1 9
    assert det.recall == {
        0.1: pytest.approx(1 / 3),
        0.2: pytest.approx(1 / 3),
        0.5: pytest.approx(2 / 3),
    }
    np.testing.assert_allclose(det.found[[0, 1, 3, 7, 10]], [0, 1 / 3, 2 / 3, 1, 1])
    # AUROC = P(score flipped > score clean): 0.9 beats 7 clean, 0.7 beats 6, 0.3 beats 3: 16 of 21
    assert det.auroc == pytest.approx(16 / 21)


def test_bad_inputs():
    with pytest.raises(tt.ConfigurationError, match="same length"):
        tt.mislabel_detection(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(tt.ConfigurationError, match="both flipped and clean"):
        tt.mislabel_detection(np.zeros(3), np.zeros(3, dtype=bool))
