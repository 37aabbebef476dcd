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

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traintrace.data import BATCH_FORMATS as _FORMATS
from traintrace.data import batch_size_of
from traintrace.exceptions import BatchFormatError, ConfigurationError, LabelError, ModelOutputError
from traintrace.validation import format_indices

__all__ = ["Classification", "LanguageModeling", "Regression", "Task", "require_task"]

#: Which part of a model's output is the prediction: an index into a tuple, a key or attribute
#: name, or a function of the whole output; ``None`` for a tensor or an output with ``.logits``.
OutputSelector = int | str | Callable[[Any], Tensor] | None

_OUTPUT_HINT = (
    "say which part is the prediction with output=: an index (Classification(output=1) for "
    "the second element of a tuple), a key or attribute name (output='logits'), or a function "
    "of the output (output=lambda out: out[1])"
)

# cross-entropy's default ignore_index is -100; traintrace passes a value no label can take so
# that a -100 label is never dropped silently (it is refused, or ignored only when asked).
_NO_IGNORE = -(2**62)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return type(value).__name__


def _check_selector(output: Any) -> OutputSelector:
    ok = output is None or callable(output) or isinstance(output, str)
    ok = ok or (isinstance(output, int) and not isinstance(output, bool))
    if not ok or output == "":
        raise ConfigurationError(
            f"output must be an index, a key/attribute name or a function of the model's output, "
            f"got {output!r}"
        )
    return output


def _selector_repr(output: OutputSelector) -> str:
    if callable(output) and not isinstance(output, str):
        module = getattr(output, "__module__", "") or ""
        return f"{module}.{getattr(output, '__qualname__', type(output).__qualname__)}"
    return repr(output)


def _unwrap_outputs(out: Any, output: OutputSelector = None, owner: str = "Task") -> Tensor:
    """The prediction tensor of a model output (tensor, ``.logits``, mapping, tuple).

    With ``output=None`` a tensor is used as it is, an object or mapping with ``logits`` (a
    Hugging Face ``ModelOutput``) gives its logits, and a 1-tuple its element; a longer tuple
    is refused (:class:`ModelOutputError`) rather than guessing which element is meant.
    """
    if output is None:
        if isinstance(out, Tensor):
            return out
        logits = getattr(out, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        if isinstance(out, Mapping):
            if isinstance(out.get("logits"), Tensor):
                return out["logits"]
            found = {str(k): _describe(v) for k, v in out.items()}
            raise ModelOutputError(
                f"the model returned a {type(out).__name__} with keys {found} and no 'logits'; "
                f"{_OUTPUT_HINT.replace('Classification', owner)}"
            )
        if isinstance(out, tuple | list):
            if len(out) == 1 and isinstance(out[0], Tensor):
                return out[0]
            parts = ", ".join(_describe(v) for v in out)
            raise ModelOutputError(
                f"the model returned a {type(out).__name__} of {len(out)} values ({parts}), so "
                "traintrace cannot tell which one is the prediction (it no longer takes the "
                f"first); {_OUTPUT_HINT.replace('Classification', owner)}"
            )
        raise ModelOutputError(
            f"the model returned {type(out).__name__}, not a tensor or an object with `.logits`; "
            f"{_OUTPUT_HINT.replace('Classification', owner)}, or override Task.forward"
        )
    try:
        if callable(output) and not isinstance(output, str):
            value = output(out)
        elif isinstance(output, int) or (isinstance(out, Mapping) and output in out):
            value = out[output]
        else:
            value = getattr(out, output)
    except (IndexError, KeyError, AttributeError, TypeError) as exc:
        raise ModelOutputError(
            f"{owner}(output={_selector_repr(output)}) could not select the prediction from the "
            f"model's {_describe(out)} ({type(exc).__name__}: {exc}); "
            + _OUTPUT_HINT.replace("Classification", owner)
        ) from exc
    if not isinstance(value, Tensor):
        raise ModelOutputError(
            f"{owner}(output={_selector_repr(output)}) selected a {type(value).__name__}, not a "
            f"tensor; {_OUTPUT_HINT.replace('Classification', owner)}"
        )
    return value


def _positions(mask: Tensor) -> Tensor | None:
    """Positions where ``mask`` is true, or None when none is, or when running under vmap.

    Under ``torch.func.vmap`` a tensor's values cannot reach Python; the check is then left to
    :meth:`Task.validate`, which the estimators run once per batch outside vmap.
    """
    try:
        if not bool(mask.any()):
            return None
    except RuntimeError as exc:
        if "vmap" in str(exc):
            return None
        raise
    return mask.reshape(-1).nonzero().reshape(-1)


class Task:
    """Base class: how to run the model on a batch, its training loss and the query measurement.

    Subclass it for a custom model or objective. Override :meth:`loss` (required) and optionally
    :meth:`measurement`, :meth:`forward`, :meth:`split`, :meth:`validate` and
    :meth:`sample_loss`. All methods work on whole batches and must return one value per
    example (shape ``[batch]``): traintrace calls them on batches of one example under
    ``torch.func.vmap`` to get exact per-example gradients, so they must not mix examples (no
    batch-mean, no in-place updates of module state) and must not branch in Python on tensor
    values (checks of values belong in :meth:`validate`, which runs outside vmap).

    Args:
        output: which part of the model's output is the prediction when the model returns more
            than one tensor: an index into a tuple (``output=1`` for ``(hidden, logits)``), a
            key or attribute name (``"logits"``), or a function of the output. ``None``
            (default): a tensor, or the ``.logits`` of a Hugging Face ``ModelOutput``; a tuple
            of several tensors is then refused with :class:`ModelOutputError`.
        label_key: the key of the labels in mapping batches. With the default ``"labels"`` a
            batch without ``"labels"`` but with ``"label"`` (the column name Hugging Face
            datasets use) takes ``"label"``; a batch with both is refused. Any other value is
            used exactly. The label key is not passed to the model.

    Example::

        class Poisson(tt.Task):
            def loss(self, outputs, batch):
                y = self.labels(batch, required=True)
                return F.poisson_nll_loss(outputs.squeeze(-1), y, reduction="none")
    """

    #: True when a larger measurement is better for the query (a margin or a probability), False
    #: when it is a loss. Attribution scores are oriented so that positive means "helps".
    measurement_higher_is_better: bool = False

    #: Key of the labels in mapping batches (see the class docstring for ``"label"``).
    label_key: str = "labels"

    #: Which part of the model's output is the prediction (see the class docstring).
    output: OutputSelector = None

    def __init__(self, *, output: OutputSelector = None, label_key: str = "labels") -> None:
        self.output = _check_selector(output)
        if not isinstance(label_key, str) or not label_key:
            raise ConfigurationError(
                f"label_key must be a non-empty string (the key of the labels in mapping "
                f"batches), got {label_key!r}"
            )
        self.label_key = label_key

    def _extra_repr(self) -> list[str]:
        """Non-default ``output=``/``label_key=`` for ``repr`` (stores compare task reprs)."""
        parts = []
        if self.output is not None:
            parts.append(f"output={_selector_repr(self.output)}")
        if self.label_key != "labels":
            parts.append(f"label_key={self.label_key!r}")
        return parts

    # -- reading batches ---------------------------------------------------------------------
    def _label_key_of(self, batch: Mapping[str, Any]) -> str | None:
        """The key holding the labels in a mapping batch, or None (rule: class docstring)."""
        key = self.label_key
        if key in batch:
            if key == "labels" and "label" in batch:
                raise BatchFormatError(
                    "the batch has both 'labels' and 'label' keys; pass label_key= to the task "
                    "to say which holds the labels (the other would be passed to the model), or "
                    "remove one"
                )
            return key
        if key == "labels" and "label" in batch:
            return "label"
        return None

    def split(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Tensor | None]:
        """Split a batch into ``(positional inputs, keyword inputs, labels or None)``."""
        if isinstance(batch, Tensor):
            return (batch,), {}, None
        if isinstance(batch, Mapping):
            key = self._label_key_of(batch)
            kwargs = {k: v for k, v in batch.items() if k != key}
            if not kwargs:
                raise BatchFormatError(
                    f"mapping batch has only the key {key!r} and no model inputs; " + _FORMATS
                )
            return (), kwargs, (batch[key] if key is not None else None)
        if isinstance(batch, tuple | list):
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
            if isinstance(batch, Mapping):
                found = (
                    f"the batch has no {self.label_key!r} key (keys found: "
                    f"{sorted(map(str, batch))}); pass label_key= to the task to name the key "
                    "holding the labels"
                )
            else:
                found = f"the batch has none ({_describe(batch)}); {_FORMATS}"
            raise BatchFormatError(
                f"{type(self).__name__} needs labels for {what}, but {found}. For unlabeled "
                "queries use a measurement that needs no label "
                "(Classification(measurement='margin'))."
            )
        return y

    # -- the model ---------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: Any) -> Tensor:
        """Run the model on a batch and return its prediction tensor (logits, values).

        Positional inputs are passed as ``model(*inputs)``, mapping entries as
        ``model(**inputs)``; the prediction is chosen from the output by ``output=``.
        """
        args, kwargs, _ = self.split(batch)
        try:
            out = model(*args, **kwargs)
        except (TypeError, RuntimeError) as exc:
            if "vmap" in str(exc) or "functorch" in str(exc):
                raise
            raise BatchFormatError(
                f"the model could not be called on this batch ({type(exc).__name__}: {exc}). "
                f"{_FORMATS}; positional inputs are passed as model(*inputs), mapping entries as "
                "model(**inputs)."
                + _forward_hint(model, args, kwargs)
                + " Override Task.forward if your model needs something else."
            ) from exc
        return self.prediction(out)

    def prediction(self, out: Any) -> Tensor:
        """The prediction tensor of a model's raw output (``output=`` selects it; a Hugging Face
        ``ModelOutput``'s ``.logits``; a bare tuple without ``output=`` is refused)."""
        return _unwrap_outputs(out, self.output, type(self).__name__)

    # -- checks outside vmap -----------------------------------------------------------------
    def validate(self, outputs: Tensor, batch: Any, offset: int = 0) -> None:
        """Check a batch's values (labels against the output size); raise a named error.

        Called once per batch by the estimators outside ``torch.func.vmap`` (see
        :func:`traintrace.validation.check_batch`), where data-dependent checks can run.
        ``outputs`` is the prediction tensor of a plain forward; ``offset`` is the data-set
        index of the batch's first example, used to name examples in errors. The base class
        checks nothing; the built-in tasks check their labels.
        """

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


def _forward_hint(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Likely causes of a failed model call: non-tensor inputs, a float dtype mismatch."""
    hints = []
    other = sorted(str(k) for k, v in kwargs.items() if not isinstance(v, Tensor))
    if other:
        hints.append(
            f" The batch keys {other} are not tensors (text columns?) and are passed to the "
            "model as keyword arguments: remove those columns (dataset.remove_columns(...)) or "
            "set label_key= if one of them holds the labels."
        )
    param = next(iter(model.parameters()), None)
    if param is not None and param.is_floating_point():
        floats = {
            str(v.dtype)
            for v in (*args, *kwargs.values())
            if isinstance(v, Tensor) and v.is_floating_point() and v.dtype != param.dtype
        }
        if floats:
            hints.append(
                f" The inputs are {sorted(floats)} but the model is {param.dtype}: convert the "
                f"data (x.to({param.dtype})) or the model."
            )
    return "".join(hints)


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


def _label_values(y: Tensor, positions: Tensor, offset: int) -> str:
    """``"examples [3, 9] (labels [7, -1])"`` for an error message."""
    flat = y.reshape(-1)
    values = [v.item() for v in flat[positions[:10]]]
    more = ", ..." if positions.numel() > 10 else ""
    return (
        f"examples {format_indices((positions + offset).tolist())} "
        f"(labels {str(values)[:-1]}{more}])"
    )


class Classification(Task):
    """Multi-class classification with cross-entropy.

    Args:
        measurement: ``"loss"`` — the query's cross-entropy (needs labels; lower is better);
            ``"margin"`` — the logit of the class minus the log-sum-exp of the other logits
            (higher is better), where the class is the query's label when the batch has one and
            ``use_labels`` is true, else the model's predicted class. The margin is the TracIn
            "prediction variant": it needs no label. ``"logit"`` — the raw logit ``Φ_c`` of
            that same class (higher is better; what representer points decompose); for a
            single-logit binary classifier (logits ``[0, s]``) it is ``±s``, the class's logit
            relative to the other one, which equals the margin there.
        use_labels: for the margin and the logit, use the label when present (default) or always
            the predicted class.
        ignore_index: a label value whose examples get a zero loss (and so a zero gradient and
            a zero score against every query, and self-influence 0), like PyTorch's
            ``ignore_index``; for the margin, such queries use the predicted class. ``None``
            (default): every label must be a class index in ``[0, classes)`` — in particular
            cross-entropy's usual ignore index ``-100`` is refused, since it would silently
            give the example a zero gradient and rank it *least* suspicious.
        output, label_key: see :class:`Task`.

    Model outputs must be logits of shape ``[batch, classes]`` (Hugging Face outputs with
    ``.logits`` are unwrapped), or one logit per example (``[batch]`` or ``[batch, 1]``) for a
    binary classifier with labels 0/1, whose loss is then ``BCEWithLogits``. The training loss
    is ``F.cross_entropy(..., reduction="none")``.

    Labels are integer class indices ``[batch]`` (or ``[batch, 1]``); ``bool`` and any integer
    dtype are accepted. For a single-logit (binary) classifier float targets are also accepted,
    as ``BCEWithLogits`` takes them: probabilities in ``[0, 1]`` (0/1 for the margin). Otherwise
    float labels are refused, even whole numbers (``3.7`` would be truncated to 3): convert them
    with ``y.long()``; for soft labels (probabilities, label
    smoothing) or multi-label targets write a :class:`Task` subclass whose ``loss`` is e.g.
    ``-(y * F.log_softmax(logits, -1)).sum(-1)``. Label values are checked against the number of
    classes by :meth:`validate` (out of range: :class:`LabelError` naming the examples).
    """

    def __init__(
        self,
        measurement: Literal["loss", "margin", "logit"] = "loss",
        *,
        use_labels: bool = True,
        ignore_index: int | None = None,
        output: OutputSelector = None,
        label_key: str = "labels",
    ) -> None:
        super().__init__(output=output, label_key=label_key)
        if measurement not in ("loss", "margin", "logit"):
            raise ConfigurationError(
                f"measurement must be 'loss', 'margin' or 'logit', got {measurement!r}"
            )
        if ignore_index is not None and (
            isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
        ):
            raise ConfigurationError(
                f"ignore_index must be an integer label value (e.g. -100) or None, got "
                f"{ignore_index!r}"
            )
        self.measurement_kind = measurement
        self.use_labels = use_labels
        self.ignore_index = ignore_index
        self.measurement_higher_is_better = measurement != "loss"

    def __repr__(self) -> str:
        parts = [f"measurement={self.measurement_kind!r}"]
        if self.ignore_index is not None:
            parts.append(f"ignore_index={self.ignore_index}")
        return f"Classification({', '.join(parts + self._extra_repr())})"

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
                "sequences, output= to pick the logits from the model's output, or a custom Task"
            )
        return outputs

    def _class_labels(self, y: Tensor, n: int) -> Tensor:
        """Labels as ``long [batch]`` after the checks that need no values (vmap-safe)."""
        if not isinstance(y, Tensor):
            raise LabelError(
                f"Classification labels must be a tensor of class indices, got "
                f"{type(y).__name__}; make the data set return integer labels"
            )
        if y.is_floating_point() or y.is_complex():
            raise LabelError(
                f"Classification needs integer class indices, but the labels are {y.dtype} "
                f"(shape {tuple(y.shape)}); float labels would be truncated (3.7 -> 3). If they "
                "are whole numbers convert them with y.long(); for soft labels (probabilities, "
                "label smoothing) or multi-label targets write a Task subclass, e.g. loss = "
                "-(y * F.log_softmax(logits, -1)).sum(-1); use Regression for real-valued targets"
            )
        if y.numel() != n:
            raise LabelError(
                f"Classification needs one class index per example, but the labels have shape "
                f"{tuple(y.shape)} for {n} examples; for one-hot or multi-label "
                "targets write a Task subclass (e.g. with binary_cross_entropy_with_logits), or "
                "pass class indices (y.argmax(-1) for one-hot)"
            )
        return y.reshape(-1).long()

    def _bad_labels(self, y: Tensor, classes: int) -> Tensor:
        bad = (y < 0) | (y >= classes)
        if self.ignore_index is not None:
            bad = bad & (y != self.ignore_index)
        return bad

    def _label_error(self, y: Tensor, positions: Tensor, classes: int, offset: int | None) -> None:
        where = (
            _label_values(y, positions, offset)
            if offset is not None
            else _label_values(y, positions, 0).replace("examples", "positions in the batch", 1)
        )
        bad = y.reshape(-1)[positions]
        if self.ignore_index is None and bool((bad == -100).any()):
            raise LabelError(
                f"{where} have label -100, cross-entropy's ignore index: such an example would "
                "get a zero loss and zero gradient and silently rank as the least suspicious; "
                "remove those examples (torch.utils.data.Subset) or pass "
                "Classification(ignore_index=-100) to give them a zero loss and zero scores "
                "explicitly"
            )
        raise LabelError(
            f"{where} are outside the model's {classes} classes (valid labels 0..{classes - 1}"
            + (f" or ignore_index={self.ignore_index}" if self.ignore_index is not None else "")
            + "); check the labels, or the size of the model's output layer"
            + (" (a single output is a binary classifier with labels 0/1)" if classes == 2 else "")
        )

    @staticmethod
    def _is_binary(outputs: Tensor) -> bool:
        return outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1)

    def _binary_targets(self, y: Tensor, n: int, offset: int | None, *, exact: bool) -> Tensor:
        """Float targets of a single-logit (binary) classifier, checked when values are visible.

        ``exact``: they must be 0 or 1 (the margin needs a class); else any probability in
        ``[0, 1]`` (the loss is ``BCEWithLogits``, which takes soft targets).
        """
        if y.numel() != n:
            raise LabelError(
                f"a binary classifier needs one target per example, but the labels have shape "
                f"{tuple(y.shape)} for {n} examples"
            )
        t = y.reshape(-1)
        bad = ~torch.isfinite(t) | (t < 0) | (t > 1)
        if exact:
            bad = bad | ((t != 0) & (t != 1))
        positions = _positions(bad)
        if positions is not None:
            where = _label_values(t, positions, offset or 0)
            if offset is None:
                where = where.replace("examples", "positions in the batch", 1)
            need = "0 or 1 (the margin needs a class)" if exact else "probabilities in [0, 1]"
            raise LabelError(
                f"{where}: float targets of a binary (single-logit) classifier must be {need}; "
                "for class indices use integer labels"
            )
        return t

    def _labels_for(self, outputs: Tensor, batch: Any, *, required: bool) -> Tensor | None:
        """Class labels ``long [batch]``, checked against the classes when values are visible."""
        y = self.labels(batch, required=required)
        if y is None:
            return None
        if self._is_binary(outputs) and isinstance(y, Tensor) and y.is_floating_point():
            return (self._binary_targets(y, outputs.shape[0], None, exact=True) > 0.5).long()
        logits = self._logits(outputs)
        y = self._class_labels(y, logits.shape[0])
        positions = _positions(self._bad_labels(y, logits.shape[-1]))
        if positions is not None:  # only outside vmap; validate() names data-set indices
            self._label_error(y, positions, logits.shape[-1], None)
        return y

    def validate(self, outputs: Tensor, batch: Any, offset: int = 0) -> None:
        """Labels are integer class indices in ``[0, classes)`` (or ``ignore_index``).

        For a single-logit (binary) classifier float targets are accepted: probabilities in
        ``[0, 1]`` for the loss, exactly 0 or 1 for the margin and the logit.

        Raises:
            LabelError: naming the examples (data-set indices) and their labels.
            BatchFormatError: labels missing where the loss needs them (keys found listed).
        """
        classes = self._logits(outputs).shape[-1]
        by_class = self.measurement_kind != "loss"  # the margin or the logit of a class
        y = self.labels(batch, required=not by_class)
        if y is None or (not self.use_labels and by_class):
            return
        n = batch_size_of(batch)
        if self._is_binary(outputs) and isinstance(y, Tensor) and y.is_floating_point():
            self._binary_targets(y, n, offset, exact=by_class)
            return
        flat = self._class_labels(y, n)
        positions = _positions(self._bad_labels(flat, classes))
        if positions is not None:
            self._label_error(flat, positions, classes, offset)

    def loss(self, outputs: Tensor, batch: Any) -> Tensor:
        logits = self._logits(outputs)
        y = self.labels(batch, required=True)
        if self._is_binary(outputs) and isinstance(y, Tensor) and y.is_floating_point():
            t = self._binary_targets(y, logits.shape[0], None, exact=False)
            return F.binary_cross_entropy_with_logits(
                logits[:, 1], t.to(logits.dtype), reduction="none"
            )
        y = self._labels_for(outputs, batch, required=True)
        ignore = _NO_IGNORE if self.ignore_index is None else self.ignore_index
        return F.cross_entropy(logits, y, ignore_index=ignore, reduction="none")

    def measurement(self, outputs: Tensor, batch: Any) -> Tensor:
        if self.measurement_kind == "loss":
            return self.loss(outputs, batch)
        logits = self._logits(outputs)
        y = self._labels_for(outputs, batch, required=False) if self.use_labels else None
        predicted = logits.argmax(dim=-1)
        if y is None:
            cls = predicted
        elif self.ignore_index is not None:
            cls = torch.where(y == self.ignore_index, predicted, y)
        else:
            cls = y
        chosen = logits.gather(-1, cls.unsqueeze(-1)).squeeze(-1)
        if self.measurement_kind == "logit" and not self._is_binary(outputs):
            return _check_per_example(chosen, logits, "logit")
        # the margin; for a binary [0, s] also the logit (±s: relative to the other class)
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

    Args:
        output, label_key: see :class:`Task`.

    :meth:`validate` refuses NaN or infinite targets, naming the examples.
    """

    def __init__(self, *, output: OutputSelector = None, label_key: str = "labels") -> None:
        super().__init__(output=output, label_key=label_key)

    def __repr__(self) -> str:
        return f"Regression({', '.join(self._extra_repr())})"

    def validate(self, outputs: Tensor, batch: Any, offset: int = 0) -> None:
        """Targets present, one value per output, finite.

        Raises:
            LabelError: non-finite targets (examples named by data-set index) or a target shape
                that does not match the prediction's.
        """
        y = self.labels(batch, required=True)
        n = batch_size_of(batch)
        per_example = outputs[0].numel() if outputs.ndim >= 1 and outputs.shape[0] else 1
        if not isinstance(y, Tensor) or y.numel() != n * per_example:
            raise LabelError(
                f"Regression targets have shape "
                f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__} for {n} "
                f"examples, but the model predicts {per_example} value(s) per example; they must "
                "hold the same number of values"
            )
        if y.is_floating_point():
            bad = ~torch.isfinite(y.reshape(n, -1)).all(dim=1)
            positions = _positions(bad)
            if positions is not None:
                raise LabelError(
                    f"{_label_values(y.reshape(n, -1)[:, 0], positions, offset)} have "
                    "non-finite (NaN or infinite) regression targets; fix or drop them"
                )

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

    Args:
        output, label_key: see :class:`Task`.

    :meth:`validate` checks that every label (or input id, when there are no labels) is a
    token id in ``[0, vocab)`` or ``-100``.
    """

    def __init__(self, *, output: OutputSelector = None, label_key: str = "labels") -> None:
        super().__init__(output=output, label_key=label_key)

    def __repr__(self) -> str:
        return f"LanguageModeling({', '.join(self._extra_repr())})"

    def _token_labels(self, batch: Any) -> Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            found = (
                f" (keys found: {sorted(map(str, batch))})" if isinstance(batch, Mapping) else ""
            )
            raise BatchFormatError(
                "LanguageModeling needs mapping batches with 'input_ids' (and optionally "
                f"'attention_mask' and 'labels'){found}"
            )
        key = self._label_key_of(batch)
        labels = batch[key] if key is not None else batch["input_ids"]
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
            raise LabelError(
                f"LanguageModeling labels must be integer token ids, got "
                f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}"
            )
        return labels

    def validate(self, outputs: Tensor, batch: Any, offset: int = 0) -> None:
        """Every label is a token id in ``[0, vocab)`` or -100 (ignored).

        Raises:
            LabelError: naming the examples (data-set indices) with out-of-range tokens.
        """
        vocab = outputs.shape[-1]
        labels = self._token_labels(batch).long()
        mask = batch.get("attention_mask")
        if isinstance(mask, Tensor) and mask.shape == labels.shape:
            labels = labels.masked_fill(mask == 0, -100)
        bad = ((labels < 0) & (labels != -100)) | (labels >= vocab)
        positions = _positions(bad.reshape(labels.shape[0], -1).any(dim=1))
        if positions is not None:
            values = sorted({int(v) for v in labels[bad].tolist()})[:10]
            raise LabelError(
                f"examples {format_indices((positions + offset).tolist())} have token labels "
                f"{values} outside the vocabulary of {vocab} (valid 0..{vocab - 1}, or -100 for "
                "ignored positions); check the tokenizer matches the model's vocabulary size"
            )

    def _token_losses(self, outputs: Tensor, batch: Any, targets: Tensor | None) -> Tensor:
        if outputs.ndim != 3:
            raise BatchFormatError(
                f"LanguageModeling expects logits [batch, seq, vocab], got {tuple(outputs.shape)}"
            )
        token_labels = self._token_labels(batch)
        labels = (targets if targets is not None else token_labels).long().clone()
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
