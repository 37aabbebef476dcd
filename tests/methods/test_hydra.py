"""HYDRA against an explicit loop over a recorded SGD trajectory, and against the exact
derivative of the query loss w.r.t. an example's weight after one step (where dropping the
Hessian terms is exact). The recorder's store: resume, reopen, guards and errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from reference import ce, loop_gradients, neg_margin
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.exceptions import ConfigurationError, NotFittedError
from traintrace.features.gradients import GradientComputer
from traintrace.methods.hydra import HYDRA, TrajectoryRecorder

DT = torch.float64
N_TRAIN = 11  # example 10 is never in a batch: its scores must be exactly 0
# (indices, lr): repeats across steps, a repeat inside one batch (8), varying B and η
SCHEDULE = [
    ([0, 1, 2, 3], 0.5),
    ([4, 5, 6], 0.3),
    ([0, 7, 8, 8], 0.4),
    ([2, 9], 0.2),
    ([1, 3, 5, 7, 9], 0.25),
]


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def tiny_data(n: int = N_TRAIN, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, x, y, recorder=None, schedule=SCHEDULE, start=0):
    """Plain SGD on the mean cross-entropy; returns the parameters θ_t before every step."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    states = []
    for t, (idx, lr) in enumerate(schedule[start:], start=start):
        for group in opt.param_groups:
            group["lr"] = lr
        idx_t = torch.tensor(idx)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        loss = F.cross_entropy(model(x[idx_t]), y[idx_t])
        opt.zero_grad()
        loss.backward()
        if recorder is not None:
            recorder.record((x[idx_t], y[idx_t]), idx_t, lr, step=t)
        opt.step()
    return states


def brute_accumulator(model, states, x, y, schedule=SCHEDULE, names=None):
    """``a_i = Σ_{t: i∈B_t} (η_t/B_t) ∇l(z_i, θ_t)`` by one autograd call per example per step."""
    width = sum(p.numel() for n, p in model.named_parameters() if names is None or n in names)
    acc = torch.zeros(N_TRAIN, width, dtype=DT)
    for state, (idx, lr) in zip(states, schedule, strict=True):
        grads = loop_gradients(model, state, [(x[i], y[i]) for i in idx], ce, names)
        for k, i in enumerate(idx):
            acc[i] += lr / len(idx) * grads[k]
    return acc


@pytest.fixture(scope="module")
def recorded():
    x, y = tiny_data()
    model = tiny_mlp()
    start = copy.deepcopy(model)
    with TrajectoryRecorder(model, tt.Classification(), N_TRAIN) as rec:
        states = train(model, x, y, rec)
    return start, model, rec, states, x, y


@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_scores_equal_the_explicit_trajectory_sum(recorded, measurement):
    _, model, rec, states, x, y = recorded
    task = tt.Classification(measurement)
    xq, yq = tiny_data(4, seed=1)
    hydra = HYDRA(model, task, rec, progress=False).fit(TensorDataset(x, y))
    acc = brute_accumulator(model, states, x, y)
    query_fn = ce if measurement == "loss" else neg_margin
    q = loop_gradients(model, model.state_dict(), list(zip(xq, yq, strict=True)), query_fn)
    expected = q @ acc.T
    got = hydra.score(TensorDataset(xq, yq))
    assert got.shape == (4, N_TRAIN)
    torch.testing.assert_close(rec.accumulator(), acc, rtol=0, atol=1e-12)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    assert bool((got[:, 10] == 0).all())
    assert hydra.counts_.tolist() == [2, 2, 2, 2, 1, 2, 1, 2, 2, 2, 0]
    top = hydra.top_k(TensorDataset(xq, yq), k=3)
    torch.testing.assert_close(top.proponents.scores, expected.topk(3, dim=1).values)


def test_an_accumulator_read_from_disk_gives_the_same_results_as_one_in_memory(recorded):
    _, model, rec, _, x, y = recorded
    xq, yq = tiny_data(5, seed=2)
    train, queries = TensorDataset(x, y), TensorDataset(xq, yq)
    memory = HYDRA(model, tt.Classification(), rec, progress=False).fit(train)
    disk = HYDRA(model, tt.Classification(), rec, max_feature_gib=0, query_block=2, progress=False)
    disk.fit(train)
    assert isinstance(memory.train_features_, list)
    assert not isinstance(disk.train_features_, list)  # read block by block, never loaded
    expected = memory.score(queries)
    torch.testing.assert_close(disk.score(queries), expected, rtol=0, atol=0)
    top = disk.top_k(queries, k=4)
    torch.testing.assert_close(top.proponents.scores, expected.topk(4, dim=1).values)
    torch.testing.assert_close(disk.self_influence(), memory.self_influence(), rtol=0, atol=0)
    # R × P × w: the recorded sums, the identity, weight 1
    assert type(disk.featurizer).__name__ == "RecordedTrajectory"
    assert type(disk.preconditioners[0]).__name__ == "Identity" and disk.weights == [1.0]


def test_self_influence_is_the_diagonal_at_the_final_parameters(recorded):
    _, model, rec, states, x, y = recorded
    hydra = HYDRA(model, tt.Classification(), rec, progress=False).fit(TensorDataset(x, y))
    acc = brute_accumulator(model, states, x, y)
    g = loop_gradients(model, model.state_dict(), list(zip(x, y, strict=True)), ce)
    expected = (g * acc).sum(dim=1)
    torch.testing.assert_close(hydra.self_influence(), expected, rtol=1e-10, atol=1e-14)
    diag = hydra.score(TensorDataset(x, y)).diagonal()
    torch.testing.assert_close(hydra.self_influence(), diag, rtol=1e-10, atol=1e-14)
    with pytest.raises(NotFittedError, match="training data"):
        HYDRA(model, tt.Classification(), rec, progress=False).fit().self_influence()


def test_one_step_equals_the_exact_derivative_wrt_the_example_weight():
    """θ_1 = θ_0 − (η/B) Σ_j w_j ∇l_j(θ_0): ∂f(θ_1)/∂w_i has no Hessian term, so HYDRA is exact."""
    x, y = tiny_data()
    xq, yq = tiny_data(3, seed=2)
    model = tiny_mlp(1)
    idx, lr = [1, 4, 4, 6, 9], 0.7
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    w = torch.ones(len(idx), dtype=DT, requires_grad=True)
    params = dict(theta0)
    for p in params.values():
        p.requires_grad_(True)
    losses = F.cross_entropy(functional_call(model, params, (x[idx],)), y[idx], reduction="none")
    grads = torch.autograd.grad(
        (w * losses).sum() / len(idx), list(params.values()), create_graph=True
    )
    theta1 = {k: p - lr * g for (k, p), g in zip(params.items(), grads, strict=True)}
    query_losses = F.cross_entropy(functional_call(model, theta1, (xq,)), yq, reduction="none")
    exact = torch.zeros(3, N_TRAIN, dtype=DT)
    for q in range(3):
        dw = torch.autograd.grad(query_losses[q], w, retain_graph=True)[0]
        for k, i in enumerate(idx):
            exact[q, i] += -dw[k]  # helps = lowers the loss when w_i grows
    with TrajectoryRecorder(model, tt.Classification(), N_TRAIN) as rec:
        rec.record((x[idx], y[idx]), idx, lr)
        with torch.no_grad():
            for (_, p), g in zip(model.named_parameters(), grads, strict=True):
                p.sub_(lr * g.detach())
    got = HYDRA(model, tt.Classification(), rec, progress=False).fit().score(TensorDataset(xq, yq))
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-12 * float(exact.abs().max()))
    assert float(exact.abs().max()) > 1e-3


def test_last_layer_and_final_checkpoint(recorded):
    start, _, _, _, x, y = recorded
    model = copy.deepcopy(start)
    with TrajectoryRecorder(model, tt.Classification(), N_TRAIN, layers="last") as rec:
        states = train(model, x, y, rec)
    names = ["2.weight", "2.bias"]
    acc = brute_accumulator(model, states, x, y, names=names)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # the model moves on; the final checkpoint is what counts
        for p in model.parameters():
            p.add_(1.0)
    xq, yq = tiny_data(2, seed=3)
    hydra = HYDRA(model, tt.Classification(), rec, tt.Checkpoint(final), progress=False).fit()
    q = loop_gradients(model, final, list(zip(xq, yq, strict=True)), ce, names)
    expected = q @ acc.T
    got = hydra.score(TensorDataset(xq, yq))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


class RandomProjection:
    """A stand-in featurizer: a fixed Gaussian projection of exact gradients."""

    def __init__(self, model, width, seed=0):
        self.computer = GradientComputer(model, tt.Classification())
        gen = torch.Generator().manual_seed(seed)
        self.matrix = torch.randn(self.computer.layout.numel, width, dtype=DT, generator=gen)
        self.width = width

    def features(self, state, batch, kind):
        return self.computer.per_example(state, batch, kind) @ self.matrix


def test_a_projecting_featurizer_is_applied_on_both_sides(recorded):
    start, _, _, _, x, y = recorded
    model = copy.deepcopy(start)
    proj = RandomProjection(model, 6)
    with TrajectoryRecorder(model, tt.Classification(), N_TRAIN, projection=proj) as rec:
        states = train(model, x, y, rec)
    assert rec.width == 6
    acc = brute_accumulator(model, states, x, y) @ proj.matrix
    xq, yq = tiny_data(2, seed=4)
    q = loop_gradients(model, model.state_dict(), list(zip(xq, yq, strict=True)), ce)
    expected = (q @ proj.matrix) @ acc.T
    got = HYDRA(model, tt.Classification(), rec, progress=False).fit().score(TensorDataset(xq, yq))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * float(expected.abs().max()))
    # reopening a path recorded with a projection object needs the same object
    with pytest.raises(ConfigurationError, match="same projection"):
        HYDRA(model, tt.Classification(), rec.path, progress=False).fit()
    same = RandomProjection(model, 6)  # an equal featurizer, built anew (as in a new process)
    got2 = HYDRA(model, tt.Classification(), rec.path, projection=same, progress=False).fit()
    torch.testing.assert_close(got2.score(TensorDataset(xq, yq)), got)

    class OtherProjection(RandomProjection):
        pass

    with pytest.raises(ConfigurationError, match="projection: store"):
        HYDRA(
            model,
            tt.Classification(),
            rec.path,
            projection=OtherProjection(model, 6),
            progress=False,
        ).fit()


def test_projection_dimension_uses_projected_gradients_when_available(recorded, tmp_path):
    start, _, _, _, x, y = recorded
    model = copy.deepcopy(start)
    try:
        import traintrace.features.projections  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigurationError, match="ProjectedGradients"):
            TrajectoryRecorder(model, tt.Classification(), N_TRAIN, projection=8)
        return
    with TrajectoryRecorder(model, tt.Classification(), N_TRAIN, tmp_path, projection=8) as rec:
        train(model, x, y, rec)
    hydra = HYDRA(model, tt.Classification(), tmp_path, progress=False).fit()  # dim read back
    scores = hydra.score(TensorDataset(*tiny_data(2, seed=5)))
    assert scores.shape == (2, N_TRAIN) and bool(torch.isfinite(scores).all())


def test_resume_from_path_gives_the_same_accumulator(recorded, tmp_path):
    start, model_full, rec_full, _, x, y = recorded
    model = copy.deepcopy(start)
    task = tt.Classification()
    path = tmp_path / "store"
    first, rest = SCHEDULE[:2], SCHEDULE
    with TrajectoryRecorder(model, task, N_TRAIN, path, flush_every=1) as rec:
        train(model, x, y, rec, schedule=first)
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # the training checkpoint
    meta = json.loads((path / "meta.json").read_text())
    assert meta["steps"] == 2 and meta["n_train"] == N_TRAIN and not meta["dirty"]

    with pytest.raises(ConfigurationError, match="already holds a HYDRA store"):
        TrajectoryRecorder(model, task, N_TRAIN, path)
    with pytest.raises(ConfigurationError, match="parameters"):
        TrajectoryRecorder(model, task, N_TRAIN, path, mode="resume", layers="last")
    with pytest.raises(ConfigurationError, match="n_train"):
        TrajectoryRecorder(model, task, N_TRAIN + 1, path, mode="resume")

    resumed = tiny_mlp()
    resumed.load_state_dict(saved)
    with TrajectoryRecorder(resumed, task, N_TRAIN, path, mode="resume") as rec:
        assert rec.steps_recorded == 2
        with pytest.raises(ConfigurationError, match="2 steps are recorded"):
            rec.record((x[:1], y[:1]), [0], 0.1, step=0)  # would count step 0 twice
        train(resumed, x, y, rec, schedule=rest, start=2)
        assert rec.steps_recorded == len(SCHEDULE)
    torch.testing.assert_close(
        TrajectoryRecorder(resumed, task, None, path, mode="read").accumulator(),
        rec_full.accumulator(),
        rtol=0,
        atol=1e-14,
    )
    xq, yq = tiny_data(3, seed=6)
    from_path = HYDRA(resumed, task, os.fspath(path), progress=False).fit(TensorDataset(x, y))
    from_object = HYDRA(model_full, task, rec_full, progress=False).fit()
    torch.testing.assert_close(
        from_path.score(TensorDataset(xq, yq)), from_object.score(TensorDataset(xq, yq))
    )

    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "dirty": True}))
    with pytest.raises(ConfigurationError, match="interrupted"):
        TrajectoryRecorder(resumed, task, N_TRAIN, path, mode="resume")
    with TrajectoryRecorder(resumed, task, N_TRAIN, path, mode="overwrite") as rec:
        assert rec.steps_recorded == 0
        assert float(rec.accumulator().abs().sum()) == 0.0


def test_buffered_and_unbuffered_recording_agree(recorded):
    start, _, rec_full, _, x, y = recorded
    model = copy.deepcopy(start)
    with TrajectoryRecorder(model, tt.Classification(), N_TRAIN, flush_every=1) as rec:
        train(model, x, y, rec)
        assert rec.steps_on_disk == len(SCHEDULE)
    torch.testing.assert_close(rec.accumulator(), rec_full.accumulator(), rtol=0, atol=1e-15)


def test_wrong_usage_raises_clear_errors():
    x, y = tiny_data()
    model = tiny_mlp()
    task = tt.Classification()
    rec = TrajectoryRecorder(model, task, N_TRAIN)
    batch = (x[:3], y[:3])
    with pytest.raises(ConfigurationError, match=r"outside the training set \[0, 11\)"):
        rec.record(batch, [0, 1, 11], 0.1)
    with pytest.raises(ConfigurationError, match="outside"):
        rec.record(batch, [0, -1, 2], 0.1)
    with pytest.raises(ConfigurationError, match="3 examples but 2 indices"):
        rec.record(batch, [0, 1], 0.1)
    with pytest.raises(ConfigurationError, match="needs lr"):
        rec.record(batch, [0, 1, 2], None)
    with pytest.raises(ConfigurationError, match=">= 0"):
        rec.record(batch, [0, 1, 2], -0.1)
    with pytest.raises(ConfigurationError, match="integers"):
        rec.record(batch, torch.tensor([0.0, 1.0, 2.0]), 0.1)
    with pytest.raises(ConfigurationError, match="needs indices"):
        rec.record(batch, None, 0.1)
    assert rec.steps_recorded == 0  # nothing half-recorded
    with pytest.raises(ConfigurationError, match="no recorded steps"):
        HYDRA(model, task, rec, progress=False).fit()
    with pytest.raises(NotFittedError):
        HYDRA(model, task, rec, progress=False).score(TensorDataset(x, y))
    momentum = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="not plain SGD"):
        rec.record(batch, [0, 1, 2], momentum)
    rec.record(batch, [0, 1, 2], momentum)  # warns once only
    rec.close()
    with pytest.raises(ConfigurationError, match="closed"):
        rec.record(batch, [0, 1, 2], 0.1)
    with pytest.raises(ConfigurationError, match="n_train"):
        TrajectoryRecorder(model, task, 0)
    with pytest.raises(ConfigurationError, match="no HYDRA store"):
        HYDRA(model, task, "/nonexistent/hydra", progress=False).fit()
    with pytest.raises(ConfigurationError, match="12 examples"):
        HYDRA(model, task, rec, progress=False).fit(TensorDataset(*tiny_data(12)))


def test_recording_leaves_a_training_model_as_it_was():
    """Per-example gradients are taken functionally in eval mode: train mode, BatchNorm running
    statistics and ``.grad`` of the user's model are untouched."""
    from reference import MLP

    torch.manual_seed(0)
    model = MLP().double().train()
    x = torch.randn(6, 5, dtype=DT)
    y = torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    with TrajectoryRecorder(model, tt.Classification(), 6, dtype=torch.float32) as rec:
        rec.record((x, y), range(6), 0.1)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert rec.dtype == torch.float32 and rec.accumulator().dtype == torch.float32
    assert float(rec.accumulator().abs().sum()) > 0
