"""Input validation: one table of bad inputs, each with its named error and a phrase of its message.

Also checks that the label checks stay out of ``torch.func.vmap`` (``Task.loss`` is vmapped per
example; ``check_batch`` runs outside it) and that an estimator never turns a bad label into a
silent zero gradient.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

import traintrace as tt
from traintrace.data import as_loader
from traintrace.validation import (
    check_batch,
    check_model_dtype,
    finite_non_negative,
    finite_positive,
    learning_rate,
    message,
    non_negative_int,
    one_of,
    positive_int,
    require_length,
)


def _logits(n=4, c=3):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(0))


def _check(task, y, offset=0, outputs=None):
    outputs = _logits(len(y)) if outputs is None else outputs
    return lambda: check_batch(task, outputs, (torch.zeros(len(y), 2), y), offset)


def _opt_state(lr):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    state = opt.state_dict()
    state["param_groups"][0]["lr"] = lr
    return {"model": model.state_dict(), "optimizer": state}


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return x, self.fc(x)  # (hidden, logits)


CASES = {
    # -- small validators: one message format ------------------------------------------------
    "seed -1": (
        lambda: non_negative_int("--seed", -1),
        tt.ConfigurationError,
        "--seed must be an integer >= 0, got -1",
    ),
    "k = 0": (
        lambda: positive_int("k", 0),
        tt.ConfigurationError,
        "k must be an integer >= 1, got 0",
    ),
    "k = 2.0": (lambda: positive_int("k", 2.0), tt.ConfigurationError, "k must be an integer"),
    "k = True": (lambda: positive_int("k", True), tt.ConfigurationError, "got True"),
    "k = '3'": (lambda: positive_int("k", "3"), tt.ConfigurationError, "got '3'"),
    "damping nan": (
        lambda: finite_non_negative("damping", math.nan),
        tt.ConfigurationError,
        "finite number >= 0, got nan",
    ),
    "damping -1": (lambda: finite_non_negative("damping", -1.0), tt.ConfigurationError, "got -1.0"),
    "scale inf": (
        lambda: finite_positive("scale", math.inf),
        tt.ConfigurationError,
        "finite number > 0, got inf",
    ),
    "scale 0": (lambda: finite_positive("scale", 0), tt.ConfigurationError, "got 0"),
    "choice": (
        lambda: one_of("method", "fast", ["exact", "faiss"]),
        tt.ConfigurationError,
        "one of ['exact', 'faiss']",
    ),
    # -- learning rates from every source ---------------------------------------------------
    "lr -0.1": (
        lambda: learning_rate(-0.1, "lr"),
        tt.LearningRateError,
        "lr must be a finite number > 0, got -0.1",
    ),
    "lr nan": (
        lambda: tt.Checkpoint({"w": torch.ones(1)}, lr=math.nan),
        tt.LearningRateError,
        "got nan",
    ),
    "lr 0": (lambda: tt.Checkpoint({"w": torch.ones(1)}, lr=0.0), tt.LearningRateError, "got 0.0"),
    "lr bool": (
        lambda: tt.Checkpoint({"w": torch.ones(1)}, lr=True),
        tt.LearningRateError,
        "got True",
    ),
    "optimizer lr -0.1": (
        lambda: tt.Checkpoint(_opt_state(-0.1), name="ep1").learning_rate,
        tt.LearningRateError,
        "checkpoint ep1: the learning rate in its optimizer state must be a finite number > 0, got -0.1",
    ),
    "optimizer lr 0": (
        lambda: tt.Checkpoint(_opt_state(0.0)).learning_rate,
        tt.LearningRateError,
        "got 0.0",
    ),
    "optimizer lr inf": (
        lambda: tt.Checkpoint(_opt_state(math.inf)).learning_rate,
        tt.LearningRateError,
        "got inf",
    ),
    # -- data --------------------------------------------------------------------------------
    "empty training set": (
        lambda: require_length(as_loader([], 4)),
        tt.EmptyDataError,
        "the training data set is empty",
    ),
    "empty queries": (
        lambda: require_length(as_loader([], 4), "the query set"),
        tt.EmptyDataError,
        "the query set is empty",
    ),
    "unsized": (
        lambda: require_length(as_loader(_Iterable(), 4)),
        tt.UnsizedDataError,
        "has no length",
    ),
    "subset sampler": (
        lambda: as_loader(
            DataLoader(TensorDataset(torch.ones(4)), sampler=SubsetRandomSampler([0, 2])), 4
        ),
        tt.DataOrderError,
        "torch.utils.data.Subset",
    ),
    "bare tensor": (lambda: as_loader(torch.ones(3, 2), 4), tt.BatchFormatError, "TensorDataset"),
    "ragged rows": (
        lambda: list(as_loader([{"ids": [1, 2]}, {"ids": [1]}], 2)),
        tt.BatchFormatError,
        "DataCollatorWithPadding",
    ),
    # -- labels (checked outside vmap) -------------------------------------------------------
    "label out of range": (
        _check(tt.Classification(), torch.tensor([0, 1, 7, 2]), offset=100),
        tt.LabelError,
        "examples [102] (labels [7]) are outside the model's 3 classes",
    ),
    "negative label": (
        _check(tt.Classification(), torch.tensor([0, -1, 1, -2])),
        tt.LabelError,
        "examples [1, 3] (labels [-1, -2])",
    ),
    "ignore index -100": (
        _check(tt.Classification(), torch.tensor([0, -100, 1, 2]), offset=8),
        tt.LabelError,
        "examples [9] (labels [-100]) have label -100, cross-entropy's ignore index",
    ),
    "float labels 3.7": (
        _check(tt.Classification(), torch.tensor([0.0, 3.7, 1.0, 2.0])),
        tt.LabelError,
        "float labels would be truncated",
    ),
    "soft labels": (
        _check(tt.Classification(), torch.full((4, 3), 1 / 3)),
        tt.LabelError,
        "soft labels",
    ),
    "one-hot int labels": (
        _check(tt.Classification(), torch.eye(3, dtype=torch.long)[[0, 1, 2, 0]]),
        tt.LabelError,
        "one class index per example",
    ),
    "binary label 2": (
        _check(tt.Classification(), torch.tensor([0, 1, 2, 1]), outputs=torch.randn(4, 1)),
        tt.LabelError,
        "binary classifier with labels 0/1",
    ),
    "uint8 label 255": (
        _check(tt.Classification(), torch.tensor([0, 255, 1, 2], dtype=torch.uint8)),
        tt.LabelError,
        "labels [255]",
    ),
    "no labels: keys listed": (
        lambda: check_batch(
            tt.Classification(),
            _logits(2),
            {"input_ids": torch.ones(2, 3), "target": torch.ones(2)},
        ),
        tt.BatchFormatError,
        "keys found: ['input_ids', 'target']",
    ),
    "labels and label": (
        lambda: check_batch(
            tt.Classification(),
            _logits(2),
            {"x": torch.ones(2), "labels": torch.ones(2), "label": torch.ones(2)},
        ),
        tt.BatchFormatError,
        "both 'labels' and 'label'",
    ),
    "regression NaN target": (
        lambda: check_batch(
            tt.Regression(),
            torch.zeros(3, 1),
            (torch.ones(3, 2), torch.tensor([0.0, math.nan, 1.0])),
            10,
        ),
        tt.LabelError,
        "examples [11]",
    ),
    "LM token out of vocab": (
        lambda: check_batch(
            tt.LanguageModeling(),
            torch.zeros(2, 3, 5),
            {"input_ids": torch.tensor([[1, 2, 3], [1, 9, 2]])},
            4,
        ),
        tt.LabelError,
        "examples [5] have token labels [9] outside the vocabulary of 5",
    ),
    # -- model outputs and dtypes ------------------------------------------------------------
    "tuple output": (
        lambda: tt.Classification().forward(_Pair(), torch.ones(2, 2)),
        tt.ModelOutputError,
        "output=1",
    ),
    "dict without logits": (
        lambda: tt.Classification().forward(lambda x: {"h": x}, torch.ones(2, 2)),
        tt.ModelOutputError,
        "keys {'h': 'Tensor(2, 2)'} and no 'logits'",
    ),
    "bad output index": (
        lambda: tt.Classification(output=5).forward(_Pair(), torch.ones(2, 2)),
        tt.ModelOutputError,
        "could not select",
    ),
    "bad output selector": (
        lambda: tt.Classification(output=1.5),
        tt.ConfigurationError,
        "output must be",
    ),
    "bfloat16 model": (
        lambda: check_model_dtype(nn.Linear(2, 2).bfloat16()),
        tt.ModelDtypeError,
        "model.float()",
    ),
    "float16 model": (
        lambda: check_model_dtype(nn.Linear(2, 2).half()),
        tt.ModelDtypeError,
        "torch.float16",
    ),
}


class _Iterable(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([torch.ones(2)])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_its_named_error(case):
    fn, error, phrase = CASES[case]
    with pytest.raises(error) as err:
        fn()
    assert phrase in str(err.value), str(err.value)
    assert isinstance(err.value, tt.TraintraceError)


def test_validators_return_plain_numbers_and_one_message_format():
    assert positive_int("k", np.int64(3)) == 3 and type(positive_int("k", np.int64(3))) is int
    assert non_negative_int("seed", 0) == 0
    assert finite_positive("lr", torch.tensor(0.5)) == 0.5
    assert finite_non_negative("damping", 0) == 0.0
    assert learning_rate(np.float32(0.25), "lr") == 0.25
    assert message("k", "an integer >= 1", 0, "pass k=10") == (
        "k must be an integer >= 1, got 0; pass k=10"
    )
    check_model_dtype(nn.Linear(2, 2).double())  # float32/float64 pass
    check_batch(tt.Classification(), _logits(), (torch.ones(4, 2), torch.tensor([0, 1, 2, 0])))
    check_batch(tt.Classification("margin"), _logits(), torch.ones(4, 2))  # no label needed
    check_batch(
        tt.Classification(ignore_index=-100),
        _logits(),
        (torch.ones(4), torch.tensor([0, -100, 1, 2])),
    )


def test_label_checks_stay_out_of_vmap():
    """``Task.loss`` under vmap(grad) equals the per-example loop; bad values are caught by
    ``check_batch`` (outside vmap) with data-set indices, and by the loss itself outside vmap."""
    task = tt.Classification()
    w = torch.randn(3, 2, dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0], dtype=torch.uint8)  # any integer dtype

    def one(w, xi, yi):
        return task.loss((xi @ w.T).unsqueeze(0), (xi.unsqueeze(0), yi.unsqueeze(0))).sum()

    batched = vmap(grad(one), in_dims=(None, 0, 0))(w, x, y)
    looped = torch.stack([grad(one)(w, x[i], y[i]) for i in range(5)])
    torch.testing.assert_close(batched, looped)
    bad = y.long().clone()
    bad[3] = -100
    # under vmap the value cannot be inspected; the sentinel ignore index makes torch raise
    # rather than silently ignore the example
    with pytest.raises(RuntimeError, match="out of bounds"):
        vmap(grad(one), in_dims=(None, 0, 0))(w, x, bad)
    # outside vmap the loss names the position in the batch
    with pytest.raises(tt.LabelError, match=r"positions in the batch \[3\] \(labels \[-100\]\)"):
        task.loss(x @ w.T, (x, bad))
    # float labels are refused by dtype, which vmap can see
    with pytest.raises(tt.LabelError, match="float"):
        vmap(grad(one), in_dims=(None, 0, 0))(w, x, y.double())


def test_an_estimator_never_turns_label_minus_100_into_a_zero_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3))
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, -100, 1, 0])
    est = tt.TracIn(
        model, tt.Classification(), [tt.Checkpoint(model.state_dict(), lr=0.1)], progress=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # today's vmap fallback warning
        with pytest.raises(tt.LabelError, match="-100"):
            est.fit(TensorDataset(x, y))
    # with ignore_index the example is kept with zero loss, zero gradient and zero scores
    explicit = tt.TracIn(
        model,
        tt.Classification(ignore_index=-100),
        [tt.Checkpoint(model.state_dict(), lr=0.1)],
        progress=False,
    ).fit(TensorDataset(x, y))
    scores = explicit.score(TensorDataset(x, y.clamp(min=0)))
    assert torch.all(scores[:, 3] == 0) and torch.all(scores[:, [0, 1, 2, 4, 5]] != 0)
    loss = tt.Classification(ignore_index=-100).loss(x @ torch.ones(2, 3), (x, y))
    torch.testing.assert_close(loss[3], torch.tensor(0.0))
    torch.testing.assert_close(
        loss[0], F.cross_entropy(x[:1] @ torch.ones(2, 3), y[:1], reduction="none")[0]
    )
