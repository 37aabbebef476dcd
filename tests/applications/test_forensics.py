"""Attack forensics: renormalized scores against brute force, target identification, mitigation.

Expected values:
* renormalized scores — explicit per-example, per-layer gradients by ``torch.func.vmap(grad)``
  on a tiny float64 MLP, an explicit Hessian by ``torch.func.hessian``, divided by the norms;
  these tests skip until the estimators accept the keyword (``normalize="train"|"cosine"``,
  ``layerwise=True``) and turn on by themselves when it lands;
* target identification — a synthetic score matrix with one planted heavy tail;
* recall and mitigation — a backdoor planted on digits and real retraining.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.applications.forensics import identify_targets, mitigate, robust_tail

# -- a tiny model and brute-force renormalized scores ----------------------------------------------


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


LAYERS = {"fc1": ["fc1.weight", "fc1.bias"], "fc2": ["fc2.weight", "fc2.bias"]}


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Tiny().double()
    states = []
    for _ in range(2):
        states.append({k: v + 0.3 * torch.randn_like(v) for k, v in model.state_dict().items()})
    lrs = [0.2, 0.05]
    xt, yt = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    xq, yq = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    return model, states, lrs, (xt, yt), (xq, yq)


def _per_example_grads(model, state, x, y) -> dict[str, torch.Tensor]:
    """``{name: [n, numel]}`` cross-entropy gradients, one example at a time via vmap(grad)."""

    def loss(params, xi, yi):
        out = functional_call(model, params, (xi[None],))
        return F.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(dict(state), x, y)
    return {k: v.reshape(len(x), -1) for k, v in g.items()}


def _blocks(g: dict[str, torch.Tensor], layerwise: bool) -> list[torch.Tensor]:
    if layerwise:
        return [torch.cat([g[n] for n in names], 1) for names in LAYERS.values()]
    return [torch.cat([g[n] for names in LAYERS.values() for n in names], 1)]


def brute_renormalized_tracin(model, states, lrs, train, query, mode: str, layerwise: bool):
    """``Σ_c η_c Σ_blocks ⟨q_b, t_b⟩ / ‖t_b‖`` ("train") or ``/ (‖q_b‖‖t_b‖)`` ("cosine")."""
    total = 0.0
    for state, lr in zip(states, lrs, strict=True):
        gt = _blocks(_per_example_grads(model, state, *train), layerwise)
        gq = _blocks(_per_example_grads(model, state, *query), layerwise)
        for t, q in zip(gt, gq, strict=True):
            if mode == "cosine":
                q = q / q.norm(dim=1, keepdim=True)
            total = total + lr * (q @ t.T) / t.norm(dim=1)[None]
    return total


def brute_rif(model, state, train, query, damping: float, layerwise: bool):
    """``(1/n) Σ_blocks ⟨(H + λI)⁻¹ ∇f(z')⟩_b · ∇l(z)_b / ‖∇l(z)_b‖`` with an explicit Hessian."""
    names = [n for ns in LAYERS.values() for n in ns]
    shapes = [state[n].shape for n in names]
    sizes = [state[n].numel() for n in names]
    flat0 = torch.cat([state[n].reshape(-1) for n in names])
    xt, yt = train

    def mean_loss(flat):
        params = {n: p.reshape(s) for n, p, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (xt,)), yt)

    hess = torch.func.hessian(mean_loss)(flat0) + damping * torch.eye(len(flat0), dtype=flat0.dtype)
    gt = torch.cat([_per_example_grads(model, state, *train)[n] for n in names], 1)
    gq = torch.cat([_per_example_grads(model, state, *query)[n] for n in names], 1)
    pq = torch.linalg.solve(hess, gq.T).T / len(xt)
    bounds = np.cumsum([0] + [sum(state[n].numel() for n in ns) for ns in LAYERS.values()])
    spans = [(bounds[i], bounds[i + 1]) for i in range(len(LAYERS))] if layerwise else [(0, None)]
    total = 0.0
    for a, b in spans:
        t, q = gt[:, a:b], pq[:, a:b]
        total = total + (q @ t.T) / t.norm(dim=1)[None]
    return total, hess


def _string_normalize_available(make) -> bool:
    """The estimator validates ``normalize=`` strings (an unknown mode is refused)."""
    try:
        make(normalize="no-such-mode")
    except (TypeError, tt.ConfigurationError):
        pass
    else:
        return False
    try:
        make(normalize="train")
    except (TypeError, tt.ConfigurationError):
        return False
    return True


def _layerwise_available(make) -> bool:
    try:
        make(normalize="train", layerwise=True)
    except (TypeError, tt.ConfigurationError):
        return False
    return True


def _close(actual, expected, rtol=1e-6):
    scale = expected.abs().max()
    assert scale > 0
    err = float((actual - expected).abs().max() / scale)
    assert err <= rtol, f"relative error {err:.2e}"


@pytest.mark.parametrize("mode", ["train", "cosine"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_renormalized_tracin_equals_brute_force(mode, layerwise):
    model, states, lrs, train, query = _setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]

    def make(**kw):
        return tt.TracIn(model, tt.Classification(), ckpts, progress=False, **kw)

    if not _string_normalize_available(make):
        pytest.skip("TracIn does not take normalize='train'|'cosine' yet")
    if layerwise and not _layerwise_available(make):
        pytest.skip("TracIn does not take layerwise= yet")
    kw = {"layerwise": True} if layerwise else {}
    est = make(normalize=mode, **kw).fit(TensorDataset(*train))
    expected = brute_renormalized_tracin(model, states, lrs, train, query, mode, layerwise)
    _close(est.score(TensorDataset(*query)), expected)


def test_gas_today_equals_brute_force_cosine():
    """normalize=True (GAS) is available now: the cosine reference must already agree."""
    model, states, lrs, train, query = _setup(1)
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(), ckpts, normalize=True, progress=False)
    est.fit(TensorDataset(*train))
    expected = brute_renormalized_tracin(model, states, lrs, train, query, "cosine", False)
    _close(est.score(TensorDataset(*query)), expected)


@pytest.mark.parametrize("layerwise", [False, True], ids=["RIF", "layerwise-RIF"])
def test_renormalized_influence_equals_brute_force(layerwise):
    model, states, _, train, query = _setup(2)
    state = states[-1]
    ckpt = tt.Checkpoint(state)
    damping = 1.0  # the Hessian's smallest eigenvalue here is about -0.82

    def make(**kw):
        return tt.InfluenceFunction(
            model,
            tt.Classification(),
            ckpt,
            hessian="exact",
            damping=damping,
            progress=False,
            **kw,
        )

    if not _string_normalize_available(make):
        pytest.skip("InfluenceFunction does not take normalize='train' yet")
    if layerwise and not _layerwise_available(make):
        pytest.skip("InfluenceFunction does not take layerwise= yet")
    expected, hess = brute_rif(model, state, train, query, damping, layerwise)
    assert torch.linalg.eigvalsh(hess).min() > 0  # the reference inverse exists
    kw = {"layerwise": True} if layerwise else {}
    est = make(normalize="train", **kw).fit(TensorDataset(*train))
    _close(est.score(TensorDataset(*query)), expected)


# -- target identification on a synthetic matrix ------------------------------------------------------


def _planted_matrix(seed: int = 0):
    """50 candidates × 1000 training examples: N(0, 1) plus a +3 "class" bump on 100 examples
    per row; candidate 17 also gets +12 on 20 planted examples (the attack)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(50, 1000, generator=gen, dtype=torch.float64)
    for r in range(50):
        scores[r, torch.randperm(1000, generator=gen)[:100]] += 3.0
    planted = torch.randperm(1000, generator=gen)[:20]
    scores[17, planted] += 12.0
    return scores, planted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identify_targets_finds_the_planted_tail_exactly(seed):
    scores, planted = _planted_matrix(seed)
    report = identify_targets(scores)
    assert int(report.ranking[0]) == 17
    assert report.rank_of(17) == 1
    assert report.scores[17] > 2 * report.scores[report.ranking[1]]
    assert sorted(report.attack_set(17).tolist()) == sorted(planted.tolist())
    # ordered by decreasing influence, z above the cut
    found = report.attack_set(17)
    assert torch.all(scores[17, found][:-1] >= scores[17, found][1:])
    assert torch.all(report.tail_z(17) > 3.5)
    # no clean candidate's tail is mistaken for an attack of that size
    assert max(len(report.attack_set(i)) for i in range(50) if i != 17) < 5


def test_anomaly_score_is_invariant_to_shift_and_positive_scale():
    scores, _ = _planted_matrix(3)
    a = identify_targets(scores)
    b = identify_targets(scores * 7.5 - 2.0)
    assert torch.allclose(a.scores, b.scores)
    assert torch.equal(a.ranking, b.ranking)
    assert torch.equal(a.attack_set(17), b.attack_set(17))


def test_robust_tail_definition_by_hand():
    """Score = (s_(k) − median(U)) / (1.4826 · MAD(U)) with U the top ⌈0.1 n⌉ values."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=400)
    s[[5, 9, 11, 70, 123, 200]] += 10
    score, idx, z = robust_tail(s, tail_fraction=0.1, k=5, threshold=3.5)
    top = np.sort(s)[::-1][:40]
    med = np.median(top)
    sigma = 1.482602218505602 * np.median(np.abs(top - med))
    assert score == pytest.approx((top[4] - med) / sigma)
    assert sorted(idx.tolist()) == [5, 9, 11, 70, 123, 200]
    assert np.allclose(z, (s[idx] - med) / sigma)


def test_flat_tail_has_no_anomaly():
    score, idx, _ = robust_tail(np.ones(100))
    assert score == 0.0 and len(idx) == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(5), "n_candidates, n_train"),
        (torch.tensor([[1.0, float("nan")] * 10]), "non-finite"),
    ],
)
def test_bad_score_matrices_are_refused(bad, match):
    with pytest.raises(tt.ConfigurationError, match=match):
        identify_targets(bad)


def test_bad_arguments_are_refused():
    scores, _ = _planted_matrix()
    with pytest.raises(tt.ConfigurationError, match="k=2000 exceeds"):
        identify_targets(scores, k=2000)
    with pytest.raises(tt.ConfigurationError, match="tail_fraction"):
        identify_targets(scores, tail_fraction=0)
    with pytest.raises(tt.ConfigurationError, match="position"):
        identify_targets(scores).attack_set(50)
    with pytest.raises(tt.ConfigurationError, match="fitted estimator"):
        identify_targets([[1.0, 2.0]])


def test_identify_targets_with_an_estimator_matches_its_score_matrix():
    model, states, lrs, train, query = _setup(5)
    model.load_state_dict(states[-1])
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(), ckpts, normalize=True, progress=False)
    est.fit(TensorDataset(*train))
    queries = TensorDataset(*query)
    given = identify_targets(est, queries, labels="given", k=2, block_size=3)
    ref = identify_targets(est.score(queries), k=2)
    assert torch.allclose(given.scores, ref.scores)
    for i in range(len(query[0])):
        assert torch.equal(given.attack_set(i), ref.attack_set(i))
    # labels="predicted": the class the model predicts at the last checkpoint
    with torch.no_grad():
        pred = model(query[0]).argmax(1)
    predicted = identify_targets(est, TensorDataset(query[0]), k=2)  # unlabelled candidates
    assert torch.equal(predicted.labels, pred)
    ref = identify_targets(est.score(TensorDataset(query[0], pred)), k=2)
    assert torch.allclose(predicted.scores, ref.scores)
    with pytest.raises(tt.ConfigurationError, match="4 integer classes"):
        identify_targets(est, queries, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(tt.NotFittedError):
        identify_targets(tt.TracIn(model, tt.Classification(), ckpts, progress=False), queries)


# -- a planted backdoor on digits ------------------------------------------------------------------


@pytest.fixture(scope="module")
def backdoor():
    """A 30-image backdoor on the 1,347 training digits, an MLP trained 30 epochs (≈ 2 s)."""
    from traintrace.interfaces.forensics import Trainer, load_digits_split, plant_backdoor

    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    attack = plant_backdoor(x_tr, y_tr, x_te, y_te, 30, np.random.default_rng(0))
    trainer = Trainer(
        attack.x_train, attack.y_train, hidden=32, epochs=30, lr=0.05, n_checkpoints=4
    )
    model, ckpts = trainer.checkpoints(np.arange(len(attack.y_train)), 0)
    with torch.no_grad():
        assert int(model(attack.target_x).argmax()) == attack.adversarial_label  # it worked
    return attack, trainer, model, ckpts, (x_te, y_te)


def _recall_at_cut(est, attack, candidates) -> float:
    report = identify_targets(est, candidates)
    return float(np.isin(report.attack_set(0).numpy(), attack.poison).sum() / len(attack.poison))


@pytest.mark.slow
def test_renormalized_recall_at_least_raw_on_a_planted_backdoor(backdoor):
    attack, _, model, ckpts, (x_te, _) = backdoor
    cand_x = torch.cat([attack.target_x, x_te[:19]])
    candidates = TensorDataset(cand_x)
    train = TensorDataset(attack.x_train, attack.y_train)
    task = tt.Classification()
    raw = tt.TracIn(model, task, ckpts, progress=False).fit(train)
    gas = tt.TracIn(model, task, ckpts, normalize=True, progress=False).fit(train)
    raw_if = tt.InfluenceFunction(
        model, task, ckpts[-1], hessian=tt.EKFAC(), damping=0.01, progress=False
    )
    rif = tt.InfluenceFunction(
        model, task, ckpts[-1], hessian=tt.EKFAC(), damping=0.01, normalize="train", progress=False
    ).fit(train)
    r_raw, r_gas = _recall_at_cut(raw, attack, candidates), _recall_at_cut(gas, attack, candidates)
    r_if, r_rif = (
        _recall_at_cut(raw_if.fit(train), attack, candidates),
        _recall_at_cut(rif, attack, candidates),
    )
    print("recall at the cut: raw, GAS, IF, RIF", r_raw, r_gas, r_if, r_rif)
    assert r_gas >= r_raw and r_rif > r_if, (r_raw, r_gas, r_if, r_rif)
    assert max(r_gas, r_rif) > 0.5, (r_gas, r_rif)


@pytest.mark.slow
@pytest.mark.parametrize("removed", ["planted", "recovered"])
def test_mitigation_restores_the_target_in_the_planted_case(backdoor, removed):
    attack, trainer, model, ckpts, (x_te, y_te) = backdoor
    if removed == "planted":
        suspected = torch.as_tensor(attack.poison)
    else:  # what RIF recovers at the robust cut for the target
        rif = tt.InfluenceFunction(
            model,
            tt.Classification(),
            ckpts[-1],
            hessian=tt.EKFAC(),
            damping=0.01,
            normalize="train",
            progress=False,
        ).fit(TensorDataset(attack.x_train, attack.y_train))
        suspected = identify_targets(rif, TensorDataset(attack.target_x)).attack_set(0)
        assert len(suspected) >= 0.8 * len(attack.poison)
    target = TensorDataset(attack.target_x, torch.tensor([attack.clean_label]))
    result = mitigate(
        trainer,
        suspected,
        target,
        n_train=len(attack.y_train),
        clean_test=TensorDataset(x_te, y_te),
        task=tt.Classification(),
    )
    assert result.attack_effective  # before: the backdoor label
    assert result.before.tolist() == [[attack.adversarial_label]]
    assert result.restored, result.summary()
    assert result.after.tolist() == [[attack.clean_label]]
    assert abs(result.accuracy_change) < 0.05
    assert len(result.removed) == len(suspected)


def _constant_model_train_fn(indices: np.ndarray, seed: int) -> nn.Module:
    """Predicts class (number of training examples) mod 3 for every input."""
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.bias[len(indices) % 3] = 1.0
    return model


def test_mitigate_mechanics_with_a_retrainer(tmp_path):
    target = TensorDataset(torch.zeros(1, 2), torch.tensor([1]))
    clean = TensorDataset(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]))
    engine = tt.Retrainer(
        _constant_model_train_fn,
        lambda m: torch.zeros(1),
        executor=None,
        cache_dir=tmp_path,
        experiment="const",
        progress=False,
    )
    # 9 examples -> class 0 before; removing 2 -> 7 -> class 1 after
    result = mitigate(
        engine,
        [3, 4, 4],
        target,
        n_train=9,
        clean_test=clean,
        task=tt.Classification(),
        seeds=(0, 1),
    )
    assert result.removed.tolist() == [3, 4]
    assert result.before.tolist() == [[0], [0]] and result.after.tolist() == [[1], [1]]
    assert result.restored and result.attack_effective
    assert result.accuracy_before == 0.5 and result.accuracy_after == 0.5
    assert len(list(tmp_path.glob("*.npz"))) == 4  # the Retrainer's cache was used
    with pytest.raises(tt.ConfigurationError, match=r"\[0, 9\)"):
        mitigate(engine, [9], target, n_train=9, clean_test=clean, task=tt.Classification())
    with pytest.raises(tt.ConfigurationError, match="integer training indices"):
        mitigate(engine, [0.5], target, n_train=9, clean_test=clean, task=tt.Classification())
    with pytest.raises(tt.ConfigurationError, match="measure_fn only"):
        mitigate(
            tt.Retrainer(measure_fn=lambda i, s: torch.zeros(1), executor=None),
            [1],
            target,
            n_train=9,
            clean_test=clean,
            task=tt.Classification(),
        )
