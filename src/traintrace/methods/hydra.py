"""HYDRA (Chen et al., "Hydra: Hypergradient Data Relevance Analysis", AAAI 2021).

Give every training example a weight ``w_i`` in the SGD update

    θ_{t+1} = θ_t − (η_t / B_t) Σ_{j ∈ B_t} w_j ∇l(z_j, θ_t)          (w = 1 during training)

The hypergradient of the final query measurement ``f(z', θ_T)`` w.r.t. ``w_i``, with every
Hessian term dropped, is ``−∇f(z', θ_T) · a_i`` with the *step-weighted gradient sum*

    a_i = Σ_{t : i ∈ B_t} (η_t / B_t) ∇l(z_i, θ_t).

:class:`TrajectoryRecorder` accumulates ``a_i`` (or its random projection) inside the user's own
training loop, one call per optimizer step, into an on-disk array ``[n_train, width]``;
:class:`HYDRA` scores queries against it at the final parameters. No training-set pass is needed
after training.
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from traintrace.checkpoints import Checkpoint
from traintrace.data import as_loader, batch_size_of, dataset_length, progress_batches, to_plain
from traintrace.exceptions import ConfigurationError, NotFittedError
from traintrace.features.params import Layers, select_parameters
from traintrace.features.store import write_atomic
from traintrace.methods.base import Data
from traintrace.methods.gradient import GradientEstimator
from traintrace.methods.preconditioners import Identity
from traintrace.methods.stored import FeatureServing
from traintrace.retrieval.exact import as_feature_source
from traintrace.task import Task

__all__ = ["HYDRA", "RecordedTrajectory", "TrajectoryRecorder"]

_FORMAT = "traintrace.hydra/1"
_META = "meta.json"
_ACC = "accumulator.npy"
_COUNTS = "counts.npy"
_MIB = 2**20
_GIB = 2**30

Mode = Literal["new", "resume", "overwrite", "read"]
_MODES = ("new", "resume", "overwrite", "read")


# -- featurizers: exact gradients or a projection ---------------------------------------------------
class _ExactFeatures:
    """Exact flat per-example gradients from the engine's hooked capture, ``width = P``.

    Covered layers need no ``vmap`` (padded batches and SDPA attention stay batched); the rest
    use exact ``vmap`` gradients (:class:`~traintrace.features.engine.ExactGradients`).
    """

    def __init__(self, model: nn.Module, task: Task, layers: Layers) -> None:
        from traintrace.features.engine import ExactGradients

        self.engine = ExactGradients(model, task, layers)
        self.width = self.engine.layout.numel

    def features(self, state: Mapping[str, Tensor], batch: Any, kind: str, where: str) -> Tensor:
        cap = self.engine.capture(state, batch, kind, where=where)  # type: ignore[arg-type]
        return self.engine.flatten(cap)


class _ForeignFeatures:
    """Any featurizer with ``.features(state, batch, kind) -> [B, width]`` and ``.width``."""

    def __init__(self, featurizer: Any) -> None:
        self.featurizer = featurizer
        self.width = int(featurizer.width)

    def features(self, state: Mapping[str, Tensor], batch: Any, kind: str, where: str) -> Tensor:
        return self.featurizer.features(state, batch, kind)


def _projection_spec(projection: Any) -> dict[str, Any]:
    if projection is None:
        return {"kind": "none"}
    if isinstance(projection, int) and not isinstance(projection, bool):
        return {"kind": "dimension", "dimension": int(projection)}
    cls = type(projection)
    return {
        "kind": "object",
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "repr": repr(projection),
    }


def _same_projection(stored: dict[str, Any], given: dict[str, Any]) -> bool:
    """Equal specs; for objects the type, and the repr unless it is the default ``<... at 0x>``."""
    if stored.get("kind") != "object" or given.get("kind") != "object":
        return stored == given
    if stored["type"] != given["type"]:
        return False
    default = " object at 0x" in stored["repr"] or " object at 0x" in given["repr"]
    return default or stored["repr"] == given["repr"]


def _make_featurizer(model: nn.Module, task: Task, layers: Layers, projection: Any) -> Any:
    """Exact gradients for ``projection=None``; else a ``ProjectedGradients`` (imported lazily)."""
    if projection is None:
        return _ExactFeatures(model, task, layers)
    if hasattr(projection, "features") and hasattr(projection, "width"):
        return _ForeignFeatures(projection)
    try:
        from traintrace.features.projections import ProjectedGradients
    except ImportError as exc:
        raise ConfigurationError(
            f"projection={projection!r} needs traintrace.features.projections.ProjectedGradients, "
            f"which could not be imported ({exc}); record exact gradients with projection=None, "
            "or pass a featurizer object with .features(state, batch, kind) and .width"
        ) from exc
    return _ForeignFeatures(ProjectedGradients(model, task, layers, projection))


def _architecture(model: nn.Module, names: list[str]) -> list[list[Any]]:
    params = dict(model.named_parameters())
    return [[n, list(params[n].shape)] for n in names]


def _numpy_dtype(model: nn.Module, dtype: torch.dtype | None) -> np.dtype:
    if dtype is None:
        dtype = next(model.parameters()).dtype
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ConfigurationError(
            f"the accumulator dtype must be torch.float32 or torch.float64, got {dtype}"
        )
    return np.dtype("float64" if dtype == torch.float64 else "float32")


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Atomic write: a killed process leaves the old file or the new one, never half of one."""
    write_atomic(Path(path), json.dumps(payload, indent=1), durable=True)


def _learning_rate(lr: Any, warned: list[bool]) -> float:
    """``lr`` as a float; an optimizer's (single) learning rate, with a warning if not plain SGD."""
    if lr is None:
        raise ConfigurationError(
            "record() needs lr, the learning rate used for this step "
            "(optimizer.param_groups[0]['lr'], or pass the optimizer itself)"
        )
    if isinstance(lr, torch.optim.Optimizer):
        groups = lr.param_groups
        lrs = {float(g["lr"]) for g in groups}
        if len(lrs) != 1:
            raise ConfigurationError(
                f"the optimizer has parameter groups with different learning rates {sorted(lrs)}; "
                "HYDRA needs one η per step: pass lr= explicitly"
            )
        plain = type(lr) is torch.optim.SGD and all(
            not g.get("momentum", 0) and not g.get("nesterov", False) for g in groups
        )
        if not plain and not warned[0]:
            warned[0] = True
            warnings.warn(
                f"{type(lr).__name__} with these settings is not plain SGD: HYDRA's step-weighted "
                "gradient sum assumes θ_(t+1) = θ_t − η_t·(mean gradient), so with momentum or "
                "adaptive steps its scores are an approximation",
                RuntimeWarning,
                stacklevel=3,
            )
        lr = lrs.pop()
    try:
        value = float(lr)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"lr must be a number (or the optimizer), got {type(lr).__name__}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(f"lr must be a finite number >= 0, got {lr!r}")
    return value


def _as_indices(indices: Any, n_train: int, size: int) -> Tensor:
    if indices is None:
        raise ConfigurationError(
            "record() needs indices, the training-set index of every example in the batch "
            "(have your Dataset return its index, or use a fixed batch schedule)"
        )
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigurationError(
            f"indices must be a sequence or tensor of integers, got {type(indices).__name__}"
        ) from None
    if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex():
        raise ConfigurationError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.reshape(-1).to(device="cpu", dtype=torch.long)
    if idx.numel() != size:
        raise ConfigurationError(
            f"the batch holds {size} examples but {idx.numel()} indices were given; pass one "
            "training-set index per example, in batch order"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_train):
        bad = idx[(idx < 0) | (idx >= n_train)][:10].tolist()
        raise ConfigurationError(
            f"indices {bad} are outside the training set [0, {n_train}); the recorder was created "
            f"with n_train={n_train}"
        )
    return idx


# -- the recorder ---------------------------------------------------------------------------------
class TrajectoryRecorder:
    """Accumulate HYDRA's step-weighted training gradients inside your own training loop.

    For every training example ``i`` it keeps

        a_i = Σ_{t : i ∈ B_t} (η_t / B_t) · ∇l(z_i, θ_t)        (a row of ``[n_train, width]``)

    where ``t`` runs over the optimizer steps you :meth:`record`, ``B_t`` is that step's batch,
    ``η_t`` its learning rate and ``∇l(z_i, θ_t)`` the per-example gradient of ``task.loss`` at
    the parameters the step's gradient was computed at (projected to ``width`` dimensions when
    ``projection`` is given — projections are linear, so the projection of ``a_i`` is stored).

    Call :meth:`record` **once per optimizer step, before** ``optimizer.step()`` (before or after
    ``loss.backward()``; it does not touch ``.grad``), so that the model still holds ``θ_t``::

        with tt.TrajectoryRecorder(model, task, n_train=len(train), path="runs/hydra") as rec:
            for x, y, idx in loader:              # the Dataset also returns each example's index
                loss = task.loss(model(x), (x, y)).mean()
                opt.zero_grad(); loss.backward()
                rec.record((x, y), idx, lr=opt.param_groups[0]["lr"])
                opt.step()
        hydra = tt.HYDRA(model, task, "runs/hydra").fit()

    **Assumptions.** The formula is exact (up to the dropped Hessian terms) for plain SGD whose
    loss is the *mean* of ``task.loss`` over the batch (``loss_reduction="sum"``: the sum, weight
    ``η_t``). Weight decay does not change it. With momentum, Adam or other adaptive optimizers
    the update is not ``η_t ×`` the gradient and HYDRA's scores are an approximation (passing the
    optimizer as ``lr`` warns once). Gradients are taken in eval mode (dropout off, BatchNorm with
    running statistics), like every per-example gradient in traintrace; for models with dropout
    or BatchNorm they differ from the training-mode gradient of the step.

    **Storage.** ``path`` is a directory holding ``accumulator.npy`` (a numpy memmap
    ``[n_train, width]``), ``counts.npy`` (how often each example was recorded) and ``meta.json``
    (settings, model parameter names and shapes, number of recorded steps, a dirty flag). With
    ``path=None`` a temporary directory is used and deleted when the recorder is garbage
    collected. Updates are buffered in memory (at most ``flush_every`` steps or ``buffer_mib``)
    and written by :meth:`flush`; the files on disk always hold exactly the first
    :attr:`steps_on_disk` recorded steps. Call :meth:`flush` when you save a training checkpoint,
    then resume both together: ``TrajectoryRecorder(..., path, mode="resume")`` continues from
    :attr:`steps_recorded`, and ``record(..., step=t)`` refuses to record step ``t`` twice or to
    skip one. A process killed *during* a flush leaves the store marked dirty, and reopening it
    raises.

    Args:
        model: the network being trained (its current parameters are read at each call).
        task: defines ``l`` (``task.loss``).
        n_train: size of the training set (rows of the accumulator). May be ``None`` only with
            ``mode="resume"`` or ``"read"`` of an existing store.
        path: directory of the store, or ``None`` for a temporary one.
        layers: parameters to differentiate (``None`` all, ``"last"``, module names).
        projection: ``None`` for exact gradients (``width = P``); an int ``k`` or a projection
            config, passed to ``traintrace.features.projections.ProjectedGradients(model, task,
            layers, projection)``; or a featurizer object with ``.features(state, batch, kind)``
            and ``.width``.
        mode: ``"new"`` (default; refuses a directory that already holds a store), ``"resume"``
            (reopen an existing store, checking every setting, or create it when absent),
            ``"overwrite"`` (delete any existing store) or ``"read"`` (read-only; settings such as
            ``layers`` and ``n_train`` come from the store).
        loss_reduction: ``"mean"`` (step weight ``η_t / B_t``) or ``"sum"`` (``η_t``): how your
            training loss combines the batch's per-example losses.
        dtype: accumulator dtype, ``torch.float32`` or ``torch.float64`` (default: the model's
            dtype; float32 for half precision models).
        flush_every: write buffered updates to disk every this many steps.
        buffer_mib: also write when the buffered updates exceed this size.

    Cost per step: one vmapped forward+backward on the batch (the per-example gradients) besides
    your own; disk: ``n_train × width`` numbers.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        n_train: int | None,
        path: str | os.PathLike[str] | None = None,
        *,
        layers: Layers = None,
        projection: Any = None,
        mode: Mode = "new",
        loss_reduction: Literal["mean", "sum"] = "mean",
        dtype: torch.dtype | None = None,
        flush_every: int = 100,
        buffer_mib: float = 256.0,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"task must be a traintrace Task (tt.Classification(), ...), got {task!r}"
            )
        if mode not in _MODES:
            raise ConfigurationError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ConfigurationError(
                f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}"
            )
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ConfigurationError(f"flush_every must be a positive integer, got {flush_every!r}")
        if not buffer_mib > 0:
            raise ConfigurationError(f"buffer_mib must be positive, got {buffer_mib!r}")
        if n_train is not None:
            try:
                n_train = operator.index(n_train)
            except TypeError:
                raise ConfigurationError(
                    f"n_train must be an integer, got {type(n_train).__name__}"
                ) from None
            if n_train < 1:
                raise ConfigurationError(f"n_train must be >= 1, got {n_train}")
        self.model = model
        self.task = task
        self.loss_reduction = loss_reduction
        self.flush_every = flush_every
        self.buffer_mib = float(buffer_mib)
        self.read_only = mode == "read"
        self._closed = False
        self._warned_optimizer = [False]
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_steps = 0
        self._pending_lr = 0.0
        self._pending_bytes = 0

        if path is None:
            if mode in ("resume", "read"):
                raise ConfigurationError(f"mode={mode!r} needs the path of an existing store")
            self.path = tempfile.mkdtemp(prefix="traintrace-hydra-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
        else:
            self.path = os.fspath(path)
            self._cleanup = None
        meta_path = os.path.join(self.path, _META)
        exists = os.path.exists(meta_path)
        if mode == "read" and not exists:
            raise ConfigurationError(
                f"{self.path!r} holds no HYDRA store ({_META} is missing); record one with "
                "TrajectoryRecorder(model, task, n_train, path) during training"
            )
        if mode == "new" and exists:
            raise ConfigurationError(
                f"{self.path!r} already holds a HYDRA store; pass mode='resume' to continue "
                "recording into it, mode='overwrite' to start again, or another path"
            )
        if mode == "overwrite" and exists:
            for name in (_META, _ACC, _COUNTS):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, name))
            exists = False

        if exists:
            self._open_existing(layers, projection, n_train, dtype, strict=mode == "resume")
        else:
            if n_train is None:
                raise ConfigurationError("n_train is required to create a new HYDRA store")
            self._create(layers, projection, n_train, dtype)

    # -- creating and opening ---------------------------------------------------------------------
    def _create(self, layers: Layers, projection: Any, n_train: int, dtype: Any) -> None:
        os.makedirs(self.path, exist_ok=True)
        self.parameter_names = select_parameters(self.model, layers)
        self._projection = projection
        self._featurizer = _make_featurizer(self.model, self.task, layers, projection)
        self.n_train = n_train
        self.width = int(self._featurizer.width)
        np_dtype = _numpy_dtype(self.model, dtype)
        self._meta: dict[str, Any] = {
            "format": _FORMAT,
            "n_train": n_train,
            "width": self.width,
            "dtype": np_dtype.name,
            "parameters": _architecture(self.model, self.parameter_names),
            "projection": _projection_spec(projection),
            "loss_reduction": self.loss_reduction,
            "task": repr(self.task),
            "steps": 0,
            "lr_sum": 0.0,
            "dirty": False,
        }
        acc = np.lib.format.open_memmap(
            os.path.join(self.path, _ACC), mode="w+", dtype=np_dtype, shape=(n_train, self.width)
        )
        counts = np.lib.format.open_memmap(
            os.path.join(self.path, _COUNTS), mode="w+", dtype=np.int64, shape=(n_train,)
        )
        acc.flush()
        counts.flush()
        del acc, counts
        _write_json(os.path.join(self.path, _META), self._meta)
        self._open_arrays()

    def _open_existing(
        self, layers: Layers, projection: Any, n_train: int | None, dtype: Any, strict: bool
    ) -> None:
        with open(os.path.join(self.path, _META)) as fh:
            meta = json.load(fh)
        if meta.get("format") != _FORMAT:
            raise ConfigurationError(
                f"{self.path!r} is not a HYDRA store of this version (format "
                f"{meta.get('format')!r}, expected {_FORMAT!r})"
            )
        if meta.get("dirty"):
            raise ConfigurationError(
                f"the HYDRA store {self.path!r} was interrupted while writing recorded steps "
                f"{meta['steps']}..{meta.get('target_steps', '?')}, so its accumulator is "
                "inconsistent. Record again with mode='overwrite'."
            )
        self._meta = meta
        self.n_train = int(meta["n_train"])
        self.width = int(meta["width"])
        stored_names = [p[0] for p in meta["parameters"]]
        mismatches = []
        if n_train is not None and n_train != self.n_train:
            mismatches.append(f"n_train: store {self.n_train}, given {n_train}")
        params = dict(self.model.named_parameters())
        if strict or layers is not None:
            names = select_parameters(self.model, layers)
            if names != stored_names:
                mismatches.append(f"parameters: store {stored_names}, given {names}")
        else:
            names = stored_names
            missing = [n for n in names if n not in params]
            if missing:
                raise ConfigurationError(
                    f"the HYDRA store {self.path!r} was recorded for parameters {missing} that "
                    f"{type(self.model).__name__} does not have"
                )
        if names == stored_names and _architecture(self.model, names) != meta["parameters"]:
            mismatches.append(
                f"parameter shapes: store {meta['parameters']}, model "
                f"{_architecture(self.model, names)}"
            )
        if strict and self.loss_reduction != meta["loss_reduction"]:
            mismatches.append(
                f"loss_reduction: store {meta['loss_reduction']!r}, given {self.loss_reduction!r}"
            )
        if strict and dtype is not None and _numpy_dtype(self.model, dtype).name != meta["dtype"]:
            mismatches.append(f"dtype: store {meta['dtype']}, given {dtype}")
        spec = meta["projection"]
        if projection is None and spec["kind"] == "dimension":
            projection = int(spec["dimension"])
        elif projection is None and spec["kind"] == "object":
            raise ConfigurationError(
                f"the HYDRA store {self.path!r} was recorded with projection {spec['repr']}; pass "
                "the same projection= to reopen it"
            )
        given = _projection_spec(projection)
        if not _same_projection(spec, given):
            mismatches.append(f"projection: store {spec}, given {given}")
        if mismatches:
            raise ConfigurationError(
                f"the HYDRA store {self.path!r} does not match these settings: "
                + "; ".join(mismatches)
                + ". Pass the settings it was recorded with, or another path."
            )
        self.loss_reduction = meta["loss_reduction"]
        self.parameter_names = names
        self._projection = projection
        self._featurizer = _make_featurizer(self.model, self.task, names, projection)
        if int(self._featurizer.width) != self.width:
            raise ConfigurationError(
                f"the featurizer gives width {self._featurizer.width} but the store holds "
                f"{self.width} columns"
            )
        self._open_arrays()

    def _open_arrays(self) -> None:
        mode = "r" if self.read_only else "r+"
        self._acc = np.load(os.path.join(self.path, _ACC), mmap_mode=mode)
        self._counts = np.load(os.path.join(self.path, _COUNTS), mmap_mode=mode)
        if self._acc.shape != (self.n_train, self.width) or self._counts.shape != (self.n_train,):
            raise ConfigurationError(
                f"the HYDRA store {self.path!r} is damaged: accumulator {self._acc.shape}, counts "
                f"{self._counts.shape}, metadata says ({self.n_train}, {self.width})"
            )

    # -- state ------------------------------------------------------------------------------------
    @property
    def steps_on_disk(self) -> int:
        """Steps whose updates are written to the store's files."""
        return int(self._meta["steps"])

    @property
    def steps_recorded(self) -> int:
        """Steps recorded so far (on disk plus buffered)."""
        return self.steps_on_disk + self._pending_steps

    @property
    def dtype(self) -> torch.dtype:
        """The accumulator's dtype."""
        return torch.float64 if self._meta["dtype"] == "float64" else torch.float32

    @property
    def projection_spec(self) -> dict[str, Any]:
        """How features were made: ``{"kind": "none"}`` (exact gradients) or the projection."""
        return dict(self._meta["projection"])

    def features(self, state: Mapping[str, Tensor], batch: Any, kind: str, where: str) -> Tensor:
        """Per-example features (exact or projected gradients) of ``kind`` at ``state``."""
        return self._featurizer.features(state, batch, kind, where)

    def featurizer_for(self, model: nn.Module, task: Task) -> Any:
        """A featurizer with this store's parameters and projection for another model/task.

        Used by :class:`HYDRA` so that the query side uses *its* task's measurement. A featurizer
        object given as ``projection`` carries its own task and is returned as it is.
        """
        return _make_featurizer(model, task, self.parameter_names, self._projection)

    def counts(self) -> Tensor:
        """How many recorded steps used each training example (flushed steps), ``[n_train]``."""
        self._flush_if_writable()
        return torch.from_numpy(np.array(self._counts))

    def accumulator(self) -> Tensor:
        """The whole accumulator ``[n_train, width]`` in memory (a copy; small stores only)."""
        self._flush_if_writable()
        return torch.from_numpy(np.array(self._acc))

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` of the accumulator, ``[rows, width]`` (a copy), for block reads
        of a store too large for :meth:`accumulator`."""
        self._flush_if_writable()
        return torch.from_numpy(np.array(self._acc[start:stop]))

    # -- recording --------------------------------------------------------------------------------
    def record(
        self,
        batch: Any,
        indices: Any,
        lr: Any,
        *,
        batch_size: int | None = None,
        step: int | None = None,
    ) -> None:
        """Add ``(η / B) ∇l(z_i, θ_t)`` to row ``indices[k]`` for every example ``k`` of ``batch``.

        Call once per optimizer step, **before** ``optimizer.step()``: the gradients are taken at
        the model's current parameters, which must be the ``θ_t`` that step's gradient is
        computed at.

        Args:
            batch: the step's training batch, in any format the task reads.
            indices: the training-set index of each example of ``batch``, in batch order (a list,
                array or integer tensor; repeats are allowed and each counts).
            lr: the learning rate ``η_t`` in force for this step, or the optimizer (its single
                learning rate is read; non-plain-SGD optimizers warn once).
            batch_size: ``B``, the number of examples your loss averages over, when it differs
                from ``len(indices)`` (gradient accumulation over micro-batches: record each
                micro-batch with the full step's ``B``).
            step: optional guard: the 0-based number of this call; it must equal
                :attr:`steps_recorded`, so that a resumed run neither repeats nor skips steps.

        Raises:
            ConfigurationError: bad ``lr`` or ``indices`` (out of range, wrong length), a closed
                or read-only recorder, or a ``step`` that does not follow the recorded ones.
        """
        if self._closed:
            raise ConfigurationError("this TrajectoryRecorder is closed; open a new one to record")
        if self.read_only:
            raise ConfigurationError("this TrajectoryRecorder was opened with mode='read'")
        if step is not None and step != self.steps_recorded:
            raise ConfigurationError(
                f"record(step={step}) but {self.steps_recorded} steps are recorded (the next is "
                f"step {self.steps_recorded}): resume training from the checkpoint saved with "
                "the recorder's last flush, or reopen the store with mode='overwrite'"
            )
        eta = _learning_rate(lr, self._warned_optimizer)
        device = next(self.model.parameters()).device
        plain = to_plain(batch, device)
        size = batch_size_of(plain)
        idx = _as_indices(indices, self.n_train, size)
        if self.loss_reduction == "mean":
            denom = size if batch_size is None else batch_size
            if isinstance(denom, bool) or not isinstance(denom, (int, np.integer)) or denom < size:
                raise ConfigurationError(
                    f"batch_size must be an integer >= the {size} examples of this batch, got "
                    f"{batch_size!r}"
                )
            weight = eta / denom if denom else 0.0
        else:
            weight = eta
        if size:
            state = self.model.state_dict()
            feats = self.features(state, plain, "loss", f"recorded step {self.steps_recorded}")
            rows = (feats.detach() * weight).to(device="cpu", dtype=self.dtype)
            self._pending.append((idx, rows))
            self._pending_bytes += rows.numel() * rows.element_size()
        self._pending_steps += 1
        self._pending_lr += eta
        if self._pending_steps >= self.flush_every or self._pending_bytes >= self.buffer_mib * _MIB:
            self.flush()

    def flush(self) -> None:
        """Write the buffered steps to disk (atomically as far as the metadata is concerned)."""
        if self.read_only or self._closed or not self._pending_steps:
            return
        target = self.steps_on_disk + self._pending_steps
        meta_path = os.path.join(self.path, _META)
        self._meta.update(dirty=True, target_steps=target)
        _write_json(meta_path, self._meta)
        if self._pending:
            idx = torch.cat([i for i, _ in self._pending])
            rows = torch.cat([r for _, r in self._pending])
            unique, inverse = torch.unique(idx, sorted=True, return_inverse=True)
            summed = torch.zeros(len(unique), self.width, dtype=rows.dtype)
            summed.index_add_(0, inverse, rows)
            hits = torch.bincount(inverse, minlength=len(unique))
            where = unique.numpy()
            self._acc[where] = self._acc[where] + summed.numpy()
            self._counts[where] = self._counts[where] + hits.numpy()
            self._acc.flush()
            self._counts.flush()
        self._meta["lr_sum"] = float(self._meta["lr_sum"]) + self._pending_lr
        self._meta.update(steps=target, dirty=False)
        self._meta.pop("target_steps", None)
        _write_json(meta_path, self._meta)
        self._pending.clear()
        self._pending_steps = 0
        self._pending_lr = 0.0
        self._pending_bytes = 0

    def _flush_if_writable(self) -> None:
        if not self.read_only and not self._closed:
            self.flush()

    def close(self) -> None:
        """Flush and stop recording. The store (unless temporary) stays readable by HYDRA."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self.read_only = True
        # reopen read-only so that HYDRA can still stream it
        self._open_arrays()

    def __enter__(self) -> TrajectoryRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and self._pending_steps:
                self.flush()
        except Exception:  # best effort at garbage collection; never raise from __del__
            pass

    def __repr__(self) -> str:
        return (
            f"TrajectoryRecorder(path={self.path!r}, n_train={self.n_train}, width={self.width}, "
            f"steps={self.steps_recorded}, projection={self._meta['projection']})"
        )


# -- the estimator --------------------------------------------------------------------------------
class _RecordedRows:
    """The recorder's accumulator as a retrieval feature source, read from disk in row blocks
    (:class:`~traintrace.retrieval.exact.FeatureSource`): nothing of size ``n × width`` is
    loaded; the operating system caches the file."""

    checkpoints = 1

    def __init__(self, recorder: TrajectoryRecorder) -> None:
        self._rec = recorder
        self.n, self.width = recorder.n_train, recorder.width
        self.read_dtype = recorder.dtype

    def read(
        self, checkpoint: int, start: int = 0, stop: int | None = None, *, out: Tensor | None = None
    ) -> Tensor:
        rows = self._rec.rows(start, stop)
        if out is None:
            return rows
        out.copy_(rows)
        return out

    def norms(self, checkpoint: int, start: int = 0, stop: int | None = None) -> Tensor:
        return self.read(checkpoint, start, stop).norm(dim=1)


class RecordedTrajectory(FeatureServing):
    """``R`` = the step-weighted gradient sums ``a_i`` a :class:`TrajectoryRecorder` wrote.

    ``fit`` opens the recorder's store (no pass over the training data): its accumulator is the
    training side, in memory when at most ``max_feature_gib``, else read from disk block by block.
    The query side is the recorder's featurizer (exact or projected gradients) rebuilt for the
    estimator's model and task, so queries use that task's measurement. Scores and top-k go
    through the shared retrieval (:class:`~traintrace.methods.stored.FeatureServing`).
    """

    kind = "trajectory"

    def __init__(
        self,
        recorder: TrajectoryRecorder | str | os.PathLike[str],
        *,
        projection: Any,
        max_feature_gib: float,
    ) -> None:
        self.recorder = recorder
        self.projection = projection
        self.max_feature_gib = max_feature_gib
        self.names: list[str] = []
        self.coverage: dict[str, str] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "featurizer": "recorded trajectory",
            "store": str(getattr(self.recorder, "path", self.recorder)),
        }

    def fit(self, est: GradientEstimator, loader: Any, n: int | None) -> None:
        rec = self.recorder
        if not isinstance(rec, TrajectoryRecorder):
            rec = TrajectoryRecorder(
                est.model, est.task, None, rec, mode="read", projection=self.projection
            )
        rec._flush_if_writable()
        if rec.steps_on_disk == 0:
            raise ConfigurationError(
                f"the HYDRA store {rec.path!r} holds no recorded steps; call "
                "recorder.record(batch, indices, lr) once per optimizer step during training"
            )
        params = dict(est.model.named_parameters())
        shapes = [
            [name, list(params[name].shape) if name in params else None]
            for name, _ in rec._meta["parameters"]
        ]
        if shapes != rec._meta["parameters"]:
            raise ConfigurationError(
                f"the HYDRA store was recorded for parameters {rec._meta['parameters']}, but the "
                f"model has {shapes}"
            )
        if n is not None and n != rec.n_train:
            raise ConfigurationError(
                f"the training data has {n} examples but the HYDRA store was recorded with "
                f"n_train={rec.n_train}"
            )
        gradients = rec.featurizer_for(est.model, est.task)
        if int(gradients.width) != rec.width:
            raise ConfigurationError(
                f"the query featurizer gives width {gradients.width} but the store holds "
                f"{rec.width} columns"
            )
        self.gradients = gradients
        self.names = list(rec.parameter_names)
        self.coverage = {name: f"recorded:{rec.projection_spec['kind']}" for name in self.names}
        itemsize = 8 if rec.dtype == torch.float64 else 4
        size_gib = rec.n_train * rec.width * itemsize / _GIB
        est.recorder_ = rec
        est.counts_ = rec.counts()
        est.train_features_ = (
            [rec.accumulator()] if size_gib <= self.max_feature_gib else _RecordedRows(rec)
        )

    def _train_rows(self, est: GradientEstimator) -> Any:
        return est.train_features_

    def _query_features(
        self, est: GradientEstimator, c: int, state: dict[str, Tensor], batch: Any, offset: int
    ) -> Tensor:
        return self.gradients.features(state, batch, "measurement", f"query batch at {offset}")

    def self_influence(self, est: GradientEstimator, train: Data | None = None) -> Tensor:
        """``∇l(z_i, θ_T) · a_i`` from one pass over ``train`` (or the data given to ``fit``)."""
        data = train if train is not None else est.train_
        if data is None:
            raise NotFittedError(
                "HYDRA.self_influence needs the training data (in recorded-index order): pass it "
                "here or to fit(train)"
            )
        loader = as_loader(data, est.batch_size)
        source = as_feature_source(est.train_features_)
        out = torch.zeros(est.n_train_, dtype=est.recorder_.dtype)
        count = 0
        for offset, batch in progress_batches(
            loader, est.device, "HYDRA self-influence", est.progress
        ):
            g = self.gradients.features(est.state_, batch, "loss", f"training batch at {offset}")
            size = g.shape[0]
            if offset + size > est.n_train_:
                raise ConfigurationError(
                    f"the training data yields more than n_train={est.n_train_} examples"
                )
            rows = source.read(0, offset, offset + size)
            out[offset : offset + size] = (
                (g * rows.to(g.device, g.dtype)).sum(dim=1).cpu().to(out.dtype)
            )
            count += size
        if count != est.n_train_:
            raise ConfigurationError(
                f"the training data yielded {count} examples but the store has "
                f"n_train={est.n_train_}"
            )
        return out


class HYDRA(GradientEstimator):
    """HYDRA scores from a recorded training trajectory.

    ``score(z_i, z') = ∇f(z', θ_T) · a_i``,  ``a_i = Σ_{t : i ∈ B_t} (η_t / B_t) ∇l(z_i, θ_t)``

    where ``a_i`` was accumulated by a :class:`TrajectoryRecorder` during training (projected when
    it was recorded with a projection: then the query gradient gets the same projection) and
    ``f`` is the task's query measurement oriented so that lower is better, taken at the final
    parameters ``θ_T``. This is *minus* Chen et al.'s Hessian-free hypergradient
    ``∂f(z', θ_T)/∂w_i`` of the query measurement w.r.t. example ``i``'s weight in every SGD step
    that used it; with a single recorded step it is the exact derivative.

    Composition (:mod:`traintrace.methods.gradient`): ``R`` = the recorded sums ``a_i``
    (:class:`RecordedTrajectory`; the query side is the recorder's gradient featurizer at
    ``θ_T``), ``P = I``, ``w = 1``, one checkpoint ``θ_T``.

    **Sign:** positive = the training example *helps* the query (up-weighting it in training
    would have lowered the query's loss / raised its margin). **Orientation:** ``[n_query,
    n_train]``. Examples never recorded score 0.

    Args:
        model: the network, evaluated functionally in eval mode (not modified).
        task: loss and measurement (the loss must be the one used while recording).
        recorder: a :class:`TrajectoryRecorder` or the path of its store.
        checkpoint_final: ``θ_T``, as a :class:`~traintrace.Checkpoint` or state dict; ``None``
            snapshots the model's parameters when :meth:`fit` is called.
        projection: only to reopen a path recorded with a projection object (an int dimension
            is read from the store).
        batch_size: batch size used when Datasets are given.
        max_feature_gib: the accumulator is loaded into memory at ``fit`` when it is at most
            this size, else read from disk in blocks for every query block.
        query_block: queries featurized and scored together.
        progress: tqdm progress bars.

    Cost: ``fit`` reads the store (no pass over the training data); ``score`` costs one
    forward+backward per query plus ``n_query × n_train × width`` multiply-adds; ``top_k`` the
    same with memory ``[n_query, k]`` (exact; FAISS with ``method="faiss"`` on an in-memory
    accumulator); ``self_influence`` one pass over the training data at ``θ_T``.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        recorder: TrajectoryRecorder | str | os.PathLike[str],
        checkpoint_final: Checkpoint | Mapping[str, Tensor] | None = None,
        *,
        projection: Any = None,
        batch_size: int = 64,
        max_feature_gib: float = 4.0,
        query_block: int = 1024,
        progress: bool = True,
    ) -> None:
        if not isinstance(task, Task):
            raise ConfigurationError(
                f"task must be a traintrace Task (tt.Classification(), ...), got {task!r}"
            )
        if not isinstance(recorder, (TrajectoryRecorder, str, os.PathLike)):
            raise ConfigurationError(
                "recorder must be a tt.TrajectoryRecorder or the path of its store, got "
                f"{type(recorder).__name__}"
            )
        if checkpoint_final is not None and not isinstance(checkpoint_final, Checkpoint):
            if not isinstance(checkpoint_final, Mapping):
                raise ConfigurationError(
                    "checkpoint_final must be a tt.Checkpoint, a state dict or None, got "
                    f"{type(checkpoint_final).__name__}"
                )
            checkpoint_final = Checkpoint(checkpoint_final, name="final")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.recorder = recorder
        self.checkpoint_final = checkpoint_final
        self.projection = projection
        self.max_feature_gib = max_feature_gib
        final = checkpoint_final or Checkpoint(model.state_dict(), name="final (set at fit)")
        super().__init__(
            model,
            task,
            [final],  # θ_T
            # R: the recorded sums a_i; queries: the recorder's gradient featurizer at θ_T
            featurizer=RecordedTrajectory(
                recorder, projection=projection, max_feature_gib=max_feature_gib
            ),
            preconditioners=[Identity()],  # P = I
            weights=[1.0],  # w = 1
            batch_size=batch_size,
            query_block=query_block,
            progress=progress,
        )

    def fit(self, train: Data | None = None) -> HYDRA:
        """Open the recorded accumulator and fix ``θ_T``. Returns ``self``.

        ``train`` is optional: when given, its length is checked against the store and it is kept
        for :meth:`self_influence`.
        """
        n = None
        if train is not None:
            n = dataset_length(as_loader(train, self.batch_size))
        if self.checkpoint_final is None:
            snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.checkpoints = [Checkpoint(snapshot, name="final")]
        self.featurizer.fit(self, None, n)
        self.state_ = self.state(0)
        self.train_ = train
        self.n_train_ = self.recorder_.n_train
        return self

    def self_influence(self, train: Data | None = None) -> Tensor:
        """``∇l(z_i, θ_T) · a_i`` for every training example, ``[n_train]``.

        The training loss at the final parameters against the example's own recorded sum: the
        diagonal of ``score(train, train)`` when the task's measurement is the loss. High values
        flag examples whose training steps kept lowering their own final loss (memorized,
        mislabeled, rare). Needs the training data (``train`` here or given to :meth:`fit`), in
        the order of the recorded indices. Cost: one forward+backward pass over it at ``θ_T``.
        """
        self._check_fitted()
        return self.featurizer.self_influence(self, train)
