"""Embedding kNN: cosine similarity of the last layer's inputs, computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import MLP, perturbed_states
from torch.utils.data import TensorDataset

import traintrace as tt


def test_scores_are_cosine_of_penultimate_features_at_the_checkpoint():
    torch.manual_seed(0)
    model = MLP().double()
    state = perturbed_states(model, 1)[0]
    xt, xq = torch.randn(10, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    knn = tt.EmbeddingKNN(model, tt.Classification(), tt.Checkpoint(state, lr=1.0), batch_size=4)
    knn.fit(TensorDataset(xt, torch.zeros(10, dtype=torch.long)))
    ref = MLP().double()
    ref.load_state_dict(state)
    ref.eval()

    def emb(x):
        return torch.tanh(ref.bn(ref.fc1(x)))

    expected = F.normalize(emb(xq), dim=1) @ F.normalize(emb(xt), dim=1).T
    torch.testing.assert_close(knn.score(TensorDataset(xq)), expected.detach())
    top = knn.top_k(TensorDataset(xq), 2)
    torch.testing.assert_close(top.proponents.indices, expected.topk(2, dim=1).indices)
    with pytest.raises(tt.ConfigurationError, match="no self-influence"):
        knn.self_influence()
