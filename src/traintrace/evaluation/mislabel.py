"""Mislabel detection: how many flipped labels a ranking finds when inspected from the top."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from traintrace.exceptions import ConfigurationError
from traintrace.retrieval.topk import import_pandas

__all__ = ["MislabelDetection", "mislabel_detection"]


@dataclass(frozen=True)
class MislabelDetection:
    """Result of :func:`mislabel_detection`.

    Attributes:
        inspected: fraction of the training set inspected, ``[n + 1]`` from 0 to 1.
        found: fraction of the flipped examples found at each point, ``[n + 1]``.
        recall: ``{fraction inspected: fraction of flipped found}`` at the requested fractions.
        auroc: area under the ROC curve of the score as a flipped-vs-clean classifier.
    """

    inspected: np.ndarray
    found: np.ndarray
    recall: dict[float, float]
    auroc: float

    def to_pandas(self) -> Any:
        """The curve as a ``pandas.DataFrame`` with ``n + 1`` rows.

        Columns ``inspected_count`` (examples inspected, 0..n, highest scores first),
        ``inspected`` (that count / n) and ``found`` (fraction of the flipped examples among
        them). ``frame.attrs`` holds ``auroc`` and ``recall``. Needs pandas
        (``pip install 'traintrace[export]'``).
        """
        pd = import_pandas()
        frame = pd.DataFrame(
            {
                "inspected_count": np.arange(len(self.inspected)),
                "inspected": self.inspected,
                "found": self.found,
            }
        )
        frame.attrs.update(auroc=self.auroc, recall=dict(self.recall))
        return frame


def mislabel_detection(
    scores: torch.Tensor | np.ndarray,
    flipped: torch.Tensor | np.ndarray | Sequence[bool],
    fractions: Sequence[float] = (0.05, 0.1, 0.2),
) -> MislabelDetection:
    """Rank training examples by ``scores`` (highest first) and measure recall of ``flipped``.

    Args:
        scores: one score per training example; higher = more suspicious (self-influence, loss).
        flipped: boolean mask of the examples whose label was corrupted.
        fractions: fractions of the training set inspected at which to report recall; recall at
            ``f`` is the share of flipped examples among the top ``round(f · n)``.

    Ties are broken by position (stable sort). Cost: ``O(n log n)``.
    """
    s = np.asarray(
        scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=float
    )
    f = np.asarray(flipped.cpu() if isinstance(flipped, torch.Tensor) else flipped).astype(bool)
    if s.ndim != 1 or s.shape != f.shape:
        raise ConfigurationError(
            f"scores {s.shape} and flipped {f.shape} must be 1-D and of the same length"
        )
    if not np.isfinite(s).all():
        raise ConfigurationError("scores contain NaN or infinity")
    n_flipped = int(f.sum())
    if n_flipped == 0 or n_flipped == len(f):
        raise ConfigurationError("flipped must contain both flipped and clean examples")
    order = np.argsort(-s, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(f[order]) / n_flipped])
    inspected = np.arange(len(s) + 1) / len(s)
    recall = {}
    for frac in fractions:
        if not 0 <= frac <= 1:
            raise ConfigurationError(f"fractions must lie in [0, 1], got {frac}")
        recall[float(frac)] = float(found[round(frac * len(s))])
    return MislabelDetection(inspected, found, recall, float(roc_auc_score(f, s)))
