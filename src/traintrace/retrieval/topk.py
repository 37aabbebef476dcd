"""Exact top-k over streamed blocks of scores.

Scores arrive as blocks ``[queries in block, n_train]``; only the running top-k of each query is
kept, so memory does not grow with the number of queries beyond the ``[n_query, k]`` result.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from traintrace.exceptions import ConfigurationError

__all__ = ["Ranking", "TopK", "check_k", "import_pandas", "top_k_from_blocks"]


def import_pandas() -> Any:
    """The ``pandas`` module, or a :class:`ConfigurationError` naming the extra that installs it."""
    try:
        import pandas
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            "exporting results needs pandas (and pyarrow for Parquet), which are not installed: "
            "pip install 'traintrace[export]'"
        ) from exc
    return pandas


def _per_train_values(name: str, values: Any, needed: int) -> np.ndarray:
    """``values`` (one per training example) as a 1-D array covering indices ``< needed``."""
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise ConfigurationError(
            f"{name} must hold one value per training example (a list, array or tensor), got "
            f"{type(values).__name__}"
        )
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged entries
        arr = np.empty(len(values), dtype=object)
        arr[:] = list(values)
    if arr.ndim != 1:
        raise ConfigurationError(
            f"{name} must be 1-D (one value per training example), got {arr.shape}"
        )
    if len(arr) < needed:
        raise ConfigurationError(
            f"{name} has {len(arr)} values but the ranking refers to training example "
            f"{needed - 1}; pass one value per training example, in training-set order"
        )
    return arr


@dataclass(frozen=True)
class Ranking:
    """Training-example indices and their scores, ``[n_query, k]`` each, best first."""

    indices: Tensor
    scores: Tensor

    def to_pandas(
        self,
        labels: Sequence[Any] | Tensor | np.ndarray | None = None,
        *,
        text: Sequence[str] | None = None,
        columns: Mapping[str, Sequence[Any] | Tensor | np.ndarray] | None = None,
        query_ids: Sequence[Any] | Tensor | np.ndarray | None = None,
        kind: str | None = None,
    ) -> Any:
        """A long ``pandas.DataFrame``: one row per (query, rank).

        Columns: ``query`` (row of the query set, or ``query_ids[row]``), ``kind`` (when
        given), ``rank`` (1 = strongest), ``train_index``, ``score`` (positive = the training
        example helps the query); then ``label`` / ``text`` / each of ``columns``, looked up by
        ``train_index`` in sequences holding one value per training example (training-set order).
        ``n_query × k`` rows, queries in order, best first. Needs pandas (``traintrace[export]``).
        """
        pd = import_pandas()
        idx = self.indices.detach().cpu().numpy().astype(np.int64)
        n_query, k = idx.shape
        if query_ids is None:
            qid: np.ndarray = np.arange(n_query)
        else:
            if isinstance(query_ids, Tensor):
                query_ids = query_ids.detach().cpu().numpy()
            qid = np.asarray(query_ids)
            if qid.shape != (n_query,):
                raise ConfigurationError(
                    f"query_ids must hold one value per query ({n_query}), got shape {qid.shape}"
                )
        data: dict[str, Any] = {"query": np.repeat(qid, k)}
        if kind is not None:
            data["kind"] = np.full(n_query * k, kind, dtype=object)
        data["rank"] = np.tile(np.arange(1, k + 1), n_query)
        data["train_index"] = idx.reshape(-1)
        data["score"] = self.scores.detach().cpu().double().numpy().reshape(-1)
        named = {n: v for n, v in (("label", labels), ("text", text)) if v is not None}
        for name in set(named) & set(columns or {}):
            raise ConfigurationError(f"column {name!r} given twice")
        extra = {**named, **(columns or {})}
        needed = int(idx.max()) + 1 if idx.size else 0
        for name, values in extra.items():
            if name in data:
                raise ConfigurationError(
                    f"extra column {name!r} clashes with a built-in column {sorted(data)}"
                )
            data[name] = _per_train_values(name, values, needed)[data["train_index"]]
        return pd.DataFrame(data)


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

    @classmethod
    def concat(cls, parts: Sequence[TopK]) -> TopK:
        """The rankings of consecutive blocks of queries, stacked in query order.

        When any block came from an approximate (FAISS) search the result keeps that type and
        its index description, with the measured recalls (if any) averaged over every block's
        sampled queries and their indices shifted to the stacked query order: a merged result
        never looks exact when part of it was not.
        """
        if not parts:
            raise ConfigurationError("no queries: the query data set is empty")
        proponents = Ranking(
            torch.cat([p.proponents.indices for p in parts]),
            torch.cat([p.proponents.scores for p in parts]),
        )
        opponents = Ranking(
            torch.cat([p.opponents.indices for p in parts]),
            torch.cat([p.opponents.scores for p in parts]),
        )
        approximate = [p for p in parts if hasattr(p, "recall_queries")]
        if not approximate:
            return cls(proponents=proponents, opponents=opponents)
        sampled, totals, count, offset = [], {"proponents": 0.0, "opponents": 0.0}, 0, 0
        for p in parts:
            queries = getattr(p, "recall_queries", None)
            recall = getattr(p, "recall", None)
            if queries is not None and recall is not None:
                sampled.append(queries + offset)
                for kind in totals:
                    totals[kind] += recall[kind] * len(queries)
                count += len(queries)
            offset += p.proponents.indices.shape[0]
        return dataclasses.replace(
            approximate[0],
            proponents=proponents,
            opponents=opponents,
            recall={kind: total / count for kind, total in totals.items()} if count else None,
            recall_queries=torch.cat(sampled) if sampled else None,
        )

    def to_pandas(
        self,
        labels: Sequence[Any] | Tensor | np.ndarray | None = None,
        *,
        text: Sequence[str] | None = None,
        columns: Mapping[str, Sequence[Any] | Tensor | np.ndarray] | None = None,
        query_ids: Sequence[Any] | Tensor | np.ndarray | None = None,
    ) -> Any:
        """Proponents and opponents as one long ``pandas.DataFrame``, ``2 × n_query × k`` rows.

        Columns ``query, kind, rank, train_index, score`` where ``kind`` is ``"proponent"``
        (largest scores, rank 1 = largest) or ``"opponent"`` (most negative, rank 1 = most
        negative); positive score = the training example helps the query. Optional per-training-
        example ``labels`` / ``text`` / ``columns`` are looked up by ``train_index`` (see
        :meth:`Ranking.to_pandas`). Rows are ordered by query, then proponents before opponents,
        then rank. Needs pandas: ``pip install 'traintrace[export]'``.
        """
        pd = import_pandas()
        kw = {"labels": labels, "text": text, "columns": columns, "query_ids": query_ids}
        pro = self.proponents.to_pandas(kind="proponent", **kw)
        opp = self.opponents.to_pandas(kind="opponent", **kw)
        k = self.proponents.indices.shape[1]
        n_query = self.proponents.indices.shape[0]
        # query 0's proponents, query 0's opponents, query 1's proponents, ...
        row = np.arange(n_query * k).reshape(n_query, k)
        order = np.concatenate([row, row + n_query * k], axis=1).reshape(-1)
        return pd.concat([pro, opp], ignore_index=True).iloc[order].reset_index(drop=True)

    def to_csv(self, path: str | os.PathLike[str], **columns: Any) -> Path:
        """Write :meth:`to_pandas` (same keyword arguments) to a CSV file; returns its path."""
        path = Path(path)
        frame = self.to_pandas(**columns)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        return path

    def to_parquet(self, path: str | os.PathLike[str], **columns: Any) -> Path:
        """Write :meth:`to_pandas` to a Parquet file (needs pyarrow: ``traintrace[export]``)."""
        path = Path(path)
        frame = self.to_pandas(**columns)
        try:
            import pyarrow  # noqa: F401
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                "writing Parquet needs pyarrow, which is not installed: "
                "pip install 'traintrace[export]' (or use to_csv)"
            ) from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
        return path


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
