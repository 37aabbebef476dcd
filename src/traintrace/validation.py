"""Input validation in one place, with one message format.

Every check here raises a named error from :mod:`traintrace.exceptions` whose message reads

    ``<what> must be <requirement>, got <value>; <what to do>``

so that a user sees what was wrong, the value found and the fix. The small validators
(:func:`positive_int`, :func:`non_negative_int`, :func:`finite_positive`,
:func:`finite_non_negative`, :func:`one_of`, :func:`learning_rate`) return the value converted to
a plain Python number, so callers write ``self.k = positive_int("k", k)``.

Three checks are meant for the estimators' data path:

* :func:`require_length` — the number of examples of a loader (named errors for an empty or an
  unsized data set);
* :func:`check_batch` — the task's checks of one batch (labels against the output size, ignore
  indices, float labels), run on a plain forward *outside* ``torch.func.vmap``;
* :func:`check_model_dtype` — half-precision models refused with what to do.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor, nn

from traintrace.exceptions import (
    ConfigurationError,
    EmptyDataError,
    LearningRateError,
    ModelDtypeError,
    TraintraceError,
    UnsizedDataError,
)

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from traintrace.task import Task

__all__ = [
    "check_batch",
    "check_model_dtype",
    "finite_non_negative",
    "finite_positive",
    "format_indices",
    "learning_rate",
    "message",
    "non_negative_int",
    "one_of",
    "positive_int",
    "require_length",
]

_E = TypeVar("_E", bound=TraintraceError)


def message(what: str, requirement: str, value: Any, fix: str = "") -> str:
    """The library's one message format: ``"<what> must be <requirement>, got <value>; <fix>"``."""
    text = f"{what} must be {requirement}, got {value!r}"
    return f"{text}; {fix}" if fix else text


def _fail(error: type[_E], what: str, requirement: str, value: Any, fix: str) -> _E:
    return error(message(what, requirement, value, fix))


def format_indices(indices: Iterable[int], limit: int = 10) -> str:
    """``[3, 17, 42]`` or ``[3, 17, ..., 99] (25 in all)`` for error messages."""
    items = [int(i) for i in indices]
    shown = ", ".join(map(str, items[:limit]))
    if len(items) > limit:
        return f"[{shown}, ...] ({len(items)} in all)"
    return f"[{shown}]"


# -- scalar validators ------------------------------------------------------------------------
def _as_int(what: str, value: Any, requirement: str, fix: str, error: type[_E]) -> int:
    if isinstance(value, bool):
        raise _fail(error, what, requirement, value, fix)
    try:
        return operator.index(value)  # int, numpy integers; not 2.0, not "3"
    except TypeError:
        raise _fail(error, what, requirement, value, fix) from None


def positive_int(
    what: str,
    value: Any,
    *,
    minimum: int = 1,
    fix: str = "",
    error: type[_E] = ConfigurationError,  # type: ignore[assignment]
) -> int:
    """``value`` as an ``int`` >= ``minimum`` (default 1); bools and floats are refused.

    Raises:
        ConfigurationError (or ``error``): ``"<what> must be an integer >= 1, got 0; <fix>"``.
    """
    requirement = f"an integer >= {minimum}"
    n = _as_int(what, value, requirement, fix, error)
    if n < minimum:
        raise _fail(error, what, requirement, value, fix)
    return n


def non_negative_int(
    what: str,
    value: Any,
    *,
    fix: str = "",
    error: type[_E] = ConfigurationError,  # type: ignore[assignment]
) -> int:
    """``value`` as an ``int`` >= 0 (seeds, offsets); bools and floats are refused."""
    return positive_int(what, value, minimum=0, fix=fix, error=error)


def _as_float(what: str, value: Any, requirement: str, fix: str, error: type[_E]) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(error, what, requirement, value, fix)
    x = float(value)
    if not math.isfinite(x):
        raise _fail(error, what, requirement, value, fix)
    return x


def finite_positive(
    what: str,
    value: Any,
    *,
    fix: str = "",
    error: type[_E] = ConfigurationError,  # type: ignore[assignment]
) -> float:
    """``value`` as a ``float`` that is finite and > 0 (NaN, ±inf, 0, negatives, bools refused)."""
    requirement = "a finite number > 0"
    x = _as_float(what, value, requirement, fix, error)
    if x <= 0:
        raise _fail(error, what, requirement, value, fix)
    return x


def finite_non_negative(
    what: str,
    value: Any,
    *,
    fix: str = "",
    error: type[_E] = ConfigurationError,  # type: ignore[assignment]
) -> float:
    """``value`` as a ``float`` that is finite and >= 0 (a damping, a tolerance)."""
    requirement = "a finite number >= 0"
    x = _as_float(what, value, requirement, fix, error)
    if x < 0:
        raise _fail(error, what, requirement, value, fix)
    return x


def one_of(what: str, value: Any, choices: Sequence[Any], *, fix: str = "") -> Any:
    """``value`` if it is one of ``choices``, else a :class:`ConfigurationError` listing them."""
    if value not in choices:
        raise _fail(ConfigurationError, what, f"one of {list(choices)!r}", value, fix)
    return value


def learning_rate(value: Any, source: str) -> float:
    """A learning rate as a finite float > 0, from any source (given, or read from a file).

    A negative rate flips the sign of every score and 0 makes them all 0, so both are refused.

    Args:
        value: the learning rate.
        source: where it came from, for the message (``"checkpoint ep1.pt: lr"``,
            ``"checkpoint ep1.pt: the learning rate saved in its optimizer state"``).

    Raises:
        LearningRateError: ``"<source> must be a finite number > 0, got -0.1; ..."``.
    """
    return finite_positive(
        source,
        value,
        fix="pass the learning rate in force when the checkpoint was saved, e.g. "
        "tt.Checkpoint(path, lr=0.1)",
        error=LearningRateError,
    )


# -- data -------------------------------------------------------------------------------------
def require_length(loader: DataLoader | Any, what: str = "the training data set") -> int:
    """The number of examples of a loader's data set, which must be known and >= 1.

    Raises:
        UnsizedDataError: the data set has no ``len`` (an iterable); ``what`` names it.
        EmptyDataError: it holds no example (``"the training data set is empty"``).
    """
    dataset = getattr(loader, "dataset", loader)
    try:
        n = len(dataset)
    except TypeError:
        raise UnsizedDataError(
            f"{what} has no length ({type(dataset).__name__} is an iterable), but the number of "
            "examples is needed to lay out the store and number the examples; pass a map-style "
            "data set (a list, a torch Dataset, a Hugging Face datasets.Dataset) or give the "
            "iterable a __len__"
        ) from None
    if n == 0:
        raise EmptyDataError(f"{what} is empty (len 0); pass a data set with at least one example")
    return n


def check_batch(task: Task, outputs: Any, batch: Any, offset: int = 0) -> None:
    """Run ``task``'s checks of one batch; call it once per batch outside ``vmap``.

    ``task.loss`` runs under ``torch.func.vmap`` one example at a time, where data-dependent
    Python checks (``if (labels < 0).any()``) cannot run; this is where they run instead. The
    built-in tasks check labels against the output size (``Classification``: class indices in
    ``[0, classes)``, no ignore index unless configured, no float labels; ``LanguageModeling``:
    token ids in ``[0, vocab)`` or -100; ``Regression``: finite targets).

    Args:
        task: the :class:`~traintrace.task.Task`.
        outputs: the prediction tensor ``task.forward(model, batch)`` of a plain (non-vmapped,
            no-grad) forward. The built-in tasks read only ``outputs.shape[1:]`` (the number of
            classes / the vocabulary), so the outputs of one earlier batch may be reused.
        batch: the plain batch (as yielded by :func:`traintrace.data.iterate_batches`).
        offset: the index of the batch's first example in the data set, so errors name the
            examples by their data-set index.

    Cost: O(batch) comparisons on the labels, one device sync.

    Raises:
        LabelError: naming the examples (``offset`` + position) and the values found.
        BatchFormatError: the batch has no labels where the task needs them (the keys found
            are listed).
    """
    validate = getattr(task, "validate", None)
    if validate is not None:
        validate(outputs, batch, offset=offset)


# -- models -----------------------------------------------------------------------------------
_HALF = (torch.float16, torch.bfloat16)


def check_model_dtype(model: nn.Module) -> None:
    """Refuse models whose floating-point parameters are ``float16``/``bfloat16``.

    Per-example gradients, their inner products and sums over checkpoints need more precision
    than half precision keeps (bfloat16 has 8 significant bits, float16 overflows at 65504), so
    traintrace computes in float32 or float64. The supported path is a float32 copy of the
    model: checkpoints saved in bfloat16/float16 are cast to the model's dtype when read, so the
    same checkpoint files work.

    Raises:
        ModelDtypeError: naming the dtype and the first such parameter.
    """
    for name, p in model.named_parameters():
        if p.dtype in _HALF:
            raise ModelDtypeError(
                message(
                    f"the model's parameters (e.g. {name!r})",
                    "float32 or float64",
                    p.dtype,
                    "traintrace computes gradients in full precision; pass model.float() (a "
                    "float32 model; bfloat16/float16 checkpoints are cast to float32 when read)",
                )
            )
