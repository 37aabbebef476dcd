"""Hugging Face ``Trainer`` integration: save TracIn checkpoints and record HYDRA while training.

:class:`TraintraceCallback` is a ``transformers.TrainerCallback``. Added to a ``Trainer`` it

* saves checkpoints every ``every_steps`` optimizer steps and/or every ``every_epochs`` epochs
  (and at the end): ``<output_dir>/step-<global step>.pt``, written with ``torch.save`` as
  ``{"model": state_dict, "optimizer": {"param_groups": [{"lr": η, ...}], "state": {}},
  "lr": η, "global_step": t, "epoch": e}``. ``η`` is the learning rate of the optimizer step that
  produced these parameters (read before the scheduler moves on to the next step's value), so
  ``tt.Checkpoint(path)`` reads TracIn's ``η_c`` from the file without ``lr=``. Only the
  learning rates of the optimizer are kept, not its moments (the file is the model's size);
* optionally records HYDRA's step-weighted gradient sum ``a_i = Σ_t (η_t / B_t) ∇l(z_i, θ_t)``
  into a :class:`~traintrace.TrajectoryRecorder`, once per optimizer step, at the parameters
  ``θ_t`` the step's gradient was taken at and with the step's ``η_t``.

Example::

    from traintrace.interfaces.huggingface import TraintraceCallback

    callback = TraintraceCallback("runs/ckpts", every_steps=100)
    trainer = Trainer(model, args, train_dataset=train, callbacks=[callback])
    trainer.train()
    tracin = tt.TracIn(model, tt.Classification(), callback.checkpoints(), layers="last")

Recording HYDRA needs each training example's position in the training set: let the Dataset
return it under ``index_key`` (default ``"index"``) and set
``TrainingArguments(remove_unused_columns=False)`` so the Trainer keeps that key; the callback
takes it out of the batch before the model sees it::

    recorder = tt.TrajectoryRecorder(model, tt.Classification(), n_train=len(train),
                                     path="runs/hydra", layers="last")
    callback = TraintraceCallback("runs/ckpts", every_epochs=1, recorder=recorder)

The batch is captured by forward hooks on the model while it is in training mode and replayed
to the recorder before ``optimizer.step()`` (one ``record`` call per micro-batch, so with
gradient accumulation ``recorder.steps_recorded`` counts micro-batches). Each example's weight
is read off the loss the Trainer actually differentiates: the model's returned loss must equal
``Σ_i task.loss_i / D`` with ``D`` the micro-batch size (models whose loss is a plain mean) or
the ``num_items_in_batch`` the Trainer passed (causal LMs: tokens of the whole step), and the
Trainer's own division by the number of micro-batches is applied when it makes one; a task
whose loss the model does not average that way is refused (``ConfigurationError``). HYDRA's
formula is then exact for plain SGD (``optim="sgd"``, ``max_grad_norm=0``, no weight decay);
with AdamW (the Trainer's default), momentum or gradient clipping it is an approximation and
the recorder warns once. Recording runs in one process only (``world_size`` 1); a Trainer with
``compute_loss_func`` or ``label_smoothing_factor`` computes the loss outside the model and is
refused.

``transformers`` (and ``accelerate``, which its Trainer needs) are the optional extra
``traintrace[hf]``; importing this module without them raises an ``ImportError`` saying so.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from traintrace.checkpoints import Checkpoint
from traintrace.exceptions import ConfigurationError
from traintrace.methods.hydra import TrajectoryRecorder

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "traintrace.interfaces.huggingface needs transformers and accelerate: pip install "
        f"'traintrace[hf]' (or pip install transformers accelerate). ({exc})"
    ) from exc

__all__ = ["TraintraceCallback"]

#: keys the Trainer adds to a model call that are not part of the training example
_TRAINER_KEYS = ("num_items_in_batch", "return_dict")


def _positive_int_or_none(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")
    return value


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the object itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _group_lrs(optimizer: Any) -> list[float]:
    groups = getattr(_unwrap_optimizer(optimizer), "param_groups", None)
    if not groups:
        raise ConfigurationError(
            f"the Trainer's optimizer ({type(optimizer).__name__}) has no param_groups to read the "
            "learning rate from"
        )
    return [float(g["lr"]) for g in groups]


class TraintraceCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` saving TracIn checkpoints (and HYDRA's trajectory).

    Args:
        output_dir: directory for the checkpoint files (created if missing).
        every_steps: save after every this many optimizer steps (``state.global_step``).
        every_epochs: save at the end of every this many epochs.
        save_final: also save at the end of training (unless that step was just saved).
        recorder: a :class:`~traintrace.TrajectoryRecorder` built on the same model; each
            optimizer step's batch is recorded into it (module docstring for the requirements).
            It is flushed whenever a checkpoint is saved and at the end of training, and left
            open (``HYDRA(model, task, recorder)`` reads it).
        index_key: the key under which the Dataset returns each example's training-set
            index (needed with ``recorder``); removed from the batch before the model is called.

    At least one of ``every_steps``, ``every_epochs`` and ``save_final`` must save something.

    Attributes:
        saved: the paths written so far, in order.
        learning_rates: the learning rate stored in each saved file, in the same order.

    Cost: one ``torch.save`` of the state dict per checkpoint; with a recorder, one vmapped
    per-example gradient pass over each training batch (what ``TrajectoryRecorder.record``
    costs) besides the Trainer's own forward and backward.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        *,
        every_steps: int | None = None,
        every_epochs: int | None = None,
        save_final: bool = True,
        recorder: TrajectoryRecorder | None = None,
        index_key: str = "index",
    ) -> None:
        self.every_steps = _positive_int_or_none(every_steps, "every_steps")
        self.every_epochs = _positive_int_or_none(every_epochs, "every_epochs")
        if self.every_steps is None and self.every_epochs is None and not save_final:
            raise ConfigurationError(
                "TraintraceCallback would save nothing: give every_steps=, every_epochs= or "
                "save_final=True"
            )
        if recorder is not None and not isinstance(recorder, TrajectoryRecorder):
            raise ConfigurationError(
                f"recorder must be a tt.TrajectoryRecorder, got {type(recorder).__name__}"
            )
        if not isinstance(index_key, str) or not index_key:
            raise ConfigurationError(f"index_key must be a non-empty string, got {index_key!r}")
        self.output_dir = Path(output_dir)
        self.save_final = bool(save_final)
        self.recorder = recorder
        self.index_key = index_key
        self.saved: list[Path] = []
        self.learning_rates: list[float] = []
        self._saved_steps: set[int] = set()
        self._step_lrs: list[float] | None = None  # the lrs of the last optimizer step
        self._pending: tuple[dict[str, Any], Tensor, int | None] | None = None
        self._captured: list[_MicroBatch] = []
        self._hooks: list[Any] = []
        self._replaying = False
        self._model: nn.Module | None = None

    def __repr__(self) -> str:
        return (
            f"TraintraceCallback(output_dir={str(self.output_dir)!r}, every_steps="
            f"{self.every_steps}, every_epochs={self.every_epochs}, saved={len(self.saved)}, "
            f"recorder={self.recorder!r})"
        )

    def checkpoints(self) -> list[Checkpoint]:
        """``[tt.Checkpoint(path)]`` for every saved file (learning rates read from the files)."""
        return [Checkpoint(path) for path in self.saved]

    # -- Trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        model = kwargs.get("model")
        if self.recorder is None:
            return
        if getattr(args, "world_size", 1) != 1:
            raise ConfigurationError(
                f"TraintraceCallback(recorder=...) records in one process, but this Trainer runs "
                f"{args.world_size} processes; record without distributed training"
            )
        if getattr(args, "remove_unused_columns", False):
            raise ConfigurationError(
                "TraintraceCallback(recorder=...) needs each example's training-set index under "
                f"the key {self.index_key!r}, but TrainingArguments(remove_unused_columns=True) "
                "drops keys the model's forward does not take. Set "
                "TrainingArguments(remove_unused_columns=False) and let the Dataset return "
                f"{self.index_key!r}."
            )
        if not isinstance(model, nn.Module):
            raise ConfigurationError("the Trainer passed no model to the callback")
        if model is not self.recorder.model and not _shares_parameters(model, self.recorder.model):
            raise ConfigurationError(
                f"the recorder was built on another model ({type(self.recorder.model).__name__}) "
                f"than the one being trained ({type(model).__name__}); build "
                "TrajectoryRecorder(model, ...) on the model you pass to the Trainer"
            )
        self._model = model
        self._hooks = [
            model.register_forward_pre_hook(self._capture, with_kwargs=True),
            model.register_forward_hook(self._measure_scale, with_kwargs=True),
        ]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        optimizer = kwargs.get("optimizer")
        self._step_lrs = _group_lrs(optimizer)
        if self.recorder is None:
            return
        captured, self._captured = self._captured, []
        if not captured:
            raise ConfigurationError(
                "TraintraceCallback saw no training batch before this optimizer step; the model "
                "must be called as model(**batch) in training mode (a custom compute_loss that "
                "calls a submodule instead is not supported)"
            )
        lr = _unwrap_optimizer(optimizer)
        self._replaying = True
        try:
            for micro in captured:
                # the Trainer divides a loss by the number of micro-batches unless it passed
                # num_items_in_batch to the model (then the model's loss is already scaled)
                denom = micro.denominator * (1 if micro.trainer_scaled else len(captured))
                self.recorder.record(micro.batch, micro.indices, lr, batch_size=denom)
        finally:
            self._replaying = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every_steps is not None and state.global_step % self.every_steps == 0:
            self._save(state, kwargs.get("model"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every_epochs is None or state.epoch is None:
            return
        epoch = round(state.epoch)
        if abs(state.epoch - epoch) < 1e-6 and epoch % self.every_epochs == 0:
            self._save(state, kwargs.get("model"))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            if self.save_final:
                self._save(state, kwargs.get("model"))
            if self.recorder is not None:
                self.recorder.flush()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self._captured.clear()
            self._pending = None

    # -- internals --------------------------------------------------------------------------------
    def _capture(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook: take the index out of the batch; keep training batches to record."""
        if self._replaying or self.index_key not in kwargs:
            if module.training and not self._replaying and self.recorder is not None:
                raise ConfigurationError(
                    f"a training batch has no {self.index_key!r} key (it has "
                    f"{sorted(kwargs)}); TraintraceCallback(recorder=...) needs the Dataset to "
                    f"return each example's training-set index as {self.index_key!r} and "
                    "TrainingArguments(remove_unused_columns=False)"
                )
            return None
        kwargs = dict(kwargs)
        indices = kwargs.pop(self.index_key)
        if module.training:
            if args:
                raise ConfigurationError(
                    "TraintraceCallback records batches passed as model(**batch); this model was "
                    f"called with {len(args)} positional arguments"
                )
            batch = {k: v for k, v in kwargs.items() if k not in _TRAINER_KEYS}
            items = kwargs.get("num_items_in_batch")
            items = None if items is None else int(items)
            self._pending = (batch, torch.as_tensor(indices).reshape(-1), items)
        return args, kwargs

    def _measure_scale(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Forward hook: how the model's loss weighs each example's ``task.loss``.

        HYDRA's step weight is ``η_t / B_t`` for a loss that is the mean of ``task.loss`` over
        the step's ``B_t`` examples. What the Trainer differentiates is the model's own loss,
        which is the mean over the micro-batch for some models and ``Σ / num_items_in_batch``
        (tokens or labels of the whole step) for others, so the weight is read off the actual
        loss: ``loss = Σ_i task.loss_i / D`` must hold for ``D`` one of those two counts.
        """
        if self._replaying or self._pending is None or not module.training:
            return
        batch, indices, items = self._pending
        self._pending = None
        task = self.recorder.task  # type: ignore[union-attr]
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ConfigurationError(
                "TraintraceCallback(recorder=...) reads the training loss the model returns, but "
                f"{type(module).__name__} returned none (labels under {task.label_key!r} missing, "
                "or a Trainer with compute_loss_func / label_smoothing_factor computes it "
                "outside the model); record with TrajectoryRecorder in your own training loop"
            )
        with torch.no_grad():
            per_example = task.loss(_prediction(output, module), batch).detach().double()
        size = len(per_example)
        total = float(per_example.sum())
        value = float(loss.detach().double())
        candidates = [size] + ([items] if items is not None and items != size else [])
        for d in candidates:
            if math.isclose(total / d, value, rel_tol=1e-4, abs_tol=1e-7):
                self._captured.append(_MicroBatch(batch, indices, d, items is not None))
                return
        raise ConfigurationError(
            f"the model's training loss ({value:.6g}) is neither the mean of "
            f"{type(task).__name__}.loss over the batch ({total / size:.6g}) nor its sum over "
            "num_items_in_batch"
            + (f" ({total / items:.6g})" if items else "")
            + ", so HYDRA's step weights η/B would not describe this training. Use the task "
            "whose per-example loss the model averages (tt.LanguageModeling sums token losses; "
            "tt.Classification is cross-entropy; tt.Regression is the mean squared error)."
        )

    def _save(self, state: Any, model: nn.Module | None) -> None:
        step = int(state.global_step)
        if step in self._saved_steps or not state.is_world_process_zero:
            return
        if not isinstance(model, nn.Module):
            raise ConfigurationError("the Trainer passed no model to the callback")
        if self._step_lrs is None:
            # no optimizer step yet (a save before training): nothing has a learning rate
            return
        if self.recorder is not None:
            self.recorder.flush()  # the store then matches this checkpoint (resume together)
        lrs = self._step_lrs
        payload = {
            "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": lr, "params": []} for lr in lrs]},
            "lr": lrs[0],
            "global_step": step,
            "epoch": float(state.epoch or 0.0),
        }
        path = self.output_dir / f"step-{step:08d}.pt"
        fd, tmp = tempfile.mkstemp(dir=self.output_dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(payload, fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._saved_steps.add(step)
        self.saved.append(path)
        self.learning_rates.append(lrs[0])


def _prediction(output: Any, module: nn.Module) -> Tensor:
    """The prediction tensor of a Hugging Face output (``.logits``), as Task.forward reads it."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise ConfigurationError(
            f"TraintraceCallback(recorder=...) needs the model's logits, but "
            f"{type(module).__name__} returned {type(output).__name__} without .logits"
        )
    return logits


@dataclass
class _MicroBatch:
    """One captured training forward: the batch, its indices, and the loss's denominator."""

    batch: dict[str, Any]
    indices: Tensor
    denominator: int  # the model's loss is Σ task.loss / denominator
    trainer_scaled: bool  # num_items_in_batch was passed: the Trainer does not divide again


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the very same parameter tensors (a wrapper and its model)."""
    ids_b = {id(p) for p in b.parameters()}
    return bool(ids_b) and all(id(p) in ids_b for p in a.parameters())
