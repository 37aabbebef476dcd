"""Projections of per-example gradients: every path against an explicit brute-force projection.

References: exact per-example gradients from :class:`GradientComputer` (itself tested against a
loop of ``autograd.grad`` calls), reshaped per layer into the canonical ``[d_out, d_in(+1)]``
matrix by the rule written out in :func:`canonical` (independent of the implementation), and
projected with explicit matrices: ``P_out G P_inᵀ`` (Kronecker) or ``g @ R`` (dense, sparse).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from reference import CNN, MLP
from torch import nn

import traintrace as tt
from traintrace.features import GradientComputer
from traintrace.features.projections import BLOCK_ROWS, ProjectedGradients, Projection

torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
class SeqLinear(nn.Module):
    """Linear layers applied to every token of a [B, T, d] input, then mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x))).mean(dim=1)


class Recurrent(nn.Module):
    """One Linear registered under two names and called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.alias = self.cell
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.alias(torch.tanh(self.cell(x)))))


class EmbedBag(nn.Module):
    """Embedding with padding_idx, mean over tokens, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)).mean(dim=1))


class ConvNet(nn.Module):
    """Conv2d variants: reflect padding with bias; stride 2 and dilation without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(4, 5, 3, stride=2, dilation=2, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(x), inplace=True)
        return self.fc(torch.tanh(self.c2(h)).mean(dim=(2, 3)))


class Conv1dNet(nn.Module):
    """Conv1d: circular padding with bias; stride 2 and dilation without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv1d(6, 5, 3, stride=2, dilation=2, bias=False)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.c2(F.relu(self.c1(x)))).mean(dim=2))


class NormNet(nn.Module):
    """Linear + LayerNorm + a raw Parameter: the last two take the dense (exact) path."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x)) * self.scale))


class FunctionalUse(nn.Module):
    """`fc`'s weight is used through F.linear, so its forward hook never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(F.linear(x, self.fc.weight, self.fc.bias)))


class SequenceFirst(nn.Module):
    """A Linear applied to a [T, B, d] (sequence-first) tensor: not batch-first."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, 4]
        h = torch.tanh(self.fc(x.transpose(0, 1))).transpose(0, 1)
        return self.out(h.mean(dim=1))


class SharedBias(nn.Module):
    """`fc` maps a constant [1, 2] buffer to a bias shared by all examples, reshaped to [3]: its
    output cannot be expanded over the batch (view fails), so it takes the exact path."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("const", torch.tensor([[1.0, -2.0]]))
        self.fc = nn.Linear(2, 3)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.fc(self.const).view(3)


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=50,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config).double()


def case(name: str):
    """(model, task, batch, dim, layers) for each layer type, in float64."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def labels(n: int, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (n,), generator=gen)

    cls = tt.Classification()
    if name == "linear":
        model = MLP().double()  # with BatchNorm, evaluated with (non-trivial) running statistics
        model.bn.running_mean = randn(7)
        model.bn.running_var = 0.5 + torch.rand(7, generator=gen, dtype=torch.float64)
        return model, cls, (randn(6, 5), labels(6, 3)), 40, None
    if name == "linear-partial":
        return MLP().double(), cls, (randn(6, 5), labels(6, 3)), 20, ["fc1.weight", "fc2.bias"]
    if name == "linear-twice":
        return Recurrent().double(), cls, (randn(5, 4), labels(5, 3)), 20, None
    if name == "linear-sequence":
        return SeqLinear().double(), cls, (randn(5, 7, 5), labels(5, 3)), 30, None
    if name == "conv2d":
        return CNN().double(), cls, (randn(5, 1, 6, 6), labels(5, 4)), 30, None
    if name == "conv2d-variants":
        return ConvNet().double(), cls, (randn(4, 2, 9, 9), labels(4, 3)), 40, None
    if name == "conv2d-grouped":
        model = nn.Sequential(
            nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 25, 3)
        )
        return model.double(), cls, (randn(4, 4, 5, 5), labels(4, 3)), 40, None
    if name == "conv1d":
        return Conv1dNet().double(), cls, (randn(4, 3, 12), labels(4, 3)), 40, None
    if name == "embedding":
        ids = torch.randint(0, 11, (5, 6), generator=gen)
        ids[:, -2:] = 0  # padding
        ids[0, 0] = 0
        return EmbedBag().double(), cls, (ids, labels(5, 3)), 40, None
    if name == "gpt2":
        ids = torch.randint(0, 50, (3, 7), generator=gen)
        mask = torch.ones_like(ids)
        mask[2, -2:] = 0
        return (
            tiny_gpt2(),
            tt.LanguageModeling(),
            {"input_ids": ids, "attention_mask": mask},
            300,
            None,
        )
    if name == "bert":
        ids = torch.randint(0, 30, (3, 6), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels(3, 2)}
        return tiny_bert(), cls, batch, 300, None
    raise KeyError(name)


# ----------------------------------------------------------------------------------------------
# the reference: canonical matrices and explicit projections
# ----------------------------------------------------------------------------------------------
def first_owner(model: nn.Module, name: str) -> nn.Module:
    param = dict(model.named_parameters())[name]
    for _, module in model.named_modules(remove_duplicate=False):
        if any(p is param for p in module._parameters.values()):
            return module
    raise KeyError(name)


def canonical(model: nn.Module, params: list[str], grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example ``[n, d_out, d_in(+1)]``: the layer's weight gradient in its first module's
    ``[d_out, d_in]`` orientation (Embedding and HF Conv1D transposed, Conv2d flattened), with the
    bias gradient as the last column."""
    weight = next((p for p in params if p.endswith("weight")), None)
    bias = next((p for p in params if p.endswith("bias")), None)
    parts = []
    if weight is not None:
        g = grads[weight]
        owner = first_owner(model, weight)
        if isinstance(owner, nn.Embedding) or type(owner).__name__ == "Conv1D":
            parts.append(g.transpose(1, 2))
        else:
            parts.append(g.reshape(g.shape[0], g.shape[1], -1))
    if bias is not None:
        parts.append(grads[bias].reshape(grads[bias].shape[0], -1, 1))
    return torch.cat(parts, dim=2)


def exact_gradients(pg: ProjectedGradients, state, batch, kind="loss") -> torch.Tensor:
    return GradientComputer(pg.model, pg.task, pg.names).per_example(state, batch, kind)


def explicit_projection(pg: ProjectedGradients, flat: torch.Tensor) -> torch.Tensor:
    """``[n, width]`` from exact flat gradients with explicit matrices."""
    grads = pg.layout.unflatten(flat)
    factors = pg.kronecker_factors()
    out = torch.zeros(flat.shape[0], pg.width, dtype=flat.dtype)
    for group in pg.describe()["kronecker_groups"]:
        p_out, p_in = factors[group["key"]]
        g = canonical(pg.model, group["params"], grads)
        assert list(g.shape[1:]) == group["matrix"]
        out[:, pg.columns[group["key"]]] = (p_out @ g @ p_in.T).reshape(flat.shape[0], -1)
    dense = pg.describe()["dense"]["params"]
    if dense:
        g = torch.cat([grads[n].reshape(flat.shape[0], -1) for n in dense], dim=1)
        r = pg.dense_matrix()
        out[:, pg.columns["dense"]] = g if r is None else g @ r
    return out


# ----------------------------------------------------------------------------------------------
# Kronecker: hooks equal the explicit projection
# ----------------------------------------------------------------------------------------------
KRONECKER_CASES = [
    ("linear", "kronecker:Linear"),
    ("linear-partial", "kronecker:Linear"),
    ("linear-twice", "kronecker:Linear"),
    ("linear-sequence", "kronecker:Linear"),
    ("conv2d", "kronecker:Conv2d"),
    ("conv2d-variants", "kronecker:Conv2d"),
    ("conv1d", "kronecker:Conv1d"),
    ("conv2d-grouped", "kronecker:Conv2d"),
    ("embedding", "kronecker:Embedding"),
    ("gpt2", "kronecker:Conv1D"),
    ("bert", "kronecker:Embedding"),
]


@pytest.mark.filterwarnings("ignore:torch.func.vmap could not batch")
@pytest.mark.parametrize(("name", "path"), KRONECKER_CASES)
def test_kronecker_features_equal_explicit_kronecker_projection(name, path):
    model, task, batch, dim, layers = case(name)
    pg = ProjectedGradients(model, task, layers, projection=dim)
    state = model.state_dict()
    features = pg.features(state, batch)
    # the fast path was taken for every Kronecker layer (not the exact fallback)
    assert path in pg.coverage.values()
    assert not any(p.startswith("exact+kronecker") for p in pg.coverage.values()), pg.report()
    assert "vmap:" not in pg.report()  # normalization layers were hooked, too
    # and some factor is a real projection (k < d), so the comparison means something
    assert any(p.shape[0] < p.shape[1] for f in pg.kronecker_factors().values() for p in f)
    expected = explicit_projection(pg, exact_gradients(pg, state, batch))
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-10)
    assert features.shape == (tt.data.batch_size_of(batch), pg.width)
    assert pg.width <= dim


def test_gpt2_tied_embedding_and_position_embeddings_are_hooked():
    model, task, batch, dim, _ = case("gpt2")
    pg = ProjectedGradients(model, task, projection=dim)
    pg.features(model.state_dict(), batch)
    assert pg.coverage["transformer.wte.weight"] == "kronecker:Embedding+Linear"
    # wpe is indexed by [1, T] position ids and broadcast over the batch
    assert pg.coverage["transformer.wpe.weight"] == "kronecker:Embedding"
    assert pg.coverage["transformer.h.0.ln_1.weight"].startswith("exact")


def test_partial_selection_makes_weight_only_and_bias_only_groups():
    model, task, _, dim, layers = case("linear-partial")
    pg = ProjectedGradients(model, task, layers, projection=dim)
    groups = {g["key"]: g for g in pg.describe()["kronecker_groups"]}
    assert groups["fc1.weight"]["params"] == ["fc1.weight"]
    assert groups["fc1.weight"]["matrix"] == [7, 5]  # no bias column
    assert groups["fc2.bias"]["matrix"] == [3, 1]  # ã = 1


def test_kronecker_is_batch_size_invariant_and_leaves_the_model_alone():
    model, task, (x, y), dim, _ = case("conv2d-variants")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = model.state_dict()
    pg = ProjectedGradients(model, task, projection=dim)
    whole = pg.features(state, (x, y))
    ones = torch.cat([pg.features(state, (x[i : i + 1], y[i : i + 1])) for i in range(len(y))])
    torch.testing.assert_close(whole, ones, rtol=1e-12, atol=1e-12)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_same_settings_same_features_and_seed_changes_them():
    model, task, batch, dim, _ = case("embedding")
    state = model.state_dict()
    a = ProjectedGradients(model, task, projection=Projection(dim, seed=3)).features(state, batch)
    b = ProjectedGradients(model, task, projection=Projection(dim, seed=3)).features(state, batch)
    c = ProjectedGradients(model, task, projection=Projection(dim, seed=4)).features(state, batch)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ----------------------------------------------------------------------------------------------
# fallbacks: dense group, functional use, not batch-first
# ----------------------------------------------------------------------------------------------
def test_coverage_lists_every_parameter_and_dense_group_is_exact_plus_gaussian():
    torch.manual_seed(2)
    model = NormNet().double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    pg = ProjectedGradients(model, tt.Classification(), projection=30)
    assert set(pg.coverage) == {n for n, _ in model.named_parameters()}
    assert pg.coverage["fc1.weight"] == pg.coverage["fc2.bias"] == "kronecker:Linear"
    for name in ("norm.weight", "norm.bias", "scale"):
        assert pg.coverage[name] == "exact+gaussian"
        assert name in pg.report()
    assert "hooks on LayerNorm" in pg.report()
    r = pg.dense_matrix()
    assert r is not None and r.shape == (24, pg.columns["dense"].stop - pg.columns["dense"].start)
    state = model.state_dict()
    features = pg.features(state, (x, y))
    g = pg.layout.unflatten(exact_gradients(pg, state, (x, y)))
    # the dense group's parameters in layout (named_parameters) order: the root's own first
    assert pg.describe()["dense"]["params"] == ["scale", "norm.weight", "norm.bias"]
    dense = torch.cat([g["scale"], g["norm.weight"], g["norm.bias"]], dim=1)
    torch.testing.assert_close(features[:, pg.columns["dense"]], dense @ r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        features, explicit_projection(pg, exact_gradients(pg, state, (x, y)))
    )
    assert "vmap:" not in pg.report()  # the LayerNorm hooks passed their checks
    # with room for all 24 dense numbers the dense group is stored exactly
    big = ProjectedGradients(model, tt.Classification(), projection=400)
    assert big.coverage["scale"] == "exact" and big.dense_matrix() is None


@pytest.mark.parametrize("model_cls", [FunctionalUse, SequenceFirst, SharedBias])
def test_layers_the_hooks_cannot_see_fall_back_to_exact_with_the_same_projection(model_cls):
    torch.manual_seed(3)
    model = model_cls().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    if model_cls is SequenceFirst:  # with T == B only the example-0-alone check can see it
        x = torch.randn(4, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    pg = ProjectedGradients(model, tt.Classification(), projection=16)
    state = model.state_dict()
    features = pg.features(state, (x, y))
    assert pg.coverage["fc.weight"] == "exact+kronecker:Linear", pg.report()
    assert pg.coverage["out.weight"] == "kronecker:Linear"
    assert "exact+kronecker" in pg.report()
    expected = explicit_projection(pg, exact_gradients(pg, state, (x, y)))
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# dense and sparse kinds
# ----------------------------------------------------------------------------------------------
def wide_mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 10)).double()  # P = 1560


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_dense_and_sparse_kinds_equal_g_times_explicit_r(kind):
    model = wide_mlp()
    assert sum(p.numel() for p in model.parameters()) > BLOCK_ROWS  # several seeded blocks
    x, y = torch.randn(7, 20, dtype=torch.float64), torch.randint(0, 10, (7,))
    state = model.state_dict()
    pg = ProjectedGradients(model, tt.Classification(), projection=Projection(24, kind))
    r = pg.dense_matrix()
    assert r is not None and r.shape == (1560, 24)
    features = pg.features(state, (x, y))
    g = exact_gradients(pg, state, (x, y))
    torch.testing.assert_close(features, g @ r, rtol=1e-10, atol=1e-10)
    assert all(p == f"exact+{kind}" for p in pg.coverage.values())
    # batch 1 vs batch 7, and with no block cache: identical
    uncached = ProjectedGradients(
        model, tt.Classification(), projection=Projection(24, kind), cache_mib=0
    )
    ones = torch.cat([uncached.features(state, (x[i : i + 1], y[i : i + 1])) for i in range(7)])
    torch.testing.assert_close(ones, features, rtol=1e-12, atol=1e-12)
    # the seeded blocks are independent: rows j and j + BLOCK_ROWS are uncorrelated
    # (mean of 536 inner products of independent rows: 0 ± 0.05; identical blocks would give 1)
    n = 1560 - BLOCK_ROWS
    assert abs(float((r[:n] * r[BLOCK_ROWS:]).sum(dim=1).mean())) < 0.15
    # the entries have the documented law
    k = 24
    if kind == "gaussian":
        assert abs(float(r.mean())) < 0.01
        assert float(r.var()) == pytest.approx(1 / k, rel=0.05)
    elif kind == "rademacher":
        torch.testing.assert_close(r.abs(), torch.full_like(r, 1 / math.sqrt(k)))
        assert abs(float(torch.sign(r).mean())) < 0.02
    else:
        s = pg.projection.sjlt_nonzeros
        assert ((r != 0).sum(dim=1) == s).all()  # one entry per output block
        torch.testing.assert_close(
            r[r != 0].abs(), torch.full(((r != 0).sum(),), s**-0.5, dtype=r.dtype)
        )
        for block in range(s):
            cols = slice(block * k // s, (block + 1) * k // s)
            assert ((r[:, cols] != 0).sum(dim=1) == 1).all()


# ----------------------------------------------------------------------------------------------
# unbiasedness and Johnson–Lindenstrauss
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kronecker", "gaussian", "rademacher", "sjlt"])
def test_inner_products_are_unbiased_over_seeds(kind):
    """Mean over S seeds of ⟨Rg, Rg'⟩ is within 5 standard errors of ⟨g, g'⟩ (and of ‖g‖²).

    The standard error is the sample standard deviation over seeds / √S (for the dense kinds
    it is at most √(2/k) ‖g‖‖g'‖ / √S); a wrong scale (1/k instead of 1/√k, a missing 1/√s)
    or correlated factors shift the mean by far more.
    """
    torch.manual_seed(5)
    # Kronecker: Linear layers and a dense group; the others: P = 1560, two seeded blocks of R
    model = NormNet().double() if kind == "kronecker" else wide_mlp()
    d_in, classes = (6, 3) if kind == "kronecker" else (20, 10)
    x, y = torch.randn(2, d_in, dtype=torch.float64), torch.randint(0, classes, (2,))
    base = ProjectedGradients(model, tt.Classification())
    g = base.features(model.state_dict(), (x, y))  # exact [2, P]
    truth = torch.stack([g[0] @ g[1], g[0] @ g[0]])
    seeds = 300
    est = []
    for seed in range(seeds):
        pg = ProjectedGradients(model, tt.Classification(), projection=Projection(12, kind, seed))
        f = pg.project(g)
        est.append(torch.stack([f[0] @ f[1], f[0] @ f[0]]))
    est = torch.stack(est)
    sem = est.std(dim=0) / math.sqrt(seeds)
    assert ((est.mean(dim=0) - truth).abs() <= 5 * sem).all(), (est.mean(dim=0), truth, sem)


def test_kronecker_variance_matches_theory_for_rank_one_gradients():
    """For a Linear layer on one position the gradient is b ãᵀ, so ⟨Rg, Rg'⟩/⟨g, g'⟩ is a
    product of two independent Gaussian estimates: its variance is at most
    2/k_out + 2/k_in + 4/(k_out k_in) relative to ‖g‖²‖g'‖². Checked over seeds (factor 1.3)."""
    torch.manual_seed(6)
    model = nn.Linear(16, 12).double()
    task = tt.Regression()
    x, y = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    g = ProjectedGradients(model, task).features(model.state_dict(), (x, y))
    norms = g.norm(dim=1)
    errors = []
    for seed in range(300):
        pg = ProjectedGradients(model, task, projection=Projection(48, seed=seed))
        f = pg.project(g)
        errors.append(float((f[0] @ f[1] - g[0] @ g[1]) / (norms[0] * norms[1])))
    k_out, k_in = (
        pg.kronecker_factors()["weight"][0].shape[0],
        pg.kronecker_factors()["weight"][1].shape[0],
    )
    assert (k_out, k_in) == (6, 8)
    bound = math.sqrt(2 / k_out + 2 / k_in + 4 / (k_out * k_in))
    assert float(torch.tensor(errors).std()) <= 1.3 * bound


def test_kronecker_factors_are_independent():
    """With b ∥ a (rank-one gradient b aᵀ of a square layer), E‖(P_out ⊗ P_in) vec(b aᵀ)‖² equals
    ‖b‖²‖a‖² only if P_out and P_in are independent; factors drawn from one random stream would
    add 2/max(k_out, k_in) = 50% here (k_out = k_in = 4). Mean over 2000 seeds within 5 standard
    errors (about 3% of the mean)."""
    torch.manual_seed(7)
    model = nn.Linear(12, 12, bias=False).double()
    x = torch.randn(1, 12, dtype=torch.float64)
    y = (model(x) - 0.5 * x).detach()  # output gradient of the squared error ∝ x: b ∥ a
    g = ProjectedGradients(model, tt.Regression()).features(model.state_dict(), (x, y))
    est = []
    seeds = 2000
    for seed in range(seeds):
        pg = ProjectedGradients(model, tt.Regression(), projection=Projection(16, seed=seed))
        est.append(float(pg.project(g).square().sum()))
    est_t = torch.tensor(est, dtype=torch.float64)
    truth = float(g.square().sum())
    assert [f.shape for f in pg.kronecker_factors()["weight"]] == [(4, 12), (4, 12)]
    assert abs(float(est_t.mean()) - truth) <= 5 * float(est_t.std()) / math.sqrt(seeds)


def test_dim_is_shared_by_water_filling():
    """A small layer gets what it needs (stored exactly); the rest goes to the big one."""
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Linear(20, 1))
    pg = ProjectedGradients(model, tt.Regression(), ["0", "3"], projection=100)
    factors = pg.kronecker_factors()
    small_out, small_in = factors["3.weight"]
    assert small_out.shape == (1, 1) and small_in.shape == (21, 21)  # 21 numbers: exact
    big_out, big_in = factors["0.weight"]
    assert big_out.shape[0] * big_in.shape[0] >= 100 - 21 - 10  # ≈ the remaining 79
    assert pg.width >= 0.9 * 100


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "sjlt"])
def test_johnson_lindenstrauss_for_one_seed(kind):
    """One seed, k = 2048: every pairwise inner product (and squared norm) of 8 gradients is
    within ε‖g‖‖g'‖, ε = 6·√(2/k) ≈ 0.19 (six standard deviations of the estimator for unit
    vectors, whose variance is at most 2/k for these kinds; union bound over 36 pairs)."""
    model = wide_mlp()
    x, y = torch.randn(8, 20, dtype=torch.float64), torch.randint(0, 10, (8,))
    k = 2048
    pg = ProjectedGradients(model, tt.Classification(), projection=Projection(k, kind, seed=11))
    state = model.state_dict()
    f = pg.features(state, (x, y))
    g = exact_gradients(pg, state, (x, y))
    norms = g.norm(dim=1)
    rel = (f @ f.T - g @ g.T) / torch.outer(norms, norms)
    eps = 6 * math.sqrt(2 / k)
    assert float(rel.abs().max()) <= eps
    assert float(rel.abs().max()) > 1e-6  # it is a projection, not the identity


# ----------------------------------------------------------------------------------------------
# query side, errors, configuration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [40, Projection(20, "sjlt"), None])
def test_measurement_side(projection):
    model, _, batch, _, _ = case("linear")
    state = model.state_dict()
    loss = ProjectedGradients(model, tt.Classification("loss"), projection=projection)
    torch.testing.assert_close(
        loss.features(state, batch, "measurement"), loss.features(state, batch, "loss")
    )
    margin = ProjectedGradients(model, tt.Classification("margin"), projection=projection)
    got = margin.features(state, batch, "measurement")
    expected = margin.project(exact_gradients(margin, state, batch, "measurement"))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, loss.features(state, batch, "loss"))


@pytest.mark.parametrize("projection", [40, Projection(20, "gaussian")])
def test_non_finite_gradients_name_the_examples(projection):
    model, task, (x, y), _, _ = case("linear")
    x = x.clone()
    x[3, 1] = float("nan")
    pg = ProjectedGradients(model, task, projection=projection)
    with pytest.raises(tt.NonFiniteGradientError, match=r"examples \[13\]") as err:
        pg.features(model.state_dict(), (x, y), offset=10, where="checkpoint 2")
    assert "fc1.weight" in str(err.value) and "checkpoint 2" in str(err.value)


def test_projection_config_is_validated_and_described():
    assert Projection.coerce(64) == Projection(dim=64, kind="kronecker")
    assert Projection.coerce(None) is None
    description = Projection(32, "sjlt", seed=7).describe()
    assert description["nonzeros"] == 4 and description["seed"] == 7
    json.dumps(description)
    for bad in (
        dict(dim=0),
        dict(dim=8, kind="fourier"),
        dict(dim=8, kind="gaussian", nonzeros=2),
        dict(dim=8, kind="sjlt", nonzeros=9),
        dict(dim=8, seed=1.5),
    ):
        with pytest.raises(tt.ConfigurationError):
            Projection(**bad)
    with pytest.raises(tt.ConfigurationError, match="projection must be"):
        Projection.coerce("4096")
    model = NormNet()
    with pytest.raises(tt.ConfigurationError, match="smaller than the number of parameter groups"):
        ProjectedGradients(model, tt.Classification(), projection=2)
    pg = ProjectedGradients(model, tt.Classification(), projection=30)
    json.dumps(pg.describe())
    with pytest.raises(tt.ConfigurationError, match="kind must be"):
        pg.features(model.state_dict(), (torch.randn(2, 6), torch.tensor([0, 1])), "query")


def test_no_projection_is_the_exact_gradient():
    model, task, batch, _, _ = case("linear")
    pg = ProjectedGradients(model, task)
    state = model.state_dict()
    assert pg.width == pg.layout.numel
    assert set(pg.coverage.values()) == {"exact"}
    torch.testing.assert_close(pg.features(state, batch), exact_gradients(pg, state, batch))
