"""Layer 1 — what is differentiated.

A :class:`Task` turns ``(model, batch)`` into per-example training losses and per-example
query *measurements*. Every estimator differentiates these two functions and nothing else.

Batches may be

* a tensor ``x`` (inputs only, no labels);
* a tuple or list ``(x, y)`` or ``(x1, ..., xk, y)``: the last element is the label, the others
  are passed to the model positionally; a 1-tuple ``(x,)`` has no label;
* a mapping (Hugging Face style): the ``labels`` key is the label, every other key is passed to
  the model as a keyword argument.

Sign convention used everywhere in traintrace: a positive attribution score means the training
example *helps* the query. For a loss-like measurement (lower is better) helping means lowering
it, for a score-like measurement such as the logit margin (higher is better) raising it. Each
task says which kind its measurement is through :attr:`Task.measurement_higher_is_better`, and
estimators orient query gradients with :meth:`Task.oriented_measurement`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traintrace.data import BATCH_FORMATS as _FORMATS
from traintrace.exceptions import BatchFormatError, ConfigurationError

__all__ = ["Classification", "LanguageModeling", "Regression", "Task", "require_task"]


def _unwrap_outputs(out: Any) -> Tensor:
    """Return the prediction tensor from a model output (tensor, HF ModelOutput, dict, tuple)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise BatchFormatError(
        f"the model returned {type(out).__name__}, not a tensor or an object with `.logits`; "
        "override Task.forward to return the prediction tensor"
    )


class Task:
    """Base class: how to run the model on a batch, its training loss and the query measurement.

    Subclass it for a custom model or objective. Override :meth:`loss` (required) and optionally
    :meth:`measurement`, :meth:`forward`, :meth:`split` and :meth:`sample_loss`. All methods work
    on whole batches and must return one value per example (shape ``[batch]``): traintrace calls
    them on batches of one example under ``torch.func.vmap`` to get exact per-example gradients,
    so they must not mix examples (no batch-mean, no in-place updates of module state).

    Example::

        class Poisson(tt.Task):
            def loss(self, outputs, batch):
                _, _, y = self.split(batch)
                return F.poisson_nll_loss(outputs.squeeze(-1), y, reduction="none")
    """

    #: True when a larger measurement is better for the query (a margin or a probability), False
    #: when it is a loss. Attribution scores are oriented so that positive means "helps".
    measurement_higher_is_better: bool = False

    #: Key of the labels in mapping batches.
    label_key: str = "labels"

    # -- reading batches ---------------------------------------------------------------------
    def split(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
        """Split a batch into ``(positional inputs, keyword inputs, labels or None)``."""
        if isinstance(batch, Tensor):
            return (batch,), {}, None
        if isinstance(batch, Mapping):
            kwargs = {k: v for k, v in batch.items() if k != self.label_key}
            if not kwargs:
                raise BatchFormatError(
                    f"mapping batch has only the key {self.label_key!r} and no model inputs; "
                    + _FORMATS
                )
            return (), kwargs, batch.get(self.label_key)
        if isinstance(batch, (tuple, list)):
            if len(batch) == 0:
                raise BatchFormatError("empty tuple batch; " + _FORMATS)
            if len(batch) == 1:
                return (batch[0],), {}, None
            return tuple(batch[:-1]), {}, batch[-1]
        raise BatchFormatError(
            f"cannot read a batch of type {type(batch).__name__}; {_FORMATS}. "
            "Give a Dataset/DataLoader that yields one of these, or override Task.split."
        )

    def labels(self, batch: Any, *, required: bool, what: str = "the loss") -> Tensor | None:
        """Labels of a batch; raise :class:`BatchFormatError` when ``required`` and absent."""
        _, _, y = self.split(batch)
        if y is None and required:
            raise BatchFormatError(
                f"{type(self).__name__} needs labels for {what}, but the batch has none; "
                f"{_FORMATS}. For unlabeled queries use a measurement that needs no label "
                "(Classification(measurement='margin'))."
            )
        return y

    # -- the model ---------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """Run the model on a batch and return its prediction tensor (logits, values)."""
        args, kwargs, _ = self.split(batch)
        try:
            out = model(*args, **kwargs)
        except (TypeError, RuntimeError) as exc:
            if "vmap" in str(exc) or "functorch" in str(exc):
                raise
            raise BatchFormatError(
                f"the model could not be called on this batch ({type(exc).__name__}: {exc}). "
                f"{_FORMATS}; positional inputs are passed as model(*inputs), mapping entries as "
                "model(**inputs). Override Task.forward if your model needs something else."
            ) from exc
        return _unwrap_outputs(out)

    # -- what is differentiated -----------------------------------------------------------------
    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example training loss, shape ``[batch]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss(outputs, batch)")

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        """Per-example query measurement ``f(z', θ)``, shape ``[batch]``. Defaults to the loss."""
        return self.loss(outputs, batch)

    def oriented_measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        """The measurement with the sign that makes "lower is better" (used for query gradients).

        Equal to :meth:`measurement` for loss-like measurements and to its negative when
        :attr:`measurement_higher_is_better`; a training step along ``-∇l(z)`` then helps the
        query exactly when ``⟨∇l(z), ∇oriented⟩ > 0``.
        """
        m = self.measurement(outputs, batch)
        return -m if self.measurement_higher_is_better else m

    def sample_loss(
        self, outputs: Tensor, batch: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-example loss with labels drawn from the model's own predictive distribution.

        Its gradients give the true Fisher (used by K-FAC/EK-FAC with ``sampled_labels=True``).
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not define sample_loss; implement it to use the true "
            "Fisher, or use the empirical Fisher (sampled_labels=False)"
        )


def require_task(task: Any) -> Task:
    """``task`` if it is a :class:`Task`, else a :class:`ConfigurationError` saying what to pass."""
    if not isinstance(task, Task):
        raise ConfigurationError(
            f"task must be a traintrace Task (tt.Classification(), tt.Regression(), "
            f"tt.LanguageModeling() or a Task subclass), got {task!r}"
        )
    return task


def _check_per_example(value: Tensor, outputs: Tensor, name: str) -> Tensor:
    if value.ndim != 1 or value.shape[0] != outputs.shape[0]:
        raise BatchFormatError(
            f"{name} returned shape {tuple(value.shape)}, expected one value per example "
            f"([{outputs.shape[0]}])"
        )
    return value


class Classification(Task):
    """Multi-class classification with cross-entropy.

    Args:
        measurement: ``"loss"`` — the query's cross-entropy (needs labels; lower is better);
            ``"margin"`` — the logit of the class minus the log-sum-exp of the other logits
            (higher is better), where the class is the query's label when the batch has one and
            ``use_labels`` is true, else the model's predicted class. The margin is the TracIn
            "prediction variant": it needs no label.
        use_labels: for the margin, use the label when present (default) or always the predicted
            class.

    Model outputs must be logits of shape ``[batch, classes]`` (Hugging Face outputs with
    ``.logits`` are unwrapped), or one logit per example (``[batch]`` or ``[batch, 1]``) for a
    binary classifier with labels 0/1, whose loss is then ``BCEWithLogits``. The training loss
    is ``F.cross_entropy(..., reduction="none")``.
    """

    def __init__(
        self, measurement: Literal["loss", "margin"] = "loss", *, use_labels: bool = True
    ) -> None:
        if measurement not in ("loss", "margin"):
            raise ConfigurationError(f"measurement must be 'loss' or 'margin', got {measurement!r}")
        self.measurement_kind = measurement
        self.use_labels = use_labels
        self.measurement_higher_is_better = measurement == "margin"

    def __repr__(self) -> str:
        return f"Classification(measurement={self.measurement_kind!r})"

    @staticmethod
    def _logits(outputs: Tensor) -> Tensor:
        """``[batch, classes]`` logits; a single logit ``s`` (binary) becomes ``[0, s]``.

        With ``[0, s]`` the cross-entropy is ``BCEWithLogits(s, y)`` and the margin is ``±s``.
        """
        if outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
            s = outputs.reshape(-1, 1)
            return torch.cat([torch.zeros_like(s), s], dim=1)
        if outputs.ndim != 2:
            raise BatchFormatError(
                f"Classification expects logits of shape [batch, classes] (or one logit per "
                f"example for binary), got {tuple(outputs.shape)}; use LanguageModeling for "
                "sequences or a custom Task"
            )
        return outputs

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        logits = self._logits(outputs)
        y = self.labels(batch, required=True)
        return F.cross_entropy(logits, y.reshape(-1).long(), reduction="none")

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        if self.measurement_kind == "loss":
            return self.loss(outputs, batch)
        logits = self._logits(outputs)
        y = self.labels(batch, required=False) if self.use_labels else None
        cls = logits.argmax(dim=-1) if y is None else y.reshape(-1).long()
        chosen = logits.gather(-1, cls.unsqueeze(-1)).squeeze(-1)
        classes = torch.arange(logits.shape[-1], device=logits.device)
        others = logits.masked_fill(classes == cls.unsqueeze(-1), float("-inf"))
        return _check_per_example(chosen - torch.logsumexp(others, dim=-1), logits, "margin")

    def sample_loss(
        self, outputs: Tensor, batch: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        logits = self._logits(outputs)
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return F.cross_entropy(logits, y, reduction="none")


class Regression(Task):
    """Regression with squared error, ``l = mean over outputs of (prediction − target)²``.

    This is ``nn.MSELoss`` per example. Targets are reshaped to the prediction's shape when they
    hold the same number of values (so ``[batch]`` targets work with ``[batch, 1]`` outputs). The
    measurement is the query's squared error (lower is better).
    """

    def __repr__(self) -> str:
        return "Regression()"

    def _target(self, outputs: Tensor, batch: Any) -> Tensor:
        y = self.labels(batch, required=True)
        if y.numel() != outputs.numel():
            raise BatchFormatError(
                f"Regression target has shape {tuple(y.shape)} but the model predicts "
                f"{tuple(outputs.shape)}; they must hold the same number of values"
            )
        return y.reshape(outputs.shape).to(outputs.dtype)

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        err = (outputs - self._target(outputs, batch)) ** 2
        return err.reshape(outputs.shape[0], -1).mean(dim=1)

    def sample_loss(
        self, outputs: Tensor, batch: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        # (pred − y)² is −2·log N(y; pred, ½) up to a constant: sample y from that Gaussian.
        with torch.no_grad():
            noise = torch.randn(
                outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
            )
            y = outputs.detach() + noise * 0.5**0.5
        err = (outputs - y) ** 2
        return err.reshape(outputs.shape[0], -1).mean(dim=1)


class LanguageModeling(Task):
    """Causal language modeling: the per-example loss is the *sum* of next-token losses.

    Batches are mappings with ``input_ids`` (and optionally ``attention_mask`` and ``labels``).
    Labels default to ``input_ids``; positions with label ``-100`` or attention mask 0 are
    ignored. Logits ``[batch, seq, vocab]`` predict the token at the next position.
    """

    def __repr__(self) -> str:
        return "LanguageModeling()"

    def _token_losses(self, outputs: Tensor, batch: Any, targets: Tensor | None) -> Tensor:
        if outputs.ndim != 3:
            raise BatchFormatError(
                f"LanguageModeling expects logits [batch, seq, vocab], got {tuple(outputs.shape)}"
            )
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise BatchFormatError(
                "LanguageModeling needs mapping batches with 'input_ids' (and optionally "
                "'attention_mask' and 'labels')"
            )
        labels = targets if targets is not None else batch.get(self.label_key, batch["input_ids"])
        labels = labels.long().clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
        shift_logits = outputs[:, :-1, :]
        shift_labels = labels[:, 1:]
        tok = F.cross_entropy(
            shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
        )
        return tok.sum(dim=1)

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        return self._token_losses(outputs, batch, None)

    def sample_loss(
        self, outputs: Tensor, batch: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        with torch.no_grad():
            probs = torch.softmax(outputs.detach().float(), dim=-1)
            flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            sampled = flat.reshape(outputs.shape[:-1])
            # the sampled token at position t is the label of position t+1
            targets = torch.cat([sampled[:, :1], sampled[:, :-1]], dim=1)
        return self._token_losses(outputs, batch, targets)
