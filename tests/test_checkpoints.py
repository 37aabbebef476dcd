"""Checkpoint loading, validation and learning rates."""

from __future__ import annotations

import json
import pickle
import warnings

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


# -- learning rates from optimizer states with a scheduler ------------------------------------
def test_lr_saved_after_a_scheduler_step_warns(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()  # the saved lr is now the next epoch's
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "a.pt")
    with pytest.warns(tt.LearningRateWarning, match=r"initial_lr=0.1\).*NEXT step or epoch"):
        assert tt.Checkpoint(tmp_path / "a.pt").learning_rate == pytest.approx(0.05)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.save(
        {"model": model.state_dict(), "optimizer": plain.state_dict(), "scheduler": {}},
        tmp_path / "b.pt",
    )
    with pytest.warns(tt.LearningRateWarning, match="scheduler"):
        _ = tt.Checkpoint(tmp_path / "b.pt").learning_rate
    torch.save({"model": model.state_dict(), "optimizer": plain.state_dict()}, tmp_path / "c.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tt.Checkpoint(tmp_path / "c.pt").learning_rate == 0.1
        assert tt.Checkpoint(tmp_path / "a.pt", lr=0.1).learning_rate == 0.1  # given: no warning


# -- Hugging Face directories -------------------------------------------------------------------
def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _assert_same_state(got, model):
    expected = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v)


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2-tied"])
def test_save_pretrained_directories(tmp_path, make):
    model = make()
    model.save_pretrained(tmp_path / "out")
    ckpt = tt.Checkpoint(tmp_path / "out", lr=0.1)
    assert ckpt.name == "out"
    file = tt.Checkpoint(tmp_path / "out" / "model.safetensors", lr=0.1)
    _assert_same_state(file.state_for(model), model)
    _assert_same_state(ckpt.state_for(model), model)  # GPT-2's lm_head is stored once (tied)
    other = make()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    # the state is the directory's, not the model object's
    _assert_same_state(ckpt.state_for(other), model)
    assert ckpt.fingerprint(other) == tt.Checkpoint(model.state_dict(), lr=1).fingerprint(other)


def test_bin_and_sharded_directories(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _bert()
    state = model.state_dict()
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    _assert_same_state(tt.Checkpoint(tmp_path / "bin", lr=1.0).state_for(model), model)
    for kind, save in (
        ("safetensors", lambda part, p: safetensors.save_file(part, p)),
        ("bin", lambda part, p: torch.save(part, p)),
    ):
        folder = tmp_path / f"sharded-{kind}"
        folder.mkdir()
        names = sorted(state)
        halves = {f"model-0000{i + 1}-of-00002.{kind}": names[i::2] for i in range(2)}
        weight_map = {}
        for file, keys in halves.items():
            save({k: state[k].contiguous().clone() for k in keys}, str(folder / file))
            weight_map.update(dict.fromkeys(keys, file))
        index = (
            "model.safetensors.index.json"
            if kind == "safetensors"
            else ("pytorch_model.bin.index.json")
        )
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        _assert_same_state(tt.Checkpoint(folder, lr=1.0).state_for(model), model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(
        tt.CheckpointMismatchError, match=r"no model weights \(files found: \['config.json'\]\)"
    ):
        tt.Checkpoint(tmp_path / "empty", lr=1.0).load_state()


def _trainer_dir(path, model, *, global_step, log_history, opt_lr=0.05):
    path.mkdir()
    model.save_pretrained(path)
    opt = torch.optim.AdamW(model.parameters(), lr=opt_lr)
    for g in opt.param_groups:
        g["initial_lr"] = 0.1  # what a scheduler leaves in the saved state
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save({"last_epoch": global_step, "_last_lr": [opt_lr]}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(
        json.dumps({"global_step": global_step, "log_history": log_history})
    )
    return path


def test_trainer_checkpoint_directory_reads_the_logged_learning_rate(tmp_path):
    model = _bert()
    history = [
        {"step": 1, "learning_rate": 0.1, "loss": 1.1},
        {"step": 2, "learning_rate": 0.075, "loss": 1.0},
        {"step": 2, "eval_loss": 0.9},
        {"step": 3, "learning_rate": 0.05, "loss": 0.8},  # after the save: not this checkpoint's
    ]
    d = _trainer_dir(tmp_path / "checkpoint-2", model, global_step=2, log_history=history)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = tt.Checkpoint(d)
        assert ckpt.name == "checkpoint-2" and ckpt.learning_rate == 0.075
    _assert_same_state(ckpt.state_for(model), model)
    # logged at an earlier step only: used, with a warning
    d = _trainer_dir(tmp_path / "checkpoint-4", model, global_step=4, log_history=history[:2])
    with pytest.warns(
        tt.LearningRateWarning, match="last at step 2, but the checkpoint is at step 4"
    ):
        assert tt.Checkpoint(d).learning_rate == 0.075
    # no logged rate: the optimizer's, with the scheduler warning
    d = _trainer_dir(tmp_path / "checkpoint-6", model, global_step=6, log_history=[])
    with pytest.warns(tt.LearningRateWarning, match="NEXT step"):
        assert tt.Checkpoint(d).learning_rate == pytest.approx(0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tt.LearningRateWarning)
        found = tt.Checkpoint.from_trainer(tmp_path)
        assert [c.name for c in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
        assert [c.learning_rate for c in found] == pytest.approx([0.075, 0.075, 0.05])
    with pytest.raises(tt.ConfigurationError, match="no checkpoint-<step>"):
        tt.Checkpoint.from_trainer(tmp_path / "checkpoint-2")
    bad = [{"step": 8, "learning_rate": -0.1}]
    d = _trainer_dir(tmp_path / "checkpoint-8", model, global_step=8, log_history=bad)
    with pytest.raises(tt.LearningRateError, match=r"trainer_state\.json"):
        _ = tt.Checkpoint(d).learning_rate


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create a file if unpickled


@pytest.mark.parametrize("where", ["pytorch_model.bin", "optimizer.pt", "file.pt"])
def test_malicious_pickles_are_refused_not_run(tmp_path, where):
    marker = tmp_path / "pwned"
    model = _model()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if where == "optimizer.pt":
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    target = tmp_path / "file.pt" if where == "file.pt" else folder / where
    with open(target, "wb") as fh:
        pickle.dump({"x": _Evil(str(marker))}, fh, protocol=2)
    ckpt = tt.Checkpoint(target if where == "file.pt" else folder)
    with pytest.raises(tt.CheckpointMismatchError, match="weights_only=True"):
        if where == "optimizer.pt":
            _ = ckpt.learning_rate
        else:
            ckpt.load_state()
    assert not marker.exists()


# -- fingerprints -------------------------------------------------------------------------------
def test_model_fingerprint_sees_module_structure_and_forward_code():
    from traintrace.checkpoints import model_fingerprint

    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    tanh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert [v.shape for v in relu.state_dict().values()] == [
        v.shape for v in tanh.state_dict().values()
    ]
    assert model_fingerprint(relu) == model_fingerprint(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    )
    assert model_fingerprint(relu) != model_fingerprint(tanh)
    assert model_fingerprint(nn.Dropout(0.1)) != model_fingerprint(nn.Dropout(0.2))

    class A(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return torch.relu(self.fc(x))

    class B(A):
        def forward(self, x):
            return torch.tanh(self.fc(x))

    B.__qualname__ = A.__qualname__  # same name and state: only forward differs
    assert model_fingerprint(A()) != model_fingerprint(B())


def test_half_precision_states_fingerprint_and_cast():
    model = _model()
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    ckpt = tt.Checkpoint(half, lr=0.1)
    assert ckpt.state_for(model)["0.weight"].dtype == torch.float32  # cast to the model's dtype
    assert len(ckpt.fingerprint(model)) == 16
    assert len(tt.Checkpoint(half, lr=0.1).fingerprint(_model().bfloat16())) == 16
    from traintrace.checkpoints import model_fingerprint

    assert model_fingerprint(_model().bfloat16()) != model_fingerprint(_model())
