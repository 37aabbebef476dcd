"""Leave-one-out correlation: do predicted scores agree with actually retraining without ``z``?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from traintrace.exceptions import ConfigurationError
from traintrace.methods.retraining import LeaveOneOut, Retrainer

__all__ = ["LOOCorrelation", "loo_benchmark", "loo_correlation"]


def _as_matrix(value: Any, name: str) -> np.ndarray:
    """``[n_query, n]`` float64 from a tensor/array, ``[n]`` meaning one query."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ConfigurationError(
            f"{name} must be [n_query, n_train] (or [n_train] for one query), got shape {arr.shape}"
        )
    return arr


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na = np.sqrt((a * a).sum(axis=1))
    nb = np.sqrt((b * b).sum(axis=1))
    denom = na * nb
    out = np.full(a.shape[0], np.nan)
    ok = denom > 0
    out[ok] = (a[ok] * b[ok]).sum(axis=1) / denom[ok]
    return np.clip(out, -1.0, 1.0)


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair (average ranks for ties); NaN where constant."""
    return _pearson_rows(rankdata(a, axis=1), rankdata(b, axis=1))


def _mean(per_query: np.ndarray) -> float:
    finite = per_query[np.isfinite(per_query)]
    return float(finite.mean()) if finite.size else float("nan")


@dataclass(frozen=True)
class LOOCorrelation:
    """Agreement of predicted scores with actual leave-one-out changes.

    Attributes:
        pearson: mean over queries of the per-query Pearson correlation.
        spearman: mean over queries of the per-query Spearman (rank) correlation.
        pearson_per_query, spearman_per_query: ``[n_query]``; NaN for a query whose predicted or
            actual values are all equal (no correlation is defined), left out of the means.
        columns: the training examples compared ``[n_compared]``.
    """

    pearson: float
    spearman: float
    pearson_per_query: np.ndarray
    spearman_per_query: np.ndarray
    columns: np.ndarray


def loo_correlation(
    scores: torch.Tensor | np.ndarray, actual: torch.Tensor | np.ndarray
) -> LOOCorrelation:
    """Pearson and Spearman correlation of ``scores`` with ``actual`` LOO changes, per query.

    Args:
        scores: predicted attribution ``[n_query, n_train]`` (or ``[n_train]``), positive =
            helps (any traintrace estimator's ``score``).
        actual: the same shape: the actual effect of removing each example, with the same sign
            convention — :class:`~traintrace.LeaveOneOut` ``.score()``, i.e. the query's loss
            without ``z_i`` minus its loss with everything. Columns that are NaN in every row
            (examples LeaveOneOut did not evaluate) are skipped; any other non-finite value is
            an error.

    Both sides use "positive = helps", so a good estimator has correlations near +1 (Koh &
    Liang report ~0.99 Pearson for influence functions on logistic regression). Correlations are
    computed per query over the training examples, then averaged over queries.
    """
    s = _as_matrix(scores, "scores")
    a = _as_matrix(actual, "actual")
    if s.shape != a.shape:
        raise ConfigurationError(f"scores {s.shape} and actual {a.shape} must have the same shape")
    evaluated = ~np.isnan(a).all(axis=0)
    columns = np.flatnonzero(evaluated)
    s, a = s[:, evaluated], a[:, evaluated]
    if not np.isfinite(a).all():
        raise ConfigurationError(
            "actual has NaN or infinity in columns that are not entirely NaN; only whole "
            "unevaluated columns may be NaN"
        )
    if not np.isfinite(s).all():
        raise ConfigurationError("scores contain NaN or infinity in the compared columns")
    if len(columns) < 3:
        raise ConfigurationError(
            f"need at least 3 evaluated training examples to correlate, got {len(columns)}"
        )
    pearson = _pearson_rows(s, a)
    spearman = _spearman_rows(s, a)
    return LOOCorrelation(_mean(pearson), _mean(spearman), pearson, spearman, columns)


def loo_benchmark(
    scores: torch.Tensor | np.ndarray,
    retrainer: Retrainer,
    *,
    indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    seeds: Sequence[int] = (0,),
) -> LOOCorrelation:
    """Retrain without each of ``indices`` and correlate with ``scores`` (:func:`loo_correlation`).

    ``retrainer``'s measure must measure the queries that are the rows of ``scores``, in the
    same order; ``n_train`` is ``scores.shape[-1]``. With a ``cache_dir`` the retrains are
    stored, so comparing a second estimator reruns nothing; equivalently compute
    ``actual = tt.LeaveOneOut(retrainer, n_train, indices=...).fit().score()`` once and call
    :func:`loo_correlation` per estimator. Cost: ``(len(indices) + 1) × len(seeds)`` retrains.
    """
    s = _as_matrix(scores, "scores")
    loo = LeaveOneOut(retrainer, s.shape[1], indices=indices, seeds=seeds).fit()
    actual = loo.score().numpy()
    if actual.shape[0] != s.shape[0]:
        raise ConfigurationError(
            f"the retrainer measures {actual.shape[0]} queries but scores has {s.shape[0]} rows"
        )
    return loo_correlation(s, actual)
