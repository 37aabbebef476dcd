"""The shape every estimator shares: ``fit(train) -> self``, ``score``, ``top_k``, ``self_influence``.

Orientation is always ``[n_query, n_train]`` and the sign is always "positive = the training
example helps the query" (see :mod:`traintrace.task`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from traintrace.exceptions import NotFittedError
from traintrace.retrieval.topk import TopK, top_k_from_blocks

__all__ = ["Estimator"]

Data = Dataset | DataLoader


class Estimator:
    """Base class of attribution estimators (scikit-learn style two-phase API).

    Subclasses implement :meth:`fit`, :meth:`_score_blocks` (a generator of score blocks, one
    per query batch) and :meth:`self_influence`; :meth:`score` and :meth:`top_k` are shared.
    Learned state lives in attributes ending in ``_`` and exists only after ``fit``.
    """

    #: Number of training examples seen by ``fit`` (set by ``fit``).
    n_train_: int

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_train_"):
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call .fit(train) before score, top_k or "
                "self_influence"
            )

    def fit(self, train: Data) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def _score_blocks(self, queries: Data) -> Iterator[Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, queries: Data) -> Tensor:
        """Attribution scores ``[n_query, n_train]``; positive = the training example helps."""
        self._check_fitted()
        return self._stacked(self._score_blocks(queries))

    def _stacked(self, blocks: Iterator[Tensor]) -> Tensor:
        """Score blocks ``[m_block, n_train]`` stacked in query order (``[0, n_train]`` for none)."""
        parts = list(blocks)
        return torch.cat(parts) if parts else torch.empty(0, self.n_train_)

    def top_k(self, queries: Data, k: int = 10) -> TopK:
        """The ``k`` strongest proponents and opponents of each query, ``[n_query, k]`` each.

        Computed block by block (one query batch at a time), so memory is ``batch × n_train``.
        ``top_k(q, k).proponents.scores[i]`` equals the ``k`` largest entries of
        ``score(q)[i]`` and ``.opponents`` the ``k`` smallest (most negative first).
        """
        self._check_fitted()
        return top_k_from_blocks(self._score_blocks(queries), k, self.n_train_)

    def self_influence(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
