"""K-FAC / EK-FAC against brute force on tiny float64 models.

Where the expected values come from:

* exact per-example gradients ``G`` ([N, P]) from ``GradientComputer`` (``vmap(grad)``), giving
  the exact empirical Fisher ``(1/N) GᵀG`` restricted to each layer's block;
* factors ``A`` and ``S`` recomputed by hand: activations formed explicitly (patches by Python
  loops for the convolution) and output gradients from autograd on the pre-activations;
* the Gauss–Newton matrix ``Jᵀ (diag p − p pᵀ) J`` from an explicit Jacobian (true Fisher);
* dense inverses built here from the blocks' ``Q_S ⊗ Q_A`` and ``Λ`` with the documented
  row-major ``[d_out, d_in]`` convention (not through ``KroneckerInverse``'s own code).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from traintrace.curvature.kfac import EKFAC, KFAC, KroneckerBlock, KroneckerInverse
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.gradients import GradientComputer
from traintrace.task import Classification, LanguageModeling, Regression

DT = torch.float64
N = 7


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class SeqNet(nn.Module):
    """A Linear layer shared over 4 positions ([B, T, d] input)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x)).mean(1))


class ConvNet(nn.Module):
    def __init__(self, **conv_kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, **conv_kw)
        # 5x5 inputs give 3x3 outputs both without padding and with padding 1, stride 2
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(3 * 3, 3)  # length 5 -> 3 positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class EmbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.fc = nn.Linear(3, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(tokens)).mean(1))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(input_ids)))


def _split(full, size: int = 3) -> list:
    """Batches of ``size`` from a tuple or dict batch."""
    n = len(full["input_ids"]) if isinstance(full, dict) else len(full[0])
    out = []
    for s in range(0, n, size):
        if isinstance(full, dict):
            out.append({k: v[s : s + size] for k, v in full.items()})
        else:
            out.append(tuple(t[s : s + size] for t in full))
    return out


def make(kind: str):
    """``(model, task, full batch)`` for one of the tiny models, float64, seeded."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    y = torch.randint(0, 3, (N,), generator=g)
    if kind == "mlp":
        return MLP().to(DT), Classification(), (torch.randn(N, 3, generator=g, dtype=DT), y)
    if kind == "sequence":
        return SeqNet().to(DT), Classification(), (torch.randn(N, 4, 3, generator=g, dtype=DT), y)
    if kind == "conv":
        x = torch.randn(N, 1, 5, 5, generator=g, dtype=DT)
        return ConvNet().to(DT), Classification(), (x, y)
    if kind == "conv1d":
        return (
            Conv1dNet().to(DT),
            Classification(),
            (torch.randn(N, 2, 5, generator=g, dtype=DT), y),
        )
    if kind == "conv_strided":
        model = ConvNet(padding=1, stride=2, padding_mode="reflect").to(DT)
        return model, Classification(), (torch.randn(N, 1, 5, 5, generator=g, dtype=DT), y)
    if kind == "embedding":
        tokens = torch.randint(0, 6, (N, 4), generator=g)
        tokens[0] = torch.tensor([2, 2, 0, 5])  # a repeated token and a padding position
        return EmbNet().to(DT), Classification(), (tokens, y)
    if kind == "lm":
        ids = torch.randint(0, 8, (N, 5), generator=g)
        mask = torch.ones(N, 5, dtype=torch.long)
        mask[1, 3:] = 0
        return TinyLM().to(DT), LanguageModeling(), {"input_ids": ids, "attention_mask": mask}
    if kind == "regression_seq":
        model = nn.Linear(3, 2).to(DT)  # root module: parameter names "weight", "bias"
        x = torch.randn(N, 4, 3, generator=g, dtype=DT)
        return model, Regression(), (x, torch.randn(N, 4, 2, generator=g, dtype=DT))
    raise ValueError(kind)


KINDS = [
    "mlp",
    "sequence",
    "conv",
    "conv_strided",
    "conv1d",
    "embedding",
    "lm",
    "regression_seq",
]


# ----------------------------------------------------------------------------------------------
# brute-force helpers
# ----------------------------------------------------------------------------------------------
def block_coords(inv: KroneckerInverse, block: KroneckerBlock) -> torch.Tensor:
    """Flat index of every entry of the layer matrix, in row-major ``[d_out, d_in]`` order."""
    sl = inv.layout.slices()
    shape = dict(zip(inv.layout.names, inv.layout.shapes, strict=True))

    def rng(name):
        return torch.arange(sl[name].start, sl[name].stop)

    cols = []
    if block.weight is not None and block.transposed:  # Embedding [V, d], Conv1D [d_in, d_out]
        first, second = shape[block.weight]
        cols.append(rng(block.weight).reshape(first, second).T)
    elif block.weight is not None:
        cols.append(rng(block.weight).reshape(shape[block.weight][0], -1))
    if block.bias is not None:
        cols.append(rng(block.bias).reshape(-1, 1))
    return torch.cat(cols, dim=1).flatten()


def kron_basis(block: KroneckerBlock) -> torch.Tensor:
    q_a = block.Q_A if block.Q_A is not None else torch.eye(block.A.shape[0], dtype=DT)
    return torch.kron(block.Q_S.contiguous(), q_a.contiguous())


def dense_from_blocks(inv: KroneckerInverse) -> torch.Tensor:
    """``F̂`` built from ``Q_S ⊗ Q_A`` and ``Λ`` (and the diagonal blocks), ``[P, P]``."""
    p = inv.layout.numel
    out = torch.zeros(p, p, dtype=DT)
    for block in inv.blocks:
        c = block_coords(inv, block)
        q = kron_basis(block)
        out[c[:, None], c[None, :]] = q @ torch.diag(block.eigenvalues.flatten()) @ q.T
    sl = inv.layout.slices()
    for name, diag in inv.diagonal.items():
        idx = torch.arange(sl[name].start, sl[name].stop)
        out[idx, idx] = diag.flatten()
    return out


def exact_grads(model, task, full) -> torch.Tensor:
    return GradientComputer(model, task).per_example(model.state_dict(), full)


# ----------------------------------------------------------------------------------------------
# exactness and the defining property of EK-FAC
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_kronecker_is_exact_for_one_example_of_one_linear_layer(cls):
    # g = b ãᵀ, so g gᵀ = (b bᵀ) ⊗ (ã ãᵀ) in row-major order: both methods must be exact.
    _, _, (x, y) = make("mlp")
    layer = nn.Linear(3, 4).to(DT)
    batch = (x[:1], y[:1])
    inv = cls(sampled_labels=False).prepare(layer, Classification(), None, [batch])
    (block,) = inv.blocks
    g = exact_grads(layer, Classification(), batch)[0]
    explicit = torch.outer(g, g)
    c = block_coords(inv, block)
    torch.testing.assert_close(
        explicit[c[:, None], c[None, :]], torch.kron(block.S, block.A), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(dense_from_blocks(inv), explicit, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(inv.dense(), explicit, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("formed", [False, True], ids=["terms", "formed"])
@pytest.mark.parametrize("kind", KINDS)
def test_ekfac_eigenvalues_are_the_exact_fisher_diagonal_in_the_kronecker_basis(
    kind, formed, monkeypatch
):
    # formed: the refit receives every ungrouped convolution's per-example gradients formed by
    # the hooks (by default only from 8 input channels on), not its patches
    monkeypatch.setattr("traintrace.features.projections.FORM_MIN_CHANNELS", 1 if formed else 10**9)
    model, task, full = make(kind)
    inv = EKFAC(sampled_labels=False).prepare(model, task, None, _split(full))
    assert all(v.startswith("kronecker:") for v in inv.coverage.values())
    assert set(inv.coverage) == set(inv.layout.names)
    g = exact_grads(model, task, full)
    for block in inv.blocks:
        c = block_coords(inv, block)
        f_block = g[:, c].T @ g[:, c] / N  # exact empirical Fisher block, row-major layout
        q = kron_basis(block)
        torch.testing.assert_close(
            torch.diagonal(q.T @ f_block @ q), block.eigenvalues.flatten(), rtol=1e-8, atol=1e-10
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_solve_equals_the_dense_inverse(kind, cls):
    model, task, full = make(kind)
    lam = 0.05
    inv = cls(damping=lam, sampled_labels=False).prepare(model, task, None, _split(full))
    dense = dense_from_blocks(inv) + lam * torch.eye(inv.layout.numel, dtype=DT)
    v = torch.randn(2, inv.layout.numel, dtype=DT, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.solve(dense, v.T).T
    torch.testing.assert_close(inv.solve(v), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(inv.solve(v[0]), expected[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(inv.matvec(v, damping=lam), v @ dense.T, rtol=1e-8, atol=1e-10)
    # the solve is its own inverse's inverse
    torch.testing.assert_close(inv.matvec(inv.solve(v), damping=lam), v, rtol=1e-8, atol=1e-10)


def test_kfac_eigenvalues_are_products_of_factor_eigenvalues():
    model, task, full = make("conv")
    inv = KFAC(sampled_labels=False).prepare(model, task, None, _split(full))
    for block in inv.blocks:
        lam_a = torch.linalg.eigvalsh(block.A).clamp_min(0)
        lam_s = torch.linalg.eigvalsh(block.S).clamp_min(0)
        torch.testing.assert_close(
            block.eigenvalues, torch.outer(lam_s, lam_a), rtol=1e-8, atol=1e-12
        )
        # Q_S ⊗ Q_A diagonalizes S ⊗ A
        q = kron_basis(block)
        torch.testing.assert_close(
            q @ torch.diag(block.eigenvalues.flatten()) @ q.T,
            torch.kron(block.S, block.A),
            rtol=1e-8,
            atol=1e-12,
        )


# ----------------------------------------------------------------------------------------------
# factor statistics by hand
# ----------------------------------------------------------------------------------------------
def _with_one(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def test_factors_of_an_mlp_match_hand_computation():
    model, task, (x, y) = make("mlp")
    inv = KFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)))
    w1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    w2, b2 = model.fc2.weight.detach(), model.fc2.bias.detach()
    z1 = (x @ w1.T + b1).requires_grad_()
    h = torch.tanh(z1)
    z2 = h @ w2.T + b2
    z2.retain_grad()
    F.cross_entropy(z2, y, reduction="sum").backward()
    a1, a2 = _with_one(x), _with_one(h.detach())
    blocks = {b.module: b for b in inv.blocks}
    torch.testing.assert_close(blocks["fc1"].A, a1.T @ a1 / N, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocks["fc2"].A, a2.T @ a2 / N, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocks["fc1"].S, z1.grad.T @ z1.grad / N, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocks["fc2"].S, z2.grad.T @ z2.grad / N, rtol=1e-12, atol=1e-14)


def test_factors_of_a_sequence_linear_layer_sum_a_and_average_s_over_positions():
    model, task, (x, y) = make("sequence")
    inv = KFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)))
    z = (x @ model.fc.weight.detach().T + model.fc.bias.detach()).requires_grad_()
    out = model.head(torch.tanh(z).mean(1))
    F.cross_entropy(out, y, reduction="sum").backward()
    a = _with_one(x).reshape(-1, 4)
    b = z.grad.reshape(-1, 5)
    fc = next(b for b in inv.blocks if b.module == "fc")
    torch.testing.assert_close(fc.A, a.T @ a / N, rtol=1e-12, atol=1e-14)  # Σ_t, / N
    torch.testing.assert_close(fc.S, b.T @ b / (N * 4), rtol=1e-12, atol=1e-14)  # / (N·T)


def test_factors_of_a_convolution_match_patches_built_by_hand():
    model, task, (x, y) = make("conv")
    inv = KFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)))
    patches = torch.stack(
        [x[:, 0, i : i + 3, j : j + 3].reshape(N, 9) for i in range(3) for j in range(3)], dim=1
    )  # [N, 9 locations, C·kh·kw = 9], locations row-major like the conv output
    a = _with_one(patches).reshape(-1, 10)
    z = F.conv2d(x, model.conv.weight.detach(), model.conv.bias.detach()).requires_grad_()
    F.cross_entropy(model.fc(torch.tanh(z).flatten(1)), y, reduction="sum").backward()
    b = z.grad.permute(0, 2, 3, 1).reshape(-1, 2)
    conv = next(b for b in inv.blocks if b.module == "conv")
    torch.testing.assert_close(conv.A, a.T @ a / N, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv.S, b.T @ b / (N * 9), rtol=1e-12, atol=1e-14)


def test_embedding_factor_a_is_diagonal_token_counts_without_padding():
    model, task, (tokens, y) = make("embedding")
    inv = EKFAC(sampled_labels=False).prepare(model, task, None, _split((tokens, y)))
    e = model.emb.weight.detach()[tokens].requires_grad_()
    out = model.fc(torch.tanh(e).mean(1))
    F.cross_entropy(out, y, reduction="sum").backward()
    mask = tokens != 0
    emb = next(b for b in inv.blocks if b.module == "emb")
    assert emb.A.shape == (6,) and emb.Q_A is None  # stored as a vector, never [V, V]
    torch.testing.assert_close(
        emb.A, torch.bincount(tokens[mask], minlength=6).to(DT) / N, rtol=0, atol=1e-15
    )
    b = e.grad[mask]
    torch.testing.assert_close(emb.S, b.T @ b / mask.sum(), rtol=1e-12, atol=1e-14)
    assert torch.all(emb.eigenvalues[:, 0] == 0)  # the padding row gets no gradient


def test_factors_do_not_depend_on_how_the_data_is_batched():
    model, task, full = make("embedding")
    one = EKFAC(sampled_labels=False).prepare(model, task, None, [full])
    three = EKFAC(sampled_labels=False).prepare(model, task, None, _split(full, 3))
    for b1, b3 in zip(one.blocks, three.blocks, strict=True):
        torch.testing.assert_close(b1.A, b3.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b1.S, b3.S, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b1.eigenvalues, b3.eigenvalues, rtol=1e-9, atol=1e-12)
    v = torch.randn(3, one.layout.numel, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(one.solve(v), three.solve(v), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# errors and fallbacks
# ----------------------------------------------------------------------------------------------
def test_non_finite_input_raises_naming_the_layer_and_example():
    model, task, (x, y) = make("mlp")
    x = x.clone()
    x[4, 1] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"'fc1'.*examples \[4\]"):
        EKFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)))


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def test_unsupported_parameters_get_an_exact_diagonal_block_or_raise():
    _, task, (x, y) = make("mlp")
    model = NormNet().to(DT)
    with torch.no_grad():
        model.ln.weight.add_(0.3 * torch.randn(4, dtype=DT))
    with pytest.raises(ConfigurationError, match=r"ln\.weight.*layers="):
        KFAC(sampled_labels=False, unsupported="raise").prepare(model, task, None, [(x, y)])
    lam = 0.01
    inv = EKFAC(damping=lam, sampled_labels=False).prepare(model, task, None, _split((x, y)))
    assert inv.coverage["ln.weight"].startswith("diagonal:LayerNorm is not Linear")
    assert inv.coverage["ln.bias"].startswith("diagonal:")
    assert inv.coverage["fc1.weight"] == "kronecker:Linear"
    assert set(inv.coverage) == set(inv.layout.names)
    g = exact_grads(model, task, (x, y))
    sl = inv.layout.slices()
    for name in ("ln.weight", "ln.bias"):
        torch.testing.assert_close(
            inv.diagonal[name], (g[:, sl[name]] ** 2).mean(0), rtol=1e-10, atol=1e-14
        )
    v = torch.randn(inv.layout.numel, dtype=DT)
    out = inv.solve(v)
    s = sl["ln.weight"]
    torch.testing.assert_close(out[s], v[s] / (inv.diagonal["ln.weight"] + lam))
    # the Kronecker blocks are unaffected by the fallback
    dense = dense_from_blocks(inv) + lam * torch.eye(inv.layout.numel, dtype=DT)
    torch.testing.assert_close(out, torch.linalg.solve(dense, v), rtol=1e-8, atol=1e-10)


def test_a_grouped_convolution_gets_an_exact_diagonal_block():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)
    ).to(DT)
    task = Classification()
    x, y = torch.randn(N, 2, 5, 5, dtype=DT), torch.randint(0, 3, (N,))
    inv = EKFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)))
    assert inv.coverage["0.weight"].startswith("diagonal:a convolution with groups=2")
    assert inv.coverage["3.weight"] == "kronecker:Linear"
    g = exact_grads(model, task, (x, y))
    sl = inv.layout.slices()
    for name in ("0.weight", "0.bias"):
        torch.testing.assert_close(
            inv.diagonal[name].reshape(-1), (g[:, sl[name]] ** 2).mean(0), rtol=1e-10, atol=1e-14
        )


class FunctionalUse(nn.Module):
    """``fc`` is only used through ``F.linear``: its forward hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)


class DoubleUse(nn.Module):
    """``fc`` is called as a module *and* its weight is reused functionally."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.fc(x)), self.fc.weight)


def test_layers_used_outside_their_forward_are_not_silently_wrong():
    _, task, (x, y) = make("mlp")
    inv = KFAC(sampled_labels=False).prepare(FunctionalUse().to(DT), task, None, [(x, y)])
    assert inv.coverage["fc.weight"].startswith("diagonal:") and not inv.blocks
    g = exact_grads(FunctionalUse().to(DT), task, (x, y))
    assert g.shape[1] == inv.layout.numel
    # a weight also used outside its forward fails the shared hooks' check (Σ_i G_i against the
    # batch gradient) and takes the exact diagonal path, reported in coverage (it used to raise)
    model = DoubleUse().to(DT)
    inv = KFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)))
    assert not inv.blocks
    assert (
        inv.coverage["fc.weight"].startswith("diagonal:")
        and "autograd" in (inv.coverage["fc.weight"])
    )
    g = exact_grads(model, task, (x, y))
    torch.testing.assert_close(inv.dense().diagonal(), (g**2).mean(0), rtol=1e-10, atol=1e-14)
    with pytest.raises(ConfigurationError, match=r"fc\.weight.*layers="):
        KFAC(sampled_labels=False, unsupported="raise").prepare(model, task, None, [(x, y)])


def test_tied_embedding_and_linear_form_one_kronecker_block_in_canonical_orientation():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 5)
            self.head = nn.Linear(5, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(t)).mean(1))

    model = Tied().to(DT)
    tokens = torch.randint(0, 5, (N, 3), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 5, (N,), generator=torch.Generator().manual_seed(1))
    batches = _split((tokens, y))
    inv = EKFAC(sampled_labels=False).prepare(model, Classification(), None, batches)
    # one block on the canonical [d, V] matrix (Embedding first): it used to be diagonal
    assert inv.coverage == {"emb.weight": "kronecker:Embedding+Linear"}
    check_against_brute_force(model, Classification(), batches, inv)


def test_configuration_is_validated():
    with pytest.raises(ConfigurationError, match="damping"):
        KFAC(damping=-1.0)
    with pytest.raises(ConfigurationError, match="num_samples"):
        EKFAC(sampled_labels=False, num_samples=2)
    with pytest.raises(ConfigurationError, match="unsupported"):
        KFAC(unsupported="ignore")  # type: ignore[arg-type]
    model, task, full = make("mlp")
    with pytest.raises(ConfigurationError, match="twice"):
        EKFAC().prepare(model, task, None, iter(_split(full)))
    inv = KFAC(sampled_labels=False).prepare(model, task, None, [(full[0][:1], full[1][:1])])
    with pytest.raises(ConfigurationError, match="P=31"):
        inv.solve(torch.zeros(30, dtype=DT))
    with pytest.raises(ConfigurationError, match="damping > 0"):
        inv.solve(torch.zeros(31, dtype=DT), damping=0.0)  # rank-one factors: zero curvature


def test_mean_eigenvalue_damping_is_per_block():
    model, task, full = make("mlp")
    inv = EKFAC(damping=0.1, damping_scale="mean_eigenvalue", sampled_labels=False).prepare(
        model, task, None, _split(full)
    )
    dense = dense_from_blocks(inv)
    for block in inv.blocks:
        c = block_coords(inv, block)
        dense[c, c] += 0.1 * block.eigenvalues.mean()
    v = torch.randn(inv.layout.numel, dtype=DT)
    torch.testing.assert_close(inv.solve(v), torch.linalg.solve(dense, v), rtol=1e-8, atol=1e-10)


def test_model_is_left_unchanged_and_state_is_used():
    model, task, full = make("conv")
    before = copy.deepcopy(model.state_dict())
    state = {k: v + 0.1 for k, v in model.state_dict().items()}
    model.train()
    inv = EKFAC(sampled_labels=False).prepare(model, task, state, _split(full))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    loaded = copy.deepcopy(model)
    loaded.load_state_dict(state)
    ref = EKFAC(sampled_labels=False).prepare(loaded, task, None, _split(full))
    v = torch.randn(inv.layout.numel, dtype=DT)
    torch.testing.assert_close(inv.solve(v), ref.solve(v), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# true Fisher (sampled labels)
# ----------------------------------------------------------------------------------------------
def test_sampled_labels_are_deterministic_given_the_seed_and_psd():
    model, task, full = make("conv")
    a = EKFAC(seed=3, num_samples=2).prepare(model, task, None, _split(full))
    b = EKFAC(seed=3, num_samples=2).prepare(model, task, None, _split(full))
    c = EKFAC(seed=4, num_samples=2).prepare(model, task, None, _split(full))
    da, db, dc = a.dense(), b.dense(), c.dense()
    assert torch.equal(da, db)
    assert not torch.allclose(da, dc)
    assert torch.linalg.eigvalsh(da).min() > -1e-12


def test_true_fisher_of_one_repeated_input_approaches_the_gauss_newton_matrix():
    # For a single linear softmax layer and one input, the true Fisher is exactly Kronecker:
    # ã ãᵀ ⊗ (diag p − p pᵀ) (= GGN). K-FAC with 2000 × 2 sampled labels must approach it.
    layer = nn.Linear(3, 3).to(DT)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, dtype=DT, generator=g)
    x = x0.expand(2000, 3).clone()
    y = torch.zeros(2000, dtype=torch.long)  # ignored by sample_loss
    inv = KFAC(num_samples=2, seed=0).prepare(layer, Classification(), None, [(x, y)])

    params = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])

    def logits(theta):
        return theta[:9].reshape(3, 3) @ x0 + theta[9:]

    jac = torch.autograd.functional.jacobian(logits, params)  # [3, 12]
    p = torch.softmax(logits(params), 0).detach()
    ggn = jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    scale = ggn.abs().max()
    err = (inv.dense() - ggn).abs().max() / scale
    assert err < 0.06, err  # Monte Carlo error ~ 1/sqrt(4000) ≈ 0.016
    # the empirical Fisher with the fixed label 0 is far from it (the check can fail)
    emp = KFAC(sampled_labels=False).prepare(layer, Classification(), None, [(x, y)])
    assert (emp.dense() - ggn).abs().max() / scale > 0.3


def test_partial_selection_weight_only_and_bias_only_blocks():
    model, task, full = make("mlp")
    layers = ["fc1.weight", "fc2.bias"]
    inv = EKFAC(damping=0.02, sampled_labels=False).prepare(model, task, None, _split(full), layers)
    assert inv.layout.names == ("fc1.weight", "fc2.bias")
    fc1, fc2 = inv.blocks
    assert fc1.bias is None and fc1.A.shape == (3, 3)
    assert fc2.weight is None and fc2.A.shape == (1, 1)  # bias only: ã = [1]
    g = GradientComputer(model, task, layers).per_example(model.state_dict(), full)
    for block in inv.blocks:
        c = block_coords(inv, block)
        q = kron_basis(block)
        f_block = g[:, c].T @ g[:, c] / N
        torch.testing.assert_close(
            torch.diagonal(q.T @ f_block @ q), block.eigenvalues.flatten(), rtol=1e-8, atol=1e-10
        )
    dense = dense_from_blocks(inv) + 0.02 * torch.eye(inv.layout.numel, dtype=DT)
    v = torch.randn(inv.layout.numel, dtype=DT)
    torch.testing.assert_close(inv.solve(v), torch.linalg.solve(dense, v), rtol=1e-8, atol=1e-10)


def test_float32_models_give_float32_solves_close_to_float64():
    model, task, (x, y) = make("conv")
    inv64 = EKFAC(sampled_labels=False).prepare(model, task, None, _split((x, y)), "fc")
    model32 = copy.deepcopy(model).float()
    batches = _split((x.float(), y))
    inv32 = EKFAC(sampled_labels=False).prepare(model32, task, None, batches, "fc")
    v = torch.randn(inv64.layout.numel, dtype=DT)
    out = inv32.solve(v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), inv64.solve(v), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# any model: brute force from explicit per-example layer inputs / output gradients
# ----------------------------------------------------------------------------------------------
def _examples(batches):
    for batch in batches:
        n = len(next(iter(batch.values()))) if isinstance(batch, dict) else len(batch[0])
        for i in range(n):
            if isinstance(batch, dict):
                yield {k: v[i : i + 1] for k, v in batch.items()}
            else:
                yield tuple(t[i : i + 1] for t in batch)


def _users(model, param):
    return [
        (name, mod)
        for name, mod in model.named_modules(remove_duplicate=False)
        if any(p is param for p in mod._parameters.values())
    ]


def _is_hf_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D"


def brute_force(model, task, batches, inv):
    """Per block ``(A, S, Λ_EKFAC in the block's basis)`` and per diagonal name ``mean g²``.

    Example by example (batch of one, so nothing is broadcast), with plain forward hooks that keep
    every call's input and output (``retain_grad``) and ``.grad`` of the parameters.
    """
    model.eval()
    params = dict(model.named_parameters())
    calls = []
    handles = []
    for _, mod in model.named_modules():
        if not isinstance(mod, nn.Linear | nn.Embedding | nn.Conv2d) and not _is_hf_conv1d(mod):
            continue

        def hook(m, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if out.requires_grad:
                out.retain_grad()
            calls.append((m, x, out))

        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    stats = {b.module: [0.0, 0.0, 0, []] for b in inv.blocks}
    sq = {n: 0.0 for n in inv.diagonal}
    count = 0
    try:
        for ex in _examples(batches):
            calls.clear()
            model.zero_grad()
            task.loss(task.forward(model, ex), ex).sum().backward()
            count += 1
            for n in sq:
                sq[n] = sq[n] + params[n].grad ** 2
            for b in inv.blocks:
                weight = params[b.weight]
                users = _users(model, weight)
                owner_transposed = isinstance(users[0][1], nn.Embedding) or _is_hf_conv1d(
                    users[0][1]
                )
                a = s = 0.0
                m = 0
                for _, mod in users:
                    for cm, x, out in calls:
                        if cm is not mod or out.grad is None:
                            continue
                        grad = out.grad.reshape(-1, out.shape[-1])
                        if isinstance(mod, nn.Embedding):
                            tok = x.reshape(-1)
                            keep = tok != (-1 if mod.padding_idx is None else mod.padding_idx)
                            inp = F.one_hot(tok[keep], mod.num_embeddings).to(DT)
                            grad = grad[keep]
                        else:
                            inp = x.reshape(-1, x.shape[-1])
                            if b.bias is not None and cm is users[0][1]:
                                inp = _with_one(inp)
                        mod_transposed = isinstance(mod, nn.Embedding) or _is_hf_conv1d(mod)
                        rows, cols = (
                            (grad, inp) if mod_transposed == owner_transposed else (inp, grad)
                        )
                        a = a + cols.T @ cols
                        s = s + rows.T @ rows
                        m += rows.shape[0]
                st = stats[b.module]
                st[0], st[1], st[2] = st[0] + a, st[1] + s, st[2] + m
                g = weight.grad.T if b.transposed else weight.grad.reshape(weight.shape[0], -1)
                if b.bias is not None:
                    g = torch.cat([g, params[b.bias].grad.reshape(-1, 1)], dim=1)
                q_a = b.Q_A if b.Q_A is not None else torch.eye(g.shape[1], dtype=DT)
                st[3].append((b.Q_S.T @ g @ q_a) ** 2)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad()
    out = {}
    for b in inv.blocks:
        a, s, m, lam = stats[b.module]
        out[b.module] = (a / count, s / m, torch.stack(lam).mean(0))
    return out, {n: v / count for n, v in sq.items()}


def check_against_brute_force(model, task, batches, inv, *, ekfac=True):
    blocks, diag = brute_force(model, task, batches, inv)
    for b in inv.blocks:
        a, s, lam = blocks[b.module]
        torch.testing.assert_close(
            b.A if b.A.ndim == 2 else torch.diag(b.A), a, rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(b.S, s, rtol=1e-9, atol=1e-12)
        if ekfac:
            torch.testing.assert_close(b.eigenvalues, lam, rtol=1e-8, atol=1e-12)
    for n, d in diag.items():
        torch.testing.assert_close(inv.diagonal[n], d, rtol=1e-9, atol=1e-14)


transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=20,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg).to(DT)


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=0,
    )  # stock settings: SDPA attention, position_ids / token_type_ids buffers
    return transformers.BertForSequenceClassification(cfg).to(DT)


def token_batches(labels: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 20, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 3:] = 0
    ids[1, 3:] = 0  # padding tokens (BERT's padding_idx)
    full = {"input_ids": ids, "attention_mask": mask}
    if labels:
        full["labels"] = torch.randint(0, 3, (5,), generator=g)
    return _split(full, 3)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_tiny_gpt2_conv1d_and_tied_lm_head_equal_brute_force(cls):
    model, task = tiny_gpt2(), LanguageModeling()
    batches = token_batches(labels=False)
    inv = cls(sampled_labels=False).prepare(model, task, None, batches)
    cov = inv.coverage
    assert cov["transformer.h.0.attn.c_attn.weight"] == "kronecker:Conv1D"  # was diagonal
    assert cov["transformer.h.0.attn.c_attn.bias"] == "kronecker:Conv1D"
    assert cov["transformer.wte.weight"] == "kronecker:Embedding+Linear"  # tied with lm_head
    assert cov["transformer.wpe.weight"] == "kronecker:Embedding"  # [1, T] position ids
    assert cov["transformer.h.0.ln_1.weight"].startswith("diagonal:LayerNorm")
    check_against_brute_force(model, task, batches, inv, ekfac=cls is EKFAC)
    lam = 0.05  # Conv1D with bias and the tied block map to and from the flat layout
    dense = dense_from_blocks(inv) + lam * torch.eye(inv.layout.numel, dtype=DT)
    v = torch.randn(3, inv.layout.numel, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(inv.solve(v, lam), torch.linalg.solve(dense, v.T).T)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_stock_tiny_bert_with_padding_equals_brute_force(cls):
    model, task = tiny_bert(), Classification()
    batches = token_batches(labels=True)
    inv = cls(sampled_labels=False).prepare(model, task, None, batches)
    cov = inv.coverage
    assert cov["bert.embeddings.position_embeddings.weight"] == "kronecker:Embedding"
    assert cov["bert.embeddings.word_embeddings.weight"] == "kronecker:Embedding"
    assert all(v.startswith("kronecker:") for k, v in cov.items() if "LayerNorm" not in k)
    check_against_brute_force(model, task, batches, inv, ekfac=cls is EKFAC)
    lam = 0.05
    dense = dense_from_blocks(inv) + lam * torch.eye(inv.layout.numel, dtype=DT)
    v = torch.randn(3, inv.layout.numel, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(inv.solve(v, lam), torch.linalg.solve(dense, v.T).T)


def test_true_fisher_capture_uses_the_same_sampled_labels_everywhere():
    # sampled_labels=True through the shared capture: deterministic, brute force with the
    # labels the sampler draws (Classification draws one multinomial row per example in order)
    model, task = tiny_bert(), Classification()
    batches = token_batches(labels=True)
    inv = EKFAC(seed=7).prepare(model, task, None, batches)
    again = EKFAC(seed=7).prepare(model, task, None, batches)
    torch.testing.assert_close(
        inv.blocks[0].eigenvalues, again.blocks[0].eigenvalues, rtol=0, atol=0
    )
    gen = torch.Generator().manual_seed(7)
    relabeled = []
    model.eval()
    for batch in batches:
        with torch.no_grad():
            logits = task.forward(model, batch)
            probs = torch.softmax(logits.float(), -1)
            y = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        relabeled.append({**batch, "labels": y})
    check_against_brute_force(model, task, relabeled, inv)


def test_influence_function_with_ekfac_runs_on_a_stock_bert():
    import traintrace as tt

    model = tiny_bert()
    batches = token_batches(labels=True)
    rows = [ex for ex in _examples(batches)]
    data = [{k: v[0] for k, v in ex.items()} for ex in rows]
    est = tt.InfluenceFunction(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        hessian=tt.EKFAC(sampled_labels=False),
        damping=0.1,
        batch_size=3,
        progress=False,
    ).fit(data)
    scores = est.score(data[:2])
    assert scores.shape == (2, 5) and bool(torch.isfinite(scores).all())
    # the query gradients preconditioned by the fitted EK-FAC blocks: brute force
    inv = tt.EKFAC(sampled_labels=False, damping=0.1).prepare(
        model, tt.Classification(), None, batches
    )
    with warnings.catch_warnings():  # SDPA attention: vmap falls back to a loop (exact)
        warnings.simplefilter("ignore", RuntimeWarning)
        g = GradientComputer(model, tt.Classification()).per_example(
            model.state_dict(), {k: torch.stack([d[k] for d in data]) for k in data[0]}
        )
    expected = inv.solve(g[:2]) @ g.T / len(data)  # (1/n) ∇f(z')ᵀ (F̂ + λI)⁻¹ ∇l(z)
    torch.testing.assert_close(scores, expected, rtol=1e-7, atol=1e-10)
    self_inf = est.self_influence()
    assert self_inf.shape == (5,) and bool(torch.isfinite(self_inf).all())


class ScaleNet(nn.Module):
    """A Linear layer followed by a raw parameter (diagonal block from exact gradients)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def test_true_fisher_diagonal_blocks_use_the_same_sampled_labels():
    model, task = ScaleNet().to(DT), Classification()
    _, _, full = make("mlp")
    batches = _split(full)
    inv = EKFAC(seed=2).prepare(model, task, None, batches)
    assert inv.coverage["scale"].startswith("diagonal:'scale' is a raw parameter")
    gen = torch.Generator().manual_seed(2)
    relabeled = []
    for x, _ in batches:
        with torch.no_grad():
            probs = torch.softmax(model(x).float(), -1)
        relabeled.append((x, torch.multinomial(probs, 1, generator=gen).squeeze(-1)))
    check_against_brute_force(model, task, relabeled, inv)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "embedding", "conv", "sequence", "functional"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_quadratic_and_directions_from_a_capture_equal_solve_on_formed_gradients(kind, cls):
    from traintrace.features.engine import ExactGradients

    if kind == "gpt2":
        model, task, batches = tiny_gpt2(), LanguageModeling(), token_batches(labels=False)
    elif kind == "bert":
        model, task, batches = tiny_bert(), Classification(), token_batches(labels=True)
    elif kind == "functional":
        model, task, full = DoubleUse().to(DT), Classification(), make("mlp")[2]
        batches = _split(full)
    else:
        model, task, full = make(kind)
        batches = _split(full)
    inv = cls(damping=0.03, sampled_labels=False).prepare(model, task, None, batches)
    engine = ExactGradients(model, task)
    state = model.state_dict()
    for batch in batches:
        cap = engine.capture(state, batch)
        flat = engine.flatten(cap)
        solved = inv.solve(flat)
        torch.testing.assert_close(
            inv.quadratic(engine, cap), (solved * flat).sum(1), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(
            inv.quadratic(engine, cap, damping=0.5, scale=-2.0),
            -2.0 * (inv.solve(flat, 0.5) * flat).sum(1),
            rtol=1e-9,
            atol=1e-12,
        )
        rotated = inv.directions(engine, cap)  # in the eigenbasis: the engine rotates g instead
        torch.testing.assert_close(
            engine.dot(cap, rotated),
            engine.dot(cap, engine.directions_from_flat(solved)),
            rtol=1e-9,
            atol=1e-12,
        )
        got = inv.directions(engine, cap, rotated=False)
        want = engine.directions_from_flat(solved)
        for key, d in want.dense.items():
            torch.testing.assert_close(got.dense[key], d, rtol=1e-9, atol=1e-12)
        if want.flat is not None:
            torch.testing.assert_close(got.flat, want.flat, rtol=1e-9, atol=1e-12)
        # and the engine scores them as it scores the flat solve
        torch.testing.assert_close(
            engine.dot(cap, got), engine.dot(cap, want), rtol=1e-9, atol=1e-12
        )


class Mixing(nn.Module):
    """``fc`` sees inputs centred over the batch: not batch-first, found on a batch of B > 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x - 0.5 * x.mean(0, keepdim=True))))


def test_a_layer_failing_the_check_on_a_later_batch_restarts_the_pass():
    model, task = Mixing().to(DT), Classification()
    _, _, (x, y) = make("mlp")
    batches = [(x[:1], y[:1]), (x[1:4], y[1:4]), (x[4:], y[4:])]  # the check on B > 1 comes 2nd
    inv = EKFAC(sampled_labels=False).prepare(model, task, None, batches)
    assert inv.coverage["fc.weight"].startswith("diagonal:example 0 alone")
    grads = torch.cat([exact_grads(model, task, b) for b in batches])
    sl = inv.layout.slices()["fc.weight"]
    # over all N examples, the first batch included (the pass restarted after the demotion)
    torch.testing.assert_close(
        inv.diagonal["fc.weight"].flatten(), (grads[:, sl] ** 2).mean(0), rtol=1e-10, atol=1e-14
    )
    with pytest.raises(ConfigurationError, match="later batch"):
        KFAC(sampled_labels=False).prepare(model, task, None, iter(batches))


def test_layers_with_a_too_large_factor_get_an_exact_diagonal_block(monkeypatch):
    import traintrace.curvature.kfac as kfac

    monkeypatch.setattr(kfac, "MAX_FACTOR_DIM", 6)  # the head's S would be [8 x 8]
    model, task, full = make("lm")
    inv = EKFAC(sampled_labels=False).prepare(model, task, None, _split(full))
    assert inv.coverage["head.weight"].startswith("diagonal:a dense Kronecker factor")
    assert inv.coverage["emb.weight"] == "kronecker:Embedding"  # A is a vector, S [4 x 4]
    g = exact_grads(model, task, full)
    sl = inv.layout.slices()
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(
            inv.diagonal[name].flatten(), (g[:, sl[name]] ** 2).mean(0), rtol=1e-10, atol=1e-14
        )
    with pytest.raises(ConfigurationError, match=r"head\.weight.*MAX_FACTOR_DIM"):
        KFAC(sampled_labels=False, unsupported="raise").prepare(model, task, None, _split(full))
