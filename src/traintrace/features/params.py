"""Which parameters are differentiated, and how they are laid out in one flat vector.

Every gradient, curvature product and stored feature in traintrace uses the same layout: the
selected parameters in ``model.named_parameters()`` order, each flattened row-major and
concatenated. :class:`ParameterLayout` converts between that flat vector and a dict of tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from traintrace.exceptions import ConfigurationError

__all__ = [
    "ParameterLayout",
    "last_layer_name",
    "module_by_name",
    "select_parameters",
    "tied_aliases",
]

Layers = str | Sequence[str] | None


def tied_aliases(model: nn.Module) -> set[str]:
    """Names under which an already-listed parameter or buffer appears again (tied weights).

    ``model.state_dict()`` lists a tied tensor under every name (GPT-2's ``lm_head.weight`` and
    ``transformer.wte.weight``); ``named_parameters()`` lists it once. Functional calls must get
    only the first name, or they would see two values for one tensor.
    """
    aliases: set[str] = set()
    for named in (model.named_parameters, model.named_buffers):
        seen: set[int] = set()
        for name, tensor in named(remove_duplicate=False):
            if id(tensor) in seen:
                aliases.add(name)
            seen.add(id(tensor))
    return aliases


def last_layer_name(model: nn.Module) -> str:
    """Name of the last module (in registration order) that owns trainable parameters directly."""
    last = None
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            last = name
    if last is None:
        raise ConfigurationError(f"{type(model).__name__} has no trainable parameters")
    return last


def module_by_name(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Module]:
    """``(name, module)`` for ``layer``, or for the last module with parameters when None.

    Raises:
        ConfigurationError: naming the modules that exist.
    """
    name = last_layer_name(model) if layer is None else layer
    modules = dict(model.named_modules())
    if name not in modules:
        raise ConfigurationError(
            f"layer {name!r} is not a module of {type(model).__name__}; modules: "
            f"{[m for m in modules if m][:20]}"
        )
    return name, modules[name]


def select_parameters(model: nn.Module, layers: Layers = None) -> list[str]:
    """Names of the parameters to differentiate.

    Args:
        layers: ``None`` for every trainable parameter; ``"last"`` for the parameters of the last
            module that owns any (see :func:`last_layer_name`); or module names (``"fc2"``,
            ``"encoder.layer.0"``) and/or parameter names (``"fc2.weight"``), each selecting
            everything under it.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if layers is None:
        chosen = trainable
    else:
        if isinstance(layers, str):
            layers = [last_layer_name(model)] if layers == "last" else [layers]
        chosen = []
        modules = dict(model.named_modules())
        # a tied parameter is listed once by named_parameters(); a module or name that reaches it
        # under another name (GPT-2's lm_head -> transformer.wte.weight) selects that first name
        canonical = {id(p): n for n, p in model.named_parameters()}
        every = dict(model.named_parameters(remove_duplicate=False))
        for layer in layers:
            hits = [n for n in trainable if n == layer or n.startswith(layer + ".") or layer == ""]
            if not hits and layer in modules:
                hits = [canonical[id(p)] for p in modules[layer].parameters() if p.requires_grad]
            if not hits and layer in every and every[layer].requires_grad:
                hits = [canonical[id(every[layer])]]
            if not hits:
                avail = [
                    m
                    for m in modules
                    if m and any(True for _ in modules[m].parameters(recurse=False))
                ]
                raise ConfigurationError(
                    f"layers= names {layer!r}, which selects no trainable parameter of "
                    f"{type(model).__name__}; modules with parameters: {avail[:20]}"
                    f"{' ...' if len(avail) > 20 else ''} (or 'last', or None for all)"
                )
            chosen.extend(h for h in hits if h not in chosen)
        order = {n: i for i, n in enumerate(trainable)}
        chosen.sort(key=order.__getitem__)
    if not chosen:
        raise ConfigurationError(f"{type(model).__name__} has no trainable parameters")
    return chosen


@dataclass(frozen=True)
class ParameterLayout:
    """Names and shapes of the selected parameters, and their slices in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> ParameterLayout:
        params = dict(model.named_parameters())
        return cls(tuple(names), tuple(params[n].shape for n in names))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Length ``P`` of the flat vector."""
        return sum(self.sizes)

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for n, size in zip(self.names, self.sizes, strict=True):
            out[n] = slice(start, start + size)
            start += size
        return out

    def flatten(self, tensors: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate ``tensors[name]`` (with ``batch_dims`` leading dims) into ``[..., P]``."""
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split ``[..., P]`` back into ``{name: [..., *shape]}``."""
        lead = vector.shape[:-1]
        return {
            n: vector[..., sl].reshape(*lead, *shape)
            for (n, sl), shape in zip(self.slices().items(), self.shapes, strict=True)
        }
