"""The curvature spectrum against ``torch.linalg.eigvalsh`` of explicit matrices.

Expected values: the Hessian of the mean loss from ``torch.autograd.functional.hessian`` (full
data, and the mini-batch alone), the GGN from an explicit Jacobian of the logits and the
explicit Hessian of the loss in the logits, ``Jᵀ H_out J / N``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_local_ensembles import explicit_hessian
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.applications.spectrum import SpectrumResult, spectrum
from traintrace.exceptions import ConfigurationError

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(3)
    x = 1.5 * torch.randn(40, 3, dtype=DT, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def explicit_ggn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def logits(flat: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, params, (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(logits, flat0)  # [N·C, P]
    out0 = logits(flat0).detach()
    h_out = torch.autograd.functional.hessian(
        lambda o: F.cross_entropy(o.reshape(len(y), -1), y, reduction="sum"), out0
    )
    return jac.T @ h_out @ jac / len(y)


def test_top_eigenvalues_and_density_of_the_hessian_and_a_mini_batch() -> None:
    model, x, y = _setup()
    h = explicit_hessian(model, x, y)
    hb = explicit_hessian(model, x[:8], y[:8])
    p = h.shape[0]
    result = spectrum(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        top=4,
        num_probes=3,
        iterations=p,
        batch_data=(x[:8], y[:8]),
        batch_size=16,
        progress=False,
    )
    assert isinstance(result, SpectrumResult)
    exact = torch.linalg.eigvalsh(h)
    exact_b = torch.linalg.eigvalsh(hb)
    torch.testing.assert_close(result.top_eigenvalues, exact.flip(0)[:4], rtol=1e-6, atol=0)
    torch.testing.assert_close(result.batch_top_eigenvalues, exact_b.flip(0)[:4], rtol=1e-6, atol=0)
    assert result.min_eigenvalue == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-9)
    assert result.batch_min_eigenvalue == pytest.approx(float(exact_b[0]), rel=1e-6, abs=1e-9)
    assert result.num_examples == 40 and result.batch_size == 8
    lam_min, lam_max = float(exact[0]), float(exact[-1])
    assert lam_min < 0  # a random MLP's Hessian is indefinite: the rule must lift it
    assert result.suggested_damping == pytest.approx(-lam_min + 1e-3 * lam_max, rel=1e-6)
    for dens in (result.density, result.batch_density):
        mass = torch.trapezoid(dens.density, dens.grid)
        assert abs(float(mass) - 1.0) < 1e-3
    # with m = P every probe's quadrature nodes are the eigenvalues themselves
    torch.testing.assert_close(result.density.nodes[0].sort().values, exact, atol=1e-9, rtol=1e-7)
    # the first moment of the density is the trace / P
    mean = float(torch.trapezoid(result.density.density * result.density.grid, result.density.grid))
    assert mean == pytest.approx(float(exact.mean()), abs=0.2 * float(exact.abs().max()))


def test_ggn_spectrum_with_damping_and_few_iterations() -> None:
    model, x, y = _setup()
    g = explicit_ggn(model, x, y)
    exact = torch.linalg.eigvalsh(g + 0.1 * torch.eye(g.shape[0], dtype=DT))
    result = spectrum(
        model,
        tt.Classification(),
        tt.Checkpoint(model.state_dict()),
        TensorDataset(x, y),
        curvature="ggn",
        top=2,
        damping=0.1,
        density=False,
        iterations=25,
        progress=False,
    )
    assert result.density is None and result.batch_density is None
    torch.testing.assert_close(result.top_eigenvalues, exact.flip(0)[:2], rtol=1e-6, atol=0)
    assert result.min_eigenvalue >= float(exact[0]) - 1e-9  # a Ritz value: an upper bound
    assert result.suggested_damping == pytest.approx(1e-3 * float(exact[-1]), rel=1e-6)


def test_errors() -> None:
    model, x, y = _setup()
    ckpt = tt.Checkpoint(model.state_dict())
    data = TensorDataset(x, y)
    with pytest.raises(ConfigurationError, match="top"):
        spectrum(model, tt.Classification(), ckpt, data, top=0)
    with pytest.raises(ConfigurationError, match="iterations"):
        spectrum(model, tt.Classification(), ckpt, data, top=5, iterations=3)
    with pytest.raises(ConfigurationError, match="curvature"):
        spectrum(model, tt.Classification(), ckpt, data, curvature="fisher")
