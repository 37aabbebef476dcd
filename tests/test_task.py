"""Task layer: batch formats, the margin formula, regression/LM losses, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import traintrace as tt
from traintrace.validation import check_batch


def test_split_reads_tensor_tuple_and_mapping_batches():
    task = tt.Classification()
    x, y = torch.randn(4, 3), torch.arange(4)
    assert task.split(x) == ((x,), {}, None)
    args, kwargs, labels = task.split((x, x, y))
    assert len(args) == 2 and kwargs == {} and labels is y
    args, kwargs, labels = task.split({"input_ids": x, "labels": y})
    assert args == () and set(kwargs) == {"input_ids"} and labels is y
    assert task.split([x])[2] is None
    with pytest.raises(tt.BatchFormatError, match="mapping with a 'labels' key"):
        task.split("text")
    with pytest.raises(tt.BatchFormatError, match="no model inputs"):
        task.split({"labels": y})


def test_margin_is_logit_minus_logsumexp_of_the_others():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    y = torch.tensor([1, 2])
    m = tt.Classification("margin").measurement(logits, (None, y))
    expected = torch.stack(
        [
            logits[0, 1] - torch.logsumexp(logits[0, [0, 2]], 0),
            logits[1, 2] - torch.logsumexp(logits[1, :2], 0),
        ]
    )
    torch.testing.assert_close(m, expected)
    # without labels the predicted class is used
    m_pred = tt.Classification("margin").measurement(logits, torch.zeros(2, 3))
    torch.testing.assert_close(m_pred[0], logits[0, 0] - torch.logsumexp(logits[0, 1:], 0))
    # use_labels=False ignores a present label
    m_ignore = tt.Classification("margin", use_labels=False).measurement(logits, (None, y))
    torch.testing.assert_close(m_ignore, m_pred)
    task = tt.Classification("margin")
    assert task.measurement_higher_is_better
    torch.testing.assert_close(task.oriented_measurement(logits, (None, y)), -m)


def test_logit_is_the_target_class_logit_and_signed_for_a_single_logit():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 4.0, 0.0]])
    y = torch.tensor([1, 0, -100])
    task = tt.Classification("logit", ignore_index=-100)
    assert task.measurement_higher_is_better and "logit" in repr(task)
    # the label's logit; an ignored label and a missing label take the predicted class
    torch.testing.assert_close(task.measurement(logits, (None, y)), torch.tensor([0.5, 0.1, 4.0]))
    torch.testing.assert_close(
        tt.Classification("logit").measurement(logits, torch.zeros(3, 2)),
        torch.tensor([2.0, 3.0, 4.0]),
    )
    unlabelled = tt.Classification("logit", use_labels=False)
    torch.testing.assert_close(
        unlabelled.oriented_measurement(logits, (None, y)), -torch.tensor([2.0, 3.0, 4.0])
    )
    # one logit s (logits [0, s]): +s toward class 1, -s toward class 0, as the margin
    s, yb = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    signed = tt.Classification("logit").measurement(s, (None, yb))
    torch.testing.assert_close(signed, torch.where(yb == 1, s[:, 0], -s[:, 0]))
    with pytest.raises(tt.LabelError, match="0 or 1"):
        check_batch(tt.Classification("logit"), s, (None, torch.full((6,), 0.5)), 0)
    with pytest.raises(tt.ConfigurationError, match="'logit'"):
        tt.Classification("logits")


def test_loss_and_measurement_orientation():
    logits, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    task = tt.Classification()
    torch.testing.assert_close(
        task.loss(logits, (None, y)), F.cross_entropy(logits, y, reduction="none")
    )
    assert not task.measurement_higher_is_better
    torch.testing.assert_close(
        task.oriented_measurement(logits, (None, y)), task.loss(logits, (None, y))
    )
    with pytest.raises(tt.ConfigurationError):
        tt.Classification("accuracy")
    with pytest.raises(tt.BatchFormatError, match="needs labels"):
        task.loss(logits, logits)
    with pytest.raises(tt.BatchFormatError, match=r"\[batch, classes\]"):
        task.loss(torch.randn(2, 3, 4), (None, y))


def test_regression_is_per_example_mse():
    out, y = torch.randn(6, 1), torch.randn(6)
    torch.testing.assert_close(tt.Regression().loss(out, (None, y)), (out[:, 0] - y) ** 2)
    out2, y2 = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(tt.Regression().loss(out2, (None, y2)), ((out2 - y2) ** 2).mean(1))
    with pytest.raises(tt.BatchFormatError, match="same number of values"):
        tt.Regression().loss(out2, (None, torch.randn(3)))


def test_language_modeling_sums_next_token_losses_and_respects_the_mask():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    loss = tt.LanguageModeling().loss(logits, {"input_ids": ids, "attention_mask": mask})
    tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none"
    ).view(2, 4)
    torch.testing.assert_close(loss[0], tok[0].sum())
    torch.testing.assert_close(loss[1], tok[1, :2].sum())


def test_custom_task_subclass():
    class Poisson(tt.Task):
        def loss(self, outputs, batch):
            y = self.labels(batch, required=True)
            return F.poisson_nll_loss(outputs.squeeze(-1), y, reduction="none")

    out, y = torch.randn(4, 1), torch.rand(4)
    assert Poisson().measurement(out, (None, y)).shape == (4,)
    with pytest.raises(NotImplementedError, match="must implement loss"):
        tt.Task().loss(out, (None, y))


def test_binary_single_logit_is_bce_and_signed_margin():
    s, y = torch.randn(6, 1), torch.tensor([0, 1, 1, 0, 1, 0])
    task = tt.Classification()
    torch.testing.assert_close(
        task.loss(s, (None, y)),
        F.binary_cross_entropy_with_logits(s[:, 0], y.float(), reduction="none"),
    )
    margin = tt.Classification("margin").measurement(s[:, 0], (None, y))
    torch.testing.assert_close(margin, torch.where(y == 1, s[:, 0], -s[:, 0]))


class _Pair(torch.nn.Module):
    """Returns ``(hidden, logits)``: the hidden state must never be taken as the logits."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return x, self.fc(x)


def test_tuple_outputs_need_output_and_output_selects_by_index_key_or_function():
    model, x = _Pair(), torch.randn(2, 4)
    with pytest.raises(tt.ModelOutputError, match=r"tuple of 2 values \(Tensor\(2, 4\), Tensor"):
        tt.Classification().forward(model, x)
    logits = model.fc(x)
    torch.testing.assert_close(tt.Classification(output=1).forward(model, x), logits)
    torch.testing.assert_close(tt.Classification(output=-1).forward(model, x), logits)
    pick = tt.Regression(output=lambda out: out[1][:, :1])
    torch.testing.assert_close(pick.forward(model, x), logits[:, :1])
    as_dict = tt.Classification(output="scores")
    torch.testing.assert_close(as_dict.forward(lambda x: {"scores": x, "h": 0}, x), x)
    # a 1-tuple is not ambiguous
    torch.testing.assert_close(tt.Classification().forward(lambda x: (x,), x), x)
    # the selector is part of the task's repr, which stores compare
    assert repr(tt.Classification(output=1)) == "Classification(measurement='loss', output=1)"
    assert "output=" not in repr(tt.Classification())
    with pytest.raises(tt.ModelOutputError, match="selected a int"):
        as_dict.forward(lambda x: {"scores": 0}, x)


def test_hugging_face_model_output_keeps_working():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 5, 6]]), "label": torch.tensor([0, 2])}
    task = tt.Classification()  # the datasets column 'label' is read as the labels
    out = task.forward(model, batch)
    assert out.shape == (2, 3)
    assert task.labels(batch, required=True).tolist() == [0, 2]
    loss = task.loss(out, batch)
    torch.testing.assert_close(loss, F.cross_entropy(out, batch["label"], reduction="none"))


def test_label_key_rule():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    task = tt.Classification()
    _, kwargs, labels = task.split({"x": x, "label": y})
    assert set(kwargs) == {"x"} and labels is y
    with pytest.raises(tt.BatchFormatError, match="both 'labels' and 'label'"):
        task.split({"x": x, "label": y, "labels": y})
    custom = tt.Classification(label_key="target")
    assert set(custom.split({"x": x, "target": y})[1]) == {"x"}
    # an explicit key is used exactly: 'label' is then a model input
    assert custom.split({"x": x, "label": y})[2] is None
    with pytest.raises(
        tt.BatchFormatError, match=r"no 'target' key \(keys found: \['label', 'x'\]\)"
    ):
        custom.labels({"x": x, "label": y}, required=True)
    assert repr(custom) == "Classification(measurement='loss', label_key='target')"
    with pytest.raises(tt.ConfigurationError, match="label_key"):
        tt.Regression(label_key="")


def test_label_dtypes():
    logits = torch.randn(4, 3)
    ref = F.cross_entropy(logits, torch.tensor([0, 1, 1, 0]), reduction="none")
    for y in (
        torch.tensor([0, 1, 1, 0], dtype=torch.uint8),
        torch.tensor([0, 1, 1, 0], dtype=torch.int32),
        torch.tensor([[0], [1], [1], [0]]),
        torch.tensor([False, True, True, False]),
    ):
        torch.testing.assert_close(tt.Classification().loss(logits, (None, y)), ref)
    with pytest.raises(tt.LabelError, match=r"y.long\(\)"):
        tt.Classification().loss(logits, (None, torch.tensor([0.0, 1.0, 1.0, 0.0])))


def test_ignore_index_zero_loss_and_margin_on_the_predicted_class():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    y = torch.tensor([1, -100])
    task = tt.Classification(ignore_index=-100)
    loss = task.loss(logits, (None, y))
    assert loss[1] == 0 and loss[0] > 0
    margin = tt.Classification("margin", ignore_index=-100).measurement(logits, (None, y))
    unlabeled = tt.Classification("margin").measurement(logits, torch.zeros(2, 1))
    torch.testing.assert_close(margin[1], unlabeled[1])  # predicted class 2
    assert repr(task) == "Classification(measurement='loss', ignore_index=-100)"
    with pytest.raises(tt.ConfigurationError, match="ignore_index"):
        tt.Classification(ignore_index=-100.0)


def test_forward_error_names_text_columns_and_dtype_mismatch():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(tt.BatchFormatError, match=r"keys \['text'\] are not tensors"):
        tt.Classification().forward(Net(), {"x": torch.randn(2, 3), "text": ["a", "b"]})
    with pytest.raises(tt.BatchFormatError, match=r"inputs are \['torch.float64'\]"):
        tt.Classification().forward(Net(), (torch.randn(2, 3, dtype=torch.float64), None))


def test_binary_single_logit_takes_float_targets_as_bce():
    s = torch.randn(4, 1)
    t = torch.tensor([0.0, 1.0, 0.25, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        tt.Classification().loss(s, (None, t)),
        F.binary_cross_entropy_with_logits(s[:, 0], t.float(), reduction="none"),
    )
    hard = torch.tensor([0.0, 1.0, 1.0, 0.0])
    torch.testing.assert_close(
        tt.Classification("margin").measurement(s, (None, hard)),
        tt.Classification("margin").measurement(s, (None, hard.long())),
    )
    with pytest.raises(tt.LabelError, match=r"examples \[7\] \(labels \[1.5\]\).*\[0, 1\]"):
        check_batch(tt.Classification(), s, (None, torch.tensor([0.0, 1.0, 0.5, 1.5])), 4)
    with pytest.raises(tt.LabelError, match="0 or 1"):
        check_batch(tt.Classification("margin"), s, (None, t), 0)
    with pytest.raises(tt.LabelError, match="float labels would be truncated"):
        tt.Classification().loss(torch.randn(4, 3), (None, hard))
