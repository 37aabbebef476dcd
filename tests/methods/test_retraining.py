"""Retraining engine, LeaveOneOut and AME against explicit retrains and planted effects.

The reference model is closed-form ridge regression in numpy (deterministic, no training
noise), so a leave-one-out score must equal the explicit difference of two solves exactly.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import traintrace as tt
from traintrace.exceptions import RetrainingError
from traintrace.methods.retraining import (
    AME,
    LeaveOneOut,
    Retrainer,
    query_measurement,
    query_predictions,
)

# -- module-level (picklable) reference problem -------------------------------------------------
_RNG = np.random.default_rng(0)
N_TRAIN, D, LAM = 12, 3, 0.5
X = _RNG.normal(size=(N_TRAIN, D))
Y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * _RNG.normal(size=N_TRAIN)
Y[4] += 3.0  # an outlier that hurts the queries
XQ = _RNG.normal(size=(3, D))
YQ = XQ @ np.array([1.0, -2.0, 0.5])


def ridge_train(indices, seed):
    xs, ys = X[indices], Y[indices]
    return np.linalg.solve(xs.T @ xs + LAM * np.eye(D), xs.T @ ys)


def query_loss(w):
    return (XQ @ w - YQ) ** 2


class CountingRidge:
    """ridge_train that counts its calls and can crash after ``fail_after`` of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, indices, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return ridge_train(indices, seed)


class AdditiveGame:
    """measure_fn: query q's loss on subset S is Σ_{i∈S} beta[q, i] + noise (seeded)."""

    def __init__(self, beta: np.ndarray, noise: float) -> None:
        self.beta = beta
        self.noise = noise

    def __call__(self, indices, seed):
        rng = np.random.default_rng(seed)
        return self.beta[:, indices].sum(axis=1) + self.noise * rng.normal(size=len(self.beta))


def explicit_loo(indices=range(N_TRAIN)):
    full = query_loss(ridge_train(np.arange(N_TRAIN), 0))
    cols = [query_loss(ridge_train(np.delete(np.arange(N_TRAIN), i), 0)) - full for i in indices]
    return np.stack(cols, axis=1)


def engine(train_fn=ridge_train, **kw):
    kw.setdefault("executor", None)
    kw.setdefault("progress", False)
    return Retrainer(train_fn, query_loss, **kw)


# -- LeaveOneOut --------------------------------------------------------------------------------


def test_leave_one_out_equals_explicit_retrains():
    loo = LeaveOneOut(engine(), n_train=N_TRAIN).fit()
    scores = loo.score()
    assert scores.shape == (3, N_TRAIN) and scores.dtype == torch.float64
    np.testing.assert_allclose(scores.numpy(), explicit_loo(), rtol=1e-10, atol=1e-12)
    # the outlier hurts queries 0 and 2 most (query 1 barely depends on it): removing it lowers
    # their loss, so its score is negative and it is their strongest opponent
    assert (scores[[0, 2], 4] < 0).all()
    assert loo.top_k(k=1).opponents.indices[[0, 2], 0].tolist() == [4, 4]


def test_leave_one_out_subset_of_indices_and_fit_with_data():
    train = TensorDataset(torch.as_tensor(X), torch.as_tensor(Y))
    loo = LeaveOneOut(engine(), indices=[7, 2, 4]).fit(train)
    scores = loo.score()
    assert loo.n_train_ == N_TRAIN
    np.testing.assert_allclose(scores[:, [2, 4, 7]].numpy(), explicit_loo([2, 4, 7]), rtol=1e-10)
    others = [i for i in range(N_TRAIN) if i not in (2, 4, 7)]
    assert torch.isnan(scores[:, others]).all()
    top = loo.top_k(k=3)
    assert set(top.proponents.indices[0].tolist()) == {2, 4, 7}  # only scored examples ranked
    assert top.proponents.scores[0, 0] == scores[0, [2, 4, 7]].max()


def test_leave_one_out_seeds_are_averaged_and_paired():
    # the measurement depends on the seed additively: pairing the seeds cancels it exactly
    def noisy(indices, seed):
        return query_loss(ridge_train(indices, seed)) + 10.0 * seed

    loo = LeaveOneOut(
        Retrainer(measure_fn=noisy, executor=None, progress=False), N_TRAIN, seeds=(0, 1, 2)
    ).fit()
    np.testing.assert_allclose(loo.score().numpy(), explicit_loo(), rtol=1e-9, atol=1e-12)


def test_leave_one_out_api_errors():
    loo = LeaveOneOut(engine(), n_train=N_TRAIN)
    with pytest.raises(tt.NotFittedError):
        loo.score()
    with pytest.raises(tt.ConfigurationError, match="n_train"):
        LeaveOneOut(engine()).fit()
    with pytest.raises(tt.ConfigurationError, match="Retrainer"):
        LeaveOneOut(ridge_train, N_TRAIN)  # type: ignore[arg-type]
    with pytest.raises(tt.ConfigurationError, match=r"\[0, 12\)"):
        LeaveOneOut(engine(), N_TRAIN, indices=[3, 12]).fit()
    loo.fit()
    queries = TensorDataset(torch.as_tensor(XQ), torch.as_tensor(YQ))
    with pytest.raises(tt.ConfigurationError, match="fixed by its Retrainer"):
        loo.score(queries)
    with pytest.raises(tt.ConfigurationError, match="training examples themselves"):
        loo.self_influence()


def test_self_influence_when_measuring_the_training_set():
    def train_loss(w):
        return (X @ w - Y) ** 2

    loo = LeaveOneOut(Retrainer(ridge_train, train_loss, executor=None, progress=False), N_TRAIN)
    si = loo.fit().self_influence()
    full = train_loss(ridge_train(np.arange(N_TRAIN), 0))
    expected = [
        train_loss(ridge_train(np.delete(np.arange(N_TRAIN), i), 0))[i] - full[i]
        for i in range(N_TRAIN)
    ]
    np.testing.assert_allclose(si.numpy(), expected, rtol=1e-10)
    assert (si > 0).all()  # every point helps its own fit under ridge
    assert int(si.argmax()) == 4  # the outlier is the most self-influential


# -- AME ----------------------------------------------------------------------------------------


def test_ame_recovers_planted_points_with_signs():
    n = 40
    beta = np.zeros((2, n))
    beta[0, [3, 17, 31]] = [-1.0, 0.8, -0.6]  # query 0: 3 and 31 lower its loss (help)
    beta[1, [5, 9]] = [0.7, -0.9]
    game = Retrainer(measure_fn=AdditiveGame(beta, noise=0.05), executor=None, progress=False)
    ame = AME(game, n, num_subsets=120, seed=1).fit()
    scores = ame.score()
    assert scores.shape == (2, n)
    top0 = set(scores[0].abs().topk(3).indices.tolist())
    top1 = set(scores[1].abs().topk(2).indices.tolist())
    assert top0 == {3, 17, 31} and top1 == {5, 9}
    # score = −AME: a point whose inclusion lowers the loss (beta < 0) helps (score > 0)
    np.testing.assert_array_equal(np.sign(scores[0, [3, 17, 31]].numpy()), [1, -1, 1])
    np.testing.assert_array_equal(np.sign(scores[1, [5, 9]].numpy()), [-1, 1])
    # magnitudes: over subset seeds 0-7 the planted errors stay below 0.19 and the largest
    # unplanted |score| below 0.1 (Lasso shrinkage + noise); planted effects are >= 0.6
    np.testing.assert_allclose(scores[0, [3, 17, 31]], -beta[0, [3, 17, 31]], atol=0.25)
    others = np.setdiff1d(np.arange(n), [3, 17, 31])
    assert scores[0, others].abs().max() < 0.15
    assert ame.top_k(k=2).proponents.indices[0].tolist() == [3, 31]


def test_shapley_variant_equals_beta_on_an_additive_game():
    # For an additive game the Shapley value of i is beta_i exactly. The regression estimate is
    # unbiased with O(1/√M) error (the 1/p weights make it noisy): at M=3000 it is within ~0.03
    # (max error 0.016–0.032 over 5 seeds); 400 subsets would give errors up to 0.14.
    beta = np.array([[0.5, -0.3, 1.0, 0.0, -0.7, 0.2]])
    game = Retrainer(measure_fn=AdditiveGame(beta, noise=0.0), executor=None, progress=False)
    ame = AME(game, 6, num_subsets=3000, shapley=True, lasso_alpha=1e-6, seed=0).fit()
    np.testing.assert_allclose(ame.ame_.numpy(), beta, atol=0.04)
    np.testing.assert_allclose(ame.score().numpy(), -beta, atol=0.04)
    assert ((ame.p_ > 0.05) & (ame.p_ < 0.95)).all() and ame.p_.std() > 0.2
    assert ame.masks_.shape == (3000, 6)


def test_ame_p_distribution_validation():
    game = Retrainer(measure_fn=AdditiveGame(np.ones((1, 4)), 0.0), executor=None, progress=False)
    with pytest.raises(tt.ConfigurationError, match=r"\(0, 1\)"):
        AME(game, 4, num_subsets=10, p_distribution=(0.0, 0.5))
    with pytest.raises(tt.ConfigurationError, match="lasso_alpha"):
        AME(game, 4, num_subsets=10, lasso_alpha=-1.0)
    with pytest.raises(tt.ConfigurationError, match="drew p=1"):
        AME(game, 4, num_subsets=10, p_distribution=lambda rng: 1.0).fit()


# -- the engine: cache, resume, executors, errors -----------------------------------------------


def test_interrupted_evaluation_resumes_without_rerunning_finished_retrains(tmp_path: Path):
    cache = tmp_path / "runs"
    crashing = CountingRidge(fail_after=5)
    with pytest.raises(RetrainingError, match="simulated crash") as info:
        LeaveOneOut(engine(crashing, cache_dir=cache, experiment="ridge"), N_TRAIN).fit()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "seed=0" in str(info.value) and "resume" in str(info.value)
    assert crashing.calls == 5
    assert len(list(cache.glob("*.npz"))) == 5
    assert not list(cache.glob(".tmp-*"))  # atomic writes leave no partial files

    resumed = CountingRidge()
    scores = LeaveOneOut(engine(resumed, cache_dir=cache, experiment="ridge"), N_TRAIN).fit()
    assert resumed.calls == N_TRAIN + 1 - 5  # only the unfinished runs
    np.testing.assert_allclose(scores.score().numpy(), explicit_loo(), rtol=1e-10)

    again = CountingRidge()
    LeaveOneOut(engine(again, cache_dir=cache, experiment="ridge"), N_TRAIN).fit()
    assert again.calls == 0
    other = CountingRidge()  # another experiment name shares nothing
    LeaveOneOut(engine(other, cache_dir=cache, experiment="ridge-v2"), N_TRAIN).fit()
    assert other.calls == N_TRAIN + 1


def test_cache_needs_an_experiment_name(tmp_path: Path):
    with pytest.raises(tt.ConfigurationError, match="experiment="):
        engine(cache_dir=tmp_path)


def test_identical_runs_execute_once():
    counter = CountingRidge()
    out = engine(counter).run([(np.arange(5), 0), (np.arange(5), 0), (np.arange(5), 1)])
    assert counter.calls == 2
    assert out.shape == (3, 3)
    torch.testing.assert_close(out[0], out[1])


def test_process_pool_with_a_module_level_train_function(tmp_path: Path):
    # one spawned worker keeps this cheap (its start-up imports torch); several runs in flight
    # at once are exercised with the thread pool below
    pool_engine = Retrainer(
        ridge_train,
        query_loss,
        max_workers=1,
        progress=False,
        cache_dir=tmp_path,
        experiment="ridge",
    )
    scores = LeaveOneOut(pool_engine, n_train=N_TRAIN, indices=[0, 4, 9]).fit().score()
    np.testing.assert_allclose(scores[:, [0, 4, 9]].numpy(), explicit_loo([0, 4, 9]), rtol=1e-10)
    # the driver cached what the worker computed: an in-process rerun trains nothing
    counter = CountingRidge()
    again = LeaveOneOut(
        engine(counter, cache_dir=tmp_path, experiment="ridge"), N_TRAIN, indices=[0, 4, 9]
    )
    torch.testing.assert_close(again.fit().score(), scores, equal_nan=True)
    assert counter.calls == 0


def test_unpicklable_train_function_with_a_process_pool_is_refused_clearly():
    with pytest.raises(tt.ConfigurationError, match="cannot be pickled") as info:
        Retrainer(lambda idx, seed: ridge_train(idx, seed), query_loss, executor="processes")
    assert "executor=None" in str(info.value) and "module level" in str(info.value)


def test_foreign_executor_accepts_anything_it_can_run():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        eng = Retrainer(
            lambda idx, seed: ridge_train(idx, seed),
            query_loss,
            executor=pool,
            max_in_flight=2,  # 3 runs: the window refills as runs finish
            progress=False,
        )
        scores = LeaveOneOut(eng, N_TRAIN, indices=[1, 4]).fit().score()
    np.testing.assert_allclose(scores[:, [1, 4]].numpy(), explicit_loo([1, 4]), rtol=1e-10)


def test_failed_and_non_finite_runs_are_named(tmp_path: Path):
    def broken(indices, seed):
        raise ValueError("bad batch")

    with pytest.raises(RetrainingError, match=r"seed=3, training on 4 examples \[0, 1, 2, 3\]"):
        engine(broken).run([(np.arange(4), 3)])

    def diverged(indices, seed):
        return np.array([1.0, np.nan, 2.0])

    eng = Retrainer(
        measure_fn=diverged, executor=None, progress=False, cache_dir=tmp_path, experiment="x"
    )
    with pytest.raises(RetrainingError, match="non-finite measurement for 1 of 3 queries"):
        eng.run([(np.arange(4), 0)])
    assert not list(tmp_path.glob("*.npz"))  # nothing cached for it

    def matrix(indices, seed):
        return np.ones((2, 2))

    with pytest.raises(RetrainingError, match=r"shape \[n_query\]"):
        Retrainer(measure_fn=matrix, executor=None, progress=False).run([(np.arange(3), 0)])


def test_higher_is_better_measurements_are_negated():
    def accuracy(indices, seed):
        return np.array([0.25, 0.75])

    eng = Retrainer(measure_fn=accuracy, higher_is_better=True, executor=None, progress=False)
    torch.testing.assert_close(
        eng.run([(np.arange(3), 0)]), torch.tensor([[-0.25, -0.75]], dtype=torch.float64)
    )


def test_retrainer_argument_errors():
    with pytest.raises(tt.ConfigurationError, match="not both"):
        Retrainer(ridge_train, query_loss, measure_fn=ridge_train)
    with pytest.raises(tt.ConfigurationError, match="measure"):
        Retrainer(ridge_train)
    with pytest.raises(tt.ConfigurationError, match="executor"):
        Retrainer(ridge_train, query_loss, executor="threads")  # type: ignore[arg-type]


# -- measurements from a Task -------------------------------------------------------------------


def test_query_measurement_and_predictions_from_a_task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    model.train()
    xq, yq = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    queries = TensorDataset(xq, yq)
    measure = query_measurement(tt.Classification(), queries, batch_size=2)
    got = measure(model)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        logits = model(xq)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, yq, reduction="none"))
    # a margin is higher-is-better: the oriented measurement is its negative
    oriented = query_measurement(tt.Classification("margin"), queries)(model)
    others = logits.masked_fill(torch.nn.functional.one_hot(yq, 3).bool(), float("-inf"))
    margin = logits.gather(1, yq[:, None]).squeeze(1) - torch.logsumexp(others, dim=1)
    torch.testing.assert_close(oriented, -margin)
    torch.testing.assert_close(
        query_predictions(tt.Classification(), queries)(model), logits.argmax(1)
    )
    with pytest.raises(tt.ConfigurationError, match=r"nn\.Module"):
        measure(np.zeros(3))


# -- faults: altered cache files, a killed driver -----------------------------------------------


def _rewrite_cached_measurement(path: Path, measurement: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as f:
        fields = {k: f[k] for k in f.files}
    fields["measurement"] = measurement
    with open(path, "wb") as fh:
        np.savez(fh, **fields)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cached_run_with_non_finite_values_is_refused(tmp_path: Path, bad: float):
    eng = engine(cache_dir=tmp_path, experiment="ridge")
    clean = eng.run([(np.arange(5), 0), (np.arange(6), 0)])
    path = tmp_path / f"{eng._key(np.arange(6), 0)[:40]}.npz"
    good = np.load(path)["measurement"]
    _rewrite_cached_measurement(path, np.array([good[0], bad, good[2]]))
    counter = CountingRidge()
    with pytest.raises(RetrainingError, match="non-finite measurement for 1 of 3") as info:
        engine(counter, cache_dir=tmp_path, experiment="ridge").run([(np.arange(6), 0)])
    assert str(path) in str(info.value) and f"rm '{path}'" in str(info.value)
    assert counter.calls == 0  # refused, not silently retrained or averaged in
    path.unlink()  # what the message says to do
    again = engine(counter, cache_dir=tmp_path, experiment="ridge").run(
        [(np.arange(5), 0), (np.arange(6), 0)]
    )
    assert counter.calls == 1
    torch.testing.assert_close(again, clean, rtol=0, atol=0)


def test_cached_run_of_the_wrong_shape_is_refused(tmp_path: Path):
    eng = engine(cache_dir=tmp_path, experiment="ridge")
    eng.run([(np.arange(5), 0)])
    (path,) = tmp_path.glob("*.npz")
    _rewrite_cached_measurement(path, np.ones((3, 2)))
    with pytest.raises(RetrainingError, match=r"shape \(3, 2\).*Delete it"):
        eng.run([(np.arange(5), 0)])


_DRIVER = """
import os, sys, time
import numpy as np
import traintrace as tt

def train_fn(indices, seed):
    # announce this worker, then train "forever"
    with open(os.path.join(sys.argv[1], f"worker-{os.getpid()}"), "w") as fh:
        fh.write(str(os.getppid()))
    time.sleep(120)
    return np.zeros(1)

def measure(model):
    return model

if __name__ == "__main__":
    engine = tt.Retrainer(train_fn, measure, max_workers=2, threads_per_worker=1, progress=False)
    engine.run([(np.arange(3), s) for s in range(4)])
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killing_the_driver_ends_its_pool_workers(tmp_path: Path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    src = Path(tt.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    env["OMP_NUM_THREADS"] = "1"
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120  # two spawned workers import torch on a busy box
        while len(workers) < 2 and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.1)
            workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert len(workers) == 2, f"workers did not start (driver exit code {driver.poll()})"
        for p in tmp_path.glob("worker-*"):  # the driver is their parent
            assert int(p.read_text() or driver.pid) == driver.pid
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), "pool workers outlived their killed driver"
    finally:
        driver.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class SubmitOnlyExecutor(concurrent.futures.Executor):
    """The shape of the README's Ray adapter: only ``submit``, arguments serialized, bare Futures.

    Runs execute at submission (in this thread), like remote tasks that finished before the
    driver looked at them.
    """

    def __init__(self) -> None:
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        import pickle

        fn, args, kwargs = pickle.loads(pickle.dumps((fn, args, kwargs)))  # sent to a "worker"
        self.submitted += 1
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as exc:
            fut.set_exception(exc)
        return fut


class FailsOnSeed:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, indices, seed):
        if seed == self.seed:
            raise RuntimeError("worker lost")
        return query_loss(ridge_train(indices, seed))


def test_submit_only_executor_and_runs_finished_beside_a_failure_are_cached(tmp_path: Path):
    runs = [(np.arange(N_TRAIN), s) for s in range(6)]
    ex = SubmitOnlyExecutor()
    eng = Retrainer(measure_fn=FailsOnSeed(0), executor=ex, progress=False)
    with pytest.raises(RetrainingError, match=r"seed=0.*worker lost"):
        eng.run(runs)
    # the failed run comes first, but the 5 that had also finished are kept for the resume
    cached = Retrainer(
        measure_fn=FailsOnSeed(0), executor=ex, progress=False, cache_dir=tmp_path, experiment="x"
    )
    with pytest.raises(RetrainingError, match="seed=0"):
        cached.run(runs)
    assert cached.cached(runs) == 5
    resumed = Retrainer(
        measure_fn=FailsOnSeed(-1), executor=ex, progress=False, cache_dir=tmp_path, experiment="x"
    )
    before = ex.submitted
    out = resumed.run(runs)
    assert ex.submitted - before == 1  # only the failed run again
    expected = np.stack([query_loss(ridge_train(np.arange(N_TRAIN), s)) for s in range(6)])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
