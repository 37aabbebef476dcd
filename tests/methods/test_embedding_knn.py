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


class _Twice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(5, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) + self.head(torch.zeros_like(self.body(x)))


def test_composition_top_k_over_query_blocks_and_current_parameters():
    from traintrace.methods.embedding_knn import LayerInputs
    from traintrace.methods.preconditioners import Identity

    torch.manual_seed(1)
    model = MLP().double()
    xt, xq = torch.randn(12, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    knn = tt.EmbeddingKNN(model, tt.Classification(), layer="fc1", batch_size=5, query_block=2)
    assert isinstance(knn.featurizer, LayerInputs) and knn.normalize == "cosine"
    assert [type(p) for p in knn.preconditioners] == [Identity] and knn.weights == [1.0]
    with pytest.raises(tt.NotFittedError):
        knn.score(TensorDataset(xq))
    assert not hasattr(knn, "train_embeddings_")
    assert knn.fit(TensorDataset(xt)) is knn
    # layer="fc1": the embedding is the raw input; the checkpoint defaults to the live model
    expected = F.normalize(xq, dim=1) @ F.normalize(xt, dim=1).T
    scores = knn.score(TensorDataset(xq))
    torch.testing.assert_close(scores, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(knn.train_embeddings_, F.normalize(xt, dim=1))
    top = knn.top_k(TensorDataset(xq), 3)
    torch.testing.assert_close(top.proponents.scores, expected.topk(3, dim=1).values)
    torch.testing.assert_close(
        top.opponents.indices, expected.topk(3, dim=1, largest=False).indices
    )
    torch.testing.assert_close(knn.embed(TensorDataset(xq)), xq)


def test_a_layer_that_runs_twice_is_refused():
    model = _Twice().double()
    knn = tt.EmbeddingKNN(model, tt.Classification(), layer="head")
    with pytest.raises(tt.ConfigurationError, match="ran 2 times"):
        knn.fit(TensorDataset(torch.randn(4, 5, dtype=torch.float64)))
