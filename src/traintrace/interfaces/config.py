"""One typed configuration for the Python API, the command line and a TOML file.

:class:`RunConfig` is a dataclass: every field has a type, a default (or is required), a help
line and is validated in ``__post_init__``. The ``traintrace`` command generates its flags from
those fields (:func:`add_config_arguments`) and reads ``--config run.toml`` files with the same
keys (:func:`load_config`), so the three ways of configuring a run cannot drift apart:

    # run.toml                                   # the same on the command line
    model = "mypkg.models:make_model"            --model mypkg.models:make_model
    train = "mypkg.data:train_set"               --train mypkg.data:train_set
    queries = "mypkg.data:test_set"              --queries mypkg.data:test_set
    checkpoints = "ckpt/*.pt"                    --checkpoints 'ckpt/*.pt'
    k = 5                                        --k 5

Values come from, in increasing priority: the field defaults, the TOML file, the flags. Relative
paths (``checkpoints``, ``output``, ``path``) are relative to the current directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from traintrace.exceptions import ConfigurationError

__all__ = [
    "EvaluateUserConfig",
    "RunConfig",
    "add_config_arguments",
    "check_output_dir",
    "check_seed",
    "check_types",
    "config_from_args",
    "load_config",
    "read_toml",
]

#: ``package.module:attribute`` (the attribute may be dotted: ``module:Class.factory``).
SPEC = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
BUILTIN_TASKS = ("classification", "regression", "language-modeling")


def _f(default: Any = dataclasses.MISSING, help: str = "", metavar: str | None = None) -> Any:
    """A dataclass field carrying its command-line help (and metavar)."""
    meta = {"help": help, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults")  # pragma: no cover - developer error
    return field(default=default, metadata=meta)


def check_output_dir(path: str | os.PathLike[str], name: str = "output") -> Path:
    """``path`` as a :class:`Path` if it is a folder or does not exist yet, else a named error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigurationError(
            f"{name} {str(path)!r} is a file, not a folder; pass a folder for the run's outputs "
            "(it is created when missing)"
        )
    return path


def check_seed(seed: object) -> int:
    """``seed`` if it is an integer ``>= 0``, else a :class:`ConfigurationError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigurationError(f"seed must be an integer >= 0, got {seed!r}")
    return seed


def check_spec(value: str, name: str) -> str:
    """``value`` if it reads ``package.module:attribute``, else a :class:`ConfigurationError`."""
    if not SPEC.match(value):
        raise ConfigurationError(
            f"{name} must name a Python object as 'package.module:attribute' (e.g. "
            f"'mypkg.models:make_model'), got {value!r}"
        )
    return value


@dataclass(kw_only=True)
class RunConfig:
    """Everything ``traintrace fit | score | top-k | self-influence | report`` needs.

    The user's code is named by ``package.module:attribute`` strings and imported with
    :mod:`importlib` (never evaluated): ``model`` returns the ``torch.nn.Module``; ``train`` and
    ``queries`` return data sets (anything :class:`~traintrace.TracIn` accepts), in a fixed
    order — row ``i`` of every result is example ``i``. Scores follow the library's convention:
    ``[n_query, n_train]``, positive = the training example helps the query.

    Outputs go to ``output`` (the run folder): ``store/`` (the feature store: a second command
    on the same folder resumes it instead of recomputing), ``scores.npy``/``scores.csv``,
    ``top_k.csv``, ``self_influence.csv``/``.npy`` and ``report.html``.
    """

    # -- the user's code -------------------------------------------------------------------------
    model: str = _f(
        help="'pkg.mod:factory' — a function (or class) returning the torch.nn.Module, called "
        "with no arguments",
        metavar="PKG.MOD:FN",
    )
    train: str = _f(
        help="'pkg.mod:fn' returning the training data set (example i = row i of the results)",
        metavar="PKG.MOD:FN",
    )
    checkpoints: str = _f(
        help="glob of checkpoint files saved with torch.save (a state dict, or a dict with "
        "'model' and optionally 'optimizer'), e.g. 'ckpt/*.pt'; sorted by name, numbers "
        "compared as numbers",
        metavar="GLOB",
    )
    queries: str | None = _f(
        None,
        help="'pkg.mod:fn' returning the query data set (needed by score, top-k and the report's "
        "query section)",
        metavar="PKG.MOD:FN",
    )
    task: str = _f(
        "classification",
        help="'classification', 'regression', 'language-modeling', or 'pkg.mod:MyTask' (a "
        "traintrace.Task subclass, instance or factory)",
        metavar="TASK",
    )
    measurement: Literal["loss", "margin"] = _f(
        "loss",
        help="classification only: explain the query's loss of its label, or the logit margin "
        "of its label (of the predicted class for unlabeled queries)",
    )
    path: tuple[str, ...] = _f(
        (),
        help="folders put at the front of sys.path before importing (the current folder is "
        "always searched)",
        metavar="DIR",
    )
    # -- the estimator ---------------------------------------------------------------------------
    method: Literal["tracin", "influence"] = _f(
        "tracin",
        help="TracIn over every checkpoint, or an influence function at the last checkpoint",
    )
    lr: tuple[float, ...] | None = _f(
        None,
        help="TracIn: learning rate in force at each checkpoint (one value for all, or one per "
        "checkpoint); default: read from the optimizer state saved in each file",
        metavar="LR",
    )
    projection: int | None = _f(
        None,
        help="TracIn: project gradients to about this many features (default: exact gradients)",
        metavar="K",
    )
    projection_kind: Literal["kronecker", "gaussian", "rademacher", "sjlt"] = _f(
        "kronecker", help="TracIn: kind of random projection when --projection is given"
    )
    normalize: Literal["none", "cosine", "train"] = _f(
        "none",
        help="renormalized scores: 'cosine' (GAS: cosine similarity per checkpoint) or 'train' "
        "(divide by the training gradient's norm)",
    )
    layerwise: bool = _f(False, help="normalize per layer (exact streaming path)")
    store: bool | None = _f(
        None,
        help="keep training features in <output>/store, so later commands reuse them (default: "
        "with --projection; exact TracIn otherwise streams the training set for each command "
        "and stores nothing of size n × parameters; influence functions never store)",
    )
    hessian: Literal["exact", "cg", "lissa", "arnoldi", "mfac", "kfac", "ekfac"] = _f(
        "ekfac", help="influence: the inverse-curvature method"
    )
    damping: float | None = _f(
        None, help="influence: damping λ >= 0 added to the curvature", metavar="λ"
    )
    curvature: Literal["hessian", "ggn", "fisher"] = _f(
        "hessian",
        help="influence: the curvature inverted by exact/cg/lissa/arnoldi (K-FAC, EK-FAC and "
        "M-FAC use their own Fisher)",
    )
    seed: int = _f(0, help="seed of the random projection (>= 0)")
    batch_size: int = _f(64, help="examples per batch when computing gradients")
    # -- outputs ---------------------------------------------------------------------------------
    k: int = _f(10, help="proponents and opponents kept per query")
    output: Path = _f(Path("traintrace-run"), help="run folder for the store and results")  # noqa: RUF009
    overwrite_store: bool = _f(
        False, help="replace a store in the run folder written with other settings"
    )
    progress: bool = _f(True, help="progress bars on stderr")
    # -- the report ------------------------------------------------------------------------------
    render: Literal["auto", "image", "text", "table"] = _f(
        "auto", help="report: how examples are shown (auto: guessed from the first example)"
    )
    text: str | None = _f(
        None,
        help="report: show examples as text — the key of a text field of mapping examples, or "
        "'pkg.mod:fn' mapping an example to a string (e.g. a tokenizer's decode)",
        metavar="KEY|PKG.MOD:FN",
    )
    label_names: tuple[str, ...] = _f(
        (), help="report: names of the classes, in label order", metavar="NAME"
    )
    flipped: str | None = _f(
        None,
        help="report: 'pkg.mod:fn' returning a boolean mask of training examples known to be "
        "mislabeled (draws the mislabel-detection curve)",
        metavar="PKG.MOD:FN",
    )
    top_self_influence: int = _f(
        30, help="report: training examples shown from the top of the self-influence ranking"
    )

    def __post_init__(self) -> None:
        check_types(self)
        check_spec(self.model, "model")
        check_spec(self.train, "train")
        for name in ("queries", "flipped"):
            value = getattr(self, name)
            if value is not None:
                check_spec(value, name)
        if self.text is not None and ":" in self.text:
            check_spec(self.text, "text")
        if self.task not in BUILTIN_TASKS and not SPEC.match(self.task):
            raise ConfigurationError(
                f"task must be one of {list(BUILTIN_TASKS)} or 'pkg.mod:MyTask', got {self.task!r}"
            )
        if not self.checkpoints.strip():
            raise ConfigurationError("checkpoints must be a glob such as 'ckpt/*.pt', got ''")
        check_seed(self.seed)
        for name in ("k", "batch_size", "top_self_influence"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.projection is not None and self.projection < 1:
            raise ConfigurationError(f"projection must be >= 1, got {self.projection}")
        if self.lr is not None:
            if not self.lr:
                raise ConfigurationError("lr must hold at least one learning rate")
            bad = [v for v in self.lr if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ConfigurationError(
                    f"learning rates must be finite and > 0, got {list(self.lr)}"
                )
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigurationError(f"damping must be finite and >= 0, got {self.damping}")
        self.output = check_output_dir(self.output)


def _field_of(cls: type, name: str, default: Any = None, help: str | None = None) -> Any:
    """The field ``name`` of the dataclass ``cls`` again (its help and metavar), for another one.

    ``default`` (if not None) and ``help`` (if given) replace the original ones.
    """
    f = cls.__dataclass_fields__[name]
    return _f(
        f.default if default is None else default,
        help=f.metadata["help"] if help is None else help,
        metavar=f.metadata["metavar"],
    )


#: Keys of :attr:`EvaluateUserConfig.estimators` and what each runs (every one at its defaults).
EVALUATE_ESTIMATORS = {
    "tracin": "TracIn over every checkpoint",
    "cg": "InfluenceFunction(hessian=CG()) at the last checkpoint, damping 'auto'",
    "ekfac": "InfluenceFunction(hessian=EKFAC()) at the last checkpoint",
    "kfac": "InfluenceFunction(hessian=KFAC()) at the last checkpoint",
    "arnoldi": "InfluenceFunction(hessian=Arnoldi()) at the last checkpoint",
    "trak": "TRAK on the last checkpoint (and trak_models - 1 retrained models), projection 'auto'",
    "representer": "RepresenterPoints at the last checkpoint (classification only)",
    "exact": "InfluenceFunction() (exact Hessian, up to 20,000 parameters) at the last checkpoint",
    "lissa": "InfluenceFunction(hessian=LiSSA()) at the last checkpoint",
}
#: What ``traintrace evaluate --config`` runs when ``estimators`` is not given. ``exact`` (P
#: Hessian-vector passes) and ``lissa`` (many stochastic passes) are left out: opt in by name.
DEFAULT_EVALUATE_ESTIMATORS = ("tracin", "cg", "ekfac", "kfac", "arnoldi", "trak", "representer")


@dataclass(kw_only=True)
class EvaluateUserConfig:
    """``traintrace evaluate --config my.toml``: rank the estimators on the user's own model.

    The user's model, data, checkpoints and task are named with the same keys as
    :class:`RunConfig` (and resolved by the same :class:`~traintrace.interfaces.run.Run`);
    ``retrain`` adds the training function that gives the ground truth::

        def train_fn(indices: numpy.ndarray, seed: int) -> torch.nn.Module:
            \"\"\"A fresh model trained on the training examples at ``indices`` (int64
            positions in the ``train`` data set), deterministic given ``seed``.\"\"\"

    Ground truth: ``subsets`` random subsets of ``subset_fraction · n_train`` training examples,
    each retrained with ``seeds_per_subset`` seeds (``subsets × seeds_per_subset`` calls of
    ``train_fn``), the queries' oriented measurement (the task's, lower is better) averaged over
    the seeds. Every estimator's scores ``[n_query, n_train]`` are judged by the linear
    datamodeling score against it (:func:`traintrace.evaluate.lds`). The retrains are cached in
    ``<output>/retrains`` under an experiment name hashed from ``model``, ``train``,
    ``queries``, ``retrain``, ``task`` and the source of their modules, so a killed run
    resumes and a changed one never reads a stale measurement.
    """

    # -- the user's code (the keys of RunConfig) -------------------------------------------------
    model: str = _field_of(RunConfig, "model")
    train: str = _field_of(RunConfig, "train")
    checkpoints: str = _field_of(
        RunConfig,
        "checkpoints",
        help="glob of the model's checkpoint files (torch.save), e.g. 'ckpt/*.pt': TracIn uses "
        "every one, the other estimators the last (sorted by name, numbers as numbers)",
    )
    queries: str = _field_of(
        RunConfig,
        "queries",
        default=dataclasses.MISSING,
        help="'pkg.mod:fn' returning the query data set whose measurements are explained",
    )
    retrain: str | None = _f(
        None,
        help="'pkg.mod:train_fn' (required): train_fn(indices, seed) -> torch.nn.Module, a fresh "
        "model trained on the training examples at indices (a 1-D int64 numpy array), "
        "deterministic given seed",
        metavar="PKG.MOD:FN",
    )
    task: str = _field_of(RunConfig, "task")
    measurement: Literal["loss", "margin"] = _field_of(RunConfig, "measurement")
    path: tuple[str, ...] = _field_of(RunConfig, "path")
    lr: tuple[float, ...] | None = _field_of(RunConfig, "lr")
    batch_size: int = _field_of(RunConfig, "batch_size")
    # -- the ground truth ------------------------------------------------------------------------
    subsets: int = _f(64, help="random training subsets retrained for the LDS (>= 3)")
    seeds_per_subset: int = _f(2, help="training seeds per subset, measurements averaged")
    subset_fraction: float = _f(0.5, help="fraction of the training set in each subset")
    loo_examples: int = _f(
        0,
        help="also correlate with leave-one-out retraining on this many random training "
        "examples (one retrain each, plus one on everything; 0: no LOO columns)",
    )
    workers: int = _f(
        1, help="retraining processes (1: in this process; the built-in digits run defaults to 2)"
    )
    trak_models: int = _f(
        1,
        help="TRAK's ensemble: the last checkpoint plus trak_models - 1 models trained by retrain "
        "on the whole training set (seeds 1, 2, ...; kept in <output>/models)",
    )
    estimators: tuple[str, ...] = _f(
        DEFAULT_EVALUATE_ESTIMATORS,
        help=f"which estimators to rank, of {', '.join(EVALUATE_ESTIMATORS)}",
        metavar="NAME",
    )
    seed: int = _f(
        0, help="seed of the subsets and their training seeds (built-in run: data and training)"
    )
    # -- outputs ---------------------------------------------------------------------------------
    output: Path = _f(  # noqa: RUF009
        Path("evaluate-output"),
        help="folder for results.json, report.html, lds_subsets.npz and the retrain cache",
    )
    progress: bool = _field_of(RunConfig, "progress")

    def __post_init__(self) -> None:
        check_types(self)
        if self.retrain is None:
            raise ConfigurationError(
                "evaluating your own model needs retrain = 'pkg.mod:train_fn' (--retrain): a "
                "function train_fn(indices, seed) -> torch.nn.Module that trains a fresh model "
                "on the training examples at indices (a 1-D int64 numpy array of positions in "
                "the train data set) with random seed seed, as your training script does. The "
                "estimators are judged against the measurements of models it retrains."
            )
        check_spec(self.retrain, "retrain")
        self.run_config()  # the RunConfig checks of the shared keys
        for name in ("subsets", "seeds_per_subset", "workers", "trak_models"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.subsets < 3:
            raise ConfigurationError(
                f"subsets must be >= 3 (the LDS is a rank correlation over subsets; 64 or more "
                f"gives a usable standard error), got {self.subsets}"
            )
        if not (math.isfinite(self.subset_fraction) and 0 < self.subset_fraction < 1):
            raise ConfigurationError(
                f"subset_fraction must lie strictly between 0 and 1 (0.5: half-size subsets, "
                f"the TRAK paper's protocol), got {self.subset_fraction}"
            )
        if self.loo_examples < 0:
            raise ConfigurationError(f"loo_examples must be >= 0, got {self.loo_examples}")
        unknown = [e for e in self.estimators if e not in EVALUATE_ESTIMATORS]
        if unknown or not self.estimators:
            raise ConfigurationError(
                f"estimators must name one or more of {list(EVALUATE_ESTIMATORS)}, got "
                f"{list(self.estimators)}"
            )
        if len(set(self.estimators)) != len(self.estimators):
            raise ConfigurationError(f"estimators lists a name twice: {list(self.estimators)}")

    def run_config(self) -> RunConfig:
        """The :class:`RunConfig` of the shared keys (validated), for :class:`Run` to resolve."""
        return RunConfig(
            model=self.model,
            train=self.train,
            queries=self.queries,
            checkpoints=self.checkpoints,
            task=self.task,
            measurement=self.measurement,
            path=self.path,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            output=self.output,
            progress=self.progress,
        )


# -- types ---------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(T, True)`` for ``T | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(a) for a in typing.get_args(inner))
    elif typing.get_origin(inner) is tuple:
        text = f"a list of {typing.get_args(inner)[0].__name__}"
    elif inner is Path:
        text = "a path"
    else:
        text = f"a {inner.__name__}"
    return text + (" (or absent)" if optional else "")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (lists become tuples, str becomes Path)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigurationError(f"{name} must be {_describe(tp)}, got None")
    origin = typing.get_origin(inner)
    ok = True
    if origin is Literal:
        ok = value in typing.get_args(inner)
    elif origin is tuple:
        item = typing.get_args(inner)[0]
        values = [value] if isinstance(value, (int, float, str)) else value
        if isinstance(values, (list, tuple)):
            return tuple(_coerce(f"{name} entries", item, v) for v in values)
        ok = False
    elif inner is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        ok = False
    elif inner is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            return float(value)
    elif inner is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif inner is bool:
        ok = isinstance(value, bool)
    elif inner is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigurationError(f"{name} must be {_describe(tp)}, got {value!r}")
    return value


def check_types(obj: Any) -> None:
    """Check (and normalize) every field of the dataclass ``obj`` against its annotation.

    Call it first in ``__post_init__`` of a config dataclass: values from a TOML file are then
    checked like flags (a string where an int belongs is a :class:`ConfigurationError`).
    """
    for name, tp in _hints(type(obj)).items():
        object.__setattr__(obj, name, _coerce(name, tp, getattr(obj, name)))


# -- command-line flags --------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls`` (``batch_size`` → ``--batch-size``).

    Types come from the annotations: ``bool`` → ``--x/--no-x``, ``Literal`` → choices, ``T |
    None`` → a ``T``, ``tuple[T, ...]`` → one or more values. Flags default to "not given", so
    :func:`load_config` can tell a flag from a value in the config file. Adds ``--config``.
    """
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="TOML file with the same keys as these flags (flags override it)",
    )
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp, _ = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING and f.default not in (None, ()):
            shown = f.default if not isinstance(f.default, bool) else str(f.default).lower()
            helptext += f" (default: {shown})"
        elif f.default is dataclasses.MISSING:
            helptext += " (required, here or in --config)"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helptext}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
            kw.pop("metavar", None)
        elif origin is Literal:
            kw["choices"] = typing.get_args(tp)
        elif origin is tuple:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(tp)[0]
        else:
            kw["type"] = str if tp is Path else tp
        parser.add_argument(flag, **kw)


def config_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` that were given as flags in ``args``."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# -- TOML ----------------------------------------------------------------------------------------


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The table in a TOML file (``tomllib``; ``tomli`` on Python 3.10), or a named error."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                "reading TOML on Python 3.10 needs tomli: pip install tomli"
            ) from exc
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"config file {str(path)!r} does not exist or is not a file")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def load_config(
    cls: type,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """``cls(**values)`` from the defaults, then ``config_file`` (TOML), then ``overrides``.

    Keys may be spelled with dashes or underscores (``batch-size`` or ``batch_size``). Unknown
    keys and missing required fields raise :class:`ConfigurationError` naming them.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if config_file is not None:
        for key, value in read_toml(config_file).items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigurationError(
                    f"config file {os.fspath(config_file)!r}: unknown key {key!r}; valid keys: "
                    f"{', '.join(sorted(fields))}"
                )
            values[name] = value
    values.update(overrides or {})
    missing = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and n not in values
    ]
    if missing:
        raise ConfigurationError(
            "missing required setting(s): "
            + ", ".join(f"{n} (--{n.replace('_', '-')})" for n in missing)
            + "; give them as flags or in the --config file"
        )
    return cls(**values)
