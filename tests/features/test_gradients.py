"""Per-example gradients: vmap equals a loop, the fallback path, parameter selection."""

from __future__ import annotations

import pytest
import torch
from reference import MLP, ce, loop_gradients
from torch import nn

import traintrace as tt
from traintrace.features import (
    GradientComputer,
    ParameterLayout,
    last_layer_name,
    select_parameters,
)


def test_per_example_equals_loop_and_model_is_untouched():
    torch.manual_seed(0)
    model = MLP().double()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    gc = GradientComputer(model, tt.Classification())
    g = gc.per_example(model.state_dict(), (x, y))
    expected = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class ItemModel(nn.Module):
    """Uses .item() in forward: vmap cannot batch it, so the loop fallback must take over."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        scale = 1.0 + 0.0 * x.abs().max().item()
        return self.fc(x) * scale


def test_vmap_failure_falls_back_to_an_exact_loop_with_a_warning():
    torch.manual_seed(1)
    model = ItemModel().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    gc = GradientComputer(model, tt.Classification())
    with pytest.warns(RuntimeWarning, match="falling back"):
        g = gc.per_example(model.state_dict(), (x, y))
    expected = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    torch.testing.assert_close(g, expected)


class GRUClassifier(nn.Module):
    """A GRU: vmap fails inside the model call (its in-place hidden state), which the task
    reports as a BatchFormatError; the loop must still take over."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gru(x)[0][:, -1])


def test_vmap_failure_inside_the_model_call_falls_back_instead_of_blaming_the_batch():
    torch.manual_seed(2)
    model = GRUClassifier().double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    gc = GradientComputer(model, tt.Classification())
    with pytest.warns(RuntimeWarning, match="falling back"):
        g = gc.per_example(model.state_dict(), (x, y))
    expected = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    torch.testing.assert_close(g, expected)
    # a batch that is really malformed still gets the named error from the loop
    with pytest.raises(tt.BatchFormatError):
        gc.per_example(model.state_dict(), (torch.randn(5, 4, 7, dtype=torch.float64), y))


def test_parameter_selection_and_layout_round_trip():
    model = MLP()
    assert last_layer_name(model) == "fc2"
    assert select_parameters(model, "last") == ["fc2.weight", "fc2.bias"]
    assert select_parameters(model, ["fc2", "fc1.weight"]) == [
        "fc1.weight",
        "fc2.weight",
        "fc2.bias",
    ]
    model.fc1.bias.requires_grad_(False)
    assert "fc1.bias" not in select_parameters(model)
    layout = ParameterLayout.of(model, select_parameters(model))
    vec = torch.arange(layout.numel, dtype=torch.float32)
    torch.testing.assert_close(layout.flatten(layout.unflatten(vec)), vec)
    with pytest.raises(tt.ConfigurationError, match="modules with parameters"):
        select_parameters(model, ["decoder"])


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight, as in GPT-2."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids).mean(1))))


def test_tied_weights_get_one_gradient_summed_over_both_uses():
    torch.manual_seed(2)
    model = TiedLM().double()
    ids, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    state = tt.Checkpoint(model.state_dict(), lr=1.0).state_for(model)
    assert "head.weight" in state  # state dicts list the tied tensor twice
    gc = GradientComputer(model, tt.Classification())
    assert gc.names == ["embed.weight", "mix.weight", "mix.bias"]
    g = gc.per_example(state, (ids, y))
    expected = loop_gradients(model, model.state_dict(), list(zip(ids, y, strict=True)), ce)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)
