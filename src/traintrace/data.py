"""Reading user data: Datasets and DataLoaders in a fixed order, batches moved to a device.

Training examples are identified by their position in the order the data is iterated, so a
shuffled loader is refused (its order changes between passes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from traintrace.exceptions import BatchFormatError, DataOrderError

__all__ = [
    "as_loader",
    "batch_size_of",
    "dataset_fingerprint",
    "dataset_length",
    "in_dims_of",
    "index_batch",
    "iterate_batches",
    "map_tensors",
    "to_plain",
]


BATCH_FORMATS = (
    "traintrace reads a batch as a tensor of inputs, a tuple/list (inputs..., labels), or a "
    "mapping with a 'labels' key (Hugging Face style)"
)


def as_loader(data: Dataset | DataLoader, batch_size: int) -> DataLoader:
    """A loader over ``data`` in a fixed order: a Dataset gets ``shuffle=False``."""
    if isinstance(data, DataLoader):
        if isinstance(data.sampler, RandomSampler):
            raise DataOrderError(
                "the DataLoader shuffles (shuffle=True), so example indices would change between "
                "passes; pass the Dataset itself or a DataLoader with shuffle=False"
            )
        if data.drop_last:
            raise DataOrderError(
                "the DataLoader has drop_last=True and would skip examples; use drop_last=False"
            )
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if isinstance(data, Tensor):
        raise BatchFormatError(
            "got a bare tensor; wrap it: torch.utils.data.TensorDataset(inputs, labels)"
        )
    raise BatchFormatError(
        f"expected a torch Dataset or DataLoader, got {type(data).__name__}; wrap tensors in "
        "torch.utils.data.TensorDataset"
    )


def to_plain(batch: Any, device: torch.device | None = None) -> Any:
    """Turn a batch into plain tensors/dicts/tuples (vmap-friendly), optionally on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device) if device is not None else batch
    if isinstance(batch, Mapping):
        return {k: to_plain(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(to_plain(v, device) for v in batch)
    if isinstance(batch, list):
        return [to_plain(v, device) for v in batch]
    return batch


def _leaves(batch: Any) -> Iterator[Any]:
    if isinstance(batch, Mapping):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch: the leading size of its first tensor with a batch dim."""
    for leaf in _leaves(batch):
        if isinstance(leaf, Tensor) and leaf.ndim >= 1:
            return int(leaf.shape[0])
    raise BatchFormatError(
        f"the batch ({type(batch).__name__}) holds no tensor with a batch dimension; "
        f"{BATCH_FORMATS}, made of tensors. Make the Dataset return tensors."
    )


def in_dims_of(batch: Any, size: int) -> Any:
    """vmap ``in_dims`` for a plain batch: 0 for tensors with the batch dim, None otherwise."""
    if isinstance(batch, Tensor):
        return 0 if batch.ndim >= 1 and batch.shape[0] == size else None
    if isinstance(batch, Mapping):
        return {k: in_dims_of(v, size) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(in_dims_of(v, size) for v in batch)
    if isinstance(batch, list):
        return [in_dims_of(v, size) for v in batch]
    return None


def map_tensors(batch: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a plain batch."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(map_tensors(v, fn) for v in batch)
    if isinstance(batch, list):
        return [map_tensors(v, fn) for v in batch]
    return batch


def index_batch(batch: Any, index: slice | Tensor, size: int) -> Any:
    """Select examples of a plain batch along the batch dimension."""
    return map_tensors(batch, lambda t: t[index] if t.ndim >= 1 and t.shape[0] == size else t)


def iterate_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[int, Any]]:
    """Yield ``(offset of the batch's first example, plain batch on device)``."""
    offset = 0
    for batch in loader:
        plain = to_plain(batch, device)
        size = batch_size_of(plain)
        yield offset, plain
        offset += size


def dataset_length(loader: DataLoader) -> int | None:
    """Number of examples when the dataset knows it, else None."""
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def dataset_fingerprint(dataset: Dataset, samples: int = 8) -> str:
    """A short hash of a data set's length and of ``samples`` evenly spaced examples.

    Cheap (no pass over the data) and enough to refuse a store built from another data set of
    the same length; it cannot see a change confined to examples it does not sample.
    """
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        return "unsized"
    h = hashlib.sha256(str(n).encode())
    picks = sorted({round(i * (n - 1) / max(samples - 1, 1)) for i in range(samples)}) if n else []
    for i in picks:
        _hash_leaves(h, dataset[i])
    return h.hexdigest()[:16]


def _hash_leaves(h: Any, item: Any) -> None:
    for leaf in _leaves(item):
        if isinstance(leaf, Tensor):
            h.update(leaf.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
