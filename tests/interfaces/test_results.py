"""Score matrices and self-influence saved beside a run: .npy without pickle, CSV via pandas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import traintrace as tt

pd = pytest.importorskip("pandas")


def test_scores_round_trip(tmp_path):
    scores = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]])
    paths = tt.save_scores(scores, tmp_path / "run")
    np.testing.assert_array_equal(np.load(paths["npy"], allow_pickle=False), scores.numpy())
    frame = pd.read_csv(paths["csv"])
    assert list(frame.columns) == ["query", "0", "1", "2"]
    np.testing.assert_allclose(frame.drop(columns="query").to_numpy(), scores.numpy())
    assert list(tt.save_scores(scores, tmp_path / "npy-only", csv=False)) == ["npy"]


def test_self_influence_is_saved_ranked_with_labels(tmp_path):
    values = torch.tensor([0.1, 3.0, 0.5, 3.0])
    paths = tt.save_self_influence(values, tmp_path, labels=["a", "b", "c", "d"])
    np.testing.assert_array_equal(np.load(paths["npy"]), values.numpy())  # training-set order
    frame = pd.read_csv(paths["csv"])
    assert frame["train_index"].tolist() == [1, 3, 2, 0]  # highest first, ties by position
    assert frame["rank"].tolist() == [1, 2, 3, 4]
    assert frame["label"].tolist() == ["b", "d", "c", "a"]


def test_bad_results_are_refused(tmp_path):
    with pytest.raises(tt.ConfigurationError, match="1 NaN or infinite"):
        tt.save_scores(torch.tensor([[1.0, float("nan")]]), tmp_path)
    with pytest.raises(tt.ConfigurationError, match="must be 1-D"):
        tt.save_self_influence(torch.zeros(2, 2), tmp_path)
    with pytest.raises(tt.ConfigurationError, match="one label per training example"):
        tt.save_self_influence(torch.zeros(3), tmp_path, labels=[1, 2])
    (tmp_path / "file").write_text("x")
    with pytest.raises(tt.ConfigurationError, match="is a file"):
        tt.save_scores(torch.zeros(1, 1), tmp_path / "file")
    assert not list(tmp_path.glob("*.npy"))
