"""Linear datamodeling score (LDS; Park et al., "TRAK", ICML 2023).

Draw ``M`` random subsets of ``αn`` training examples, retrain on each and record every
query's measurement. An attribution method is good when the *sum of its scores over a subset*
ranks the subsets the way the actual measurements do. The retrains are the expensive part and
do not depend on the estimator, so they live in a :class:`SubsetMeasurements` object that is
computed once, saved, loaded and applied to any number of score matrices.

Sign convention: scores are "positive = helps", i.e. a training example with score ``s``
lowers the query's oriented measurement (its loss) by about ``s``. The linear datamodel's
prediction of the query's loss when training on subset ``S`` is therefore
``−Σ_{i∈S} score[q, i]`` (plus a constant, which a rank correlation ignores), and for each
query

    ``LDS_q = Spearman_j( measurement[j, q],  −Σ_{i∈S_j} score[q, i] )``

over the subsets ``j``, with measurements oriented lower-is-better (a higher-is-better
measurement is negated by the :class:`~traintrace.Retrainer`). ``LDS`` is the mean over
queries; +1 is perfect, 0 no better than chance.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from traintrace.evaluation.loo import _as_matrix, _mean, _spearman_rows
from traintrace.exceptions import ConfigurationError
from traintrace.methods.retraining import Retrainer, _LazyRuns

__all__ = ["LDSResult", "SubsetMeasurements", "lds", "sample_subsets"]

_FORMAT = 1


def sample_subsets(
    n_train: int, num_subsets: int = 100, alpha: float = 0.5, seed: int = 0
) -> np.ndarray:
    """``[num_subsets, round(α·n_train)]`` int64: random subsets drawn without replacement.

    Each row is sorted ascending; rows are independent. Deterministic given ``seed``.
    """
    if not isinstance(n_train, int) or n_train < 2:
        raise ConfigurationError(f"n_train must be an integer >= 2, got {n_train!r}")
    if not isinstance(num_subsets, int) or num_subsets < 1:
        raise ConfigurationError(f"num_subsets must be a positive integer, got {num_subsets!r}")
    size = round(alpha * n_train)
    if not 0 < alpha < 1 or not 1 <= size < n_train:
        raise ConfigurationError(
            f"alpha must lie in (0, 1) and give subsets of 1..{n_train - 1} examples, got "
            f"alpha={alpha} (size {size})"
        )
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(n_train, size=size, replace=False)) for _ in range(num_subsets)]
    return np.stack(rows).astype(np.int64)


@dataclass(frozen=True)
class LDSResult:
    """Result of :func:`lds`.

    Attributes:
        score: the LDS, the mean of ``per_query`` over queries where it is defined.
        per_query: ``[n_query]`` Spearman correlations; NaN where all measurements (or all
            predictions) of a query are equal over the subsets.
    """

    score: float
    per_query: np.ndarray


def _subset_masks(subsets: Any, n_train: int) -> np.ndarray:
    """``[M, n_train]`` bool membership from index rows ``[M, m]`` or boolean masks."""
    if isinstance(subsets, torch.Tensor):
        subsets = subsets.detach().cpu().numpy()
    arr = np.asarray(subsets)
    if arr.ndim != 2:
        raise ConfigurationError(
            f"subsets must be [M, subset size] indices or [M, n_train] boolean masks, got shape "
            f"{arr.shape}"
        )
    if arr.dtype == bool:
        if arr.shape[1] != n_train:
            raise ConfigurationError(
                f"boolean subset masks have {arr.shape[1]} columns but scores have {n_train}"
            )
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigurationError(f"subset indices must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_train):
        raise ConfigurationError(
            f"subset indices must lie in [0, {n_train}), got {arr.min()}..{arr.max()}"
        )
    masks = np.zeros((arr.shape[0], n_train), dtype=bool)
    np.put_along_axis(masks, arr.astype(np.int64), True, axis=1)
    if (masks.sum(axis=1) != arr.shape[1]).any():
        raise ConfigurationError("a subset lists the same training example twice")
    return masks


def lds(
    scores: torch.Tensor | np.ndarray,
    benchmark: SubsetMeasurements | None = None,
    *,
    subsets: Any = None,
    measurements: Any = None,
) -> LDSResult:
    """Linear datamodeling score of ``scores`` ``[n_query, n_train]`` (module doc for the formula).

    Give either ``benchmark`` (a :class:`SubsetMeasurements`) or both ``subsets`` (``[M, m]``
    training indices or ``[M, n_train]`` boolean masks) and ``measurements`` (``[M, n_query]``,
    the retrained models' oriented measurement of each query, lower is better).

    Cost: ``O(n_query · n_train · M)`` for the subset sums.
    """
    if benchmark is not None:
        if subsets is not None or measurements is not None:
            raise ConfigurationError("give a benchmark or subsets= and measurements=, not both")
        subsets, measurements = benchmark.subsets, benchmark.measurements
    elif subsets is None or measurements is None:
        raise ConfigurationError(
            "lds needs a SubsetMeasurements benchmark, or both subsets= and measurements="
        )
    s = _as_matrix(scores, "scores")
    if not np.isfinite(s).all():
        raise ConfigurationError("scores contain NaN or infinity")
    n_query, n_train = s.shape
    if benchmark is not None and n_train != benchmark.n_train:
        raise ConfigurationError(
            f"scores have {n_train} training columns but the subsets were drawn from "
            f"{benchmark.n_train} examples"
        )
    masks = _subset_masks(subsets, n_train)
    y = measurements.detach().cpu().numpy() if isinstance(measurements, torch.Tensor) else None
    y = np.asarray(measurements if y is None else y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape != (masks.shape[0], n_query):
        raise ConfigurationError(
            f"measurements must be [M={masks.shape[0]} subsets, n_query={n_query}], got "
            f"{y.shape}; check that the scores' rows are the measured queries"
        )
    if not np.isfinite(y).all():
        raise ConfigurationError("measurements contain NaN or infinity")
    if masks.shape[0] < 3:
        raise ConfigurationError(f"need at least 3 subsets for a rank correlation, got {len(y)}")
    predicted_loss = -(s @ masks.T.astype(np.float64))  # [n_query, M]
    per_query = _spearman_rows(predicted_loss, y.T)
    return LDSResult(_mean(per_query), per_query)


@dataclass(frozen=True)
class SubsetMeasurements:
    """Retrained measurements on random subsets: the reusable half of the LDS.

    Attributes:
        subsets: ``[M, m]`` int64 training indices of each subset (rows sorted).
        measurements: ``[M, n_query]`` float64, each query's oriented measurement (lower is
            better) of the model trained on each subset, averaged over that subset's seeds.
        seeds: ``[M, s]`` int64 training seeds of each subset.
        n_train: size of the training set.
        experiment: the Retrainer's experiment name (a record of what was measured).

    Make one with :meth:`compute`; :meth:`save` / :meth:`load` keep it; :meth:`lds` scores an
    estimator against it.
    """

    subsets: np.ndarray
    measurements: np.ndarray
    seeds: np.ndarray
    n_train: int
    experiment: str = field(default="")

    def __post_init__(self) -> None:
        if self.subsets.ndim != 2 or self.measurements.ndim != 2 or self.seeds.ndim != 2:
            raise ConfigurationError("subsets, measurements and seeds must be 2-D arrays")
        m = self.subsets.shape[0]
        if self.measurements.shape[0] != m or self.seeds.shape[0] != m:
            raise ConfigurationError(
                f"subsets {self.subsets.shape}, measurements {self.measurements.shape} and seeds "
                f"{self.seeds.shape} must have one row per subset"
            )

    @property
    def num_subsets(self) -> int:
        """``M``."""
        return int(self.subsets.shape[0])

    @property
    def n_query(self) -> int:
        """Number of measured queries."""
        return int(self.measurements.shape[1])

    @classmethod
    def compute(
        cls,
        retrainer: Retrainer,
        n_train: int,
        *,
        num_subsets: int = 100,
        alpha: float = 0.5,
        seed: int = 0,
        seeds_per_subset: int = 1,
    ) -> SubsetMeasurements:
        """Draw subsets (:func:`sample_subsets`), retrain on each and measure the queries.

        Each subset is trained with ``seeds_per_subset`` seeds (drawn from ``seed``) and the
        measurements averaged, which reduces training noise. Runs go through ``retrainer``
        (its executor and cache: an interrupted computation resumes). Cost:
        ``num_subsets × seeds_per_subset`` retrains.
        """
        if not isinstance(retrainer, Retrainer):
            raise ConfigurationError(
                f"retrainer must be a tt.Retrainer, got {type(retrainer).__name__}"
            )
        if not isinstance(seeds_per_subset, int) or seeds_per_subset < 1:
            raise ConfigurationError(
                f"seeds_per_subset must be a positive integer, got {seeds_per_subset!r}"
            )
        subsets = sample_subsets(n_train, num_subsets, alpha, seed)
        rng = np.random.default_rng([seed, 1])
        seeds = rng.integers(0, 2**31 - 1, size=(num_subsets, seeds_per_subset))
        s = seeds_per_subset
        runs = _LazyRuns(num_subsets * s, lambda j: (subsets[j // s], int(seeds[j // s, j % s])))
        y = retrainer.run(runs, desc="LDS subsets").numpy()
        y = y.reshape(num_subsets, s, -1).mean(axis=1)
        return cls(subsets, y, seeds.astype(np.int64), n_train, retrainer.experiment or "")

    def lds(self, scores: torch.Tensor | np.ndarray) -> LDSResult:
        """:func:`lds` of ``scores`` ``[n_query, n_train]`` against these measurements."""
        return lds(scores, self)

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (a ``.npz`` file), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    format=np.int64(_FORMAT),
                    subsets=self.subsets,
                    measurements=self.measurements,
                    seeds=self.seeds,
                    n_train=np.int64(self.n_train),
                    experiment=np.str_(self.experiment),
                )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> SubsetMeasurements:
        """Read what :meth:`save` wrote."""
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or int(f["format"]) != _FORMAT:
                raise ConfigurationError(f"{path} is not a traintrace SubsetMeasurements file")
            return cls(
                subsets=f["subsets"],
                measurements=f["measurements"],
                seeds=f["seeds"],
                n_train=int(f["n_train"]),
                experiment=str(f["experiment"]),
            )
