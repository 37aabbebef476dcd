"""Exact top-k over streamed blocks of scores.

Scores arrive as blocks ``[queries in block, n_train]``; only the running top-k of each query is
kept, so memory does not grow with the number of queries beyond the ``[n_query, k]`` result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from traintrace.exceptions import ConfigurationError

__all__ = ["Ranking", "TopK", "check_k", "top_k_from_blocks"]


@dataclass(frozen=True)
class Ranking:
    """Training-example indices and their scores, ``[n_query, k]`` each, best first."""

    indices: Tensor
    scores: Tensor


@dataclass(frozen=True)
class TopK:
    """Top-k training examples per query.

    Attributes:
        proponents: the ``k`` largest scores per query, largest first (examples that help most).
        opponents: the ``k`` smallest scores per query, most negative first (examples that hurt
            most). With few negative scores, opponents may have positive scores: check the sign.
    """

    proponents: Ranking
    opponents: Ranking


def check_k(k: object, n_train: int) -> int:
    """``k`` if it is an integer in ``[1, n_train]``, else a :class:`ConfigurationError`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(f"k must be a positive integer, got {k!r}")
    if k > n_train:
        raise ConfigurationError(f"k={k} is larger than the training set ({n_train} examples)")
    return k


def top_k_from_blocks(blocks: Iterable[Tensor], k: int, n_train: int) -> TopK:
    """Exact top-k (largest and smallest) of each row over a stream of ``[b, n_train]`` blocks."""
    check_k(k, n_train)
    pro_i, pro_s, opp_i, opp_s = [], [], [], []
    for block in blocks:
        top = torch.topk(block, k, dim=1, largest=True, sorted=True)
        bottom = torch.topk(block, k, dim=1, largest=False, sorted=True)
        pro_i.append(top.indices)
        pro_s.append(top.values)
        opp_i.append(bottom.indices)
        opp_s.append(bottom.values)
    if not pro_i:
        raise ConfigurationError("no queries: the query data set is empty")
    return TopK(
        proponents=Ranking(torch.cat(pro_i), torch.cat(pro_s)),
        opponents=Ranking(torch.cat(opp_i), torch.cat(opp_s)),
    )
