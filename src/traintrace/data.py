"""Reading user data: any map-style data set or DataLoader, in a fixed order, batched.

Training examples are identified by their position in the order the data is iterated, so
anything that reorders or resamples examples (a shuffled loader, a random or weighted sampler,
a sampler over a subset, ``drop_last``) is refused with :class:`DataOrderError`.

Accepted data (:func:`as_loader`):

* any map-style sequence — ``len(data)`` and ``data[i]`` for ``i`` in ``range(len(data))``:
  a ``torch.utils.data.Dataset``, a Hugging Face ``datasets.Dataset`` (with
  ``set_format("torch")`` or not), a list of dicts or tuples, a NumPy-backed sequence;
* an iterable-style ``torch.utils.data.IterableDataset`` (read in its own order; where the
  number of examples is needed it must have a ``len``);
* a ``DataLoader`` over any of these whose sampler is sequential.

Examples are turned into tensors by :func:`collate` unless a ``collate_fn`` is given: NumPy
arrays and Python numbers (and lists of numbers inside an example) become tensors, strings stay
lists of strings, and the examples of a batch are stacked. Rows of different lengths (tokenized
text) cannot be stacked: pass a padding collator, for Hugging Face tokenizers
``collate_fn=transformers.DataCollatorWithPadding(tokenizer)``.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)
from tqdm.auto import tqdm

from traintrace.exceptions import BatchFormatError, DataOrderError

__all__ = [
    "DataHasher",
    "as_loader",
    "batch_size_of",
    "collate",
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

Collate = Callable[[list[Any]], Any]

_PADDING_HINT = (
    "pad them into one batch with a collate function: collate_fn="
    "transformers.DataCollatorWithPadding(tokenizer) for tokenized text, or any function that "
    "turns a list of examples into a batch"
)

_SUBSET_HINT = (
    "traintrace numbers examples by their position in the data, so the sampler's order would "
    "not match the indices in the results. To use part of a data set, pass "
    "torch.utils.data.Subset(dataset, indices) (example i of the results is indices[i]) or a "
    "DataLoader over it without a sampler (shuffle=False)"
)


def as_loader(data: Any, batch_size: int, collate_fn: Collate | None = None) -> DataLoader:
    """A ``DataLoader`` over ``data`` in a fixed, sequential order.

    Args:
        data: a map-style sequence (``len`` + integer ``__getitem__``: a torch ``Dataset``, a
            Hugging Face ``datasets.Dataset``, a list of dicts/tuples, a NumPy-backed sequence),
            a torch ``IterableDataset``, or a ``DataLoader`` over one of these with a sequential
            sampler.
        batch_size: examples per batch when ``data`` is not a DataLoader (a DataLoader keeps its
            own).
        collate_fn: turns a list of examples into a batch (``None``: :func:`collate`). Use it to
            pad variable-length text: ``transformers.DataCollatorWithPadding(tokenizer)``. Not
            allowed with a DataLoader, which carries its own.

    A DataLoader built with the default ``collate_fn`` is rebuilt with :func:`collate` (which
    also reads Python lists, NumPy arrays and strings); its other settings are kept.

    Raises:
        DataOrderError: a shuffled loader, a sampler other than sequential (random, weighted,
            subset, distributed, a custom ``sampler``/``batch_sampler``), or ``drop_last``.
        BatchFormatError: data that is not a sequence (a bare tensor or array, a dict of
            columns, a one-shot iterator), or a ``collate_fn`` given with a DataLoader.
    """
    if isinstance(data, DataLoader):
        if collate_fn is not None:
            raise BatchFormatError(
                "collate_fn= was given together with a DataLoader, which has its own collate_fn; "
                "build the DataLoader with DataLoader(data, collate_fn=...) or pass the data set "
                "itself with collate_fn="
            )
        _check_order(data)
        if data.collate_fn is default_collate:
            iterable = isinstance(data.dataset, IterableDataset)
            return DataLoader(
                data.dataset,
                # checked above: sequential, no drop_last
                **(
                    {"batch_size": data.batch_size}
                    if iterable
                    else {"batch_sampler": data.batch_sampler}
                ),
                collate_fn=collate,
                num_workers=data.num_workers,
                pin_memory=data.pin_memory,
                timeout=data.timeout,
                worker_init_fn=data.worker_init_fn,
                multiprocessing_context=data.multiprocessing_context,
                generator=data.generator,
                prefetch_factor=data.prefetch_factor,
                persistent_workers=data.persistent_workers,
            )
        return data
    if isinstance(data, Tensor | np.ndarray):
        raise BatchFormatError(
            f"got a bare {type(data).__name__}; wrap it with its labels: "
            "torch.utils.data.TensorDataset(inputs, labels) (inputs alone for unlabeled data)"
        )
    if isinstance(data, str | bytes) or (
        isinstance(data, Mapping) and not isinstance(data, Dataset)
    ):
        splits = ""
        if type(data).__name__ == "DatasetDict":
            splits = f" (a DatasetDict: pick a split, e.g. data[{next(iter(data), 'train')!r}])"
        raise BatchFormatError(
            f"expected a sequence of examples, got a {type(data).__name__}{splits}; a dict of "
            "columns is not indexed by example: use datasets.Dataset.from_dict(columns) or "
            "torch.utils.data.TensorDataset(*columns)"
        )
    if not isinstance(data, Dataset | IterableDataset) and not _is_sequence(data):
        one_shot = isinstance(data, Iterator)
        raise BatchFormatError(
            f"expected a data set (a list, a torch Dataset, a Hugging Face datasets.Dataset) or a "
            f"DataLoader, got {type(data).__name__}"
            + (
                "; an iterator can be read only once and traintrace reads the data once per "
                "checkpoint: pass list(...) of it or a Dataset"
                if one_shot
                else "; it needs len() and integer indexing (data[i]), or wrap it in a "
                "torch.utils.data.IterableDataset"
            )
        )
    return DataLoader(
        data,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_fn or collate,
    )


def _is_sequence(data: Any) -> bool:
    return hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _check_order(loader: DataLoader) -> None:
    """Refuse a loader that does not read its data set once, in order, without dropping any."""
    if isinstance(loader.dataset, IterableDataset):
        if loader.drop_last:
            raise DataOrderError(
                "the DataLoader has drop_last=True and would skip examples; use drop_last=False"
            )
        return  # read in the iterable's own order; samplers do not apply
    sampler = loader.sampler
    name = type(sampler).__name__
    if isinstance(sampler, RandomSampler):
        raise DataOrderError(
            "the DataLoader shuffles (shuffle=True, a RandomSampler), so example indices would "
            "change between passes; pass the Dataset itself or a DataLoader with shuffle=False"
        )
    if isinstance(sampler, SubsetRandomSampler | WeightedRandomSampler | DistributedSampler):
        kind = {
            "SubsetRandomSampler": "draws a subset in random order",
            "WeightedRandomSampler": "resamples examples by weight (with repeats)",
            "DistributedSampler": "splits and shuffles the data across processes (traintrace "
            "splits the work across torchrun ranks itself)",
        }[name]
        raise DataOrderError(f"the DataLoader's sampler is a {name}, which {kind}; {_SUBSET_HINT}")
    batch_sampler = loader.batch_sampler
    if batch_sampler is None:  # batch_size=None: every item of the data set is already a batch
        raise BatchFormatError(
            "the DataLoader has batch_size=None (each item of its data set is used as a batch), "
            "but traintrace counts examples by len(dataset); give it a batch size, or pass the "
            "data set of single examples"
        )
    if getattr(batch_sampler, "drop_last", False) or loader.drop_last:
        raise DataOrderError(
            "the DataLoader has drop_last=True and would skip examples; use drop_last=False"
        )
    if type(batch_sampler) is not BatchSampler:
        if not _reads_in_order(batch_sampler, loader.dataset, flat=False):
            raise DataOrderError(
                f"the DataLoader's batch_sampler ({type(batch_sampler).__name__}) does not read "
                f"the examples once each in order 0, 1, 2, ...; {_SUBSET_HINT}"
            )
        return
    if not isinstance(sampler, SequentialSampler) and not _reads_in_order(
        sampler, loader.dataset, flat=True
    ):
        raise DataOrderError(
            f"the DataLoader's sampler ({name}) does not read the examples once each in order "
            f"0, 1, 2, ...; {_SUBSET_HINT}"
        )


def _reads_in_order(sampler: Any, dataset: Any, *, flat: bool) -> bool:
    """Whether two passes of a custom sampler both yield exactly ``0, 1, ..., len(dataset)-1``."""
    try:
        n = len(dataset)
    except TypeError:
        return False
    for _ in range(2):
        seen = list(sampler) if flat else [i for b in sampler for i in b]
        if seen != list(range(n)):
            return False
    return True


# -- collating ----------------------------------------------------------------------------------
def collate(examples: list[Any]) -> Any:
    """Turn a list of examples into one batch (the default ``collate_fn``).

    Each example may be a tensor, a NumPy array, a number, a tuple/list ``(inputs..., label)``
    or a mapping (a Hugging Face row). NumPy arrays and Python/NumPy numbers become tensors
    (Python floats take torch's default dtype, float32); inside an example, a list of numbers
    (a Hugging Face column such as ``input_ids``) becomes a tensor. Tensors of the same shape
    are stacked along a new first dimension; strings and other objects are kept as a list.
    A tuple/list example gives a list batch, a mapping a dict batch (like
    ``torch.utils.data.default_collate``).

    Raises:
        BatchFormatError: examples whose tensors differ in shape (variable-length text: pass
            ``collate_fn=transformers.DataCollatorWithPadding(tokenizer)``), or whose structure
            differs (different keys, different tuple lengths).
    """
    if not examples:
        raise BatchFormatError("collate got an empty list of examples")
    converted = [_to_tensors(e, top=True, path="") for e in examples]
    return _stack(converted, "")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Number | np.generic) and not isinstance(x, str | bytes)


def _all_numbers(x: Any) -> bool:
    if isinstance(x, list | tuple):
        return len(x) > 0 and all(_all_numbers(v) for v in x)
    return _is_number(x)


def _to_tensors(x: Any, *, top: bool, path: str) -> Any:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise BatchFormatError(
                f"example field {path or '(the example)'} is a NumPy array of Python objects "
                "(dtype=object), which cannot become a tensor; store numbers of one dtype "
                "(rows of different lengths: " + _PADDING_HINT + ")"
            )
        return torch.from_numpy(np.ascontiguousarray(x))
    if _is_number(x):
        return torch.as_tensor(x)
    if isinstance(x, Mapping):
        return {k: _to_tensors(v, top=False, path=f"{path}[{k!r}]") for k, v in x.items()}
    if isinstance(x, list | tuple):
        if not top and _all_numbers(x):
            try:
                return torch.as_tensor(x)
            except (ValueError, TypeError) as exc:  # ragged nested lists
                raise BatchFormatError(
                    f"example field {path} is a nested list of different lengths ({exc}); "
                    + _PADDING_HINT
                ) from None
        if not top and not any(_is_structured(v) for v in x):
            return tuple(x)  # a list of strings (or objects) is one value, kept as it is
        return [_to_tensors(v, top=False, path=f"{path}[{i}]") for i, v in enumerate(x)]
    return x


def _is_structured(x: Any) -> bool:
    return isinstance(x, Tensor | np.ndarray | Mapping | list | tuple) or _is_number(x)


def _stack(items: list[Any], path: str) -> Any:
    first = items[0]
    where = f"field {path}" if path else "the examples"
    if isinstance(first, Tensor):
        if not all(isinstance(t, Tensor) for t in items):
            raise BatchFormatError(
                f"{where}: some examples hold a tensor and others "
                f"{sorted({type(t).__name__ for t in items})}; every example must have the same "
                "structure"
            )
        shapes = [tuple(t.shape) for t in items]
        if len(set(shapes)) > 1:
            j = next(j for j, s in enumerate(shapes) if s != shapes[0])
            raise BatchFormatError(
                f"{where}: examples of one batch have different shapes ({shapes[0]} at "
                f"position 0, {shapes[j]} at position {j}), so they cannot be stacked; "
                + _PADDING_HINT
            )
        return torch.stack(items)
    if isinstance(first, Mapping):
        keys = list(first)
        for j, m in enumerate(items):
            if not isinstance(m, Mapping) or set(m) != set(keys):
                found = sorted(m) if isinstance(m, Mapping) else type(m).__name__
                raise BatchFormatError(
                    f"{where}: example at position {j} of the batch has keys {found}, the first "
                    f"has {sorted(keys)}; every example must have the same keys"
                )
        return {k: _stack([m[k] for m in items], f"{path}[{k!r}]") for k in keys}
    if isinstance(first, list):
        size = len(first)
        for j, s in enumerate(items):
            if not isinstance(s, list) or len(s) != size:
                raise BatchFormatError(
                    f"{where}: example at position {j} of the batch has "
                    f"{len(s) if isinstance(s, list) else type(s).__name__} fields, the first "
                    f"has {size}; every example must have the same structure"
                )
        return [_stack([s[i] for s in items], f"{path}[{i}]") for i in range(size)]
    return list(items)


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


def _sliced(loader: DataLoader) -> Iterator[Any] | None:
    """Batches of a ``TensorDataset`` read in order by slicing its tensors (no per-example
    ``__getitem__`` and collate: the same batches, a fifth of an epoch faster on small models),
    or ``None`` when the loader does anything else."""
    ds = loader.dataset
    sampler = loader.batch_sampler
    if (
        type(ds) is not TensorDataset
        or loader.num_workers != 0
        or loader.collate_fn not in (default_collate, collate)
        or type(sampler) is not BatchSampler
        or type(sampler.sampler) is not SequentialSampler
        or sampler.drop_last
        or loader.batch_size is None
    ):
        return None
    size, n = loader.batch_size, len(ds)
    return (tuple(t[i : i + size] for t in ds.tensors) for i in range(0, n, size))


def iterate_batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[int, Any]]:
    """Yield ``(offset of the batch's first example, plain batch on device)``."""
    offset = 0
    batches = _sliced(loader)
    for batch in loader if batches is None else batches:
        plain = to_plain(batch, device)
        size = batch_size_of(plain)
        yield offset, plain
        offset += size


def progress_batches(
    loader: DataLoader, device: torch.device, desc: str, show: bool
) -> Iterator[tuple[int, Any]]:
    """:func:`iterate_batches` under a transient progress bar counting batches (out of the total
    when the data set knows its length)."""
    total = len(loader) if dataset_length(loader) is not None else None
    yield from tqdm(
        iterate_batches(loader, device),
        total=total,
        desc=desc,
        unit="batch",
        disable=not show,
        leave=False,
    )


def dataset_length(loader: DataLoader) -> int | None:
    """Number of examples when the dataset knows it, else None."""
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


class DataHasher:
    """Incremental full-content fingerprint of a data set: feed it every batch, in order.

    Every tensor's bytes, dtype and shape are hashed with BLAKE2b (``hashlib.blake2b``, about
    1 GB/s on one core), strings and other values by their ``repr``, so changing one label of
    one example changes :meth:`hexdigest`. Each field of the batch (``"labels"``, ``[0]``, ...)
    has its own stream, and a tensor's shape is recorded only when its trailing dimensions
    change, so for fixed-shape examples the digest does not depend on the batch size
    (``[a; b]`` streams the same bytes as ``a`` then ``b``). With dynamic padding the padded
    lengths, and so the digest, depend on how examples were batched.

    Example::

        hasher = DataHasher()
        for _, batch in iterate_batches(loader, device):
            hasher.update(batch)
        hasher.hexdigest()   # 32 hex digits

    Cost: one copy to the CPU of each batch's tensors (already there when fed before moving
    the batch to the device) and a hash pass over its bytes.
    """

    def __init__(self) -> None:
        self._streams: dict[str, Any] = {}
        self._layout: dict[str, str] = {}
        self.n_examples = 0

    def _stream(self, path: str) -> Any:
        if path not in self._streams:
            self._streams[path] = hashlib.blake2b(digest_size=16)
        return self._streams[path]

    def update(self, batch: Any) -> None:
        """Hash one batch (a plain batch of tensors/dicts/lists, on any device)."""
        size = batch_size_of(batch)
        for path, leaf in _paths(batch, ""):
            h = self._stream(path)
            if isinstance(leaf, Tensor):
                batched = leaf.ndim >= 1 and leaf.shape[0] == size
                layout = f"{leaf.dtype}:{tuple(leaf.shape[1:]) if batched else tuple(leaf.shape)}"
                if not batched:
                    layout += f":unbatched@{self.n_examples}"
                if self._layout.get(path) != layout:
                    self._layout[path] = layout
                    h.update(f"<{layout}>".encode())
                h.update(tensor_bytes(leaf))
            elif isinstance(leaf, list | tuple) and len(leaf) == size:
                for item in leaf:  # one value per example (strings)
                    text = repr(item).encode()
                    h.update(len(text).to_bytes(8, "little") + text)
            else:
                text = repr(leaf).encode()
                h.update(f"<const@{self.n_examples}:{len(text)}>".encode() + text)
        self.n_examples += size

    def hexdigest(self) -> str:
        """The fingerprint so far: 32 hex digits (BLAKE2b-128 over every field's stream)."""
        total = hashlib.blake2b(digest_size=16)
        total.update(f"n={self.n_examples};".encode())
        for path in sorted(self._streams):
            total.update(f"{path}={self._streams[path].hexdigest()};".encode())
        return total.hexdigest()


def tensor_bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor in row-major order, for any dtype (bfloat16, bool included)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _paths(batch: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(field path, leaf)`` pairs of a batch; mappings in sorted key order."""
    if isinstance(batch, Mapping):
        for k in sorted(batch, key=str):
            yield from _paths(batch[k], f"{path}[{k!r}]")
    elif isinstance(batch, list | tuple) and any(
        isinstance(v, Tensor | Mapping | list) for v in batch
    ):
        for i, v in enumerate(batch):
            yield from _paths(v, f"{path}[{i}]")
    else:
        yield path or "batch", batch


def dataset_fingerprint(data: Any, batch_size: int = 256, collate_fn: Collate | None = None) -> str:
    """Full-content fingerprint of a data set: :class:`DataHasher` over every example.

    For callers without a featurizing pass of their own; estimators that read the data anyway
    feed a :class:`DataHasher` instead (same digest for the same batches). Every example is
    read (relabelling one example of thousands changes the result).

    Args:
        data: anything :func:`as_loader` accepts (a DataLoader is read as it is).
        batch_size, collate_fn: as in :func:`as_loader`; for fixed-shape examples the digest
            does not depend on ``batch_size``.

    Cost: one pass over the data (reading and collating, no model).
    """
    loader = as_loader(data, batch_size, collate_fn)
    hasher = DataHasher()
    for batch in loader:
        hasher.update(to_plain(batch))
    return hasher.hexdigest()
