"""TopK / Ranking / MislabelDetection as pandas tables, CSV and Parquet, read back."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import traintrace as tt

pd = pytest.importorskip("pandas")


def _top():
    # 2 queries, k = 2; by hand
    pro = tt.Ranking(torch.tensor([[3, 0], [1, 2]]), torch.tensor([[0.9, 0.5], [0.7, 0.1]]))
    opp = tt.Ranking(torch.tensor([[2, 1], [0, 3]]), torch.tensor([[-0.8, -0.2], [-0.6, -0.3]]))
    return tt.TopK(pro, opp)


def test_long_table_rows_and_order():
    frame = _top().to_pandas()
    assert list(frame.columns) == ["query", "kind", "rank", "train_index", "score"]
    expected = [
        (0, "proponent", 1, 3, 0.9),
        (0, "proponent", 2, 0, 0.5),
        (0, "opponent", 1, 2, -0.8),
        (0, "opponent", 2, 1, -0.2),
        (1, "proponent", 1, 1, 0.7),
        (1, "proponent", 2, 2, 0.1),
        (1, "opponent", 1, 0, -0.6),
        (1, "opponent", 2, 3, -0.3),
    ]
    got = [tuple(r) for r in frame.itertuples(index=False)]
    assert [g[:4] for g in got] == [e[:4] for e in expected]
    np.testing.assert_allclose([g[4] for g in got], [e[4] for e in expected], rtol=1e-6)


def test_label_text_and_extra_columns_are_looked_up_by_train_index():
    labels = torch.tensor([10, 11, 12, 13])
    text = ["a", "b", "c", "<d>"]
    frame = _top().to_pandas(
        labels, text=text, columns={"source": ["w", "x", "y", "z"]}, query_ids=["q7", "q9"]
    )
    assert list(frame.columns)[-3:] == ["label", "text", "source"]
    assert (frame["label"] == frame["train_index"] + 10).all()
    assert frame.loc[0, "text"] == "<d>" and frame.loc[0, "source"] == "z"
    assert frame["query"].tolist() == ["q7"] * 4 + ["q9"] * 4


def test_bad_columns_are_named_errors():
    with pytest.raises(tt.ConfigurationError, match="label has 2 values"):
        _top().to_pandas([0, 1])
    with pytest.raises(tt.ConfigurationError, match="query_ids"):
        _top().to_pandas(query_ids=[1, 2, 3])
    with pytest.raises(tt.ConfigurationError, match="clashes"):
        _top().to_pandas(columns={"score": [0, 1, 2, 3]})


def test_csv_and_parquet_round_trip(tmp_path):
    top = _top()
    a = pd.read_csv(top.to_csv(tmp_path / "sub" / "top.csv", labels=[0, 1, 2, 3]))
    pd.testing.assert_frame_equal(a, top.to_pandas([0, 1, 2, 3]), check_dtype=False)
    pytest.importorskip("pyarrow")
    b = pd.read_parquet(top.to_parquet(tmp_path / "top.parquet"))
    pd.testing.assert_frame_equal(b, top.to_pandas())


def test_missing_pandas_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(tt.ConfigurationError, match=r"traintrace\[export\]"):
        _top().to_pandas()


def test_mislabel_curve_as_a_table():
    det = tt.mislabel_detection([0.9, 0.1, 0.8, 0.3], [True, False, False, True])
    frame = det.to_pandas()
    assert list(frame.columns) == ["inspected_count", "inspected", "found"]
    # ranking 0(F) 2 3(F) 1
    np.testing.assert_allclose(frame["found"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(frame["inspected"], [0, 0.25, 0.5, 0.75, 1])
    assert frame.attrs["auroc"] == det.auroc
