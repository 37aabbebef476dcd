"""Retraining on a real Dask cluster: same results as in-process, and resumption after a kill.

One module-scoped ``LocalCluster`` (2 worker processes, 1 thread each) serves every test. The
reference problem is closed-form ridge regression (deterministic), so results from the cluster
must equal the in-process ones bit for bit. Calls are counted through files, because they
happen in other processes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import traintrace as tt
from traintrace.exceptions import RetrainingError

distributed = pytest.importorskip("distributed")

# -- module-level (importable by the workers) reference problem ----------------------------------
_RNG = np.random.default_rng(0)
N_TRAIN, D, LAM = 12, 3, 0.5
X = _RNG.normal(size=(N_TRAIN, D))
Y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * _RNG.normal(size=N_TRAIN)
XQ = _RNG.normal(size=(3, D))
YQ = XQ @ np.array([1.0, -2.0, 0.5])


def ridge_train(indices, seed):
    xs, ys = X[indices], Y[indices]
    return np.linalg.solve(xs.T @ xs + LAM * np.eye(D), xs.T @ ys)


def query_loss(w):
    return (XQ @ w - YQ) ** 2


class FileCountedRidge:
    """``ridge_train`` that leaves one file per call in ``root/calls`` (named by its seed).

    Runs whose seed is in ``slow`` first write ``root/started/<seed>-<pid>`` and then wait
    (at most ``patience`` seconds) for the file ``root/gate``, so the test can kill the worker
    process while they are in flight.
    """

    def __init__(self, root: Path, slow: frozenset[int] = frozenset(), patience: float = 30.0):
        self.root = Path(root)
        self.slow = slow
        self.patience = patience
        for sub in ("calls", "started"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def __call__(self, indices, seed):
        (self.root / "calls" / f"{seed}-{os.getpid()}-{uuid.uuid4().hex}").touch()
        if seed in self.slow:
            (self.root / "started" / f"{seed}-{os.getpid()}").touch()
            deadline = time.monotonic() + self.patience
            while not (self.root / "gate").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return ridge_train(indices, seed)

    def calls(self) -> Counter:
        return Counter(int(p.name.split("-")[0]) for p in (self.root / "calls").iterdir())

    def pids(self) -> set[int]:
        return {int(p.name.split("-")[1]) for p in (self.root / "calls").iterdir()}

    def started(self) -> dict[int, int]:
        """``{seed: worker pid}`` of the slow runs that started."""
        out = {}
        for p in (self.root / "started").iterdir():
            seed, pid = p.name.split("-")
            out[int(seed)] = int(pid)
        return out


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def worker_pids(client) -> set[int]:
    return set(client.run(os.getpid, on_error="ignore").values())


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple]:
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,  # a killed worker is logged loudly; it is the test
        ) as local,
        distributed.Client(local) as client,
    ):
        client.wait_for_workers(2)
        yield local, client


@pytest.fixture
def client(cluster):
    local, client = cluster
    client.wait_for_workers(2, timeout=60)  # a worker killed by a previous test is back
    yield client
    local.scheduler.allowed_failures = 3  # Dask's default, in case a test lowered it


def engine(executor, train_fn=ridge_train, **kw) -> tt.Retrainer:
    return tt.Retrainer(train_fn, query_loss, executor=executor, progress=False, **kw)


# -- the same numbers as in-process ---------------------------------------------------------------


def test_leave_one_out_on_a_dask_cluster_equals_in_process(client, tmp_path: Path):
    here = tt.LeaveOneOut(engine(None), N_TRAIN).fit().score()
    counted = FileCountedRidge(tmp_path)
    there = tt.LeaveOneOut(engine(client.get_executor(), counted), N_TRAIN).fit().score()
    torch.testing.assert_close(there, here, rtol=0, atol=0)
    # and both are the explicit leave-one-out differences
    full = query_loss(ridge_train(np.arange(N_TRAIN), 0))
    explicit = np.stack(
        [query_loss(ridge_train(np.delete(np.arange(N_TRAIN), i), 0)) - full for i in range(12)],
        axis=1,
    )
    np.testing.assert_allclose(there.numpy(), explicit, rtol=1e-12, atol=1e-14)
    # the runs really executed in the workers' processes, not here
    assert counted.calls() == Counter({0: N_TRAIN + 1})
    assert counted.pids() <= worker_pids(client) and os.getpid() not in counted.pids()


def test_lds_on_a_dask_cluster_equals_in_process(client, tmp_path: Path):
    here = tt.evaluate.SubsetMeasurements.compute(engine(None), N_TRAIN, num_subsets=10)
    counted = FileCountedRidge(tmp_path)
    there = tt.evaluate.SubsetMeasurements.compute(
        engine(client.get_executor(), counted, max_in_flight=3), N_TRAIN, num_subsets=10
    )
    np.testing.assert_array_equal(there.measurements, here.measurements)
    np.testing.assert_array_equal(there.subsets, here.subsets)
    assert sum(counted.calls().values()) == 10  # one retrain per subset
    scores = tt.LeaveOneOut(engine(None), N_TRAIN).fit().score()
    assert there.lds(scores).score == here.lds(scores).score > 0.5


# -- a worker killed mid-run ----------------------------------------------------------------------


def _run_in_background(eng: tt.Retrainer, runs) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut = pool.submit(eng.run, runs)
    pool.shutdown(wait=False)
    return fut


def test_worker_killed_mid_run_is_retried_by_dask(client, tmp_path: Path):
    # Dask's default: a task whose worker died is rescheduled (allowed-failures=3)
    runs = [(np.arange(N_TRAIN - 1), s) for s in range(6)]
    counted = FileCountedRidge(tmp_path / "work", slow=frozenset({0, 1}))
    cache = tmp_path / "cache"
    eng = engine(client.get_executor(), counted, cache_dir=cache, experiment="ridge")
    running = _run_in_background(eng, runs)
    wait_until(lambda: len(counted.started()) == 2, "both workers to start a slow run")
    victim_seed, victim = sorted(counted.started().items())[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in worker_pids(client), "the killed worker to be gone")
    (tmp_path / "work" / "gate").touch()
    out = running.result(timeout=60)
    torch.testing.assert_close(out, engine(None).run(runs), rtol=0, atol=0)
    calls = counted.calls()
    # the killed run executed again; every other run once
    assert calls == Counter({s: 1 + (s == victim_seed) for s in range(6)})
    assert len(list(cache.glob("*.npz"))) == 6
    # everything is cached now: a second call retrains nothing
    engine(client.get_executor(), counted, cache_dir=cache, experiment="ridge").run(runs)
    assert counted.calls() == calls


def test_resume_after_a_killed_worker_recomputes_only_unfinished_runs(
    cluster, client, tmp_path: Path
):
    local, _ = cluster
    local.scheduler.allowed_failures = 0  # a worker death fails the run at once (KilledWorker)
    runs = [(np.arange(N_TRAIN - 1), s) for s in range(6)]
    counted = FileCountedRidge(tmp_path / "work", slow=frozenset({4, 5}))
    cache = tmp_path / "cache"
    eng = engine(client.get_executor(), counted, cache_dir=cache, experiment="ridge")
    running = _run_in_background(eng, runs)
    wait_until(lambda: len(counted.started()) == 2, "both slow runs to start")
    wait_until(lambda: len(list(cache.glob("*.npz"))) == 4, "the fast runs to be cached")
    victim_seed, victim = sorted(counted.started().items())[0]
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(RetrainingError, match=f"seed={victim_seed}.*KilledWorker") as info:
        running.result(timeout=60)
    assert "resume" in str(info.value) and str(cache) in str(info.value)
    (tmp_path / "work" / "gate").touch()  # lets the other slow run (cancelled) end
    assert counted.calls() == Counter(dict.fromkeys(range(6), 1))
    assert len(list(cache.glob("*.npz"))) == 4  # the finished runs, not the failed one

    local.scheduler.allowed_failures = 3
    client.wait_for_workers(2, timeout=60)
    resumed = engine(client.get_executor(), counted, cache_dir=cache, experiment="ridge")
    out = resumed.run(runs)
    torch.testing.assert_close(out, engine(None).run(runs), rtol=0, atol=0)
    # only the two unfinished runs were computed again
    assert counted.calls() == Counter({0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2})
