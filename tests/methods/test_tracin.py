"""TracIn against a brute-force loop of per-example ``autograd.grad`` calls, plus metamorphic checks.

Expected values come from ``reference.brute_tracin``: the checkpoint loaded into a copy of the
model, one gradient per example, explicit dot products summed over checkpoints with their lrs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    CNN,
    MLP,
    DictDataset,
    KwargModel,
    brute_tracin,
    ce,
    neg_margin,
    perturbed_states,
)
from torch.utils.data import DataLoader, TensorDataset

import traintrace as tt

RTOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Relative to the largest magnitude (scores near zero have no meaningful relative error)."""
    scale = expected.abs().max()
    assert scale > 0
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.2e} > {rtol}"


def _mlp_setup(n_train=13, n_query=5, seed=0):
    torch.manual_seed(seed)
    model = MLP().double()
    model.train()  # TracIn must switch to eval mode itself (BatchNorm running stats, no dropout)
    states = perturbed_states(model, 3, seed=seed)
    for st in states:  # non-trivial running statistics
        st["bn.running_mean"].normal_()
        st["bn.running_var"].uniform_(0.5, 2.0)
    lrs = [0.3, 0.1, 0.05]
    xt, yt = torch.randn(n_train, 5, dtype=torch.float64), torch.randint(0, 3, (n_train,))
    xq, yq = torch.randn(n_query, 5, dtype=torch.float64), torch.randint(0, 3, (n_query,))
    return model, states, lrs, (xt, yt), (xq, yq)


def _cnn_setup(seed=1):
    torch.manual_seed(seed)
    model = CNN().double()
    states = perturbed_states(model, 2, seed=seed)
    lrs = [0.2, 0.02]
    xt, yt = torch.randn(11, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (11,))
    xq, yq = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    return model, states, lrs, (xt, yt), (xq, yq)


@pytest.mark.parametrize("setup", [_mlp_setup, _cnn_setup], ids=["mlp", "cnn"])
@pytest.mark.parametrize("measurement", ["loss", "margin"])
def test_tracin_equals_brute_force(setup, measurement):
    model, states, lrs, (xt, yt), (xq, yq) = setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(measurement), ckpts, batch_size=4, progress=False)
    est.fit(TensorDataset(xt, yt))
    scores = est.score(TensorDataset(xq, yq))
    query_fn = ce if measurement == "loss" else neg_margin
    expected = brute_tracin(
        model,
        states,
        lrs,
        list(zip(xt, yt, strict=True)),
        list(zip(xq, yq, strict=True)),
        ce,
        query_fn,
    )
    assert scores.shape == (len(xq), len(xt))
    assert_rel_close(scores, expected)
    assert model.training, "the user's model mode must be restored"


def test_tracin_float32_matches_float64_reference():
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    expected = brute_tracin(
        model, states, lrs, list(zip(xt, yt, strict=True)), list(zip(xq, yq, strict=True)), ce, ce
    )
    model32 = model.float()
    est = tt.TracIn(model32, tt.Classification(), ckpts, batch_size=5, progress=False)
    est.fit(TensorDataset(xt.float(), yt))
    assert_rel_close(est.score(TensorDataset(xq.float(), yq)).double(), expected, rtol=1e-5)


def test_dict_batches_with_keyword_model():
    torch.manual_seed(2)
    model = KwargModel().double()
    states = perturbed_states(model, 2, seed=2)
    lrs = [0.5, 0.25]
    x, s, y = (
        torch.randn(9, 4, dtype=torch.float64),
        torch.rand(9, dtype=torch.float64),
        torch.randint(0, 3, (9,)),
    )
    data = DictDataset(x, s, y)
    ckpts = [tt.Checkpoint(st, lr=lr) for st, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(), ckpts, batch_size=4, progress=False).fit(data)
    scores = est.score(DataLoader(data, batch_size=3))

    def fn(m, ex):
        xi, si, yi = ex
        return F.cross_entropy(m(pixel_values=xi[None], scale=si[None]), yi[None])

    ex = list(zip(x, s, y, strict=True))
    assert_rel_close(scores, brute_tracin(model, states, lrs, ex, ex, fn, fn))


def test_unlabeled_queries_use_predicted_class_margin():
    model, states, lrs, (xt, yt), (xq, _) = _mlp_setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification("margin"), ckpts, progress=False).fit(
        TensorDataset(xt, yt)
    )
    scores = est.score(
        TensorDataset(xq)
    )  # no labels: margin of the predicted class at each checkpoint
    expected = torch.zeros_like(scores)
    for st, lr in zip(states, lrs, strict=True):
        m = MLP().double()
        m.load_state_dict(st)
        m.eval()
        pred = m(xq).argmax(1)
        expected += brute_tracin(
            model,
            [st],
            [lr],
            list(zip(xt, yt, strict=True)),
            list(zip(xq, pred, strict=True)),
            ce,
            neg_margin,
        )
    assert_rel_close(scores, expected)


def test_layers_subset_equals_brute_force_on_those_parameters():
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(), ckpts, layers="last", progress=False)
    assert est.parameter_names == ["fc2.weight", "fc2.bias"]
    est.fit(TensorDataset(xt, yt))
    expected = brute_tracin(
        model,
        states,
        lrs,
        list(zip(xt, yt, strict=True)),
        list(zip(xq, yq, strict=True)),
        ce,
        ce,
        names={"fc2.weight", "fc2.bias"},
    )
    assert_rel_close(est.score(TensorDataset(xq, yq)), expected)
    est_named = tt.TracIn(
        model, tt.Classification(), ckpts, layers=["fc1", "fc2.bias"], progress=False
    )
    assert est_named.parameter_names == ["fc1.weight", "fc1.bias", "fc2.bias"]


def test_cosine_variant_equals_brute_force():
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(), ckpts, normalize=True, progress=False)
    est.fit(TensorDataset(xt, yt))
    expected = brute_tracin(
        model,
        states,
        lrs,
        list(zip(xt, yt, strict=True)),
        list(zip(xq, yq, strict=True)),
        ce,
        ce,
        cosine=True,
    )
    assert_rel_close(est.score(TensorDataset(xq, yq)), expected)
    with pytest.raises(tt.ConfigurationError, match="ranks nothing"):
        est.self_influence()  # a cosine with itself is 1: it ranks nothing


def test_self_influence_is_the_diagonal_of_train_scores():
    model, states, lrs, (xt, yt), _ = _mlp_setup(n_train=17)
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    train = TensorDataset(xt, yt)
    est = tt.TracIn(model, tt.Classification(), ckpts, batch_size=5, progress=False).fit(train)
    torch.testing.assert_close(
        est.self_influence(), est.score(train).diagonal(), rtol=1e-10, atol=0
    )
    assert (est.self_influence() > 0).all()


def test_top_k_agrees_with_score():
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup(n_train=20, n_query=7)
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Classification(), ckpts, batch_size=3, progress=False).fit(
        TensorDataset(xt, yt)
    )
    scores = est.score(TensorDataset(xq, yq))
    top = est.top_k(TensorDataset(xq, yq), k=4)
    assert top.proponents.indices.shape == (7, 4) and top.opponents.scores.shape == (7, 4)
    sorted_desc = scores.sort(dim=1, descending=True)
    torch.testing.assert_close(top.proponents.scores, sorted_desc.values[:, :4])
    torch.testing.assert_close(top.opponents.scores, scores.sort(dim=1).values[:, :4])
    torch.testing.assert_close(scores.gather(1, top.proponents.indices), top.proponents.scores)
    torch.testing.assert_close(scores.gather(1, top.opponents.indices), top.opponents.scores)
    assert (top.opponents.scores[:, 0] <= top.proponents.scores[:, -1]).all()


def test_batch_size_invariance():
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup(n_train=23, n_query=6)
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    results = []
    for bs in (1, 4, 23):
        est = tt.TracIn(model, tt.Classification(), ckpts, batch_size=bs, progress=False)
        est.fit(TensorDataset(xt, yt))
        results.append((est.score(TensorDataset(xq, yq)), est.self_influence()))
    for scores, self_inf in results[1:]:
        torch.testing.assert_close(scores, results[0][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(self_inf, results[0][1], rtol=1e-12, atol=1e-12)


def test_checkpoints_from_files_and_learning_rate_from_optimizer(tmp_path):
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup()
    paths = []
    for i, (st, lr) in enumerate(zip(states, lrs, strict=True)):
        opt = torch.optim.SGD(MLP().parameters(), lr=lr)
        path = tmp_path / f"ep{i}.pt"
        torch.save({"model_state_dict": st, "optimizer_state_dict": opt.state_dict()}, path)
        paths.append(path)
    ckpts = [tt.Checkpoint(p) for p in paths]
    assert [c.learning_rate for c in ckpts] == lrs
    est = tt.TracIn(model, tt.Classification(), ckpts, progress=False).fit(TensorDataset(xt, yt))
    expected = brute_tracin(
        model, states, lrs, list(zip(xt, yt, strict=True)), list(zip(xq, yq, strict=True)), ce, ce
    )
    assert_rel_close(est.score(TensorDataset(xq, yq)), expected)


def test_regression_task_equals_brute_force():
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    states = perturbed_states(model, 2, seed=3)
    lrs = [0.1, 0.1]
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    est = tt.TracIn(model, tt.Regression(), ckpts, progress=False).fit(TensorDataset(x, y))

    def mse(m, ex):
        return F.mse_loss(m(ex[0][None]), ex[1][None])

    ex = list(zip(x, y, strict=True))
    assert_rel_close(
        est.score(TensorDataset(x, y)), brute_tracin(model, states, lrs, ex, ex, mse, mse)
    )


# -- misuse -----------------------------------------------------------------------------------


def test_scoring_before_fit_raises_not_fitted():
    model, states, _lrs, _, (xq, yq) = _mlp_setup()
    est = tt.TracIn(model, tt.Classification(), [tt.Checkpoint(states[0], lr=0.1)], progress=False)
    for call in (
        lambda: est.score(TensorDataset(xq, yq)),
        lambda: est.top_k(TensorDataset(xq, yq), 2),
        est.self_influence,
    ):
        with pytest.raises(tt.NotFittedError, match=r"call \.fit\(train\)"):
            call()


def test_mismatched_checkpoint_lists_keys_and_says_what_to_do():
    model, states, *_ = _mlp_setup()
    bad = dict(states[0])
    bad.pop("fc1.bias")
    bad["extra.weight"] = torch.zeros(2)
    bad["fc2.weight"] = torch.zeros(9, 9)
    with pytest.raises(tt.CheckpointMismatchError) as err:
        tt.TracIn(model, tt.Classification(), [tt.Checkpoint(bad, lr=0.1)], progress=False).fit(
            TensorDataset(torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
        )
    msg = str(err.value)
    assert "missing keys [fc1.bias]" in msg
    assert "unexpected keys [extra.weight]" in msg
    assert "fc2.weight: checkpoint (9, 9) vs model (3, 7)" in msg
    assert "same layer sizes" in msg


def test_unreadable_batch_raises_batch_format_error():
    model, states, *_ = _mlp_setup()
    est = tt.TracIn(model, tt.Classification(), [tt.Checkpoint(states[0], lr=0.1)], progress=False)

    class Strings(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return "not a tensor"

    with pytest.raises(tt.BatchFormatError, match="tuple/list"):
        est.fit(Strings())
    with pytest.raises(tt.BatchFormatError, match="needs labels"):
        est.fit(TensorDataset(torch.randn(3, 5, dtype=torch.float64)))
    with pytest.raises(tt.BatchFormatError, match="could not be called"):
        est.fit(
            TensorDataset(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.long))
        )


def test_non_finite_gradients_name_the_examples():
    model, states, _lrs, (xt, yt), _ = _mlp_setup()
    xt = xt.clone()
    xt[6, 2] = float("nan")
    est = tt.TracIn(
        model, tt.Classification(), [tt.Checkpoint(states[0], lr=0.1)], batch_size=4, progress=False
    )
    # fit only fingerprints the data (and checks the first batch); the first streamed pass
    # captures every example and names the bad one
    with pytest.raises(tt.NonFiniteGradientError, match=r"examples \[6\].*Check those inputs"):
        est.fit(TensorDataset(xt, yt)).score(TensorDataset(xt[:2], yt[:2]))
    with pytest.raises(tt.NonFiniteGradientError, match=r"examples \[6\].*Check those inputs"):
        est.fit(TensorDataset(xt, yt)).self_influence()


def test_shuffled_loader_and_bad_arguments_are_refused():
    model, states, _lrs, (xt, yt), _ = _mlp_setup()
    est = tt.TracIn(model, tt.Classification(), [tt.Checkpoint(states[0], lr=0.1)], progress=False)
    with pytest.raises(tt.DataOrderError, match="shuffle=False"):
        est.fit(DataLoader(TensorDataset(xt, yt), shuffle=True))
    with pytest.raises(tt.ConfigurationError, match="at least one"):
        tt.TracIn(model, tt.Classification(), [])
    with pytest.raises(tt.ConfigurationError, match="no learning rate"):
        tt.TracIn(model, tt.Classification(), [tt.Checkpoint(states[0])])
    with pytest.raises(tt.ConfigurationError, match="selects no trainable parameter"):
        tt.TracIn(model, tt.Classification(), [tt.Checkpoint(states[0], lr=1.0)], layers=["nope"])
    est.fit(TensorDataset(xt, yt))
    with pytest.raises(tt.ConfigurationError, match="larger than the training set"):
        est.top_k(TensorDataset(xt, yt), k=100)


def test_feature_memory_limit_is_checked_before_work(tmp_path):
    model, states, _lrs, (xt, yt), _ = _mlp_setup()
    est = tt.TracIn(
        model,
        tt.Classification(),
        [tt.Checkpoint(states[0], lr=0.1)],
        store=tmp_path / "store",  # exact features on disk (the streaming path stores nothing)
        max_disk_gib=1e-9,
        progress=False,
    )
    with pytest.raises(tt.FeatureMemoryError, match="layers='last'"):
        est.fit(TensorDataset(xt, yt))


def test_refitting_a_store_after_relabelling_is_refused(tmp_path):
    """The "fix the flagged labels and refit" workflow must not reuse the old data's features."""
    model, states, _lrs, (xt, yt), _ = _mlp_setup()
    ckpts = [tt.Checkpoint(states[0], lr=0.1)]
    store = tmp_path / "store"
    tt.TracIn(model, tt.Classification(), ckpts, store=store, chunk_size=4, progress=False).fit(
        TensorDataset(xt, yt)
    )
    relabelled = yt.clone()
    relabelled[[1, 5, 9]] = (relabelled[[1, 5, 9]] + 1) % 3
    again = tt.TracIn(model, tt.Classification(), ckpts, store=store, chunk_size=4, progress=False)
    with pytest.raises(tt.StoreMismatchError, match="overwrite_store=True"):
        again.fit(TensorDataset(xt, relabelled))
    # the same data resumes (nothing to recompute) and gives the same scores
    same = tt.TracIn(model, tt.Classification(), ckpts, store=store, chunk_size=4, progress=False)
    same.fit(TensorDataset(xt, yt))
    assert same.store_.chunk_data_hash(0, 0) is not None


def test_bad_labels_and_overflow_are_named_errors_with_the_example():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    ckpts = [tt.Checkpoint(model.state_dict(), lr=0.1)]
    bad = y.clone()
    bad[13] = 7
    est = tt.TracIn(model, tt.Classification(), ckpts, batch_size=8, progress=False)
    queries = TensorDataset(x[:2], y[:2])
    with pytest.raises(tt.LabelError, match=r"\[13\]"):  # its data-set index, not its position
        est.fit(TensorDataset(x, bad)).score(queries)
    huge = x.clone()
    huge[5] *= 1e25  # finite inputs whose squared gradient norm overflows float32
    with pytest.raises(tt.NonFiniteGradientError, match=r"examples near \[5\].*float64"):
        est.fit(TensorDataset(huge, y)).self_influence()
    with pytest.raises(tt.NonFiniteGradientError, match=r"\[5\]"):
        est.fit(TensorDataset(huge, y)).score(queries)


def test_a_fitted_store_reopens_without_the_training_data(tmp_path):
    model, states, lrs, (xt, yt), (xq, yq) = _mlp_setup()
    ckpts = [tt.Checkpoint(s, lr=lr) for s, lr in zip(states, lrs, strict=True)]
    store = tmp_path / "store"

    def make(checkpoints):
        return tt.TracIn(
            model, tt.Classification(), checkpoints, projection=16, store=store, progress=False
        )

    first = make(ckpts).fit(TensorDataset(xt, yt))
    again = make(ckpts).fit()  # as a new process would: no data, nothing recomputed
    assert again.n_train_ == len(xt)
    torch.testing.assert_close(
        again.score(TensorDataset(xq, yq)), first.score(TensorDataset(xq, yq))
    )
    torch.testing.assert_close(again.self_influence(), first.self_influence())
    with pytest.raises(tt.StoreMismatchError):
        make(ckpts[:1]).fit()  # other checkpoints: refused, both values shown
    with pytest.raises(tt.ConfigurationError, match="needs the training data"):
        tt.TracIn(model, tt.Classification(), ckpts, progress=False).fit()
