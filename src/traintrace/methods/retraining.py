"""Retraining-based attribution: the retraining engine, leave-one-out and AME (Shapley).

These estimators need no gradients: they call the user's training function many times on
chosen subsets of the training set and watch how a measurement of the queries changes. They
are the ground truth the gradient-based estimators are judged against (LOO correlation, LDS),
and a data-valuation method in their own right (AME / Shapley values).

The pieces:

* :class:`Retrainer` — the engine. It holds the user's ``train_fn(indices, seed) -> model``
  and ``measure(model) -> Tensor[n_query]`` (or one ``measure_fn(indices, seed)`` doing both),
  runs retrains through any :class:`concurrent.futures.Executor` and caches each run's
  measurement on disk so an interrupted evaluation resumes where it stopped.
* :func:`query_measurement` / :func:`query_predictions` — build ``measure`` from a
  :class:`~traintrace.Task` and query data.
* :class:`LeaveOneOut` and :class:`AME` — estimators with the usual ``fit`` / ``score`` /
  ``top_k`` shape. Their queries are fixed by the Retrainer's ``measure`` (the measurement
  is computed inside each retrain), so ``score()`` takes no query argument.

**Orientation of measurements.** The engine works with *oriented* measurements, lower is
better (a loss): :func:`query_measurement` returns the task's
:meth:`~traintrace.Task.oriented_measurement`; for a custom ``measure`` where higher is better
(accuracy, a margin) pass ``higher_is_better=True`` and the engine negates it.

**Sign of scores:** positive = the training example *helps* the query, i.e. training without
it raises the query's oriented measurement (its loss). Orientation ``[n_query, n_train]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import pickle
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from traintrace.data import as_loader, dataset_length, iterate_batches
from traintrace.exceptions import ConfigurationError, RetrainingError
from traintrace.methods.base import Data, Estimator
from traintrace.retrieval.topk import Ranking, TopK, top_k_from_blocks
from traintrace.task import Task

__all__ = [
    "AME",
    "LeaveOneOut",
    "Retrainer",
    "query_measurement",
    "query_predictions",
]

#: ``train_fn(indices, seed) -> model``; indices is a 1-D int64 numpy array.
TrainFn = Callable[[np.ndarray, int], Any]
#: ``measure(model) -> [n_query]`` (tensor, array or sequence of floats).
MeasureFn = Callable[[Any], Any]


# -- measurements built from a Task ------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _QueryFunction:
    """Picklable ``model -> Tensor[n_query]``: a task's measurement or predicted class."""

    def __init__(
        self, task: Task, queries: Data, batch_size: int, what: Literal["measurement", "prediction"]
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(f"task must be a traintrace Task, got {task!r}")
        as_loader(queries, batch_size)  # validate the data now, not in a worker
        self.task = task
        self.queries = queries
        self.batch_size = batch_size
        self.what = what

    def __repr__(self) -> str:
        n = dataset_length(as_loader(self.queries, self.batch_size))
        return f"query_{self.what}({self.task!r}, {n} queries)"

    def __call__(self, model: nn.Module) -> Tensor:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                f"train_fn returned {type(model).__name__}, not a torch nn.Module; "
                f"query_{self.what} needs a module (or write your own measure(model))"
            )
        loader = as_loader(self.queries, self.batch_size)
        was_training = model.training
        model.eval()
        values = []
        try:
            with torch.no_grad():
                for _, batch in iterate_batches(loader, _device_of(model)):
                    outputs = self.task.forward(model, batch)
                    if self.what == "measurement":
                        v = self.task.oriented_measurement(outputs, batch)
                    elif outputs.ndim == 1 or (outputs.ndim == 2 and outputs.shape[1] == 1):
                        v = (outputs.reshape(-1) > 0).long()  # one logit: binary classifier
                    else:
                        v = outputs.reshape(outputs.shape[0], -1).argmax(dim=-1)
                    values.append(v.detach().reshape(-1).cpu())
        finally:
            model.train(was_training)
        return torch.cat(values) if values else torch.empty(0)


def query_measurement(task: Task, queries: Data, *, batch_size: int = 256) -> MeasureFn:
    """``measure(model) -> Tensor[n_query]``: each query's oriented measurement (lower is better).

    Runs ``task.oriented_measurement(task.forward(model, batch), batch)`` over ``queries`` in
    eval mode without gradients, on the model's device, and restores the model's train/eval
    mode. The result is picklable when ``task`` and ``queries`` are (a ``TensorDataset`` is),
    so it can be sent to worker processes. Use it as the ``measure`` of a :class:`Retrainer`.
    """
    return _QueryFunction(task, queries, batch_size, "measurement")


def query_predictions(task: Task, queries: Data, *, batch_size: int = 256) -> MeasureFn:
    """``predict(model) -> Tensor[n_query]``: each query's predicted class (for brittleness).

    The argmax of the model's logits ``[batch, classes]`` (``logit > 0`` for a single binary
    logit), computed like :func:`query_measurement`.
    """
    return _QueryFunction(task, queries, batch_size, "prediction")


# -- what runs in the workers -----------------------------------------------------------------


def _as_vector(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ConfigurationError(
            f"the measurement must be one value per query, shape [n_query] (or a scalar), got "
            f"shape {arr.shape}"
        )
    return arr


class _Job:
    """``(indices, seed) -> measurement vector``: what one retraining run computes."""

    def __init__(
        self, train_fn: TrainFn | None, measure: MeasureFn | None, measure_fn: TrainFn | None
    ) -> None:
        self.train_fn = train_fn
        self.measure = measure
        self.measure_fn = measure_fn

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        if self.measure_fn is not None:
            return _as_vector(self.measure_fn(indices, seed))
        model = self.train_fn(indices, seed)  # type: ignore[misc]
        return _as_vector(self.measure(model))  # type: ignore[misc]


_WORKER_JOB: _Job | None = None

#: seconds between two checks of a pool worker that its driver is still alive
_PARENT_POLL_S = 0.5


def _watch_parent(driver_pid: int, interval: float) -> None:
    """Exit this worker process as soon as its driver is gone (kill -9 of the driver).

    A killed driver cannot shut its pool down, and an orphaned pool worker otherwise blocks on
    its task queue (or keeps training) forever. The driver is the worker's parent, so when it
    dies the worker is re-parented (``os.getppid()`` changes) and it exits at once without
    running cleanup, like a killed process.
    """
    import time

    while os.getppid() == driver_pid:
        time.sleep(interval)
    os._exit(1)


def _init_worker(job: _Job, threads: int | None, driver_pid: int | None = None) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job
    if threads:
        torch.set_num_threads(threads)
    if driver_pid is not None:
        import threading

        threading.Thread(
            target=_watch_parent,
            args=(driver_pid, _PARENT_POLL_S),
            name="traintrace-watch-driver",
            daemon=True,
        ).start()


def _run_installed(indices: np.ndarray, seed: int) -> np.ndarray:
    return _WORKER_JOB(indices, seed)  # type: ignore[misc]


def _run_job(job: _Job, indices: np.ndarray, seed: int) -> np.ndarray:
    return job(indices, seed)


def _is_dask_executor(executor: Any) -> bool:
    """Whether ``executor`` is ``dask.distributed``'s ``Client.get_executor()`` (not imported)."""
    cls = type(executor)
    return cls.__name__ == "ClientExecutor" and cls.__module__.startswith("distributed")


# -- the engine ---------------------------------------------------------------------------------


def _as_indices(indices: Any) -> np.ndarray:
    if isinstance(indices, Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigurationError(
            f"run indices must be a 1-D integer array of training-example positions, got "
            f"dtype {arr.dtype} and shape {arr.shape}"
        )
    return arr.astype(np.int64, copy=False)


def _preview(idx: np.ndarray) -> str:
    if len(idx) <= 6:
        return f"[{', '.join(map(str, idx.tolist()))}]"
    head = ", ".join(map(str, idx[:3].tolist()))
    tail = ", ".join(map(str, idx[-2:].tolist()))
    return f"[{head}, ..., {tail}]"


class _LazyRuns(Sequence):
    """A sequence of ``(indices, seed)`` made on demand (LOO runs would otherwise need O(n²))."""

    def __init__(self, length: int, make: Callable[[int], tuple[np.ndarray, int]]) -> None:
        self._length = length
        self._make = make

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        if not 0 <= i < self._length:
            raise IndexError(i)
        return self._make(i)


class Retrainer:
    """The retraining engine: run ``train_fn`` on many subsets, cache and return measurements.

    One *run* is a pair ``(indices, seed)``: train on the training examples at ``indices``
    (a 1-D ``int64`` numpy array, sorted ascending when traintrace makes it) with random seed
    ``seed``, then measure the queries. :meth:`run` returns ``[n_runs, n_query]``.

    Args:
        train_fn: ``train_fn(indices, seed) -> model``. Training is entirely the user's:
            optimizer, epochs, warm start from a saved full-data model (sensible for convex
            models and for LOO, where a cold start's noise can swamp the effect of one example).
            Index your own data with ``indices`` (``torch.utils.data.Subset(train, indices)``).
        measure: ``measure(model) -> Tensor[n_query]`` — typically
            :func:`query_measurement` ``(task, queries)``; also a numpy array or a list. It must
            measure the same queries in the same order every time.
        measure_fn: instead of ``train_fn`` and ``measure``: ``measure_fn(indices, seed) ->
            Tensor[n_query]`` doing both (handy when the model never needs to leave the worker,
            or for synthetic games in tests).
        higher_is_better: the measurement is score-like (accuracy, margin); the engine then
            negates it, so everything downstream is oriented "lower is better".
        executor: where runs execute. ``"processes"`` (default): a local
            :class:`~concurrent.futures.ProcessPoolExecutor` with the *spawn* start method,
            created per :meth:`run` call; ``train_fn`` and ``measure`` are sent once per worker
            and must be picklable (module-level functions, or callable objects of module-level
            classes). Its workers watch the driver and exit within a second when it is
            killed. ``None``: sequentially in this process (debugging, tests, lambdas). Or any
            :class:`concurrent.futures.Executor` you own (it is not shut down), e.g. Dask or
            Ray — see below.
        max_workers: processes of the default pool (default ``min(4, cpu_count)``).
        threads_per_worker: ``torch.set_num_threads`` in each worker of the default pool
            (default ``max(1, cpu_count // max_workers)``), so workers do not oversubscribe.
        max_in_flight: at most this many runs submitted and unfinished at once (default twice
            the workers; 64 for a foreign executor), which bounds memory for long run lists.
        cache_dir: a directory for one small ``.npz`` file per finished run (the raw
            measurement, the indices, the seed and the experiment), written atomically, keyed
            by ``sha256(experiment, seed, indices)``. A later call with the same runs loads
            them instead of retraining, so an interrupted evaluation resumes. ``None``: no cache.
        experiment: the name of what is being trained and measured; required with
            ``cache_dir``. **Change it whenever train_fn, the training data, the model or the
            queries change** — the cache cannot see inside your functions, and an unchanged name
            would serve stale measurements.
        progress: tqdm progress bar.

    Using a cluster::

        # Dask: its executor serializes with cloudpickle, so lambdas and closures work too
        from distributed import Client
        client = Client("scheduler:8786")
        engine = tt.Retrainer(train_fn, measure, executor=client.get_executor())

        # Ray: Ray object refs convert to concurrent.futures.Future
        import concurrent.futures, ray
        class RayExecutor(concurrent.futures.Executor):
            def __init__(self, **options):   # e.g. num_gpus=1 per run
                self.options = options
            def submit(self, fn, /, *args, **kwargs):
                remote = ray.remote(**self.options)(fn) if self.options else ray.remote(fn)
                return remote.remote(*args, **kwargs).future()
        engine = tt.Retrainer(train_fn, measure, executor=RayExecutor(num_gpus=1))

    Only ``submit`` and the returned futures (``result``, ``cancel``, ``wait``) are used. Dask
    tasks are submitted with ``pure=False``, so a call that resumes after a failure retrains
    instead of being handed the scheduler's remembered failed task. A run whose Dask worker
    dies is rescheduled by Dask (up to its ``allowed-failures``).

    The cache is written by this (the driver) process, so ``cache_dir`` is a local path even
    when runs execute elsewhere. When a run fails, the runs that finished beside it are cached
    before the error is raised, and calling :meth:`run` again retrains only the missing ones.

    Cost: one call of ``train_fn`` + ``measure`` per distinct run not yet cached; memory
    ``n_runs × n_query`` for the result plus ``max_in_flight`` index arrays.
    """

    def __init__(
        self,
        train_fn: TrainFn | None = None,
        measure: MeasureFn | None = None,
        *,
        measure_fn: TrainFn | None = None,
        higher_is_better: bool = False,
        executor: Executor | Literal["processes"] | None = "processes",
        max_workers: int | None = None,
        threads_per_worker: int | None = None,
        max_in_flight: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        experiment: str | None = None,
        progress: bool = True,
    ) -> None:
        if measure_fn is not None:
            if train_fn is not None or measure is not None:
                raise ConfigurationError(
                    "give either train_fn and measure, or measure_fn alone, not both"
                )
            if not callable(measure_fn):
                raise ConfigurationError(f"measure_fn must be callable, got {measure_fn!r}")
        else:
            if train_fn is None or measure is None:
                raise ConfigurationError(
                    "Retrainer needs train_fn(indices, seed) -> model and measure(model) -> "
                    "Tensor[n_query] (e.g. tt.query_measurement(task, queries)), or "
                    "measure_fn(indices, seed) -> Tensor[n_query]"
                )
            for name, fn in (("train_fn", train_fn), ("measure", measure)):
                if not callable(fn):
                    raise ConfigurationError(f"{name} must be callable, got {fn!r}")
        if not (executor is None or executor == "processes" or isinstance(executor, Executor)):
            raise ConfigurationError(
                "executor must be 'processes' (a local process pool), None (run in this "
                f"process) or a concurrent.futures.Executor, got {executor!r}"
            )
        cpus = os.cpu_count() or 1
        if max_workers is None:
            max_workers = min(4, cpus)
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigurationError(f"max_workers must be a positive integer, got {max_workers}")
        if threads_per_worker is None:
            threads_per_worker = max(1, cpus // max_workers)
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ConfigurationError(f"max_in_flight must be a positive integer: {max_in_flight}")
        if cache_dir is not None and (not isinstance(experiment, str) or not experiment):
            raise ConfigurationError(
                "cache_dir needs experiment='<name>': a name for what is trained and measured, "
                "changed whenever train_fn, the data, the model or the queries change (the "
                "cache is keyed by it, the indices and the seed)"
            )
        self.train_fn = train_fn
        self.measure = measure
        self.measure_fn = measure_fn
        self.higher_is_better = bool(higher_is_better)
        self.executor = executor
        self.max_workers = max_workers
        self.threads_per_worker = threads_per_worker
        self.max_in_flight = max_in_flight
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.experiment = experiment
        self.progress = progress
        self._job = _Job(train_fn, measure, measure_fn)
        if executor == "processes" or isinstance(executor, ProcessPoolExecutor):
            self._check_picklable()

    def __repr__(self) -> str:
        what = (
            f"measure_fn={self.measure_fn!r}"
            if self.measure_fn is not None
            else f"train_fn={self.train_fn!r}, measure={self.measure!r}"
        )
        return f"Retrainer({what}, executor={self.executor!r}, experiment={self.experiment!r})"

    # -- checks ----------------------------------------------------------------------------------
    def _check_picklable(self) -> None:
        advice = (
            "Define it at module level in an importable module (not a lambda, a closure or a "
            "function defined inside another function), pass executor=None to retrain in this "
            "process, or use an executor that serializes with cloudpickle (Dask, Ray)."
        )
        main = sys.modules.get("__main__")
        interactive = main is None or not hasattr(main, "__file__")
        for name in ("train_fn", "measure", "measure_fn"):
            fn = getattr(self, name)
            if fn is None:
                continue
            try:
                pickle.dumps(fn)
            except Exception as exc:
                raise ConfigurationError(
                    f"{name} ({fn!r}) cannot be pickled to send it to worker processes "
                    f"({type(exc).__name__}: {exc}). {advice}"
                ) from exc
            module = getattr(fn, "__module__", None) or type(fn).__module__
            if interactive and module == "__main__":
                raise ConfigurationError(
                    f"{name} ({fn!r}) is defined in an interactive session (__main__ has no "
                    f"file), which spawned worker processes cannot import. {advice}"
                )

    # -- cache -------------------------------------------------------------------------------------
    def _key(self, indices: np.ndarray, seed: int) -> str:
        h = hashlib.sha256()
        h.update((self.experiment or "").encode())
        h.update(b"\0")
        h.update(str(int(seed)).encode())
        h.update(b"\0")
        h.update(indices.astype("<i8", copy=False).tobytes())
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key[:40]}.npz"  # type: ignore[operator]

    def _load(self, key: str, indices: np.ndarray, seed: int) -> np.ndarray | None:
        if self.cache_dir is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as f:
                stored = (f["indices"], int(f["seed"]), str(f["experiment"]), f["measurement"])
        except Exception as exc:  # an unreadable file is re-run, not trusted
            warnings.warn(
                f"ignoring unreadable cached run {path} ({type(exc).__name__}: {exc}); "
                "it will be retrained",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        st_idx, st_seed, st_exp, measurement = stored
        if st_seed != seed or st_exp != self.experiment or not np.array_equal(st_idx, indices):
            raise RetrainingError(
                f"cached run {path} does not match the run it is named after: stored "
                f"experiment={st_exp!r}, seed={st_seed}, {len(st_idx)} indices; requested "
                f"experiment={self.experiment!r}, seed={seed}, {len(indices)} indices. Delete "
                "the file (or use another cache_dir)."
            )
        measurement = np.asarray(measurement)
        if measurement.ndim != 1 or not np.issubdtype(measurement.dtype, np.number):
            raise RetrainingError(
                f"cached run {path} holds a measurement of dtype {measurement.dtype} and shape "
                f"{measurement.shape}, not one number per query; it was not written by "
                f"traintrace or is damaged. Delete it (rm '{path}') and call again to retrain "
                "that run."
            )
        measurement = measurement.astype(np.float64)
        bad = ~np.isfinite(measurement)
        if bad.any():
            where = np.flatnonzero(bad)
            raise RetrainingError(
                f"cached run {path} (seed={seed}, {len(indices)} examples) holds a non-finite "
                f"measurement for {len(where)} of {len(measurement)} queries (first at query "
                f"{int(where[0])}: {measurement[where[0]]}); traintrace never caches such runs, "
                f"so the file was altered. Delete it (rm '{path}') and call again to retrain "
                "that run."
            )
        return measurement

    def _store(self, key: str, indices: np.ndarray, seed: int, measurement: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(
                    fh,
                    measurement=measurement,
                    indices=indices,
                    seed=np.int64(seed),
                    experiment=np.str_(self.experiment),
                )
            os.replace(tmp, self._path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def cached(self, runs: Sequence[tuple[Any, int]]) -> int:
        """How many of ``runs`` are already in the cache (0 without ``cache_dir``)."""
        if self.cache_dir is None:
            return 0
        count = 0
        for idx, seed in runs:
            idx = _as_indices(idx)
            count += self._path(self._key(idx, int(seed))).exists()
        return count

    # -- running -----------------------------------------------------------------------------------
    def _describe(self, key: str, idx: np.ndarray, seed: int) -> str:
        return (
            f"retraining run {key[:12]} (seed={seed}, training on {len(idx)} examples "
            f"{_preview(idx)})"
        )

    def _failure(self, key: str, idx: np.ndarray, seed: int, exc: BaseException) -> RetrainingError:
        hint = ""
        if isinstance(exc, BrokenProcessPool):
            hint = (
                " A worker process died: killed (out of memory?) or unable to import train_fn / "
                "measure (define them in an importable module; executor=None runs in this "
                "process and shows the real error)."
            )
        elif type(exc).__name__ == "KilledWorker":  # dask.distributed, without importing it
            hint = (
                " Dask workers died while running it more often than the scheduler's "
                "allowed-failures (out of memory? a crashing extension?); look at the workers' "
                "logs."
            )
        cache = (
            f" Runs finished before it are cached in {self.cache_dir}; fix the cause and call "
            "again to resume."
            if self.cache_dir is not None
            else ""
        )
        return RetrainingError(
            f"{self._describe(key, idx, seed)} failed: {type(exc).__name__}: {exc}.{hint}{cache}"
        )

    def _finish(self, key: str, idx: np.ndarray, seed: int, value: Any) -> np.ndarray:
        vec = _as_vector(value)
        bad = ~np.isfinite(vec)
        if bad.any():
            where = np.flatnonzero(bad)
            raise RetrainingError(
                f"{self._describe(key, idx, seed)} gave a non-finite measurement for "
                f"{len(where)} of {len(vec)} queries (first at query {int(where[0])}: "
                f"{vec[where[0]]}); it was not cached. Did training diverge (lower the learning "
                "rate) or does measure divide by zero?"
            )
        self._store(key, idx, seed, vec)
        return vec

    def run(self, runs: Sequence[tuple[Any, int]], *, desc: str = "retraining") -> Tensor:
        """Measurements of every run, ``[n_runs, n_query]`` float64, oriented lower-is-better.

        ``runs`` is a sequence of ``(indices, seed)``. Cached runs are loaded, identical runs
        are executed once, the rest go to the executor; each finished run is cached at once.

        Raises:
            RetrainingError: a run raised (chained), returned non-finite values, or runs
                returned different numbers of queries.
        """
        n_runs = len(runs)
        keys: list[str] = []
        results: dict[str, np.ndarray] = {}
        todo: list[int] = []  # position of the first run of each distinct key not cached
        scheduled: set[str] = set()
        for pos in range(n_runs):
            idx, seed = runs[pos]
            idx = _as_indices(idx)
            key = self._key(idx, int(seed))
            keys.append(key)
            if key in results or key in scheduled:
                continue
            cached = self._load(key, idx, int(seed))
            if cached is not None:
                results[key] = cached
            else:
                todo.append(pos)
                scheduled.add(key)
        n_distinct = len(results) + len(todo)
        with tqdm(
            total=n_distinct, initial=len(results), desc=desc, disable=not self.progress
        ) as bar:
            if self.executor is None:
                self._run_here(runs, todo, keys, results, bar)
            else:
                self._run_pool(runs, todo, keys, results, bar)
        if n_runs == 0:
            return torch.empty(0, 0, dtype=torch.float64)
        lengths = {len(results[k]) for k in keys}
        if len(lengths) > 1:
            raise RetrainingError(
                f"runs returned different numbers of query measurements {sorted(lengths)}; "
                "measure must return one value per query, the same queries every time (if the "
                "queries changed, change experiment= so stale cached runs are not reused)"
            )
        out = np.stack([results[k] for k in keys])
        if self.higher_is_better:
            out = -out
        return torch.from_numpy(out)

    def _run_here(
        self,
        runs: Sequence[tuple[Any, int]],
        todo: list[int],
        keys: list[str],
        results: dict[str, np.ndarray],
        bar: Any,
    ) -> None:
        for pos in todo:
            idx, seed = runs[pos]
            idx, seed, key = _as_indices(idx), int(seed), keys[pos]
            try:
                value = self._job(idx, seed)
            except Exception as exc:
                raise self._failure(key, idx, seed, exc) from exc
            results[key] = self._finish(key, idx, seed, value)
            bar.update(1)

    def _run_pool(
        self,
        runs: Sequence[tuple[Any, int]],
        todo: list[int],
        keys: list[str],
        results: dict[str, np.ndarray],
        bar: Any,
    ) -> None:
        if not todo:
            return
        own = self.executor == "processes"
        if own:
            workers = min(self.max_workers, len(todo))
            pool: Executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._job, self.threads_per_worker, os.getpid()),
            )
            window = self.max_in_flight or 2 * workers
        else:
            pool = self.executor  # type: ignore[assignment]
            window = self.max_in_flight or 64
        # Dask's executor names a task by hashing its function and arguments (pure=True): that
        # hashes the whole job for every run, and a call that resumes after a failure would be
        # handed the same failed task back while the scheduler still remembers it
        extra = {"pure": False} if _is_dask_executor(pool) else {}

        def submit(pos: int) -> Future:
            idx, seed = runs[pos]
            idx = _as_indices(idx)
            if own:
                return pool.submit(_run_installed, idx, int(seed))
            return pool.submit(_run_job, self._job, idx, int(seed), **extra)

        in_flight: dict[Future, int] = {}
        queue = iter(todo)
        ok = False
        try:
            for pos in queue:
                in_flight[submit(pos)] = pos
                if len(in_flight) >= window:
                    break
            while in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=in_flight.__getitem__):  # in run order
                    pos = in_flight.pop(fut)
                    idx, seed = runs[pos]
                    idx, seed, key = _as_indices(idx), int(seed), keys[pos]
                    try:
                        value = fut.result()
                    except Exception as exc:
                        self._salvage(runs, keys, in_flight, results)
                        raise self._failure(key, idx, seed, exc) from exc
                    try:
                        results[key] = self._finish(key, idx, seed, value)
                    except RetrainingError:
                        self._salvage(runs, keys, in_flight, results)
                        raise
                    bar.update(1)
                    nxt = next(queue, None)
                    if nxt is not None:
                        in_flight[submit(nxt)] = nxt
            ok = True
        finally:
            if not ok:
                for fut in in_flight:
                    fut.cancel()
            if own:
                pool.shutdown(wait=ok, cancel_futures=not ok)

    def _salvage(
        self,
        runs: Sequence[tuple[Any, int]],
        keys: list[str],
        in_flight: dict[Future, int],
        results: dict[str, np.ndarray],
    ) -> None:
        """Cache the runs that finished alongside a failed one, so a resumed call skips them."""
        for fut, pos in list(in_flight.items()):
            if not fut.done() or fut.cancelled() or fut.exception() is not None:
                continue
            idx, seed = runs[pos]
            idx, seed = _as_indices(idx), int(seed)
            with contextlib.suppress(RetrainingError, ConfigurationError):
                results[keys[pos]] = self._finish(keys[pos], idx, seed, fut.result())
            del in_flight[fut]


# -- estimators ---------------------------------------------------------------------------------


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    if isinstance(seeds, int):
        seeds = (seeds,)
    out = tuple(int(s) for s in seeds)
    if not out:
        raise ConfigurationError("seeds must name at least one training seed")
    if len(set(out)) != len(out):
        raise ConfigurationError(f"seeds must be distinct, got {list(out)}")
    return out


class _RetrainingEstimator(Estimator):
    """Shared plumbing: queries fixed by the Retrainer's measure; scores computed in ``fit``."""

    scores_: Tensor
    columns_: Tensor

    def __init__(self, retrainer: Retrainer, n_train: int | None) -> None:
        if not isinstance(retrainer, Retrainer):
            raise ConfigurationError(
                f"{type(self).__name__} takes a tt.Retrainer(train_fn, measure, ...) as its first "
                f"argument, got {type(retrainer).__name__}"
            )
        if n_train is not None and (not isinstance(n_train, int) or n_train < 1):
            raise ConfigurationError(f"n_train must be a positive integer, got {n_train!r}")
        self.retrainer = retrainer
        self.n_train = n_train

    def _resolve_n_train(self, train: Data | None) -> int:
        n = self.n_train
        if train is not None:
            length = dataset_length(as_loader(train, 1))
            if length is None:
                raise ConfigurationError("cannot count the training set: give n_train=")
            if n is not None and n != length:
                raise ConfigurationError(
                    f"n_train={n} but the training set given to fit has {length} examples"
                )
            n = length
        if n is None:
            raise ConfigurationError(
                f"{type(self).__name__} needs the training-set size: pass n_train= or fit(train)"
            )
        return n

    def _no_queries(self, queries: Data | None) -> None:
        if queries is not None:
            raise ConfigurationError(
                f"{type(self).__name__} measures the queries fixed by its Retrainer's measure "
                "(inside every retrain), so score()/top_k() take no query data. To attribute "
                "other queries, build a Retrainer with tt.query_measurement(task, queries) and "
                "fit again (cached runs of the same experiment are not reused for new queries: "
                "give them a new experiment name)."
            )

    def score(self, queries: Data | None = None) -> Tensor:
        """Scores ``[n_query, n_train]`` float64; positive = the training example helps."""
        self._check_fitted()
        self._no_queries(queries)
        return self.scores_.clone()

    def _score_blocks(self, queries: Data | None = None) -> Iterator[Tensor]:
        self._check_fitted()
        self._no_queries(queries)
        yield self.scores_[:, self.columns_]

    def top_k(self, queries: Data | None = None, k: int = 10) -> TopK:  # type: ignore[override]
        """The ``k`` strongest proponents and opponents of each query, among scored examples."""
        self._check_fitted()
        self._no_queries(queries)
        top = top_k_from_blocks(self._score_blocks(), k, len(self.columns_))
        cols = self.columns_
        return TopK(
            proponents=Ranking(cols[top.proponents.indices], top.proponents.scores),
            opponents=Ranking(cols[top.opponents.indices], top.opponents.scores),
        )

    def self_influence(self) -> Tensor:
        """``score[i, i]`` — only meaningful when the measure is on the training set itself.

        Build the Retrainer with ``measure=tt.query_measurement(task, train)`` (the training
        examples as queries, in order); then entry ``i`` is how much training on ``z_i`` lowers
        its own loss (large for memorized / mislabeled examples). Unscored examples are NaN.
        """
        self._check_fitted()
        n_query = self.scores_.shape[0]
        if n_query != self.n_train_:
            raise ConfigurationError(
                f"self-influence needs the Retrainer to measure the {self.n_train_} training "
                f"examples themselves (measure=tt.query_measurement(task, train)), but it "
                f"measures {n_query} queries"
            )
        return torch.diagonal(self.scores_).clone()


class LeaveOneOut(_RetrainingEstimator):
    """Leave-one-out retraining: ``score[q, i] = f_q(θ_{−i}) − f_q(θ)``.

    ``θ`` is trained on all ``n_train`` examples, ``θ_{−i}`` on all but ``z_i``, and ``f_q`` is
    the Retrainer's measurement of query ``q``, oriented so lower is better (a loss). Each term
    is averaged over ``seeds`` (the same seeds for the full and the leave-one-out models, so
    seed noise cancels where training is deterministic given the seed).

    **Sign:** positive = removing ``z_i`` raises the query's loss, i.e. ``z_i`` *helps* it —
    the same scale as :class:`~traintrace.InfluenceFunction`. ``[n_query, n_train]``, float64.

    **Queries** are fixed by the Retrainer's ``measure``: ``fit()`` runs the retrains,
    ``score()`` and ``top_k(k=...)`` take no query data.

    Warm starting (initialising each retrain from the full-data model, as Koh & Liang do for
    convex models) is up to your ``train_fn``; for non-convex models with cold starts the
    difference between two seeds can dwarf one example's effect — average several seeds.

    Args:
        retrainer: the engine holding ``train_fn`` and ``measure`` (:class:`Retrainer`).
        n_train: size of the training set (or pass the training set to ``fit``).
        indices: leave out only these examples (default all); other columns of ``score()``
            are NaN and are skipped by ``top_k``.
        seeds: training seeds; each model is trained once per seed and measurements averaged.

    Cost: ``(len(indices) + 1) × len(seeds)`` retrains (cached with ``cache_dir``).

    Example::

        engine = tt.Retrainer(train_fn, tt.query_measurement(task, test), cache_dir="runs/loo",
                              experiment="mlp-v1")
        actual = tt.LeaveOneOut(engine, n_train=len(train), indices=range(50)).fit().score()
    """

    def __init__(
        self,
        retrainer: Retrainer,
        n_train: int | None = None,
        *,
        indices: Sequence[int] | Tensor | np.ndarray | None = None,
        seeds: Sequence[int] = (0,),
    ) -> None:
        super().__init__(retrainer, n_train)
        self.indices = indices
        self.seeds = _check_seeds(seeds)

    def fit(self, train: Data | None = None) -> LeaveOneOut:
        """Retrain on everything and without each chosen example; store ``scores_``."""
        n = self._resolve_n_train(train)
        if self.indices is None:
            evaluated = np.arange(n, dtype=np.int64)
        else:
            evaluated = _as_indices(self.indices)
            if len(evaluated) == 0:
                raise ConfigurationError("indices is empty: nothing to leave out")
            if evaluated.min() < 0 or evaluated.max() >= n:
                raise ConfigurationError(
                    f"indices must lie in [0, {n}), got values from {evaluated.min()} to "
                    f"{evaluated.max()}"
                )
            evaluated = np.unique(evaluated)
        seeds = self.seeds
        s = len(seeds)
        full = np.arange(n, dtype=np.int64)

        def make(j: int) -> tuple[np.ndarray, int]:
            if j < s:
                return full, seeds[j]
            i, r = divmod(j - s, s)
            return np.delete(full, evaluated[i]), seeds[r]

        runs = _LazyRuns(s * (len(evaluated) + 1), make)
        m = self.retrainer.run(runs, desc="leave-one-out").numpy()
        full_m = m[:s].mean(axis=0)
        loo_m = m[s:].reshape(len(evaluated), s, -1).mean(axis=1)
        scores = np.full((m.shape[1], n), np.nan)
        scores[:, evaluated] = (loo_m - full_m).T
        self.full_measurement_ = torch.from_numpy(full_m)
        self.columns_ = torch.from_numpy(evaluated)
        self.scores_ = torch.from_numpy(scores)
        self.n_train_ = n
        return self


PDistribution = Sequence[float] | Callable[[np.random.Generator], float]


class AME(_RetrainingEstimator):
    """Average marginal effect of each training example (Lin et al., ICML 2022).

    ``AME_i(q) = E_{p∼P} E_{S∼p} [ f_q(S ∪ {i}) − f_q(S) ]``: the expected change of query
    ``q``'s measurement when ``z_i`` is added to a random subset ``S`` that contains every
    other example independently with probability ``p``, ``p`` itself drawn from ``P``.

    Estimator: train ``num_subsets`` submodels; for submodel ``j`` draw ``p_j ∼ P`` and include
    each example with probability ``p_j``, measure ``Y_j = f_q(S_j)``, and regress ``Y`` on
    the centered, scaled inclusion indicators

        ``X_ji = (1[i∈S_j] / p_j − 1[i∉S_j] / (1 − p_j)) / C``,  ``C = E[1 / (p(1 − p))]``

    with an L1 penalty (scikit-learn ``Lasso``; ``C`` is estimated by the mean over the drawn
    ``p_j``). ``E[X_i] = 0``, ``E[X_i X_k] = 0`` for ``i ≠ k`` and ``E[X_i Y] = AME_i / C =
    AME_i · E[X_i²]``, so the population regression coefficient is ``AME_i`` itself; the L1
    penalty exploits sparsity: when ``k`` examples matter, ``O(k log n)`` submodels suffice
    (versus ``n + 1`` for leave-one-out).

    ``P``: by default uniform over ``{0.2, 0.4, 0.6, 0.8}`` (the paper's choice).
    ``shapley=True`` draws ``p ∼ Uniform(ε, 1 − ε)``: with ``p ∼ Uniform(0, 1)`` the AME *is*
    the Shapley value (the truncation ``ε = shapley_truncation`` keeps ``C`` finite; for an
    additive game the AME equals the Shapley value for every ``P``).

    **Accuracy:** the estimate is unbiased with error ``O(1/√M)``; the ``1/p`` weights make it
    noisy (on a 6-point additive game, ``M = 400`` Shapley submodels give errors up to ~0.14 of
    effects of size ~1, ``M = 3000`` ~0.03). The Lasso pays off when few examples matter: it
    finds them with ``O(k log n)`` submodels, while the values of the many small effects are
    shrunk to zero.

    **Sign:** measurements are oriented lower-is-better, so ``score = −AME``: positive = adding
    ``z_i`` lowers the query's loss, i.e. it *helps*. ``[n_query, n_train]``, float64.
    Queries are fixed by the Retrainer's ``measure`` (see :class:`LeaveOneOut`).

    Args:
        retrainer: the engine (:class:`Retrainer`); ``train_fn`` must accept any subset,
            including very small ones.
        n_train: size of the training set (or pass the training set to ``fit``).
        num_subsets: number of submodels ``M``.
        p_distribution: a sequence of inclusion probabilities in ``(0, 1)`` (uniform over
            them) or a function ``rng -> p``.
        shapley: use ``p ∼ Uniform(ε, 1 − ε)`` (the Shapley variant); overrides
            ``p_distribution``.
        shapley_truncation: ``ε`` for ``shapley=True``.
        lasso_alpha: the Lasso penalty (scikit-learn's ``alpha``, objective
            ``‖Y − Xw − b‖² / (2M) + α‖w‖₁``), or ``"cv"`` for ``LassoCV`` per query (5 folds).
        seed: seeds the subset draws and the submodels' training seeds.

    Learned: ``scores_``, ``ame_`` (``= −scores_``), ``p_`` ``[M]``, ``masks_`` ``[M, n_train]``
    (bool), ``measurements_`` ``[M, n_query]``, ``alpha_`` ``[n_query]``.

    Cost: ``M`` retrains plus ``n_query`` Lasso fits on an ``M × n_train`` design (kept in
    memory as float64).
    """

    def __init__(
        self,
        retrainer: Retrainer,
        n_train: int | None = None,
        *,
        num_subsets: int,
        p_distribution: PDistribution = (0.2, 0.4, 0.6, 0.8),
        shapley: bool = False,
        shapley_truncation: float = 0.05,
        lasso_alpha: float | Literal["cv"] = "cv",
        seed: int = 0,
    ) -> None:
        super().__init__(retrainer, n_train)
        if not isinstance(num_subsets, int) or num_subsets < 2:
            raise ConfigurationError(f"num_subsets must be an integer >= 2, got {num_subsets!r}")
        if not callable(p_distribution):
            ps = [float(p) for p in p_distribution]
            if not ps or not all(0 < p < 1 for p in ps):
                raise ConfigurationError(
                    f"p_distribution must hold inclusion probabilities in (0, 1), got {ps}"
                )
            p_distribution = tuple(ps)
        if not 0 < shapley_truncation < 0.5:
            raise ConfigurationError(
                f"shapley_truncation must lie in (0, 0.5), got {shapley_truncation}"
            )
        if lasso_alpha != "cv" and not (isinstance(lasso_alpha, (int, float)) and lasso_alpha > 0):
            raise ConfigurationError(f"lasso_alpha must be > 0 or 'cv', got {lasso_alpha!r}")
        self.num_subsets = num_subsets
        self.p_distribution = p_distribution
        self.shapley = shapley
        self.shapley_truncation = shapley_truncation
        self.lasso_alpha = lasso_alpha
        self.seed = seed

    def _draw_p(self, rng: np.random.Generator, m: int) -> np.ndarray:
        if self.shapley:
            eps = self.shapley_truncation
            return rng.uniform(eps, 1 - eps, size=m)
        if callable(self.p_distribution):
            ps = np.array([float(self.p_distribution(rng)) for _ in range(m)])
            if not ((ps > 0) & (ps < 1)).all():
                bad = ps[~((ps > 0) & (ps < 1))][0]
                raise ConfigurationError(f"p_distribution drew p={bad}, outside (0, 1)")
            return ps
        return rng.choice(np.asarray(self.p_distribution), size=m)

    def fit(self, train: Data | None = None) -> AME:
        """Train the submodels, regress, and store ``scores_ = −AME``."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import Lasso, LassoCV

        n = self._resolve_n_train(train)
        m = self.num_subsets
        rng = np.random.default_rng(self.seed)
        ps = self._draw_p(rng, m)
        masks = rng.random((m, n)) < ps[:, None]
        run_seeds = rng.integers(0, 2**31 - 1, size=m)
        runs = _LazyRuns(m, lambda j: (np.flatnonzero(masks[j]), int(run_seeds[j])))
        y = self.retrainer.run(runs, desc="AME submodels").numpy()
        c = float(np.mean(1.0 / (ps * (1 - ps))))
        x = np.where(masks, 1.0 / ps[:, None], -1.0 / (1.0 - ps[:, None])) / c
        coef = np.zeros((y.shape[1], n))
        alphas = np.zeros(y.shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.lasso_alpha == "cv":
                for q in range(y.shape[1]):
                    reg = LassoCV(cv=min(5, m), max_iter=20_000, random_state=0).fit(x, y[:, q])
                    coef[q] = reg.coef_
                    alphas[q] = reg.alpha_
            else:
                reg = Lasso(alpha=float(self.lasso_alpha), max_iter=20_000).fit(x, y)
                coef[:] = reg.coef_.reshape(y.shape[1], n)
                alphas[:] = float(self.lasso_alpha)
        self.p_ = ps
        self.masks_ = masks
        self.measurements_ = torch.from_numpy(y)
        self.alpha_ = alphas
        self.ame_ = torch.from_numpy(coef)
        self.scores_ = torch.from_numpy(-coef)
        self.columns_ = torch.arange(n)
        self.n_train_ = n
        return self
