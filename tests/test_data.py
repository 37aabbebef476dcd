"""Data input: any map-style sequence through ``as_loader``, sampler checks, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import traintrace as tt
from traintrace.data import DataHasher, as_loader, collate, dataset_fingerprint, tensor_bytes
from traintrace.validation import require_length

datasets = pytest.importorskip("datasets")

N, D = 10, 3


def _tensors():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, 3, (N,), generator=g)


def _as_pairs(batches):
    """Batches as (inputs, labels) pairs whatever their container."""
    out = []
    for b in batches:
        if isinstance(b, dict):
            out.append((b["x"], b["labels"]))
        else:
            out.append((b[0], b[1]))
    return out


class _NumpyRows:
    """A NumPy-backed map-style sequence (no torch Dataset base class)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _sources():
    x, y = _tensors()
    hf = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})
    hf_torch = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})
    hf_torch.set_format("torch")
    rows = [{"x": x[i].numpy(), "labels": int(y[i])} for i in range(N)]
    return {
        "hf": hf,
        "hf-torch": hf_torch,
        "list-of-dicts": rows,
        "list-of-tuples": [(x[i].tolist(), int(y[i])) for i in range(N)],
        "numpy-sequence": _NumpyRows(x.numpy(), y.numpy()),
        "loader-over-list": DataLoader(rows, batch_size=4),
    }


@pytest.mark.parametrize("name", list(_sources()))
def test_map_style_sequences_give_the_tensor_dataset_batches(name):
    x, y = _tensors()
    expected = _as_pairs(as_loader(TensorDataset(x, y), 4))
    got = _as_pairs(as_loader(_sources()[name], 4))
    assert len(got) == len(expected) == 3
    for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
        assert gx.dtype == torch.float32 and gy.dtype == torch.int64
        torch.testing.assert_close(gx, ex)  # HF stores float64; values round-trip to float32
        torch.testing.assert_close(gy, ey)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(D, 3)

    def forward(self, x):  # named x, as the mapping batches' key
        return self.fc(x)


def test_an_estimator_fits_a_hugging_face_dataset_like_a_tensor_dataset():
    x, y = _tensors()
    model = _Net()
    ckpt = [tt.Checkpoint(model.state_dict(), lr=0.1)]
    ref = tt.TracIn(model, tt.Classification(), ckpt, progress=False).fit(TensorDataset(x, y))
    hf = datasets.Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()})
    hf.set_format("torch")
    est = tt.TracIn(model, tt.Classification(), ckpt, progress=False).fit(hf)
    queries = [{"x": x[i], "labels": y[i]} for i in range(3)]
    torch.testing.assert_close(est.score(queries), ref.score(TensorDataset(x[:3], y[:3])))


def _tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "set": 2, "an": 3, "alarm": 4, "disable": 5, "my": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )


def test_variable_length_text_needs_a_padding_collate_fn():
    transformers = pytest.importorskip("transformers")
    tok = _tokenizer()
    texts = ["set an alarm", "disable my alarm now", "set alarm"]
    ds = datasets.Dataset.from_dict({**tok(texts), "label": [0, 1, 0]})
    with pytest.raises(tt.BatchFormatError, match="DataCollatorWithPadding") as err:
        list(as_loader(ds, 2))
    assert "input_ids" in str(err.value) and "(3,) at position 0, (4,)" in str(err.value)
    batches = list(as_loader(ds, 2, collate_fn=transformers.DataCollatorWithPadding(tok)))
    assert batches[0]["input_ids"].tolist() == [[2, 3, 4, 0], [5, 6, 4, 1]]
    assert batches[0]["attention_mask"][0].tolist() == [1, 1, 1, 0]
    assert batches[1]["labels"].tolist() == [0]  # the collator renames label -> labels
    with pytest.raises(tt.BatchFormatError, match="has its own collate_fn"):
        as_loader(DataLoader(ds), 2, collate_fn=transformers.DataCollatorWithPadding(tok))


def test_collate_converts_numbers_arrays_and_keeps_strings():
    batch = collate(
        [
            {"ids": [1, 2], "v": np.float32(0.5), "text": "a", "flag": True},
            {"ids": [3, 4], "v": np.float32(1.5), "text": "b", "flag": False},
        ]
    )
    assert batch["ids"].tolist() == [[1, 2], [3, 4]] and batch["ids"].dtype == torch.int64
    assert batch["v"].dtype == torch.float32 and batch["text"] == ["a", "b"]
    assert batch["flag"].dtype == torch.bool
    with pytest.raises(tt.BatchFormatError, match="same keys"):
        collate([{"a": 1}, {"b": 1}])
    with pytest.raises(tt.BatchFormatError, match="dtype=object"):
        collate([(np.array([1, "a"], dtype=object), 1)])


class _Stream(IterableDataset):
    def __iter__(self):
        x, y = _tensors()
        return iter(zip(x, y, strict=True))


def test_unsupported_data_is_refused_by_name():
    x, y = _tensors()
    with pytest.raises(tt.BatchFormatError, match="TensorDataset"):
        as_loader(x, 4)
    with pytest.raises(tt.BatchFormatError, match="TensorDataset"):
        as_loader(x.numpy(), 4)
    with pytest.raises(tt.BatchFormatError, match="dict of columns"):
        as_loader({"x": x, "labels": y}, 4)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"a": [1]})})
    with pytest.raises(tt.BatchFormatError, match=r"pick a split, e.g. data\['train'\]"):
        as_loader(dd, 4)
    with pytest.raises(tt.BatchFormatError, match="can be read only once"):
        as_loader(iter([(x[0], y[0])]), 4)
    with pytest.raises(tt.BatchFormatError, match="len"):
        as_loader(object(), 4)
    # an IterableDataset is read in its own order; where n is needed it is refused by name
    loader = as_loader(_Stream(), 4)
    assert sum(len(b[1]) for b in loader) == N
    assert sum(len(b[1]) for b in as_loader(DataLoader(_Stream(), batch_size=3), 4)) == N
    with pytest.raises(tt.DataOrderError, match="drop_last"):
        as_loader(DataLoader(_Stream(), batch_size=3, drop_last=True), 4)
    with pytest.raises(tt.UnsizedDataError, match="has no length"):
        require_length(loader)
    with pytest.raises(tt.EmptyDataError, match="the training data set is empty"):
        require_length(as_loader([], 4))


def _loader_cases():
    x, y = _tensors()
    ds = TensorDataset(x, y)
    w = torch.ones(N)
    return {
        "shuffle": (DataLoader(ds, shuffle=True), "shuffle=True"),
        "subset-random": (DataLoader(ds, sampler=SubsetRandomSampler(range(5))), "Subset"),
        "weighted": (DataLoader(ds, sampler=WeightedRandomSampler(w, N)), "resamples"),
        "distributed": (
            DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=1, rank=0)),
            "torchrun",
        ),
        "subset-indices": (DataLoader(ds, sampler=[1, 2, 3]), "Subset"),
        "reversed-batches": (DataLoader(ds, batch_sampler=[[3, 2], [1, 0]]), "batch_sampler"),
        "drop-last": (DataLoader(ds, batch_size=3, drop_last=True), "drop_last"),
        "batch-sampler-drop-last": (
            DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 3, True)),
            "drop_last",
        ),
    }


@pytest.mark.parametrize("name", list(_loader_cases()))
def test_samplers_other_than_sequential_are_refused(name):
    loader, phrase = _loader_cases()[name]
    with pytest.raises(tt.DataOrderError, match=phrase) as err:
        as_loader(loader, 4)
    if "Subset" in phrase:
        assert "torch.utils.data.Subset(dataset, indices)" in str(err.value)


def test_sequential_custom_samplers_and_subsets_are_accepted():
    x, y = _tensors()
    ds = TensorDataset(x, y)
    for loader in (
        DataLoader(ds, sampler=list(range(N)), batch_size=4),
        DataLoader(ds, batch_sampler=[[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]),
        DataLoader(Subset(ds, [7, 2, 5]), batch_size=2),
    ):
        assert as_loader(loader, 4).dataset is loader.dataset
        list(as_loader(loader, 4))


def test_data_hasher_is_batch_size_invariant_and_sees_every_example():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(1000, 4, generator=g), torch.randint(0, 10, (1000,), generator=g)
    base = dataset_fingerprint(TensorDataset(x, y), batch_size=64)
    assert dataset_fingerprint(TensorDataset(x, y), batch_size=7) == base
    assert dataset_fingerprint(DataLoader(TensorDataset(x, y), batch_size=1000)) == base
    relabelled = y.clone()
    relabelled[[13, 500, 871]] = (relabelled[[13, 500, 871]] + 1) % 10
    assert dataset_fingerprint(TensorDataset(x, relabelled)) != base
    assert dataset_fingerprint(TensorDataset(x, y.int())) != base  # dtype is hashed
    assert dataset_fingerprint(TensorDataset(x.reshape(1000, 2, 2), y)) != base  # shape too
    assert dataset_fingerprint(TensorDataset(x[:999], y[:999])) != base
    # incremental: the estimator feeds it batch by batch while featurizing
    h = DataHasher()
    for b in as_loader(TensorDataset(x, y), 100):
        h.update(b)
    assert h.hexdigest() == base and h.n_examples == 1000


def test_data_hasher_reads_half_precision_strings_and_dicts():
    x = torch.randn(4, 3)
    a = DataHasher()
    a.update({"x": x.bfloat16(), "text": ["a", "b", "c", "d"], "labels": torch.arange(4)})
    b = DataHasher()
    b.update({"x": x.bfloat16(), "text": ["a", "b", "c", "e"], "labels": torch.arange(4)})
    assert a.hexdigest() != b.hexdigest()
    assert len(tensor_bytes(x.half())) == 24 and len(tensor_bytes(torch.tensor(1.0))) == 4
