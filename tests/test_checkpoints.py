"""Checkpoint loading, validation and learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import traintrace as tt


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_state_for_accepts_a_matching_state_and_casts_dtype():
    model = _model().double()
    state = {k: v.float() for k, v in _model().state_dict().items()}
    out = tt.Checkpoint(state, lr=0.1).state_for(model)
    assert set(out) == set(model.state_dict())
    assert out["0.weight"].dtype == torch.float64
    assert out["1.num_batches_tracked"].dtype == torch.long


def test_wrapper_prefixes_are_stripped():
    model = _model()
    state = {"module." + k: v for k, v in model.state_dict().items()}
    assert set(tt.Checkpoint(state, lr=1.0).state_for(model)) == set(model.state_dict())


def test_mismatch_names_every_problem():
    model = _model()
    other = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2), nn.Linear(2, 2))
    with pytest.raises(tt.CheckpointMismatchError) as err:
        tt.Checkpoint(other.state_dict(), lr=1.0, name="ep3").state_for(model)
    msg = str(err.value)
    assert "checkpoint ep3 does not fit Sequential" in msg
    assert "unexpected keys [3.bias, 3.weight]" in msg
    assert "0.weight: checkpoint (5, 3) vs model (4, 3)" in msg


def test_files_bare_and_wrapped_and_lr_from_optimizer(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.03)
    torch.save(
        {"state_dict": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "full.pt"
    )
    bare = tt.Checkpoint(tmp_path / "bare.pt", lr=0.5)
    assert bare.name == "bare.pt" and bare.learning_rate == 0.5
    full = tt.Checkpoint(tmp_path / "full.pt")
    assert full.learning_rate == pytest.approx(0.03)
    torch.testing.assert_close(full.state_for(model)["0.weight"], model.state_dict()["0.weight"])
    assert full.fingerprint(model) == bare.fingerprint(model)
    with pytest.raises(tt.ConfigurationError, match="no learning rate"):
        _ = tt.Checkpoint(tmp_path / "bare.pt").learning_rate
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(tt.CheckpointMismatchError, match="could not read"):
        tt.Checkpoint(tmp_path / "junk.pt", lr=1.0).load_state()
    with pytest.raises(tt.ConfigurationError, match="does not exist"):
        tt.Checkpoint(tmp_path / "missing.pt", lr=1.0)
    with pytest.raises(tt.LearningRateError, match="finite number > 0"):
        tt.Checkpoint(model.state_dict(), lr=-1.0)


def test_different_learning_rates_per_group_need_an_explicit_lr(tmp_path):
    model = _model()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.2}]
    )
    torch.save(
        {"model": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, tmp_path / "c.pt"
    )
    with pytest.raises(tt.ConfigurationError, match="different learning rates"):
        _ = tt.Checkpoint(tmp_path / "c.pt").learning_rate
