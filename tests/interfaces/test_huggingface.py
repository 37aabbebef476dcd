"""TraintraceCallback in a real ``transformers.Trainer`` on a tiny BERT built from a config.

Nothing is downloaded: random weights, an in-memory Dataset of dicts, ``use_cpu=True``. The
reference replays the Trainer's plain-SGD updates by hand in float64 from the batches the
Trainer drew (logged by the collator), so the saved parameters, the learning rates stored with
them and HYDRA's recorded trajectory are each checked against an explicit computation.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import brute_tracin, loop_gradients
from torch.utils.data import Dataset

import traintrace as tt

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from traintrace.interfaces.huggingface import TraintraceCallback  # noqa: E402

N, LENGTH, VOCAB, CLASSES = 12, 6, 30, 3
LR0, STEPS, BATCH = 0.5, 10, 4


class Examples(Dataset):
    """Padded token sequences with labels, as dicts; optionally with each example's index."""

    def __init__(self, with_index: bool = True, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (N, LENGTH), generator=g)
        self.mask = torch.ones(N, LENGTH, dtype=torch.long)
        self.mask[torch.arange(N) % 3 == 1, 4:] = 0  # some padded examples
        self.ids[self.mask == 0] = 0
        self.labels = torch.randint(0, CLASSES, (N,), generator=g)
        self.with_index = with_index

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}
        if self.with_index:
            item["index"] = i
        return item


class LoggingCollator:
    """``default_data_collator`` that remembers the training indices of every batch."""

    def __init__(self) -> None:
        self.collated: list[list[int]] = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.collated.append(batch["index"].tolist())
        return batch

    @property
    def batches(self) -> list[list[int]]:
        """The batches of the ``STEPS`` optimizer steps (accelerate's loader reads one ahead)."""
        assert len(self.collated) >= STEPS
        return self.collated[:STEPS]


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        num_hidden_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=VOCAB,
        max_position_embeddings=16,
        num_labels=CLASSES,
        hidden_dropout_prob=0.0,  # train and eval gradients agree: the replay is exact
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double()


def train(model, tmp_path: Path, callback, collator, **overrides):
    kw = {
        "output_dir": str(tmp_path / "hf"),
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": LR0,
        "lr_scheduler_type": "linear",  # η_t = LR0 (STEPS − t) / STEPS for step t = 0, 1, ...
        "optim": "sgd",
        "max_grad_norm": 0.0,  # no clipping: the update is exactly η_t × the mean gradient
        "weight_decay": 0.0,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": 0,
    }
    kw.update(overrides)
    args = transformers.TrainingArguments(**kw)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Examples(),
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def step_lr(t: int) -> float:
    return LR0 * (STEPS - t) / STEPS


def ce(m, ex):
    ids, mask, y = ex
    return F.cross_entropy(m(input_ids=ids[None], attention_mask=mask[None]).logits, y[None])


def examples(data: Examples, idx) -> list:
    return [(data.ids[i], data.mask[i], data.labels[i]) for i in idx]


def replay_sgd(initial: dict, batches: list[list[int]]) -> list[dict]:
    """``θ_0, θ_1, ...``: plain SGD on the mean cross-entropy of each logged batch, by hand."""
    model = tiny_bert()
    model.load_state_dict(initial)
    model.eval()  # no dropout anywhere: same function as in training mode
    data = Examples()
    states = [copy.deepcopy(model.state_dict())]
    for t, idx in enumerate(batches):
        loss = torch.stack([ce(model, ex) for ex in examples(data, idx)]).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= step_lr(t) * g
        states.append(copy.deepcopy(model.state_dict()))
    return states


def test_checkpoints_hold_the_parameters_and_learning_rate_of_their_step(tmp_path: Path):
    model = tiny_bert()
    initial = copy.deepcopy(model.state_dict())
    callback = TraintraceCallback(tmp_path / "ckpts", every_steps=3)
    collator = LoggingCollator()
    train(model, tmp_path, callback, collator)

    assert [p.name for p in callback.saved] == [f"step-{s:08d}.pt" for s in (3, 6, 9, 10)]
    states = replay_sgd(initial, collator.batches)
    for path, step in zip(callback.saved, (3, 6, 9, 10), strict=True):
        ckpt = tt.Checkpoint(path)  # no lr= : read from the file
        # the lr of the step that produced θ_step (t = step − 1), not the scheduler's next one
        assert ckpt.learning_rate == pytest.approx(step_lr(step - 1), rel=1e-12)
        saved = ckpt.state_for(model)
        for name, value in states[step].items():
            torch.testing.assert_close(saved[name], value, rtol=1e-9, atol=1e-12)
    final = tt.Checkpoint(callback.saved[-1]).load_state()
    for name, value in model.state_dict().items():
        assert torch.equal(final[name], value)
    assert callback.learning_rates == [pytest.approx(step_lr(s - 1)) for s in (3, 6, 9, 10)]

    # TracIn on the saved checkpoints equals the explicit sum over them
    data = Examples(with_index=False)
    ckpts = callback.checkpoints()
    est = tt.TracIn(model, tt.Classification(), ckpts, layers="last", batch_size=5, progress=False)
    scores = est.fit(data).score(data)
    names = ["classifier.weight", "classifier.bias"]
    assert est.parameter_names == names
    ex = examples(data, range(N))
    expected = brute_tracin(
        model,
        [c.load_state() for c in ckpts],
        [c.learning_rate for c in ckpts],
        ex,
        ex,
        ce,
        ce,
        names=names,
    )
    assert scores.shape == (N, N)
    assert ((scores - expected).abs().max() / expected.abs().max()) < 1e-8


def test_hydra_trajectory_recorded_through_the_trainer_equals_the_replayed_sum(tmp_path: Path):
    model = tiny_bert()
    initial = copy.deepcopy(model.state_dict())
    task = tt.Classification()
    recorder = tt.TrajectoryRecorder(model, task, n_train=N, path=tmp_path / "hydra")
    callback = TraintraceCallback(tmp_path / "ckpts", every_epochs=1, recorder=recorder)
    collator = LoggingCollator()
    train(model, tmp_path, callback, collator)

    # 3 steps per epoch: saved at the ends of epochs 1-3 and at the last step
    assert [p.name for p in callback.saved] == [f"step-{s:08d}.pt" for s in (3, 6, 9, 10)]
    assert recorder.steps_recorded == STEPS and recorder.steps_on_disk == STEPS  # flushed
    states = replay_sgd(initial, collator.batches)
    data = Examples()
    expected = torch.zeros(N, recorder.width, dtype=torch.float64)
    for t, idx in enumerate(collator.batches):
        grads = loop_gradients(model, states[t], examples(data, idx), ce)
        expected.index_add_(0, torch.tensor(idx), step_lr(t) / len(idx) * grads)
    got = recorder.accumulator()
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-8
    counts = torch.bincount(torch.tensor(collator.batches).reshape(-1), minlength=N)
    assert torch.equal(recorder.counts(), counts)
    # HYDRA scores from it at the final parameters
    queries = Examples(with_index=False)
    scores = tt.HYDRA(model, task, recorder, progress=False).fit().score(queries)
    g_query = loop_gradients(model, states[-1], examples(queries, range(N)), ce)
    torch.testing.assert_close(scores, g_query @ expected.T, rtol=1e-7, atol=1e-10)


def test_recording_needs_the_index_key_kept_by_the_trainer(tmp_path: Path):
    model = tiny_bert()
    recorder = tt.TrajectoryRecorder(model, tt.Classification(), n_train=N)
    callback = TraintraceCallback(tmp_path / "ckpts", recorder=recorder)
    with pytest.raises(tt.ConfigurationError, match="remove_unused_columns=False"):
        train(model, tmp_path, callback, LoggingCollator(), remove_unused_columns=True)

    def no_index(features):
        batch = transformers.default_data_collator(features)
        del batch["index"]
        return batch

    callback = TraintraceCallback(tmp_path / "ckpts", recorder=recorder)
    with pytest.raises(tt.ConfigurationError, match=r"no 'index' key.*'attention_mask'"):
        train(model, tmp_path, callback, no_index)
    assert recorder.steps_recorded == 0

    other = tt.TrajectoryRecorder(tiny_bert(), tt.Classification(), n_train=N)
    with pytest.raises(tt.ConfigurationError, match="another model"):
        train(model, tmp_path, TraintraceCallback(tmp_path, recorder=other), LoggingCollator())


def test_callback_argument_errors(tmp_path: Path):
    with pytest.raises(tt.ConfigurationError, match="save nothing"):
        TraintraceCallback(tmp_path, save_final=False)
    with pytest.raises(tt.ConfigurationError, match="every_steps"):
        TraintraceCallback(tmp_path, every_steps=0)
    with pytest.raises(tt.ConfigurationError, match="TrajectoryRecorder"):
        TraintraceCallback(tmp_path, recorder="runs/hydra")  # type: ignore[arg-type]
