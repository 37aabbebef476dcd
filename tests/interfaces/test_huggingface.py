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

    def __init__(self, accumulation: int = 1) -> None:
        self.accumulation = accumulation
        self.collated: list[list[int]] = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.collated.append(batch["index"].tolist())
        return batch

    @property
    def steps(self) -> list[list[list[int]]]:
        """The micro-batches of each of the ``STEPS`` optimizer steps.

        accelerate's loader collates one batch ahead, so the last one is not used.
        """
        k = self.accumulation
        assert len(self.collated) >= STEPS * k
        return [self.collated[t * k : (t + 1) * k] for t in range(STEPS)]

    @property
    def batches(self) -> list[list[int]]:
        """The examples of each optimizer step (its micro-batches joined)."""
        return [[i for micro in step for i in micro] for step in self.steps]


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


def step_weights(step: list[list[int]], rule: str) -> list[tuple[list[int], float]]:
    """``(micro-batch, weight of each of its examples' losses)`` in one step's loss.

    ``"mean"``: the mean over the step's examples; ``"sum of means"``: the sum of the
    micro-batch means (what a Trainer does when the model is given ``num_items_in_batch`` but
    its loss ignores it).
    """
    size = sum(len(micro) for micro in step)
    return [(micro, 1 / size if rule == "mean" else 1 / len(micro)) for micro in step]


def replay_sgd(initial: dict, steps: list[list[list[int]]], rule: str = "mean") -> list[dict]:
    """``θ_0, θ_1, ...``: plain SGD on the logged batches' cross-entropy, by hand."""
    model = tiny_bert()
    model.load_state_dict(initial)
    model.eval()  # no dropout anywhere: same function as in training mode
    data = Examples()
    states = [copy.deepcopy(model.state_dict())]
    for t, step in enumerate(steps):
        loss = sum(
            w * ce(model, ex)
            for micro, w in step_weights(step, rule)
            for ex in examples(data, micro)
        )
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= step_lr(t) * g
        states.append(copy.deepcopy(model.state_dict()))
    return states


def same_state(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12) for k in a)


def test_checkpoints_hold_the_parameters_and_learning_rate_of_their_step(tmp_path: Path):
    model = tiny_bert()
    initial = copy.deepcopy(model.state_dict())
    callback = TraintraceCallback(tmp_path / "ckpts", every_steps=3)
    collator = LoggingCollator()
    train(model, tmp_path, callback, collator)

    assert [p.name for p in callback.saved] == [f"step-{s:08d}.pt" for s in (3, 6, 9, 10)]
    states = replay_sgd(initial, collator.steps)
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


@pytest.mark.parametrize(("batch", "accumulation"), [(4, 1), (3, 2)])
def test_hydra_trajectory_recorded_through_the_trainer_equals_the_replayed_sum(
    tmp_path: Path, batch: int, accumulation: int
):
    model = tiny_bert()
    initial = copy.deepcopy(model.state_dict())
    task = tt.Classification()
    recorder = tt.TrajectoryRecorder(model, task, n_train=N, path=tmp_path / "hydra")
    callback = TraintraceCallback(tmp_path / "ckpts", every_epochs=1, recorder=recorder)
    collator = LoggingCollator(accumulation)
    train(
        model,
        tmp_path,
        callback,
        collator,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )

    # saved at the end of every epoch and at the last step (epochs of 3 or 2 steps)
    per_epoch = N // (batch * accumulation)
    saved_steps = sorted({*range(per_epoch, STEPS + 1, per_epoch), STEPS})
    assert [p.name for p in callback.saved] == [f"step-{s:08d}.pt" for s in saved_steps]
    # one record() per micro-batch, all flushed to disk
    assert recorder.steps_on_disk == recorder.steps_recorded == STEPS * accumulation
    # the reference trajectory: the SGD rule that reproduces the Trainer's parameters (with
    # gradient accumulation, transformers sums micro-batch means for models such as BERT whose
    # loss ignores num_items_in_batch)
    replays = {rule: replay_sgd(initial, collator.steps, rule) for rule in ("mean", "sum of means")}
    final = model.state_dict()
    rules = [rule for rule, states in replays.items() if same_state(states[-1], final)]
    assert rules, "no replay reproduces the Trainer's parameters"
    rule, states = rules[-1], replays[rules[-1]]
    for path in callback.saved:
        step = int(path.stem.split("-")[1])
        assert same_state(tt.Checkpoint(path).load_state(), states[step])
    data = Examples()
    expected = torch.zeros(N, recorder.width, dtype=torch.float64)
    for t, step in enumerate(collator.steps):
        for micro, w in step_weights(step, rule):
            grads = loop_gradients(model, states[t], examples(data, micro), ce)
            expected.index_add_(0, torch.tensor(micro), step_lr(t) * w * grads)
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


# -- a causal language model: the Trainer's loss is Σ token losses / tokens of the step --------


class Texts(Dataset):
    """Token sequences for GPT-2 with some padding; labels = input_ids, −100 on padding."""

    def __init__(self, with_index: bool = True) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (N, LENGTH), generator=g)
        self.mask = torch.ones(N, LENGTH, dtype=torch.long)
        self.mask[torch.arange(N) % 4 == 1, 3:] = 0
        self.ids[self.mask == 0] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)
        self.with_index = with_index

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}
        if self.with_index:
            item["index"] = i
        return item


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=VOCAB,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).double()


def token_sum_loss(m, i: int, data: Texts):
    """Σ over predicted tokens of the next-token cross-entropy of example ``i``, by hand."""
    logits = m(input_ids=data.ids[i][None], attention_mask=data.mask[i][None]).logits[0]
    return F.cross_entropy(logits[:-1], data.labels[i][1:], ignore_index=-100, reduction="sum")


def test_language_model_trajectory_is_weighted_by_the_tokens_of_each_step(tmp_path: Path):
    model = tiny_gpt2()
    initial = copy.deepcopy(model.state_dict())
    task = tt.LanguageModeling()
    recorder = tt.TrajectoryRecorder(model, task, n_train=N, path=tmp_path / "hydra")
    callback = TraintraceCallback(tmp_path / "ckpts", every_steps=3, recorder=recorder)
    collator = LoggingCollator()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=6,
        per_device_train_batch_size=BATCH,
        learning_rate=LR0,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
    )
    data = Texts()
    transformers.Trainer(
        model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[callback]
    ).train()

    # replay: θ_{t+1} = θ_t − η Σ_{i∈B_t} ∇ token_sum_loss_i / D_t, D_t the label count the
    # Trainer passes as num_items_in_batch: the predicted tokens, or (transformers 5.x, GPT-2)
    # every label that is not −100, position 0 included; the replay that reproduces the
    # Trainer's parameters is the reference
    batches = collator.collated[:6]

    def replay(shifted: bool) -> tuple[torch.nn.Module, torch.Tensor]:
        m = tiny_gpt2()
        m.load_state_dict(initial)
        m.eval()
        acc = torch.zeros(N, recorder.width, dtype=torch.float64)
        for idx in batches:
            labels = data.labels[idx][:, 1:] if shifted else data.labels[idx]
            count = int((labels != -100).sum())
            grads = loop_gradients(m, m.state_dict(), idx, lambda m, i: token_sum_loss(m, i, data))
            acc.index_add_(0, torch.tensor(idx), LR0 / count * grads)
            loss = sum(token_sum_loss(m, i, data) for i in idx) / count
            step = torch.autograd.grad(loss, list(m.parameters()))
            with torch.no_grad():
                for p, g in zip(m.parameters(), step, strict=True):
                    p -= LR0 * g
        return m, acc

    matching = [
        acc
        for m, acc in map(replay, (True, False))
        # HF's causal-LM loss runs in float32 even for a float64 model
        if all(
            torch.allclose(v, model.state_dict()[k], rtol=1e-5, atol=1e-7)
            for k, v in m.state_dict().items()
        )
    ]
    assert len(matching) == 1, "no replay reproduces the Trainer's parameters"
    expected = matching[0]
    assert same_state(tt.Checkpoint(callback.saved[-1]).load_state(), model.state_dict())
    got = recorder.accumulator()
    assert ((got - expected).abs().max() / expected.abs().max()) < 1e-6  # float32 loss upcast

    # TracIn on the saved checkpoints (a small projection keeps it cheap)
    est = tt.TracIn(
        model, task, callback.checkpoints(), projection=16, batch_size=6, progress=False
    )
    scores = est.fit(Texts(with_index=False)).score(Texts(with_index=False))
    assert scores.shape == (N, N) and torch.isfinite(scores).all()
    assert [c.learning_rate for c in callback.checkpoints()] == [LR0, LR0]


class TokenMean(tt.LanguageModeling):
    """Each example's *mean* token loss: not what GPT-2's loss (Σ tokens / count) averages."""

    def loss(self, outputs, batch):
        tokens = (batch["labels"][:, 1:] != -100).sum(dim=1).clamp(min=1)
        return super().loss(outputs, batch) / tokens


def test_a_task_that_does_not_match_the_models_loss_is_refused(tmp_path: Path):
    model = tiny_gpt2()
    recorder = tt.TrajectoryRecorder(model, TokenMean(), n_train=N, layers=["transformer.ln_f"])
    callback = TraintraceCallback(tmp_path / "ckpts", recorder=recorder)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=1,
        per_device_train_batch_size=BATCH,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Texts(),
        data_collator=LoggingCollator(),
        callbacks=[callback],
    )
    with pytest.raises(tt.ConfigurationError, match=r"neither the mean of TokenMean"):
        trainer.train()
    assert recorder.steps_recorded == 0
