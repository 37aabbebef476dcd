"""TracIn on tiny Hugging Face models built from configs (random weights, nothing downloaded)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import brute_tracin, perturbed_states
from torch.utils.data import Dataset

import traintrace as tt

transformers = pytest.importorskip("transformers")


class TokenData(Dataset):
    def __init__(self, ids, mask, labels=None):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i]}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def tokens(n=5, length=7, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 4:] = 0  # a padded example
    return ids, mask


def gpt2(attn="eager"):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=40,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return transformers.GPT2LMHeadModel(cfg).double()


def lm_sum_loss(model, ex):
    """Sum of next-token cross-entropies over the unmasked positions, written out by hand."""
    ids, mask = ex
    logits = model(input_ids=ids[None], attention_mask=mask[None]).logits[0]
    keep = mask[1:].bool()
    return F.cross_entropy(logits[:-1][keep], ids[1:][keep], reduction="sum")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_language_modeling_equals_brute_force(attn):
    model = gpt2(attn)
    states = perturbed_states(model, 2, scale=0.05)
    ids, mask = tokens()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, [0.1, 0.03], strict=True)]
    est = tt.TracIn(model, tt.LanguageModeling(), ckpts, batch_size=2, progress=False)
    # the engine's hooks need no vmap: SDPA's mask logic and padded batches stay batched
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        est.fit(TokenData(ids, mask))
    scores = est.score(TokenData(ids, mask))
    ex = list(zip(ids, mask, strict=True))
    expected = brute_tracin(model, states, [0.1, 0.03], ex, ex, lm_sum_loss, lm_sum_loss)
    assert ((scores - expected).abs().max() / expected.abs().max()) < 1e-8
    assert "transformer.wte.weight" in est.parameter_names  # tied with lm_head: listed once


def test_bert_classification_with_dict_batches_equals_brute_force():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        num_hidden_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=40,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    model = transformers.BertForSequenceClassification(cfg).double()
    states = perturbed_states(model, 1, scale=0.05)
    ids, mask = tokens(seed=1)
    labels = torch.tensor([0, 2, 1, 1, 0])
    est = tt.TracIn(
        model, tt.Classification(), [tt.Checkpoint(states[0], lr=0.5)], batch_size=3, progress=False
    )
    est.fit(TokenData(ids, mask, labels))
    scores = est.score(TokenData(ids, mask, labels))

    def ce(m, ex):
        i, msk, y = ex
        return F.cross_entropy(m(input_ids=i[None], attention_mask=msk[None]).logits, y[None])

    ex = list(zip(ids, mask, labels, strict=True))
    expected = brute_tracin(model, states, [0.5], ex, ex, ce, ce)
    assert ((scores - expected).abs().max() / expected.abs().max()) < 1e-8


def _bert():
    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        num_hidden_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        intermediate_size=16,
        vocab_size=40,
        max_position_embeddings=16,
        num_labels=3,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(cfg).double()


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_kronecker_projection_agrees_with_the_exact_path(name):
    from scipy.stats import spearmanr

    model = gpt2() if name == "gpt2" else _bert()
    task = tt.LanguageModeling() if name == "gpt2" else tt.Classification()
    ids, mask = tokens(n=8, seed=2)
    data = TokenData(ids, mask) if name == "gpt2" else TokenData(ids, mask, torch.arange(8) % 3)
    ckpt = [tt.Checkpoint(perturbed_states(model, 1, scale=0.05)[0], lr=0.1)]
    p = sum(q.numel() for q in model.parameters())
    exact = tt.TracIn(model, task, ckpt, batch_size=4, progress=False).fit(data).score(data)
    # dim >= P: every Kronecker factor is the identity, so the projection loses nothing
    full = tt.TracIn(model, task, ckpt, projection=p, batch_size=4, progress=False).fit(data)
    assert any(v.startswith("kronecker:") for v in full.coverage.values())
    assert ((full.score(data) - exact).abs().max() / exact.abs().max()) < 1e-8
    # a real compression keeps the rankings
    small = tt.TracIn(model, task, ckpt, projection=p // 8, batch_size=4, progress=False).fit(data)
    rho = [spearmanr(a, b).statistic for a, b in zip(small.score(data), exact, strict=True)]
    assert min(rho) > 0.5 and sum(rho) / len(rho) > 0.8, rho
