"""Named exceptions. Every message says what was wrong, shows the values involved and what to do."""

from __future__ import annotations


class TraintraceError(Exception):
    """Base class of every error traintrace raises on purpose."""


class CheckpointMismatchError(TraintraceError, ValueError):
    """A checkpoint's state does not fit the model (missing, unexpected or mis-shaped keys)."""


class BatchFormatError(TraintraceError, TypeError):
    """A batch the task cannot read (wrong container, missing labels, wrong shapes)."""


class NonFiniteGradientError(TraintraceError, FloatingPointError):
    """A per-example gradient (or loss) contains NaN or infinity."""


class NotFittedError(TraintraceError, RuntimeError):
    """An estimator was asked to score before ``fit`` was called."""


class FeatureMemoryError(TraintraceError, MemoryError):
    """Keeping the fitted features in memory would exceed the configured limit."""


class DataOrderError(TraintraceError, ValueError):
    """A data loader whose order is not reproducible (shuffled) was given where indices matter."""


class SolverDivergedError(TraintraceError, ArithmeticError):
    """An iterative solver diverged or produced non-finite values."""


class NotPositiveDefiniteError(SolverDivergedError):
    """The damped curvature ``C + λI`` is not positive definite, so it has no usable inverse."""


class RetrainingError(TraintraceError, RuntimeError):
    """A retraining run failed, or returned a measurement that cannot be used.

    The message names the run (seed, number of training examples, cache key); the original
    exception is chained as ``__cause__``. Runs that finished before it are cached.
    """


class StoreMismatchError(TraintraceError, ValueError):
    """An existing feature store was written with different settings than the ones requested."""


class StoreIncompleteError(TraintraceError, RuntimeError):
    """A feature store was read for results before every chunk of every checkpoint was written."""


class StoreCorruptError(TraintraceError, OSError):
    """A feature store's files are missing, truncated or unreadable."""


class StoreRewrittenError(StoreMismatchError):
    """A feature store was deleted or rewritten (``overwrite_store=True``) since it was opened."""


class StoreBusyError(TraintraceError, RuntimeError):
    """Another process is writing the same feature store (it holds the store's writer lock)."""


class DiskFullError(TraintraceError, OSError):
    """No space left on the device while writing; finished work is kept, rerun to resume."""


class ConfigurationError(TraintraceError, ValueError):
    """An argument has a value outside what the function accepts."""


class ConvergenceWarning(RuntimeWarning):
    """An iterative solver stopped before reaching its tolerance; its result is approximate."""


class EmptyDataError(ConfigurationError):
    """A data set that must hold examples (the training set, the queries) has none."""


class UnsizedDataError(ConfigurationError):
    """A data set without a length (an iterable) was given where the number of examples is needed."""


class LabelError(BatchFormatError, ValueError):
    """Labels the task cannot use: out of range, an ignore index, float or soft labels.

    The message names the examples (their index in the data set) and the values found.
    """


class ModelOutputError(BatchFormatError):
    """The model's output is ambiguous or unreadable (a tuple of tensors without ``output=``)."""


class LearningRateError(ConfigurationError):
    """A learning rate (given or read from an optimizer state) that is not finite and > 0."""


class ModelDtypeError(ConfigurationError):
    """The model's parameters are in a precision traintrace does not compute in (bfloat16, float16)."""


class TraintraceWarning(UserWarning):
    """Base class of every warning traintrace issues on purpose."""


class LearningRateWarning(TraintraceWarning):
    """A learning rate read from a checkpoint may not be the one in force when it was saved."""


__all__ = [
    "BatchFormatError",
    "CheckpointMismatchError",
    "ConfigurationError",
    "ConvergenceWarning",
    "DataOrderError",
    "DiskFullError",
    "EmptyDataError",
    "FeatureMemoryError",
    "LabelError",
    "LearningRateError",
    "LearningRateWarning",
    "ModelDtypeError",
    "ModelOutputError",
    "NonFiniteGradientError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "RetrainingError",
    "SolverDivergedError",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreRewrittenError",
    "TraintraceError",
    "TraintraceWarning",
    "UnsizedDataError",
]
