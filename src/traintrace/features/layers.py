"""The one definition of the layers the engine understands, and their canonical matrices.

For a Linear / Conv2d / Embedding / Hugging Face ``Conv1D`` layer the per-example gradient of its
weight is a matrix ``G = Σ_t b_t ãᵀ_t`` of shape ``[d_out, d_in(+1)]`` (``b_t`` the gradient of the
example's value with respect to the layer's output at position ``t``, ``ã_t`` its input with a 1
appended when the bias is selected; the bias is the last column). That ``[rows, cols]`` matrix is
the layer's *canonical matrix*:

* ``nn.Linear`` weight as is; ``nn.Conv2d`` / ``nn.Conv1d`` weight reshaped to ``[out, in·kh·kw]``
  / ``[out, in·k]`` (their inputs are the unfolded patches);
* ``nn.Embedding`` weight ``[V, d]`` transposed to ``[d, V]`` (the input is one-hot);
* Hugging Face ``Conv1D`` weight ``[d_in, d_out]`` transposed to ``[d_out, d_in]``;
* a weight tied between several of these modules keeps the orientation of its first module, and
  every module's contribution is added in that orientation (``_Role.out_rows``).

Normalization layers (LayerNorm, RMSNorm, BatchNorm in eval mode) have exact per-example affine
gradients from the same hooks (``Σ_t b_t ⊙ x̂_t``), and so do convolutions with more than
``MAX_GROUPS`` groups (depthwise: one convolution backward with the batch folded into the groups,
no patches); everything else (raw ``nn.Parameter``\\ s, Embedding with ``max_norm``) falls back
to ``vmap`` gradients, and :func:`layer_type` says why. :class:`~traintrace.features.projections.ProjectedGradients` (random
projections) and :mod:`~traintrace.features.engine` (exact contraction scores) share these rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = [
    "CONVOLUTIONS",
    "MAX_GROUPS",
    "canonical_matrix",
    "from_canonical",
    "layer_type",
    "norm_type",
]


def hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (``y = x W + b``, W ``[d_in, d_out]``)."""
    return (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers")
        and getattr(module, "weight", None) is not None
        and module.weight.ndim == 2
    )


def layer_type(module: nn.Module) -> tuple[str | None, str]:
    """``(type, "")`` for a module the Kronecker hooks support, else ``(None, why not)``."""
    if isinstance(module, nn.Linear):
        return "Linear", ""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        kind = "Conv1d" if isinstance(module, nn.Conv1d) else "Conv2d"
        if module.groups > MAX_GROUPS:
            return None, (
                f"{kind} with groups={module.groups} > {MAX_GROUPS} (one capture term per group "
                "would cost groups × the layer's gradient; its per-example gradients come from "
                "the hooks directly, see norm_type)"
            )
        return kind, ""
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return None, "Embedding with max_norm (renormalizes its weight in forward)"
        if module.scale_grad_by_freq:
            return None, "Embedding with scale_grad_by_freq (not a per-example gradient)"
        return "Embedding", ""
    if hf_conv1d(module):
        return "Conv1D", ""
    return None, f"{type(module).__name__} is not Linear/Conv1d/Conv2d/Embedding/Conv1D"


def norm_type(module: nn.Module) -> str | None:
    """Modules whose per-example gradients the hooks compute directly, exactly, into the dense
    part: normalization layers' affine parameters, and convolutions with more than
    ``MAX_GROUPS`` groups (depthwise), whose weight gradients come from one convolution backward
    with the batch folded into the groups (``"GroupedConv"``)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > MAX_GROUPS:
        return "GroupedConv"
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        return "LayerNorm"
    if isinstance(module, nn.RMSNorm) and module.elementwise_affine:
        return "RMSNorm"
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.affine
        and module.track_running_stats
        and module.running_mean is not None
        and module.running_var is not None
    ):
        return "BatchNorm"
    return None


# natural canonical orientation: is the module's weight the transpose of its [d_out, d_in] matrix?
TRANSPOSED = {
    "Linear": False,
    "Conv1d": False,
    "Conv2d": False,
    "Embedding": True,
    "Conv1D": True,
}
#: the layer types whose inputs are unfolded into patches (one position per output location)
CONVOLUTIONS = ("Conv1d", "Conv2d")
#: grouped convolutions up to this many groups are hooked: group ``j``'s gradient is the output
#: gradients of its channels times its own input patches, one capture term per group; beyond it
#: (depthwise) the hooks form the per-example gradients directly (:func:`norm_type`)
MAX_GROUPS = 8


@dataclass
class _Role:
    """One module's contribution to one Kronecker group."""

    module_name: str
    module: nn.Module
    type: str
    weight: bool  # the group's weight is this module's weight
    bias: bool  # the group's bias is this module's bias (ã gets a 1 appended)
    out_rows: bool  # the module's output gradient lies on the canonical rows side


@dataclass
class _Group:
    """A Kronecker group: one canonical matrix ``[rows, cols]`` and its factors."""

    key: str
    weight: str | None
    bias: str | None
    type: str
    roles: list[_Role]
    rows: int
    cols: int
    transposed: bool  # canonical matrix = weightᵀ (Embedding / Conv1D first owner)
    k_rows: int = 0
    k_cols: int = 0
    columns: slice = field(default_factory=lambda: slice(0, 0))
    hooked: bool = True
    reason: str = ""
    _factors: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def width(self) -> int:
        return self.k_rows * self.k_cols


@dataclass
class _Norm:
    """A module whose selected parameters' per-example gradients the hooks compute directly
    (dense group): a normalization layer's affine parameters, or a many-group convolution."""

    module_name: str
    module: nn.Module
    type: str
    weight: str | None
    bias: str | None

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)


def canonical_matrix(
    group: _Group, named: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]
) -> Tensor:
    """The group's canonical matrices ``[n, rows, cols]`` from flat per-row gradients.

    ``named[p]`` is ``[n, numel(p)]`` (or ``[n, *shape]``) for the group's weight and bias; the
    bias becomes the last column. Inverse of :func:`from_canonical`.
    """
    parts = []
    if group.weight is not None:
        g = named[group.weight]
        n = g.shape[0]
        shape = shapes[group.weight]
        if group.transposed:
            m = g.reshape(n, int(shape[0]), int(shape[1])).transpose(1, 2)
        else:
            m = g.reshape(n, int(shape[0]), -1)
        parts.append(m)
    if group.bias is not None:
        g = named[group.bias]
        parts.append(g.reshape(g.shape[0], -1, 1))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def from_canonical(
    group: _Group, matrix: Tensor, shapes: Mapping[str, torch.Size]
) -> dict[str, Tensor]:
    """``{param: [n, numel]}`` from canonical matrices ``[n, rows, cols]`` (inverse of the above)."""
    n = matrix.shape[0]
    out: dict[str, Tensor] = {}
    weight = matrix[:, :, :-1] if group.bias is not None else matrix
    if group.weight is not None:
        w = weight.transpose(1, 2) if group.transposed else weight
        out[group.weight] = w.reshape(n, -1)
    if group.bias is not None:
        out[group.bias] = matrix[:, :, -1].reshape(n, -1)
    return out
