"""The exact engine equals brute-force per-example gradients, layer type by layer type.

Reference: full per-example gradients from one ``torch.autograd.grad`` call per example on the
plain model (no hooks, no vmap), in float64; tolerance 1e-10 relative to the largest value.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import traintrace as tt
from traintrace.features.engine import ExactGradients

DT = torch.float64


def brute(model: nn.Module, task: tt.Task, batch: tuple, kind: str = "loss") -> torch.Tensor:
    """[n, P] per-example gradients, one autograd call per example, layout = named_parameters."""
    params = [p for _, p in model.named_parameters()]
    rows = []
    n = batch[0].shape[0]
    for i in range(n):
        one = tuple(t[i : i + 1] for t in batch)
        out = task.forward(model, one)
        value = task.loss(out, one) if kind == "loss" else task.oriented_measurement(out, one)
        grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for p, g in zip(params, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


class SeqModel(nn.Module):
    """Embedding (padding_idx) + position parameter + Linear on [B, T, D] + LayerNorm + tied head."""

    def __init__(self, vocab: int = 11, d: int = 6, t: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, t, d, dtype=DT) * 0.1)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos
        h = self.norm(torch.tanh(self.proj(h)))
        return self.head(h.mean(1))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 9, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens)))).mean(1)


def conv_model(**kw) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, **kw),
        nn.Tanh(),
        nn.Conv2d(4, 4, 2, groups=2),  # grouped: one capture term per group
        nn.Flatten(),
        nn.LazyLinear(3),
    )


def _cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=g)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    yield "linear", mlp, tt.Classification(), (x, y)
    img = torch.randn(6, 2, 7, 7, generator=g, dtype=DT)
    yi = torch.randint(0, 3, (6,), generator=g)
    for name, kw in {
        "conv-stride-pad": {"stride": 2, "padding": 1},
        "conv-dilation": {"dilation": 2, "padding": 2},
        "conv-reflect": {"padding": 1, "padding_mode": "reflect"},
    }.items():
        model = conv_model(**kw).double()
        model(img)  # materialize the lazy layer
        yield name, model, tt.Classification(), (img, yi)
    seq = torch.randn(6, 3, 9, generator=g, dtype=DT)
    for name, kw, length in (
        ("conv1d-circular", {"stride": 2, "padding": 1, "padding_mode": "circular"}, 5),
        ("conv1d-dilation-nobias", {"dilation": 2, "padding": 1, "bias": False}, 7),
        ("conv1d-same", {"padding": "same"}, 9),
    ):
        conv1d = nn.Sequential(
            nn.Conv1d(3, 4, 3, **kw), nn.Tanh(), nn.Flatten(), nn.Linear(4 * length, 3)
        ).double()
        yield name, conv1d, tt.Classification(), (seq, torch.randint(0, 3, (6,), generator=g))
    # more than MAX_GROUPS groups (depthwise, a channel multiplier): the hooks form the
    # per-example gradients by one convolution backward over batch × groups
    depthwise = nn.Sequential(
        nn.Conv2d(2, 10, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(
            10,
            20,
            (3, 2),
            stride=(2, 1),
            dilation=(1, 2),
            padding=1,
            groups=10,
            padding_mode="reflect",
        ),
        nn.Tanh(),
        nn.Flatten(2),
        nn.Conv1d(20, 20, 3, padding="same", groups=20, bias=False),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()
    depthwise(img)
    yield "depthwise", depthwise, tt.Classification(), (img, yi)
    tok = torch.randint(0, 11, (6, 5), generator=g)
    tok[:, -1] = 0  # padding
    yield "sequence", SeqModel(), tt.Classification(), (tok, torch.randint(0, 3, (6,), generator=g))
    lm = torch.randint(0, 9, (5, 6), generator=g)
    yield "tied", TiedLM(), tt.Classification(), (lm, torch.randint(0, 9, (5,), generator=g))


CASES = list(_cases())


@pytest.mark.parametrize("name,model,task,batch", CASES, ids=[c[0] for c in CASES])
def test_engine_matches_brute_force(name, model, task, batch, monkeypatch):
    # capture every ungrouped convolution formed when asked (by default only from 8 channels)
    monkeypatch.setattr("traintrace.features.projections.FORM_MIN_CHANNELS", 1)
    torch.manual_seed(1)
    model = model.double().eval()
    state = dict(model.state_dict(keep_vars=False))
    engine = ExactGradients(model, task)
    ref = brute(model, task, batch)
    names = [n for n, _ in model.named_parameters()]
    assert engine.names == names
    n = batch[0].shape[0]
    split = n // 2
    train = tuple(t[:split] for t in batch), tuple(t[split:] for t in batch)
    caps = [engine.capture(state, part) for part in train]
    queries = engine.capture(state, batch, "measurement")
    qref = brute(model, task, batch, "measurement")
    tol = 1e-10 * float(ref.abs().max() * qref.abs().max() * ref.shape[1])
    # factored directions (the queries' own captures)
    dirs = engine.directions(queries)
    got = torch.cat([engine.dot(c, dirs) for c in caps], dim=1)
    torch.testing.assert_close(got, qref @ ref.T, atol=tol, rtol=0)
    # dense directions (e.g. a preconditioned query)
    dense = torch.randn(3, ref.shape[1], dtype=DT)
    got = torch.cat([engine.dot(c, engine.directions_from_flat(dense)) for c in caps], dim=1)
    torch.testing.assert_close(
        got, dense @ ref.T, atol=1e-10 * float(ref.abs().max() * 10 * ref.shape[1]), rtol=0
    )
    # squared norms and per-unit parts that sum to the total
    sq = torch.cat([engine.sq_norms(c) for c in caps])
    torch.testing.assert_close(
        sq, ref.square().sum(1), atol=1e-10 * float(ref.square().sum(1).max()), rtol=0
    )
    per_unit = torch.cat([engine.sq_norms(c, per_unit=True) for c in caps], dim=1)
    assert per_unit.shape[0] == len(engine.units)
    torch.testing.assert_close(per_unit.sum(0), sq)
    flat = torch.cat([engine.flatten(c) for c in caps])
    torch.testing.assert_close(flat, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    layer_dots = engine.dot(caps[0], dirs, per_unit=True)
    torch.testing.assert_close(layer_dots.sum(0), engine.dot(caps[0], dirs))
    # convolutions captured formed (one batch-grouped convolution backward, no patches) where a
    # contraction with dense directions forms them anyway: the same gradients and scores
    form = engine.forming([engine.directions_from_flat(dense)])
    convs = [g for g in engine._groups if g.type in ("Conv1d", "Conv2d")]
    assert form == {g.key for g in convs}
    ungrouped = {g.key for g in convs if all(r.module.groups == 1 for r in g.roles)}
    formed_caps = [engine.capture(state, part, form=form) for part in train]
    assert all(ungrouped <= set(c.formed) and not (ungrouped & set(c.terms)) for c in formed_caps)
    flat = torch.cat([engine.flatten(c) for c in formed_caps])
    torch.testing.assert_close(flat, ref, atol=1e-12 * float(ref.abs().max()), rtol=0)
    got = torch.cat([engine.dot(c, engine.directions_from_flat(dense)) for c in formed_caps], 1)
    torch.testing.assert_close(
        got, dense @ ref.T, atol=1e-10 * float(ref.abs().max() * 10 * ref.shape[1]), rtol=0
    )
    sq = torch.cat([engine.sq_norms(c) for c in formed_caps])
    torch.testing.assert_close(
        sq, ref.square().sum(1), atol=1e-10 * float(ref.square().sum(1).max()), rtol=0
    )


def test_coverage_names_paths():
    model = conv_model(padding=1).double()
    model(torch.randn(1, 2, 7, 7, dtype=torch.float64))
    cov = ExactGradients(model, tt.Classification()).coverage
    assert cov["0.weight"] == "hooks:Conv2d"
    assert cov["2.weight"] == "hooks:Conv2d"  # groups=2: one capture term per group
    assert cov["4.weight"] == "hooks:Linear"
    depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(), nn.Linear(16, 2))
    cov = ExactGradients(depthwise, tt.Classification()).coverage
    assert cov["0.weight"] == "hooks:grouped-conv"  # > MAX_GROUPS groups: formed by the hooks


def test_hf_conv1d_and_gpt2_sequences():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=13,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        attn_pdrop=0,
        resid_pdrop=0,
        embd_pdrop=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 13, (4, 6))
    batch = {"input_ids": ids, "labels": ids}
    task = tt.LanguageModeling()
    engine = ExactGradients(model, task)
    state = model.state_dict()
    cap = engine.capture(state, batch)
    params = [p for _, p in model.named_parameters()]
    rows = []
    for i in range(4):
        one = {"input_ids": ids[i : i + 1], "labels": ids[i : i + 1]}
        v = task.loss(task.forward(model, one), one)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(v.sum(), params)]))
    ref = torch.stack(rows)
    assert any(v == "hooks:Conv1D" for v in engine.coverage.values())
    # layers="last" reaches the tied lm_head through its first name
    assert ExactGradients(model, task, "last").names == ["transformer.wte.weight"]
    torch.testing.assert_close(
        engine.flatten(cap), ref, atol=1e-10 * float(ref.abs().max()), rtol=0
    )
    torch.testing.assert_close(
        engine.dot(cap, engine.directions(cap)),
        ref @ ref.T,
        atol=1e-9 * float((ref @ ref.T).abs().max()),
        rtol=0,
    )
    torch.testing.assert_close(engine.sq_norms(cap), ref.square().sum(1))


def test_flush_zeroes_only_negligible_entries_per_direction():
    from traintrace.features.engine import Directions

    g = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 4, 5, generator=g)
    dense[0, 0, 0] = 1e-30  # negligible beside row 0's O(1) entries
    dense[1] *= 1e-20  # a small direction keeps its relative structure
    dense[1, 2, 3] = 1e-20 * 1e-9  # 1e-9 of its row: kept (above eps² = 1.4e-14)
    dense[2, 1, 1] = 0.0
    dense_t = torch.randn(2, 5, 4, generator=g).transpose(1, 2)  # non-contiguous
    dense_t[1, 3, 2] = 1e-40
    flat = torch.randn(3, 7, generator=g)
    flat[2, 6] = 1e-25
    before = {k: v.clone() for k, v in {"a": dense, "b": dense_t, "f": flat}.items()}
    dirs = Directions(3, dense={"a": dense, "b": dense_t}, flat=flat)
    assert dirs.flush_() is dirs
    assert dirs.dense["a"][0, 0, 0] == 0 and dirs.dense["b"][1, 3, 2] == 0
    assert dirs.flat is not None and dirs.flat[2, 6] == 0
    assert dirs.dense["a"][1, 2, 3] == before["a"][1, 2, 3]
    keep = torch.ones_like(before["a"], dtype=torch.bool)
    keep[0, 0, 0] = False
    assert torch.equal(dirs.dense["a"][keep], before["a"][keep])
    assert int((dirs.dense["b"] != before["b"]).sum()) == 1
    assert int((dirs.flat != before["f"]).sum()) == 1
