"""A configured run on the user's own model and data: what ``traintrace fit | score | ...`` do.

:class:`Run` resolves a :class:`~traintrace.interfaces.config.RunConfig` — imports the user's
model factory and data functions with :mod:`importlib` (no ``eval``/``exec``/shell), expands
the checkpoint glob, builds the estimator through its public API with its store in the run
folder — and writes each result beside it::

    from traintrace.interfaces.config import RunConfig
    from traintrace.interfaces.run import Run

    run = Run(RunConfig(model="mypkg.models:make", train="mypkg.data:train",
                        queries="mypkg.data:test", checkpoints="ckpt/*.pt", output="runs/a"))
    top = run.top_k()             # also writes runs/a/top_k.csv
    scores = run.self_influence() # also writes runs/a/self_influence.csv and .npy

Every command fits first. With a store (``store=True``, the default with a ``projection``) in
``<output>/store`` that is a resume (finished chunks are skipped), so ``fit`` then ``top-k`` in
a new process does not recompute the features; exact TracIn without a store and influence
functions stream the training set for each command instead (nothing of size n × P is written).
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

import traintrace as tt
from traintrace.exceptions import ConfigurationError
from traintrace.interfaces.config import BUILTIN_TASKS, RunConfig, check_spec
from traintrace.interfaces.results import save_scores, save_self_influence

__all__ = ["Run", "load_object"]


# -- importing the user's code -------------------------------------------------------------------


def load_object(spec: str, *, paths: Sequence[str | os.PathLike[str]] = (), what: str = "") -> Any:
    """The object named by ``'package.module:attribute'``, imported with :mod:`importlib`.

    ``paths`` and the current directory are put at the front of ``sys.path`` first. The
    attribute may be dotted (``module:Class.method``). Nothing is evaluated: a spec that is not
    of that form, a module that cannot be found or a missing attribute raise
    :class:`ConfigurationError`; errors raised by the user's module itself propagate.
    """
    label = f"{what} " if what else ""
    check_spec(spec, what or "spec")
    for folder in [os.getcwd(), *map(os.fspath, reversed(list(paths)))]:
        folder = os.path.abspath(folder)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"could not import module {module_name!r} for {label}{spec!r}: {exc}. Run from the "
            "folder that holds it, or add that folder with --path DIR (path = [...] in the "
            "config file)"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:20]
            raise ConfigurationError(
                f"{label}{spec!r}: {getattr(obj, '__name__', module_name)!r} has no attribute "
                f"{part!r}; it defines {public}"
            )
        obj = getattr(obj, part)
    return obj


def _call(spec: str, paths: Sequence[str], what: str) -> Any:
    obj = load_object(spec, paths=paths, what=what)
    return obj() if callable(obj) else obj


def _natural_key(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


# -- the run -------------------------------------------------------------------------------------


class Run:
    """The user's model, data and checkpoints resolved from a :class:`RunConfig`, and the results.

    Attributes (resolved on first use): ``model``, ``task``, ``train``, ``queries``,
    ``checkpoints`` (sorted), ``estimator`` (fitted by :meth:`fit`). Each result method fits first
    (a resume when the store in ``<output>/store`` is complete) and writes its file into
    ``config.output``.
    """

    def __init__(self, config: RunConfig, *, log: Callable[[str], None] | None = None) -> None:
        if not isinstance(config, RunConfig):
            raise ConfigurationError(f"expected a RunConfig, got {type(config).__name__}")
        self.config = config
        self.log = log or (lambda msg: None)
        self._cache: dict[str, Any] = {}

    # -- resolution --------------------------------------------------------------------------
    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def model(self) -> nn.Module:
        def make() -> nn.Module:
            model = _call(self.config.model, self.config.path, "model")
            if not isinstance(model, nn.Module):
                raise ConfigurationError(
                    f"model {self.config.model!r} returned {type(model).__name__}, not a "
                    "torch.nn.Module"
                )
            return model

        return self._once("model", make)

    @property
    def task(self) -> tt.Task:
        def make() -> tt.Task:
            cfg = self.config
            if cfg.task == "classification":
                return tt.Classification(cfg.measurement)
            if cfg.measurement != "loss":
                raise ConfigurationError(
                    f"measurement={cfg.measurement!r} applies to task='classification' only, "
                    f"not {cfg.task!r}"
                )
            if cfg.task in BUILTIN_TASKS:
                return {"regression": tt.Regression, "language-modeling": tt.LanguageModeling}[
                    cfg.task
                ]()
            obj = load_object(cfg.task, paths=cfg.path, what="task")
            if isinstance(obj, tt.Task):
                return obj
            task = obj() if callable(obj) else obj
            if not isinstance(task, tt.Task):
                raise ConfigurationError(
                    f"task {cfg.task!r} gave {type(task).__name__}, not a traintrace.Task; name a "
                    "Task subclass, an instance, or a function returning one"
                )
            return task

        return self._once("task", make)

    def _data(self, key: str) -> Any:
        spec = getattr(self.config, key)
        if spec is None:
            raise ConfigurationError(
                f"this command needs {key}: pass --{key} pkg.mod:fn (or {key} = '...' in the "
                "config file)"
            )

        def make() -> Any:
            data = _call(spec, self.config.path, key)
            if data is None:
                raise ConfigurationError(f"{key} {spec!r} returned None instead of a data set")
            return data

        return self._once(key, make)

    @property
    def train(self) -> Any:
        return self._data("train")

    @property
    def queries(self) -> Any:
        return self._data("queries")

    @property
    def checkpoints(self) -> list[tt.Checkpoint]:
        def make() -> list[tt.Checkpoint]:
            cfg = self.config
            paths = sorted(glob.glob(cfg.checkpoints, recursive=True), key=_natural_key)
            paths = [p for p in paths if os.path.isfile(p)]
            if not paths:
                raise ConfigurationError(
                    f"no checkpoint files match {cfg.checkpoints!r} (relative to {os.getcwd()})"
                )
            if cfg.method == "influence":
                return [tt.Checkpoint(paths[-1])]
            lrs: Sequence[float | None] = [None] * len(paths)
            if cfg.lr is not None:
                if len(cfg.lr) not in (1, len(paths)):
                    raise ConfigurationError(
                        f"{len(cfg.lr)} learning rates for {len(paths)} checkpoints {paths}; give "
                        "one for all or one per checkpoint"
                    )
                lrs = list(cfg.lr) * len(paths) if len(cfg.lr) == 1 else list(cfg.lr)
            ckpts = [tt.Checkpoint(p, lr=lr) for p, lr in zip(paths, lrs, strict=True)]
            for c in ckpts:
                try:
                    c.learning_rate  # noqa: B018 - read now for a CLI-worded error
                except ConfigurationError as exc:
                    raise ConfigurationError(
                        f"{exc}. On the command line: --lr 0.1 (one for all) or --lr 0.1 0.05 "
                        "... (one per checkpoint); in the config file: lr = [0.1, ...]"
                    ) from exc
            return ckpts

        return self._once("checkpoints", make)

    @property
    def estimator(self) -> tt.TracIn | tt.InfluenceFunction:
        def make() -> tt.TracIn | tt.InfluenceFunction:
            cfg = self.config
            normalize: Any = False if cfg.normalize == "none" else cfg.normalize
            common = {
                "normalize": normalize,
                "layerwise": cfg.layerwise,
                "batch_size": cfg.batch_size,
                "progress": cfg.progress,
            }
            if cfg.method == "influence":
                if cfg.projection is not None or cfg.store:
                    raise ConfigurationError(
                        "projection and store are TracIn options; method='influence' streams "
                        "exact gradients and stores nothing"
                    )
                hessian: Any = {"kfac": tt.KFAC, "ekfac": tt.EKFAC}.get(cfg.hessian, cfg.hessian)
                if not isinstance(hessian, str):
                    hessian = hessian()
                return tt.InfluenceFunction(
                    self.model,
                    self.task,
                    self.checkpoints[0],
                    hessian=hessian,
                    damping=cfg.damping,
                    curvature=cfg.curvature,
                    batch_size=cfg.batch_size,
                    progress=cfg.progress,
                )  # exact and streamed: no store
            projection = (
                None
                if cfg.projection is None
                else tt.Projection(cfg.projection, kind=cfg.projection_kind, seed=cfg.seed)
            )
            if self.uses_store:
                common["store"] = cfg.output / "store"
                common["overwrite_store"] = cfg.overwrite_store
            return tt.TracIn(
                self.model, self.task, self.checkpoints, projection=projection, **common
            )

        return self._once("estimator", make)

    @property
    def uses_store(self) -> bool:
        """Whether the training features go to ``<output>/store`` (see ``RunConfig.store``)."""
        cfg = self.config
        if cfg.method == "influence":
            return False
        return cfg.projection is not None if cfg.store is None else cfg.store

    # -- results -----------------------------------------------------------------------------
    def fit(self) -> tt.TracIn | tt.InfluenceFunction:
        """Fit the estimator (resuming ``<output>/store`` when it has one); returns it."""
        if "fitted" not in self._cache:
            self.config.output.mkdir(parents=True, exist_ok=True)
            est = self.estimator
            where = (
                f"store {self.config.output / 'store'}"
                if self.uses_store
                else "exact, streamed (no store)"
            )
            self.log(f"{type(est).__name__} on {len(self.checkpoints)} checkpoint(s), {where}")
            try:
                self._cache["fitted"] = est.fit(self.train)
            except tt.StoreMismatchError as exc:
                raise tt.StoreMismatchError(
                    f"{exc}\nFor this run: add --overwrite-store (overwrite_store = true in the "
                    "config file) to recompute the store, or pass another --output folder."
                ) from exc
        return self._cache["fitted"]

    def _resume(self, kind: str) -> dict[str, Any]:
        """``resume=<output>/resume-<kind>`` for the exact stream: a killed run continues."""
        if self.uses_store:
            return {}
        path = self.config.output / f"resume-{kind}"
        if path.exists():
            self.log(f"resuming the streamed {kind.replace('_', '-')} from {path}")
        return {"resume": path}

    @staticmethod
    def _finished(resume: dict[str, Any]) -> None:
        """The results are written: the journal of a finished run is not needed any more."""
        if "resume" in resume:
            shutil.rmtree(resume["resume"], ignore_errors=True)

    def _resume_mismatch(self, exc: tt.StoreMismatchError, kind: str) -> tt.StoreMismatchError:
        return tt.StoreMismatchError(
            f"{exc}\nFor this run: delete {self.config.output / f'resume-{kind}'} (the partial "
            "results of an interrupted run with other inputs) or pass another --output folder."
        )

    def score(self) -> Tensor:
        """``[n_query, n_train]`` scores; writes ``scores.npy`` and ``scores.csv``. The exact
        stream journals its work in ``<output>/resume-score``: a killed run resumes."""
        resume = self._resume("score")
        try:
            scores = self.fit().score(self.queries, **resume)
        except tt.StoreMismatchError as exc:
            raise self._resume_mismatch(exc, "score") from exc
        self._finished(resume)
        paths = save_scores(scores, self.config.output)
        self.log(f"scores {tuple(scores.shape)} written to {paths['npy']} and {paths['csv']}")
        return scores

    def top_k(self) -> tt.TopK:
        """Top-``k`` proponents and opponents per query; writes ``top_k.csv``."""
        if "top_k" not in self._cache:
            resume = self._resume("top_k")
            try:
                top = self.fit().top_k(self.queries, k=self.config.k, **resume)
            except tt.StoreMismatchError as exc:
                raise self._resume_mismatch(exc, "top_k") from exc
            self._finished(resume)
            path = top.to_csv(self.config.output / "top_k.csv")
            self.log(f"top-{self.config.k} of {top.proponents.indices.shape[0]} queries: {path}")
            self._cache["top_k"] = top
        return self._cache["top_k"]

    def self_influence(self) -> Tensor:
        """Self-influence ``[n_train]``; writes ``self_influence.csv`` (ranked) and ``.npy``."""
        if "self_influence" not in self._cache:
            values = self.fit().self_influence()
            paths = save_self_influence(values, self.config.output)
            self.log(f"self-influence of {len(values)} training examples: {paths['csv']}")
            self._cache["self_influence"] = values
        return self._cache["self_influence"]

    def flipped(self) -> np.ndarray | None:
        """The boolean mask named by ``config.flipped`` (known mislabeled examples), if any."""
        if self.config.flipped is None:
            return None
        mask = _call(self.config.flipped, self.config.path, "flipped")
        if isinstance(mask, Tensor):
            mask = mask.detach().cpu().numpy()
        return np.asarray(mask).astype(bool)

    def report(self) -> Path:
        """Write ``report.html``: queries with proponents/opponents, self-influence, curve."""
        from traintrace.interfaces.report import report

        cfg = self.config
        top = self.top_k() if cfg.queries is not None else None
        text: Any = cfg.text
        if text is not None and ":" in text:
            text = load_object(text, paths=cfg.path, what="text")
        path = report(
            cfg.output / "report.html",
            train=self.train,
            queries=self.queries if cfg.queries is not None else None,
            top=top,
            self_influence=self.self_influence(),
            flipped=self.flipped(),
            render=cfg.render,
            text=text,
            label_names=cfg.label_names or None,
            top_self_influence=cfg.top_self_influence,
            title=f"traintrace report — {cfg.model}",
            explains=_explains(self.task),
            method=f"{type(self.estimator).__name__} over {len(self.checkpoints)} checkpoint(s)",
        )
        self.log(f"report: {path}")
        return path


def _explains(task: tt.Task) -> str:
    kind = getattr(task, "measurement_kind", None)
    if isinstance(task, tt.Classification) and kind == "margin":
        return (
            "each query's logit margin of its label (the predicted class when the query has no "
            "label): positive = the training example raises that margin"
        )
    if isinstance(task, tt.Classification):
        return (
            "each query's cross-entropy loss of its own label (shown with the query): positive = "
            "the training example lowers that loss"
        )
    return f"each query's measurement under {task!r}: positive = the training example lowers it"
