"""Saving score matrices and self-influence beside a run: ``.npy`` (no pickle) and CSV."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from traintrace.exceptions import ConfigurationError
from traintrace.interfaces.config import check_output_dir
from traintrace.retrieval.topk import import_pandas

__all__ = ["save_scores", "save_self_influence"]


def _finite_numpy(values: Tensor | np.ndarray, name: str, ndim: int) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if arr.ndim != ndim:
        raise ConfigurationError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ConfigurationError(
            f"{name} holds {int((~np.isfinite(arr)).sum())} NaN or infinite values; refusing to "
            "save them"
        )
    return arr


def _write_npy(
    arr: np.ndarray, folder: str | os.PathLike[str], name: str, csv: bool
) -> tuple[Any, Path, dict[str, Path]]:
    """Write ``folder/name.npy`` (no pickle); ``(pandas or None, folder, {"npy": path})``.

    pandas is imported first, so a missing optional dependency fails before anything is written.
    """
    pd = import_pandas() if csv else None
    folder = check_output_dir(folder, "folder")
    folder.mkdir(parents=True, exist_ok=True)
    out = {"npy": folder / f"{name}.npy"}
    np.save(out["npy"], arr, allow_pickle=False)
    return pd, folder, out


def save_scores(
    scores: Tensor | np.ndarray,
    folder: str | os.PathLike[str],
    name: str = "scores",
    *,
    csv: bool = True,
) -> dict[str, Path]:
    """Save a score matrix ``[n_query, n_train]`` as ``folder/name.npy`` (and ``name.csv``).

    The ``.npy`` file is read back with ``np.load(path)`` (no pickle). The CSV has a ``query``
    column (row of the query set) and one column per training example, named by its index;
    positive = the training example helps the query. Returns ``{"npy": path, "csv": path}``.
    Non-finite values are refused. Cost: one write of ``n_query × n_train`` numbers per format.
    """
    arr = _finite_numpy(scores, "scores", 2)
    pd, folder, out = _write_npy(arr, folder, name, csv)
    if pd is not None:
        frame = pd.DataFrame(arr, columns=[str(i) for i in range(arr.shape[1])])
        frame.insert(0, "query", np.arange(arr.shape[0]))
        out["csv"] = folder / f"{name}.csv"
        frame.to_csv(out["csv"], index=False)
    return out


def save_self_influence(
    values: Tensor | np.ndarray,
    folder: str | os.PathLike[str],
    name: str = "self_influence",
    *,
    labels: Sequence[Any] | Tensor | np.ndarray | None = None,
    csv: bool = True,
) -> dict[str, Path]:
    """Save self-influence ``[n_train]`` as ``folder/name.npy`` and a ranked ``name.csv``.

    The CSV lists the training examples from the highest self-influence down (inspect from the
    top to find mislabeled or unusual examples): columns ``rank`` (1 = highest),
    ``train_index``, ``self_influence`` and ``label`` when ``labels`` (one per training example)
    are given. The ``.npy`` file keeps training-set order. Returns the paths written.
    """
    arr = _finite_numpy(values, "self-influence", 1)
    lab = None
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if lab.shape != arr.shape:
            raise ConfigurationError(
                f"labels has shape {lab.shape}; need one label per training example {arr.shape}"
            )
    pd, folder, out = _write_npy(arr, folder, name, csv)
    if pd is not None:
        order = np.argsort(-arr, kind="stable")
        frame = pd.DataFrame(
            {"rank": np.arange(1, len(arr) + 1), "train_index": order, "self_influence": arr[order]}
        )
        if lab is not None:
            frame["label"] = lab[order]
        out["csv"] = folder / f"{name}.csv"
        frame.to_csv(out["csv"], index=False)
    return out
