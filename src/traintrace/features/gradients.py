"""Exact per-example gradients with ``torch.func`` (``vmap(grad(...))``).

The model is evaluated *functionally* at a checkpoint's state (``functional_call``), in eval mode
(dropout off, BatchNorm uses its running statistics), so the user's model object is not modified.
One batch of full per-example gradients ``[batch, P]`` exists at a time.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from traintrace.data import batch_size_of, in_dims_of, map_tensors
from traintrace.exceptions import (
    BatchFormatError,
    ConfigurationError,
    NonFiniteGradientError,
    TraintraceError,
)
from traintrace.features.params import Layers, ParameterLayout, select_parameters, tied_aliases
from traintrace.task import Task

__all__ = ["GradientComputer", "TaskForward", "eval_mode", "forward_at"]

Kind = Literal["loss", "measurement", "sampled"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode for the duration, then restore each module's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def padding_rows_constant(model: nn.Module) -> Iterator[nn.Module]:
    """Make every ``nn.Embedding`` with a ``padding_idx`` treat its padding row as a constant,
    in forward mode as in reverse mode, for the duration.

    PyTorch's backward gives the padding row no gradient from the lookup (the row is frozen),
    but forward-mode AD (``jvp``) differentiates the lookup through it, so a curvature product
    ``Jᵀ H J v`` or ``jvp(grad)`` mixed the two conventions: the Gauss-Newton matrix came out
    asymmetric and indefinite (13% off on a small sequence model). Each such layer's outputs at
    padding positions are detached instead, which leaves every gradient as PyTorch computes it
    and gives the derivatives of the same function in both modes. The curvature operators
    (the only forward-mode users) hold it around their products.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
        (tokens,) = args[:1]
        pad = (tokens == module.padding_idx).unsqueeze(-1)
        return torch.where(pad, out.detach(), out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Embedding) and m.padding_idx is not None
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _under_vmap(t: Tensor) -> bool:
    """Whether ``t`` is a functorch batched tensor (inside ``vmap``)."""
    try:
        return bool(torch._C._functorch.is_batchedtensor(t))
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return False


class _TaskModule(nn.Module):
    """Wraps model + task so that ``functional_call`` swaps parameters for any custom forward."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(
        self,
        batch: Any,
        kind: Kind,
        generator: torch.Generator | None = None,
        offset: int = 0,
    ) -> Tensor:
        out = self.task.forward(self.model, batch)
        if isinstance(out, Tensor) and not _under_vmap(out):
            # labels against the output size, once per plain (hooked) forward: not under vmap;
            # ``offset`` (the batch's first example) lets errors name data-set indices
            from traintrace.validation import check_batch

            check_batch(self.task, out.detach(), batch, offset)
        if kind == "loss":
            return self.task.loss(out, batch)
        if kind == "sampled":  # labels drawn from the model (true Fisher); consumes `generator`
            return self.task.sample_loss(out, batch, generator)
        return self.task.oriented_measurement(out, batch)


class TaskForward(nn.Module):
    """``task.forward(model, batch)`` as a module, so ``functional_call`` can swap any parameter.

    Its parameters are the model's under the prefix ``model.`` (``"model.fc.weight"``).
    """

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Any) -> Tensor:
        return self.task.forward(self.model, batch)


def forward_at(model: nn.Module, task: Task, state: Mapping[str, Tensor], batch: Any) -> Tensor:
    """``task.forward(model, batch)`` with the model's parameters and buffers taken from ``state``.

    The model object itself is not modified. Runs in the model's current train/eval mode.
    """
    aliases = tied_aliases(model)
    prefixed = {"model." + k: v for k, v in state.items() if k not in aliases}
    return functional_call(TaskForward(model, task), prefixed, (batch,))


def _unsqueeze_batched(sample: Any, dims: Any) -> Any:
    if isinstance(sample, Tensor):
        return sample.unsqueeze(0) if dims == 0 else sample
    if isinstance(sample, Mapping):
        return {k: _unsqueeze_batched(v, dims[k]) for k, v in sample.items()}
    if isinstance(sample, (tuple, list)):
        out = [_unsqueeze_batched(v, d) for v, d in zip(sample, dims, strict=True)]
        return tuple(out) if isinstance(sample, tuple) else out
    return sample


class GradientComputer:
    """Per-example gradients of a task's loss (training side) or oriented measurement (query side).

    Args:
        model: the network; its own parameters are not used, a state is given per call.
        task: how to read batches and what to differentiate.
        layers: which parameters (see :func:`select_parameters`).

    Gradients are returned flat, ``[batch, P]``, in :attr:`layout` order. Cost: one vmapped
    forward+backward per batch, memory ``batch × P`` for the result.
    """

    def __init__(self, model: nn.Module, task: Task, layers: Layers = None) -> None:
        self.model = model
        self.task = task
        self.names = select_parameters(model, layers)
        self.layout = ParameterLayout.of(model, self.names)
        self._wrapper = _TaskModule(model, task)
        self._use_vmap = True
        self._aliases = tied_aliases(model)

    def _split_state(
        self, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        selected = {n: state[n].detach() for n in self.names}
        fixed = {
            "model." + k: v.detach()
            for k, v in state.items()
            if k not in selected and k not in self._aliases
        }
        return selected, fixed

    def function_of_params(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind = "loss",
        offset: int = 0,
        *,
        generator: torch.Generator | None = None,
    ) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """``params -> per-example values [batch]`` at ``state`` with the selected params swapped.

        ``params`` maps the selected names (:attr:`names`) to tensors; everything else comes from
        ``state``. Differentiable with ``torch.func`` or autograd; runs the model in eval mode.
        Used by the curvature layer for Hessian-vector products.

        ``kind="sampled"``: ``task.sample_loss`` with labels drawn from the model's predictive
        distribution using ``generator`` (true Fisher). Every call consumes ``generator``: pass a
        fresh copy per evaluation to get the same labels twice.
        """
        _, fixed = self._split_state(state)
        kwargs = _kind_kwargs(kind, generator)
        if offset:
            kwargs["offset"] = offset  # label errors name data-set indices

        def fn(params: Mapping[str, Tensor]) -> Tensor:
            prefixed = {"model." + k: v for k, v in params.items()}
            with eval_mode(self.model):
                return functional_call(self._wrapper, (prefixed, fixed), (batch,), kwargs)

        return fn

    def outputs_of_params(
        self, state: Mapping[str, Tensor], batch: Any
    ) -> Callable[[Mapping[str, Tensor]], Tensor]:
        """``params -> model outputs`` (``task.forward``) at ``state``, for Gauss-Newton products.

        Compose with ``task.loss(outputs, batch)`` for the per-example losses.
        """
        fixed = {
            k: v.detach()
            for k, v in state.items()
            if k not in self.names and k not in self._aliases
        }

        def fn(params: Mapping[str, Tensor]) -> Tensor:
            with eval_mode(self.model):
                return functional_call(
                    TaskForward(self.model, self.task),
                    (
                        {"model." + k: v for k, v in params.items()},
                        {"model." + k: v for k, v in fixed.items()},
                    ),
                    (batch,),
                )

        return fn

    def selected_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The selected parameters of ``state`` (detached), keyed by name."""
        return self._split_state(state)[0]

    def values(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind = "loss",
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Per-example losses (or oriented measurements) at ``state``, without gradients."""
        _, fixed = self._split_state(state)
        params = {"model." + n: state[n].detach() for n in self.names}
        kwargs = _kind_kwargs(kind, generator)
        with eval_mode(self.model), torch.no_grad():
            return functional_call(self._wrapper, (params, fixed), (batch,), kwargs)

    def per_example(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind = "loss",
        *,
        offset: int = 0,
        where: str = "",
        out: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Flat per-example gradients ``[batch, P]`` of ``kind`` at ``state``.

        ``out``, when given (``[batch, P]``, e.g. a slice of a preallocated feature matrix),
        receives the gradients directly, saving one copy of the batch's gradients.
        ``kind="sampled"`` (labels drawn with ``generator`` for the whole batch at once, so they
        equal those of a batched forward with the same generator state) differentiates one
        batched forward per example with autograd (``is_grads_batched``) instead of ``vmap``:
        valid when examples do not interact (eval mode).

        Raises:
            NonFiniteGradientError: naming the examples (``offset`` + position) and parameters.
        """
        selected, fixed = self._split_state(state)
        size = batch_size_of(batch)
        dims = in_dims_of(batch, size)

        def one(params: dict[str, Tensor], sample: Any) -> Tensor:
            sample1 = _unsqueeze_batched(sample, dims)
            prefixed = {"model." + k: v for k, v in params.items()}
            value = functional_call(self._wrapper, (prefixed, fixed), (sample1,), {"kind": kind})
            return value.sum()

        with eval_mode(self.model):
            grads = None
            if kind == "sampled":
                grads = self._per_example_autograd(state, batch, kind, generator)
            elif self._use_vmap:
                try:
                    grads = vmap(grad(one), in_dims=(None, dims))(selected, batch)
                except TraintraceError as exc:
                    # the task reports a model call that failed as a batch it cannot read; under
                    # vmap the failure may be vmap's own (an RNN's in-place hidden state): the
                    # loop below calls the model plainly and raises again if the batch is bad
                    if not (
                        isinstance(exc, BatchFormatError)
                        and isinstance(exc.__cause__, RuntimeError)
                    ):
                        raise
                    warnings.warn(
                        f"torch.func.vmap could not batch this model ({exc.__cause__}); falling "
                        "back to one gradient per example (exact, slower)"
                        + _hf_attention_hint(self.model),
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self._use_vmap = False
                except RuntimeError as exc:
                    warnings.warn(
                        f"torch.func.vmap could not batch this model ({str(exc).splitlines()[0]}); "
                        "falling back to one gradient per example (exact, slower)"
                        + _hf_attention_hint(self.model),
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    self._use_vmap = False
            if grads is None:
                rows = []
                for i in range(size):
                    sample = map_tensors(
                        batch, lambda t, i=i: t[i] if t.ndim >= 1 and t.shape[0] == size else t
                    )
                    rows.append(grad(one)(selected, sample))
                grads = {n: torch.stack([r[n] for r in rows]) for n in self.names}
        if out is None:
            flat = self.layout.flatten(grads, batch_dims=1)
        else:
            if out.shape != (size, self.layout.numel):
                raise ValueError(
                    f"out has shape {tuple(out.shape)}, expected {(size, self.layout.numel)}"
                )
            for name, sl in self.layout.slices().items():
                out[:, sl].copy_(grads[name].reshape(size, -1))
            flat = out
        del grads
        check_finite(flat, self.layout, offset=offset, where=where)
        return flat

    def _per_example_autograd(
        self, state: Mapping[str, Tensor], batch: Any, kind: Kind, generator: Any
    ) -> dict[str, Tensor]:
        """Per-example gradients from one batched forward (rows of the Jacobian of the values)."""
        leaves = {n: state[n].detach().requires_grad_(True) for n in self.names}
        with torch.enable_grad():
            values = self.function_of_params(state, batch, kind, generator=generator)(leaves)
            size = values.shape[0]
            eye = torch.eye(size, dtype=values.dtype, device=values.device)
            inputs = list(leaves.values())
            try:
                per = torch.autograd.grad(
                    values, inputs, eye, is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            except RuntimeError:
                rows = [
                    torch.autograd.grad(values[i], inputs, retain_graph=True, allow_unused=True)
                    for i in range(size)
                ]
                per = tuple(
                    torch.stack(
                        [torch.zeros_like(inputs[j]) if r[j] is None else r[j] for r in rows]
                    )
                    for j in range(len(inputs))
                )
        return {
            n: torch.zeros(size, *leaves[n].shape, dtype=leaves[n].dtype, device=values.device)
            if g is None
            else g.detach()
            for n, g in zip(self.names, per, strict=True)
        }


def _kind_kwargs(kind: Kind, generator: torch.Generator | None) -> dict[str, Any]:
    if kind not in ("loss", "measurement", "sampled"):
        raise ConfigurationError(f"kind must be 'loss', 'measurement' or 'sampled', got {kind!r}")
    return {"kind": kind} if generator is None else {"kind": kind, "generator": generator}


def _hf_attention_hint(model: nn.Module) -> str:
    """Hugging Face's SDPA attention branches on the mask's values, which vmap cannot batch."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is None or impl == "eager":
        return ""
    return (
        f". This Hugging Face model uses attn_implementation={impl!r}; build it with "
        "attn_implementation='eager' (same weights and results) to let vmap batch it"
    )


def check_finite(
    flat: Tensor,
    layout: ParameterLayout,
    *,
    offset: int = 0,
    where: str = "",
    what: str = "gradient",
) -> None:
    """Raise :class:`NonFiniteGradientError` naming examples and parameters with NaN/inf."""
    # Fast path: one reduction without a [batch, P] boolean temporary; NaN/inf propagate into
    # the sum. Only when it is non-finite (or overflowed) is the exact elementwise check run.
    if bool(torch.isfinite(flat.sum())):
        return
    finite = torch.isfinite(flat)
    if bool(finite.all()):
        return
    bad_rows = (~finite).any(dim=1).nonzero().flatten()
    bad_params: Sequence[str] = [
        n for n, sl in layout.slices().items() if not bool(finite[:, sl].all())
    ]
    examples = [int(i) + offset for i in bad_rows[:10]]
    raise NonFiniteGradientError(
        f"non-finite per-example {what}{' at ' + where if where else ''} for training/query "
        f"examples {examples}{' ...' if len(bad_rows) > 10 else ''} in parameters "
        f"{list(bad_params)[:8]}. Check those inputs for NaN/inf, the checkpoint for NaN "
        "weights, and the loss for log(0) or overflow (train in float32 or lower the learning "
        "rate if the checkpoint itself diverged)."
    )
