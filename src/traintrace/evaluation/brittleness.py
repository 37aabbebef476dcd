"""Brittleness: how few top proponents must be removed (and the model retrained) to flip a prediction.

For a query, the estimator's top-``k`` proponents (largest scores) are removed from the
training set, the model is retrained, and its predicted class for the query is compared with
the original prediction. The brittleness of the query is the smallest ``k`` in a schedule for
which the prediction changes. A better attribution method flips predictions with smaller ``k``
(Ilyas et al., "Datamodels", ICML 2022; Park et al., "TRAK", ICML 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from traintrace.evaluation.loo import _as_matrix
from traintrace.exceptions import ConfigurationError
from traintrace.methods.retraining import Retrainer, _LazyRuns

__all__ = ["Brittleness", "brittleness"]


@dataclass(frozen=True)
class Brittleness:
    """Result of :func:`brittleness`.

    Attributes:
        k: for each evaluated query, the smallest ``k`` in the schedule whose removal flipped
            its prediction, or ``None`` when no ``k`` in the schedule did.
        queries: ``[n_evaluated]`` the query rows evaluated (aligned with ``k``).
        original: ``[n_evaluated]`` the reference prediction of each evaluated query.
        schedule: the ``k`` values tried, ascending.
        flip_rate: ``[n_evaluated, len(schedule)]`` the fraction of seeds whose prediction
            differed from ``original`` after removing the top ``k``; NaN where not tried
            (the search stops at the first flip).
    """

    k: list[int | None]
    queries: np.ndarray
    original: np.ndarray
    schedule: tuple[int, ...]
    flip_rate: np.ndarray

    @property
    def flipped_fraction(self) -> float:
        """Fraction of evaluated queries flipped within the schedule."""
        return sum(k is not None for k in self.k) / max(len(self.k), 1)


def _default_schedule(max_k: int) -> tuple[int, ...]:
    out, k = [], 1
    while k < max_k:
        out.append(k)
        k *= 2
    out.append(max_k)
    return tuple(out)


def brittleness(
    scores: torch.Tensor | np.ndarray,
    retrainer: Retrainer,
    *,
    queries: Sequence[int] | np.ndarray | None = None,
    schedule: Sequence[int] | None = None,
    max_k: int | None = None,
    seeds: Sequence[int] = (0,),
    original: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> Brittleness:
    """Smallest number of top proponents whose removal flips each query's prediction.

    Args:
        scores: ``[n_query, n_train]`` attribution, positive = helps; proponents are the
            largest scores (ties broken by position).
        retrainer: a :class:`~traintrace.Retrainer` whose measure returns the *predicted class*
            of every query ``[n_query]``, the rows of ``scores`` in order — e.g.
            ``tt.Retrainer(train_fn, tt.query_predictions(task, queries), ...)``. Use its own
            ``experiment`` name (predictions, not losses, are cached).
        queries: which query rows to evaluate (default all).
        schedule: ascending ``k`` values to try (default ``1, 2, 4, …, max_k``).
        max_k: largest ``k`` of the default schedule (default ``n_train // 2``).
        seeds: training seeds; a ``k`` flips the query when the prediction differs from
            ``original`` for more than half of them.
        original: the reference prediction of each query (``[n_query]``); default: the
            majority vote of models trained on the whole training set with ``seeds``.

    The search is a linear scan over the schedule, all unresolved queries in parallel per step
    (one batch of runs through the retrainer), stopping for a query at its first flip; flips
    need not be monotone in ``k``, so a coarse schedule reports the first flip it sees.

    Cost: at most ``len(schedule) × n_evaluated × len(seeds)`` retrains, plus ``len(seeds)``
    for the original predictions.
    """
    s = _as_matrix(scores, "scores")
    if not np.isfinite(s).all():
        raise ConfigurationError("scores contain NaN or infinity")
    if not isinstance(retrainer, Retrainer):
        raise ConfigurationError(
            f"retrainer must be a tt.Retrainer, got {type(retrainer).__name__}"
        )
    n_query, n_train = s.shape
    rows = np.arange(n_query) if queries is None else np.asarray(queries, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or rows.min() < 0 or rows.max() >= n_query:
        raise ConfigurationError(f"queries must be row indices in [0, {n_query})")
    if schedule is None:
        top = n_train // 2 if max_k is None else max_k
        if not 1 <= top < n_train:
            raise ConfigurationError(f"max_k must lie in [1, {n_train}), got {top}")
        sched = _default_schedule(top)
    else:
        sched = tuple(int(k) for k in schedule)
        if not sched or any(np.diff(sched) <= 0) or sched[0] < 1 or sched[-1] >= n_train:
            raise ConfigurationError(
                f"schedule must be strictly ascending values in [1, {n_train}), got {list(sched)}"
            )
    seeds = tuple(int(x) for x in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigurationError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    n_seeds = len(seeds)

    if original is None:
        full = np.arange(n_train, dtype=np.int64)
        preds = retrainer.run([(full, sd) for sd in seeds], desc="brittleness: full").numpy()
        ref = np.empty(n_query)
        for q in range(n_query):
            values, counts = np.unique(preds[:, q], return_counts=True)
            ref[q] = values[np.argmax(counts)]  # majority; ties → the smallest class
    else:
        ref = np.asarray(
            original.detach().cpu().numpy() if isinstance(original, torch.Tensor) else original,
            dtype=np.float64,
        ).reshape(-1)
        if ref.shape != (n_query,):
            raise ConfigurationError(f"original must have one class per query ({n_query})")

    order = np.argsort(-s[rows], axis=1, kind="stable")  # proponents first
    found: list[int | None] = [None] * len(rows)
    flip_rate = np.full((len(rows), len(sched)), np.nan)
    pending = list(range(len(rows)))
    for step, k in enumerate(sched):
        if not pending:
            break
        todo = list(pending)

        def make(j: int, todo: list[int] = todo, k: int = k) -> tuple[np.ndarray, int]:
            r, si = divmod(j, n_seeds)
            keep = np.ones(n_train, dtype=bool)
            keep[order[todo[r], :k]] = False
            return np.flatnonzero(keep), seeds[si]

        preds = retrainer.run(
            _LazyRuns(len(todo) * n_seeds, make), desc=f"brittleness: remove top {k}"
        ).numpy()
        pending = []
        for r, e in enumerate(todo):
            q = rows[e]
            got = preds[r * n_seeds : (r + 1) * n_seeds, q]
            rate = float(np.mean(got != ref[q]))
            flip_rate[e, step] = rate
            if rate > 0.5:
                found[e] = k
            else:
                pending.append(e)
    return Brittleness(found, rows, ref[rows], sched, flip_rate)
