"""Curvature operators against explicit matrices built the slow, obvious way.

Where the expected values come from (nothing here goes through ``GradientComputer``):

* Hessian — ``torch.autograd.functional.hessian`` of the *mean* cross-entropy over all examples
  as a function of the flat parameter vector (``ParameterLayout`` order);
* Gauss–Newton — an explicit Jacobian ``J`` of all logits (``torch.autograd.functional.jacobian``)
  and the explicit Hessian of the summed loss w.r.t. the logits: ``Jᵀ H_out J / N``;
* empirical Fisher — one ``torch.autograd.grad`` call per example, ``Gᵀ G / N``.

The helpers here are imported by the solver and Lanczos tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from traintrace.curvature.operators import (
    EmpiricalFisher,
    GaussNewton,
    Hessian,
    MatrixOperator,
)
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.params import ParameterLayout
from traintrace.task import Classification

DT = torch.float64
N = 24
ATOL = 1e-10  # float64 products of O(1) matrices: only rounding separates the two routes
RTOL = 1e-8


# ----------------------------------------------------------------------------------------------
# tiny models and data
# ----------------------------------------------------------------------------------------------
def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    if name == "logreg":
        return nn.Linear(4, 3).to(DT)
    raise ValueError(name)


def make_data(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(n, 4, dtype=DT, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


MODELS = ["mlp", "logreg"]


def layout_of(model: nn.Module) -> ParameterLayout:
    return ParameterLayout.of(model, [n for n, _ in model.named_parameters()])


def flat_theta(model: nn.Module) -> torch.Tensor:
    return layout_of(model).flatten(dict(model.named_parameters())).detach().clone()


def logits_at(model: nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, layout_of(model).unflatten(theta), (x,))


def brute_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇²_θ (1/N) Σ_i CE(f(x_i; θ), y_i)`` by autograd's explicit Hessian."""

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_at(model, theta, x), y)

    return torch.autograd.functional.hessian(mean_loss, flat_theta(model))


def brute_gauss_newton(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    theta = flat_theta(model)
    out = logits_at(model, theta, x).detach()
    jac = torch.autograd.functional.jacobian(
        lambda t: logits_at(model, t, x).reshape(-1), theta
    )  # [N·C, P]
    h_out = torch.autograd.functional.hessian(
        lambda o: F.cross_entropy(o.reshape(out.shape), y, reduction="sum"), out.reshape(-1)
    )  # [N·C, N·C], block diagonal
    return jac.T @ h_out @ jac / x.shape[0]


def brute_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, P]``: one ``autograd.grad`` per example."""
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def brute_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    g = brute_gradients(model, x, y)
    return g.T @ g / x.shape[0]


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def build(kind: str, model: nn.Module, batches, **kw):
    task = Classification()
    state = model.state_dict()
    if kind == "hessian-reverse":
        return Hessian(model, task, state, batches, mode="reverse", **kw)
    if kind == "hessian-forward":
        return Hessian(model, task, state, batches, mode="forward", **kw)
    if kind == "ggn":
        return GaussNewton(model, task, state, batches, **kw)
    if kind == "fisher":
        return EmpiricalFisher(model, task, state, batches, **kw)
    raise ValueError(kind)


BRUTE = {
    "hessian-reverse": brute_hessian,
    "hessian-forward": brute_hessian,
    "ggn": brute_gauss_newton,
    "fisher": brute_fisher,
}
KINDS = list(BRUTE)


# ----------------------------------------------------------------------------------------------
# against brute force
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_brute_force(kind: str, model_name: str) -> None:
    model = make_model(model_name)
    x, y = make_data()
    op = build(kind, model, loader(x, y, batch_size=5))  # 5 does not divide 24: a ragged batch
    expected = BRUTE[kind](model, x, y)
    assert op.dim == expected.shape[0]
    torch.testing.assert_close(op.dense(), expected, atol=ATOL, rtol=RTOL)
    assert op.num_examples == N


def test_reverse_and_forward_hessians_agree_and_gauss_newton_differs_for_mlp() -> None:
    model = make_model("mlp")
    x, y = make_data()
    rev = build("hessian-reverse", model, [(x, y)]).dense()
    fwd = build("hessian-forward", model, [(x, y)]).dense()
    ggn = build("ggn", model, [(x, y)]).dense()
    torch.testing.assert_close(rev, fwd, atol=ATOL, rtol=RTOL)
    # the MLP Hessian has a second-order network term the GGN drops: they must differ
    assert float((rev - ggn).abs().max()) > 1e-3
    assert float(torch.linalg.eigvalsh(ggn)[0]) > -1e-10  # GGN is PSD
    assert float(torch.linalg.eigvalsh(rev)[0]) < -0.1  # this Hessian is indefinite


def test_gauss_newton_equals_hessian_for_a_linear_model() -> None:
    model = make_model("logreg")
    x, y = make_data()
    h = build("hessian-reverse", model, [(x, y)]).dense()
    g = build("ggn", model, [(x, y)]).dense()
    torch.testing.assert_close(g, h, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_damping_adds_lambda_identity(kind: str) -> None:
    model = make_model("mlp")
    x, y = make_data()
    plain = build(kind, model, [(x, y)]).dense()
    damped = build(kind, model, [(x, y)], damping=0.37).dense()
    torch.testing.assert_close(
        damped - plain, 0.37 * torch.eye(plain.shape[0], dtype=DT), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("kind", ["hessian-reverse", "ggn", "fisher"])
def test_matvec_and_matmat_agree_with_dense(kind: str) -> None:
    model = make_model("mlp")
    x, y = make_data()
    op = build(kind, model, loader(x, y, 8), damping=0.1)
    dense = BRUTE[kind](model, x, y) + 0.1 * torch.eye(op.dim, dtype=DT)
    block = torch.randn(op.dim, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op.matmat(block), dense @ block, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(op.matvec(block[:, 1]), dense @ block[:, 1], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(op @ block[:, 2], dense @ block[:, 2], atol=ATOL, rtol=RTOL)
    assert op.matmat(block[:, :0]).shape == (op.dim, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_partition_invariance(kind: str) -> None:
    """Batch size 4, one batch of everything, cached batches: the same average."""
    model = make_model("mlp")
    x, y = make_data()
    small = build(kind, model, loader(x, y, 4)).dense()
    whole = build(kind, model, [(x, y)]).dense()
    cached = build(kind, model, loader(x, y, 7), cache_batches=True).dense()
    torch.testing.assert_close(small, whole, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached, whole, atol=ATOL, rtol=RTOL)


def test_empirical_fisher_gradient_cache_and_gradients() -> None:
    model = make_model("mlp")
    x, y = make_data()
    op = EmpiricalFisher(
        model, Classification(), model.state_dict(), loader(x, y, 5), cache_gradients=True
    )
    expected_g = brute_gradients(model, x, y)
    torch.testing.assert_close(op.gradients(), expected_g, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(op.gradients(7), expected_g[:7], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(op.dense(), brute_fisher(model, x, y), atol=ATOL, rtol=RTOL)


def test_layers_select_a_block_of_the_full_matrix() -> None:
    """Restricting to the last layer gives the matching diagonal block of the full Hessian."""
    model = make_model("mlp")
    x, y = make_data()
    full = brute_hessian(model, x, y)
    op = Hessian(model, Classification(), model.state_dict(), [(x, y)], layers="last")
    assert op.layout.names == ("2.weight", "2.bias")
    start = 4 * 6 + 6
    torch.testing.assert_close(op.dense(), full[start:, start:], atol=ATOL, rtol=RTOL)


def test_state_is_used_not_the_models_own_parameters() -> None:
    model = make_model("mlp")
    x, y = make_data()
    other = make_model("mlp")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3)
    op = Hessian(model, Classification(), other.state_dict(), [(x, y)])
    torch.testing.assert_close(op.dense(), brute_hessian(other, x, y), atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_products_raise_with_advice(kind: str) -> None:
    model = make_model("mlp")
    x, y = make_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"][0, 0] = float("nan")
    op = build(kind, model, [(x, y)])
    op.state = state
    op.params = op.computer.selected_state(state)
    with pytest.raises(NonFiniteGradientError, match=r"NaN|non-finite"):
        op.matvec(torch.ones(op.dim, dtype=DT))


def test_configuration_errors() -> None:
    model = make_model("logreg")
    x, y = make_data()
    task, state = Classification(), model.state_dict()
    with pytest.raises(ConfigurationError, match="damping"):
        Hessian(model, task, state, [(x, y)], damping=-1.0)
    with pytest.raises(ConfigurationError, match=r"\[batch\]"):
        Hessian(model, task, state, (x, y))
    with pytest.raises(ConfigurationError, match="one-shot"):
        Hessian(model, task, state, iter([(x, y)]))
    with pytest.raises(ConfigurationError, match="mode"):
        Hessian(model, task, state, [(x, y)], mode="sideways")  # type: ignore[arg-type]
    op = Hessian(model, task, state, [(x, y)])
    with pytest.raises(ConfigurationError, match=r"shape \[15\]"):
        op.matvec(torch.ones(14, dtype=DT))
    with pytest.raises(ConfigurationError, match="NaN"):
        op.matvec(torch.full((15,), float("nan"), dtype=DT))
    with pytest.raises(ConfigurationError, match="no examples"):
        Hessian(model, task, state, [], cache_batches=True)


def test_matrix_operator() -> None:
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, dtype=DT, generator=g)
    m = a + a.T
    op = MatrixOperator(m, damping=0.5)
    v = torch.randn(6, dtype=DT, generator=g)
    torch.testing.assert_close(op.matvec(v), m @ v + 0.5 * v)
    torch.testing.assert_close(op.dense(), m + 0.5 * torch.eye(6, dtype=DT))
    with pytest.raises(ConfigurationError, match="symmetric"):
        MatrixOperator(a)


# ----------------------------------------------------------------------------------------------
# an Embedding with padding_idx: its padding row is a constant of the lookup in both AD modes
# ----------------------------------------------------------------------------------------------
class PaddedTied(nn.Module):
    """Embedding (padding_idx=0) → tanh → mean over tokens → head tied to the embedding."""

    def __init__(self, vocab: int = 6, d: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.lin = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(self.emb(tokens))).mean(1))


def _padded_logits(theta: torch.Tensor, tokens: torch.Tensor, d: int = 3) -> torch.Tensor:
    """PaddedTied written by hand on the flat parameters [emb (V·d), lin.weight, lin.bias]: the
    lookup reads the padding row as a constant (PyTorch's backward gives it no gradient from the
    lookup); the tied head uses every row."""
    vocab = 6
    w = theta[: vocab * d].view(vocab, d)
    lw = theta[vocab * d : vocab * d + d * d].view(d, d)
    lb = theta[vocab * d + d * d :]
    rows = torch.where((tokens == 0).unsqueeze(-1), w.detach()[tokens], w[tokens])
    return torch.tanh(rows @ lw.T + lb).mean(1) @ w.T


@pytest.mark.parametrize("kind", ["hessian-reverse", "hessian-forward", "ggn"])
def test_padding_row_is_a_constant_of_the_lookup_in_every_product(kind: str) -> None:
    torch.manual_seed(3)
    model = PaddedTied().to(DT)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 6, (10, 5), generator=g)
    tokens[:, 0] = 0  # every sequence has padding
    y = torch.randint(0, 6, (10,), generator=g)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if kind == "ggn":
        out = _padded_logits(theta, tokens).detach()
        jac = torch.autograd.functional.jacobian(
            lambda t: _padded_logits(t, tokens).reshape(-1), theta
        )
        h_out = torch.autograd.functional.hessian(
            lambda o: F.cross_entropy(o.reshape(out.shape), y, reduction="sum"), out.reshape(-1)
        )
        expected = jac.T @ h_out @ jac / 10
    else:
        expected = torch.autograd.functional.hessian(
            lambda t: F.cross_entropy(_padded_logits(t, tokens), y), theta
        )
    op = build(kind, model, loader(tokens, y, batch_size=4))
    dense = op.dense()
    torch.testing.assert_close(dense, expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dense, dense.T, atol=ATOL, rtol=RTOL)
    if kind == "ggn":
        assert float(torch.linalg.eigvalsh(dense).min()) > -1e-12
