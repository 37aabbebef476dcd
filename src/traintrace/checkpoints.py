"""Layer 2 — checkpoints: saved parameters with the weight (learning rate) they carry in a sum.

A :class:`Checkpoint` is a state dict, or a path to one, and the learning rate in force when it
was saved. A path may be

* a file written by ``torch.save``: a bare state dict, or a training checkpoint dict with
  ``model_state_dict`` / ``state_dict`` / ``model`` and, optionally, ``optimizer_state_dict`` /
  ``optimizer`` (the learning rate is then read from it when ``lr`` is not given);
* a ``.safetensors`` file;
* a Hugging Face directory written by ``model.save_pretrained(dir)`` or a ``Trainer``
  checkpoint directory (``checkpoint-500/``): weights from ``model.safetensors`` or
  ``pytorch_model.bin``, or their sharded forms (``*.index.json``); the learning rate from
  ``trainer_state.json`` (the rate logged at the checkpoint's step) or else ``optimizer.pt``.

Every file is read without unpickling code (``torch.load(weights_only=True)``, safetensors),
so a malicious checkpoint is refused, not run. Checkpoints are never loaded *into* the user's
model: estimators read the validated state and evaluate the model functionally
(``torch.func.functional_call``), so the model is left as it was.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from traintrace.data import tensor_bytes
from traintrace.exceptions import CheckpointMismatchError, ConfigurationError, LearningRateWarning
from traintrace.validation import learning_rate as _valid_lr

__all__ = ["Checkpoint", "model_fingerprint", "require_checkpoint"]

_STATE_KEYS = ("model_state_dict", "state_dict", "model")
_OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer")
_SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_scheduler_state_dict")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
# Hugging Face file names, in the order they are tried
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())
    )


def _lr_from_optimizer(opt: Any, source: str) -> float | None:
    if not isinstance(opt, Mapping) or "param_groups" not in opt:
        return None
    lrs = {float(g["lr"]) for g in opt["param_groups"] if "lr" in g}
    if len(lrs) > 1:
        raise ConfigurationError(
            f"checkpoint {source}: the optimizer has parameter groups with different learning "
            f"rates {sorted(lrs)}; pass lr= to Checkpoint explicitly"
        )
    if not lrs:
        return None
    return _valid_lr(lrs.pop(), f"checkpoint {source}: the learning rate in its optimizer state")


def _scheduler_note(opt: Mapping[str, Any], has_scheduler: bool) -> str | None:
    """Why an optimizer's saved lr may be the next step's (a scheduler was attached), or None."""
    initial = {float(g["initial_lr"]) for g in opt["param_groups"] if "initial_lr" in g}
    if not initial and not has_scheduler:
        return None
    return (
        "its optimizer state was saved with a learning-rate scheduler"
        + (f" (initial_lr={sorted(initial)[0]:g})" if initial else "")
        + ". If it was saved after scheduler.step() (as Hugging Face's Trainer and most training "
        "loops do) the learning rate read is the one for the NEXT step or epoch, not the one in "
        "force while these parameters were trained; pass Checkpoint(..., lr=η) with the rate "
        "in force (scheduler.get_last_lr() before the step) to be exact and silence this warning"
    )


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors (refused code), truncated files, non-torch files
        raise CheckpointMismatchError(
            f"could not read checkpoint file {path!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); traintrace loads files with "
            "torch.load(weights_only=True), which refuses pickled code. Save tensors only: "
            "torch.save(model.state_dict(), path), or model.save_pretrained(dir)"
        ) from exc


def _safetensors_load(path: str) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ConfigurationError(
            f"reading {path!r} needs the safetensors package: pip install safetensors "
            "(or pip install 'traintrace[hf]')"
        ) from exc
    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise CheckpointMismatchError(
            f"could not read safetensors file {path!r} ({type(exc).__name__}: {exc}); is it "
            "complete? Re-save it with model.save_pretrained(dir)"
        ) from exc


def _load_weights_file(path: str) -> Any:
    return _safetensors_load(path) if path.endswith(".safetensors") else _torch_load(path)


def _load_hf_dir(path: str) -> dict[str, Tensor]:
    """The state dict of a ``save_pretrained`` / Trainer checkpoint directory (shards merged)."""
    for name in _HF_WEIGHTS:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            state = _load_weights_file(file)
            if not _is_state_dict(state):
                raise CheckpointMismatchError(f"{file!r} holds no state dict of tensors")
            return dict(state)
    for name in _HF_INDEXES:
        index = os.path.join(path, name)
        if not os.path.isfile(index):
            continue
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointMismatchError(
                f"could not read the shard index {index!r} ({exc}); it should be JSON with a "
                "'weight_map' from parameter names to shard files"
            ) from exc
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, os.path.basename(str(shard)))
            if not os.path.isfile(shard_path):
                raise CheckpointMismatchError(
                    f"shard {shard!r} listed in {index!r} is missing; copy the whole checkpoint "
                    "directory"
                )
            loaded = _load_weights_file(shard_path)
            if not _is_state_dict(loaded):
                raise CheckpointMismatchError(f"shard {shard_path!r} holds no state dict")
            state.update(loaded)
        return state
    found = sorted(os.listdir(path))[:12]
    raise CheckpointMismatchError(
        f"checkpoint directory {path!r} holds no model weights (files found: {found}); expected "
        f"one of {list(_HF_WEIGHTS + _HF_INDEXES)}, as written by model.save_pretrained(dir) or a "
        "Hugging Face Trainer"
    )


def _lr_from_trainer_state(path: str, name: str) -> float | None:
    """The learning rate logged at the checkpoint's step in ``trainer_state.json``, or None."""
    file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file) as fh:
            state = json.load(fh)
        history = state.get("log_history", [])
        step = state.get("global_step")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointMismatchError(
            f"checkpoint {name}: could not read {file!r} ({exc}); pass lr= explicitly"
        ) from exc
    logged = [
        (int(e.get("step", -1)), e["learning_rate"])
        for e in history
        if isinstance(e, Mapping) and "learning_rate" in e
    ]
    if step is not None:
        logged = [(s, lr) for s, lr in logged if s <= int(step)]
    if not logged:
        return None
    at, lr = max(logged, key=lambda t: t[0])
    value = _valid_lr(lr, f"checkpoint {name}: the learning rate in trainer_state.json (step {at})")
    if step is not None and at != int(step):
        warnings.warn(
            f"checkpoint {name}: trainer_state.json logs the learning rate last at step {at}, "
            f"but the checkpoint is at step {step}; using {value:g}. Log at every save "
            "(logging_steps dividing save_steps) or pass lr= explicitly",
            LearningRateWarning,
            stacklevel=4,
        )
    return value


@dataclass
class Checkpoint:
    """Parameters ``θ_c`` saved during training and the weight ``w_c`` they get in a sum.

    Args:
        state: a state dict, or a path: a ``torch.save`` file (a state dict or a training
            checkpoint), a ``.safetensors`` file, or a Hugging Face ``save_pretrained`` /
            ``Trainer`` checkpoint directory (see the module docstring).
        lr: the learning rate in force when the checkpoint was saved (TracIn's ``η_c``); a
            finite number > 0. When omitted it is read from ``trainer_state.json`` (Trainer
            directories) or from an optimizer state saved with the checkpoint; a rate read from
            an optimizer state that had a scheduler attached gives a
            :class:`~traintrace.exceptions.LearningRateWarning` (it is usually the next step's).
        name: a label for progress bars and error messages (defaults to the file or directory
            name).

    Cost: a file is read each time the state is needed, so a list of checkpoints does not hold
    every state in memory at once.

    Raises:
        LearningRateError: ``lr`` (given or read) is not a finite number > 0.
    """

    state: Mapping[str, Tensor] | str | os.PathLike[str]
    lr: float | None = None
    name: str | None = None
    _cached_lr: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.state, (str, os.PathLike)):
            path = os.fspath(self.state)
            if not os.path.exists(path):
                raise ConfigurationError(f"checkpoint file {path!r} does not exist")
            if self.name is None:
                self.name = os.path.basename(os.path.normpath(path))
        elif not isinstance(self.state, Mapping):
            raise ConfigurationError(
                f"Checkpoint state must be a state dict or a path, got {type(self.state).__name__}"
            )
        if self.name is None:
            self.name = "checkpoint"
        if self.lr is not None:
            self.lr = _valid_lr(self.lr, f"checkpoint {self.name}: lr")

    @classmethod
    def from_trainer(cls, output_dir: str | os.PathLike[str]) -> list[Checkpoint]:
        """Every ``checkpoint-<step>`` directory of a Hugging Face ``Trainer`` run, by step.

        Each learning rate is read from its ``trainer_state.json`` (or ``optimizer.pt``).

        Raises:
            ConfigurationError: ``output_dir`` holds no ``checkpoint-<step>`` directory.
        """
        root = os.fspath(output_dir)
        found = []
        if os.path.isdir(root):
            for entry in os.listdir(root):
                prefix, _, step = entry.partition("-")
                full = os.path.join(root, entry)
                if prefix == "checkpoint" and step.isdigit() and os.path.isdir(full):
                    found.append((int(step), entry))
        if not found:
            raise ConfigurationError(
                f"{root!r} holds no checkpoint-<step> directories (as a Hugging Face Trainer "
                "writes with save_steps / save_strategy); pass the directories or files as "
                "tt.Checkpoint(path) one by one"
            )
        return [cls(os.path.join(root, entry)) for _, entry in sorted(found)]

    @property
    def _path(self) -> str | None:
        return None if isinstance(self.state, Mapping) else os.fspath(self.state)

    # -- reading ---------------------------------------------------------------------------
    def _load_raw(self) -> Mapping[str, Any]:
        path = self._path
        if path is None:
            return self.state  # type: ignore[return-value]
        if os.path.isdir(path):
            return _load_hf_dir(path)
        raw = _load_weights_file(path)
        if not isinstance(raw, Mapping):
            raise CheckpointMismatchError(
                f"checkpoint file {path!r} holds a {type(raw).__name__}, not a state dict; save "
                "it with torch.save(model.state_dict(), path)"
            )
        return raw

    def load_state(self) -> dict[str, Tensor]:
        """The raw model state dict stored in this checkpoint (on the CPU for files)."""
        raw = self._load_raw()
        if _is_state_dict(raw):
            return dict(raw)
        for key in _STATE_KEYS:
            if key in raw and _is_state_dict(raw[key]):
                return dict(raw[key])
        raise CheckpointMismatchError(
            f"checkpoint {self.name} holds no state dict (keys: {sorted(map(str, raw))[:10]}); "
            f"expected a state dict or a dict with one of {list(_STATE_KEYS)}"
        )

    def _read_lr(self) -> float | None:
        path = self._path
        name = str(self.name)
        if path is not None and os.path.isdir(path):
            lr = _lr_from_trainer_state(path, name)
            if lr is not None:
                return lr
            opt_file = os.path.join(path, "optimizer.pt")
            if not os.path.isfile(opt_file):
                return None
            opt = _torch_load(opt_file)
            has_scheduler = os.path.isfile(os.path.join(path, "scheduler.pt"))
        else:
            raw = self._load_raw()
            opt = next((raw[k] for k in _OPTIMIZER_KEYS if isinstance(raw.get(k), Mapping)), None)
            has_scheduler = any(k in raw for k in _SCHEDULER_KEYS)
        lr = _lr_from_optimizer(opt, name)
        if lr is not None:
            note = _scheduler_note(opt, has_scheduler)  # type: ignore[arg-type]
            if note is not None:
                warnings.warn(
                    f"checkpoint {name}: using lr={lr:g} read from the optimizer state, but {note}",
                    LearningRateWarning,
                    stacklevel=3,
                )
        return lr

    @property
    def learning_rate(self) -> float:
        """The weight ``η_c``: ``lr`` if given, else the rate saved with the checkpoint."""
        if self.lr is not None:
            return float(self.lr)
        if self._cached_lr is None:
            self._cached_lr = self._read_lr()
        if self._cached_lr is None:
            raise ConfigurationError(
                f"checkpoint {self.name} has no learning rate: pass Checkpoint(..., lr=η), the "
                "learning rate in force when it was saved, or save the optimizer state with it "
                "(a Trainer checkpoint directory: trainer_state.json or optimizer.pt)"
            )
        return self._cached_lr

    def state_for(self, model: nn.Module) -> dict[str, Tensor]:
        """The checkpoint's state, validated against ``model`` and cast to its dtypes/devices.

        Raises:
            CheckpointMismatchError: listing missing, unexpected and mis-shaped keys.
        """
        expected = model.state_dict()
        tied = _tied_names(model)
        state = _fill_tied(self.load_state(), tied)
        for prefix in _WRAPPER_PREFIXES:
            if set(state) != set(expected) and all(k.startswith(prefix) for k in state):
                stripped = _fill_tied({k[len(prefix) :]: v for k, v in state.items()}, tied)
                if set(stripped) == set(expected):
                    state = stripped
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        misshaped = [
            f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in expected
            if k in state and state[k].shape != expected[k].shape
        ]
        if missing or unexpected or misshaped:
            parts = []
            if missing:
                parts.append(f"missing keys {_short(missing)}")
            if unexpected:
                parts.append(f"unexpected keys {_short(unexpected)}")
            if misshaped:
                parts.append(f"mis-shaped keys {_short(misshaped)}")
            raise CheckpointMismatchError(
                f"checkpoint {self.name} does not fit {type(model).__name__}: "
                + "; ".join(parts)
                + ". Check that the checkpoint was saved from this architecture (same layer sizes "
                "and names) with torch.save(model.state_dict(), path)."
            )
        return {k: state[k].to(device=v.device, dtype=v.dtype) for k, v in expected.items()}

    def fingerprint(self, model: nn.Module) -> str:
        """A short hash of the validated state (stable across runs), for stores and caches.

        Hashes every entry's name, dtype, shape and bytes (any dtype, bfloat16 included).
        """
        h = hashlib.sha256()
        for k, v in sorted(self.state_for(model).items()):
            h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
            h.update(tensor_bytes(v))
        return h.hexdigest()[:16]


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """For every state-dict name, the other names of the same tensor (tied weights)."""
    groups: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(value), []).append(name)
    return {n: [m for m in names if m != n] for names in groups.values() for n in names}


def _fill_tied(state: dict[str, Tensor], tied: Mapping[str, list[str]]) -> dict[str, Tensor]:
    """Add tied names a file leaves out (``save_pretrained`` stores GPT-2's ``lm_head`` once)."""
    out = dict(state)
    for name, others in tied.items():
        if name not in out:
            source = next((o for o in others if o in state), None)
            if source is not None:
                out[name] = state[source]
    return out


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


def require_checkpoint(checkpoint: Any) -> Checkpoint:
    """``checkpoint`` if it is a :class:`Checkpoint`, else a :class:`ConfigurationError`."""
    if not isinstance(checkpoint, Checkpoint):
        raise ConfigurationError(
            f"checkpoint must be a traintrace.Checkpoint, got {type(checkpoint).__name__}; wrap "
            "a state dict or path as tt.Checkpoint(state) (tt.Checkpoint(model.state_dict()) for "
            "the model's current parameters)"
        )
    return checkpoint


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture: the module tree and the state's names, shapes, dtypes.

    Hashed: every module's name, type (module and qualified name) and ``extra_repr`` (so
    ``nn.ReLU`` → ``nn.Tanh`` or a changed ``nn.Dropout(p)`` changes it, even with the same
    state-dict shapes), the source of ``forward`` of module classes defined outside PyTorch (so
    ``F.relu`` → ``torch.tanh`` inside a user's ``forward`` changes it; editing that method
    changes it too), and every state entry's name, shape and dtype. Parameter *values* are not
    hashed (see :meth:`Checkpoint.fingerprint`). Stores record it so features computed for
    another architecture are refused.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    sources: dict[type, str] = {}
    for name, module in model.named_modules():
        kind = type(module)
        h.update(f"{name}:{kind.__module__}.{kind.__qualname__}({module.extra_repr()});".encode())
        if kind not in sources:
            sources[kind] = _forward_source(kind)
            h.update(sources[kind].encode())
    for name, value in model.state_dict().items():
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    return h.hexdigest()[:16]


def _forward_source(kind: type) -> str:
    """The source of a user-defined module class's ``forward`` ('' for PyTorch's own modules)."""
    if kind.__module__.startswith("torch."):
        return ""
    forward = getattr(kind, "forward", None)
    try:
        return inspect.getsource(forward)  # type: ignore[arg-type]
    except (OSError, TypeError):  # defined in a REPL or built in C
        code = getattr(forward, "__code__", None)
        return repr(code.co_code) if code is not None else ""
