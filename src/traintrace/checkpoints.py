"""Layer 2 — checkpoints: saved parameters with the weight (learning rate) they carry in a sum.

A :class:`Checkpoint` is a state dict (or a path to one saved with ``torch.save``) and the
learning rate in force when it was saved. Files may hold a bare state dict or a training
checkpoint dict with ``model_state_dict`` / ``state_dict`` / ``model`` and, optionally,
``optimizer_state_dict`` / ``optimizer`` (the learning rate is then read from it when ``lr`` is
not given).

Checkpoints are never loaded *into* the user's model: estimators read the validated state and
evaluate the model functionally (``torch.func.functional_call``), so the model is left as it was.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from traintrace.exceptions import CheckpointMismatchError, ConfigurationError

__all__ = ["Checkpoint", "model_fingerprint", "require_checkpoint"]

_STATE_KEYS = ("model_state_dict", "state_dict", "model")
_OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


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
    return lrs.pop() if lrs else None


@dataclass
class Checkpoint:
    """Parameters ``θ_c`` saved during training and the weight ``w_c`` they get in a sum.

    Args:
        state: a state dict, or a path to a file written by ``torch.save`` holding a state dict or
            a training checkpoint (see the module docstring).
        lr: the learning rate in force when the checkpoint was saved (TracIn's ``η_c``). When
            omitted, it is read from an optimizer state saved in the same file.
        name: a label for progress bars and error messages (defaults to the file name).

    Cost: a file is read each time the state is needed, so a list of checkpoints does not hold
    every state in memory at once.
    """

    state: Mapping[str, Tensor] | str | os.PathLike[str]
    lr: float | None = None
    name: str | None = None
    _cached_lr: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.state, (str, os.PathLike)):
            if not os.path.exists(self.state):
                raise ConfigurationError(
                    f"checkpoint file {os.fspath(self.state)!r} does not exist"
                )
            if self.name is None:
                self.name = os.path.basename(os.fspath(self.state))
        elif not isinstance(self.state, Mapping):
            raise ConfigurationError(
                f"Checkpoint state must be a state dict or a path, got {type(self.state).__name__}"
            )
        if self.name is None:
            self.name = "checkpoint"
        if self.lr is not None and not (float(self.lr) > 0 and float(self.lr) < float("inf")):
            raise ConfigurationError(f"checkpoint {self.name}: lr must be positive, got {self.lr}")

    # -- reading ---------------------------------------------------------------------------
    def _load_raw(self) -> Mapping[str, Any]:
        if isinstance(self.state, Mapping):
            return self.state
        try:
            return torch.load(os.fspath(self.state), map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated files, non-torch files
            raise CheckpointMismatchError(
                f"could not read checkpoint file {os.fspath(self.state)!r} ({exc}); save it with "
                "torch.save(model.state_dict(), path)"
            ) from exc

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

    @property
    def learning_rate(self) -> float:
        """The weight ``η_c``: ``lr`` if given, else the optimizer's saved learning rate."""
        if self.lr is not None:
            return float(self.lr)
        if self._cached_lr is None:
            raw = self._load_raw()
            for key in _OPTIMIZER_KEYS:
                lr = _lr_from_optimizer(
                    raw.get(key) if isinstance(raw, Mapping) else None, str(self.name)
                )
                if lr is not None:
                    self._cached_lr = lr
                    break
        if self._cached_lr is None:
            raise ConfigurationError(
                f"checkpoint {self.name} has no learning rate: pass Checkpoint(..., lr=η), the "
                "learning rate in force when it was saved, or save the optimizer state with it"
            )
        return self._cached_lr

    def state_for(self, model: nn.Module) -> dict[str, Tensor]:
        """The checkpoint's state, validated against ``model`` and cast to its dtypes/devices.

        Raises:
            CheckpointMismatchError: listing missing, unexpected and mis-shaped keys.
        """
        state = self.load_state()
        expected = model.state_dict()
        for prefix in _WRAPPER_PREFIXES:
            if set(state) != set(expected) and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix) :]: v for k, v in state.items()}
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
        """A short hash of the validated state (stable across runs), for stores and caches."""
        h = hashlib.sha256()
        for k, v in sorted(self.state_for(model).items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


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
    """A short hash of the architecture: class, and name, shape and dtype of every state entry.

    Stores record it so features computed for another architecture are refused.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
    return h.hexdigest()[:16]
