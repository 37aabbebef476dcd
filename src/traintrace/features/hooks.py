"""One hooked forward + backward that captures every covered layer's per-example factors.

For each covered layer call (see :mod:`traintrace.features.layers`), a forward hook records the
input side ``ã_t`` (``[B, d_in(+1), T]``; projected to ``P_in ã_t`` when the owner projects) and
the gradient edge of the layer's output; one ``autograd.grad`` of the summed per-example values
with respect to those edges gives the output gradients ``b_t`` (``[B, d_out, T]``). No weight
gradient is ever computed. What happens with each ``(b, ã)`` pair is the owner's choice: the random
projections form ``(P_out b) (P_in ã)ᵀ``; the exact engine keeps the raw factors
(``capture=True``) and contracts them with query directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from traintrace.features.layers import CONVOLUTIONS, _Group, _Norm, _Role

if TYPE_CHECKING:
    from traintrace.features.projections import ProjectedGradients

__all__ = ["Capture", "HookedPass"]


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _per_example(m: Tensor, lead: int) -> Tensor:
    """``[k, lead·T]`` (columns in example-major order) as ``[lead, k, T]`` (a view)."""
    return m.reshape(m.shape[0], lead, -1).permute(1, 0, 2)


class HookedPass:
    """One hooked forward + backward: each hooked group's projected features for a batch.

    Forward hooks project each layer's input side (``P_in ã_t``, kept as ``[B, k_in, T]``) and
    record the gradient edge of its output (:func:`torch.autograd.graph.get_gradient_edge`).
    One ``autograd.grad`` of the summed per-example values with respect to those edges gives the
    output gradients ``b_t``: the weights' own gradients are never computed. An edge taken at the
    hook is the output *before* any later in-place op (``ReLU(inplace=True)``), as needed.
    """

    def __init__(
        self,
        owner: ProjectedGradients,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        track_abs: bool,
        capture: bool = False,
        form: frozenset[str] = frozenset(),
    ) -> None:
        self.pg = owner
        self.capture = capture
        #: capture mode: group keys of single-role, ungrouped convolutions whose per-example
        #: gradients are formed here (one batch-grouped convolution backward, no patches) instead
        #: of kept as terms; the result is in :attr:`formed` (``[B, rows, cols]``)
        self.form = form if capture else frozenset()
        self.formed: dict[str, Tensor] = {}
        #: capture mode: per group key, the raw ``(rows side, cols side)`` of every layer call;
        #: a side is ``[B, d, T]`` (dense) or ``[B, T]`` integer tokens (one-hot, −1 = padding)
        self.terms: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.size = size
        self.dtype = dtype
        self.device = device
        self.track_abs = track_abs
        self.feats: dict[str, Tensor] = {}
        self.abs: dict[str, Tensor] = {}
        self.norm_grads: dict[str, Tensor] = {}
        self.norm_abs: dict[str, Tensor] = {}
        self.broadcast: set[str] = set()  # group keys / norm param names that were expanded
        self.values: Tensor | None = None  # the per-example values of the hooked forward
        self._records: list[tuple[Any, Callable[[Tensor], None]]] = []

    # -- registration ------------------------------------------------------------------------
    @contextmanager
    def installed(self) -> Iterator[HookedPass]:
        handles = []
        try:
            for name, (module, roles, norms) in self.pg._hooked_modules().items():
                hook = self._hook(name, roles, norms)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def backward(self, values: Tensor) -> None:
        """Output gradients of every recorded call, handed to their callbacks."""
        self.values = values.detach()
        records, self._records = self._records, []
        if not records or not values.requires_grad:
            return
        edges = [edge for edge, _ in records]
        grads = torch.autograd.grad(values.sum(), edges, allow_unused=True)
        for (_, callback), grad in zip(records, grads, strict=True):
            if grad is not None:
                callback(grad.to(self.dtype))

    def _hook(
        self, name: str, roles: list[tuple[_Group, _Role]], norms: list[_Norm]
    ) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
            live = [(g, r) for g, r in roles if g.hooked]
            live_norms = [n for n in norms if self.pg._norm_hooked(n)]
            if not live and not live_norms:
                return None
            x = _first_tensor(args, kwargs)
            lead = self._leading(name, module, x, out, live, live_norms)
            if lead is None or not out.requires_grad:
                return None  # demoted, or no gradient reaches this call
            expand = lead != self.size
            with torch.no_grad():
                ins = [self._input_side(g, r, module, x, out, lead) for g, r in live]
                saved = [self._norm_inputs(n, module, x) for n in live_norms]
                if expand:
                    ins = [t.expand(self.size, *t.shape[1:]) for t in ins]
                    saved = [tuple(t.expand(self.size, *t.shape[1:]) for t in s) for s in saved]
            if expand:
                out = out.expand(self.size, *out.shape[1:])
                self.broadcast.update(g.key for g, _ in live)
                for n in live_norms:
                    self.broadcast.update(n.params)
            edge = torch.autograd.graph.get_gradient_edge(out)
            self._records.append((edge, self._callback(live, ins, live_norms, saved)))
            return out if expand else None

        return hook

    def _leading(
        self,
        name: str,
        module: nn.Module,
        x: Any,
        out: Any,
        live: list[tuple[_Group, _Role]],
        norms: list[_Norm],
    ) -> int | None:
        """The input's leading size (B, or 1 to broadcast), or None after demoting the module."""
        why = None
        if not isinstance(x, Tensor) or not isinstance(out, Tensor):
            why = f"'{name}' was called with {type(x).__name__} and returned {type(out).__name__}"
        else:
            min_dim = 1 if isinstance(module, nn.Embedding) else 2
            if isinstance(module, nn.Conv2d):
                min_dim = 4
            elif isinstance(module, nn.Conv1d):
                min_dim = 3
            if x.ndim < min_dim or out.ndim < 1 or out.shape[0] != x.shape[0]:
                why = f"'{name}' got an input of shape {tuple(x.shape)} without a batch dimension"
            elif x.shape[0] == self.size:
                return self.size
            elif x.shape[0] == 1 and self.pg._expand:
                return 1
            else:
                why = (
                    f"the input of '{name}' has shape {tuple(x.shape)}, whose leading size is not "
                    f"the batch size {self.size} (not batch-first)"
                )
        for g, _ in live:
            self.pg._demote(g, why)
        for n in norms:
            self.pg._demote_norm(n, why)
        return None

    # -- forward side ------------------------------------------------------------------------
    def _input_side(
        self, group: _Group, role: _Role, module: nn.Module, x: Tensor, out: Tensor, lead: int
    ) -> Tensor:
        """``P_in ã_t`` for every position, ``[lead, k_in, T]``."""
        identity = (group.k_cols == group.cols) if role.out_rows else (group.k_rows == group.rows)
        if identity:  # a side kept at full size: no identity matrix is formed (vocabularies)
            p = None
            k = group.cols if role.out_rows else group.rows
        else:
            p_rows, p_cols = self.pg._factors(group, self.dtype, self.device)
            p = p_cols if role.out_rows else p_rows
            k = p.shape[0]
        if role.type == "Embedding":
            if self.capture:  # keep the tokens: the one-hot side is never formed
                tokens = x.reshape(lead, -1)
                pad = getattr(module, "padding_idx", None)
                return tokens if pad is None else tokens.masked_fill(tokens == pad, -1)
            tokens = x.reshape(-1)
            m = F.one_hot(tokens, k).T.to(self.dtype) if identity else p.index_select(1, tokens)
            pad = getattr(module, "padding_idx", None)
            if pad is not None:
                m = m.masked_fill((tokens == pad).unsqueeze(0), 0.0)
            return _per_example(m, lead)
        if role.type in CONVOLUTIONS:
            positions = math.prod(out.shape[2:])
        else:
            positions = x[0].numel() // x.shape[-1]
        if not role.weight:  # bias only: ã = 1, d_in = 1, P_in = [[1]]
            ones = x.new_ones(1, 1, 1, dtype=self.dtype) if p is None else p[:, -1]
            return ones.reshape(1, k, 1).expand(lead, k, positions)
        if role.type in CONVOLUTIONS:
            conv: nn.Conv1d | nn.Conv2d = module  # type: ignore[assignment]
            if group.key in self.form:
                return padded_input(conv, x, self.dtype)
            if conv.groups == 1:
                return self._conv_side(conv, role, x, lead, p, k, identity)
            # one input side per group, [lead, groups, k_in, T]: group j's output channels see
            # only its input channels (_accumulate gives each group its own rows)
            per = conv.in_channels // conv.groups
            sides = [
                self._conv_side(conv, role, x[:, j * per : (j + 1) * per], lead, p, k, identity)
                for j in range(conv.groups)
            ]
            return torch.stack(sides, dim=1)
        a = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if identity:
            m = a.T
            if role.bias:
                m = torch.cat([m, m.new_ones(1, m.shape[1])])
        elif role.bias:
            m = torch.addmm(p[:, -1:], p[:, :-1], a.T)
        else:
            m = p @ a.T
        return _per_example(m, lead)

    def _conv_side(
        self,
        conv: nn.Conv1d | nn.Conv2d,
        role: _Role,
        x: Tensor,
        lead: int,
        p: Tensor | None,
        k: int,
        identity: bool,
    ) -> Tensor:
        """A convolution's input side ``[lead, k_in, T]`` over the input channels in ``x``: its
        patches, or ``P_in`` applied to them (a convolution with ``P_in`` as kernels)."""
        if identity:
            xin = padded_input(conv, x, self.dtype)
            if role.type == "Conv1d":  # a Conv2d of kernel (1, k) over [B, C, 1, L]
                return unfold_patches(
                    xin.unsqueeze(2),
                    (1, *conv.kernel_size),
                    (1, *conv.dilation),
                    (1, *conv.stride),
                    bias=role.bias,
                )
            return unfold_patches(xin, conv.kernel_size, conv.dilation, conv.stride, bias=role.bias)
        assert p is not None  # the convolution pads zeros itself (no padded copy of the input)
        xin = x.to(self.dtype)
        padding: Any = conv.padding
        if conv.padding_mode != "zeros":
            xin = F.pad(xin, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        p_w = p[:, :-1] if role.bias else p
        kernel = p_w.reshape(k, x.shape[1], *conv.kernel_size)
        p_bias = p[:, -1] if role.bias else None
        run = F.conv1d if role.type == "Conv1d" else F.conv2d
        y = run(xin, kernel, p_bias, conv.stride, padding, conv.dilation)
        return y.reshape(lead, k, -1)

    def _norm_inputs(self, norm: _Norm, module: nn.Module, x: Tensor) -> tuple[Tensor, ...]:
        """What the backward needs: ``x̂`` (Layer/RMSNorm), ``x``, mean, 1/std (BatchNorm), or
        the padded input (a many-group convolution)."""
        x = x.detach()
        if norm.type == "GroupedConv":
            return (padded_input(module, x, self.dtype),)
        if norm.type == "BatchNorm":
            inv_std = torch.rsqrt(module.running_var + module.eps).to(self.dtype)
            mean = module.running_mean.to(self.dtype)
            b = x.shape[0]
            return x.reshape(b, x.shape[1], -1), mean.expand(b, -1), inv_std.expand(b, -1)
        dims = tuple(range(-len(module.normalized_shape), 0))
        if norm.type == "LayerNorm":
            mean = x.mean(dim=dims, keepdim=True)
            var = x.var(dim=dims, unbiased=False, keepdim=True)
            xhat = (x - mean) * torch.rsqrt(var + module.eps)
        else:  # RMSNorm
            eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
            xhat = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        width = math.prod(module.normalized_shape)
        return (xhat.reshape(x.shape[0], -1, width).to(self.dtype),)

    # -- backward side -----------------------------------------------------------------------
    def _callback(
        self,
        live: list[tuple[_Group, _Role]],
        ins: list[Tensor],
        norms: list[_Norm],
        saved: list[tuple[Tensor, ...]],
    ) -> Callable[[Tensor], None]:
        def callback(grad: Tensor) -> None:
            for (group, role), proj_in in zip(live, ins, strict=True):
                self._accumulate(group, role, grad, proj_in)
            for norm, inputs in zip(norms, saved, strict=True):
                self._accumulate_norm(norm, grad, inputs)

        return callback

    def _accumulate(self, group: _Group, role: _Role, grad: Tensor, proj_in: Tensor) -> None:
        if group.key in self.form:  # proj_in is the padded input
            weight, bias = self._conv_grads(role.module, grad, proj_in)
            formed = torch.cat([weight, bias.unsqueeze(2)], 2) if role.bias else weight
            self._add(self.formed, group.key, formed.detach())
            return
        identity = (group.k_rows == group.rows) if role.out_rows else (group.k_cols == group.cols)
        p_out = None
        if not identity:
            p_rows, p_cols = self.pg._factors(group, self.dtype, self.device)
            p_out = p_rows if role.out_rows else p_cols
        b = self.size
        groups = getattr(role.module, "groups", 1) if role.type in CONVOLUTIONS else 1
        if groups > 1 and role.weight:
            # group j: its output channels' gradients (other rows zero) × its own input side
            g = grad.reshape(b, grad.shape[1], -1)
            per = g.shape[1] // groups
            for j in range(groups):
                rows_j = torch.zeros_like(g)
                rows_j[:, j * per : (j + 1) * per] = g[:, j * per : (j + 1) * per]
                out_j = rows_j if identity else torch.matmul(p_out, rows_j)
                self._term(group, role, out_j, proj_in[:, j])
            return
        if role.type in CONVOLUTIONS:
            g = grad.reshape(b, grad.shape[1], -1)
            proj_out = g if identity else torch.matmul(p_out, g)
        else:
            g = grad.reshape(-1, grad.shape[-1])
            proj_out = _per_example(g.T if identity else p_out @ g.T, b)
        self._term(group, role, proj_out, proj_in)

    def _term(self, group: _Group, role: _Role, proj_out: Tensor, proj_in: Tensor) -> None:
        """Record one ``(output side, input side)`` term of a group's per-example gradient."""
        rows, cols = (proj_out, proj_in) if role.out_rows else (proj_in, proj_out)
        if self.capture:
            self.terms.setdefault(group.key, []).append((rows.detach(), cols.detach()))
            return
        self._add(self.feats, group.key, torch.bmm(rows, cols.transpose(1, 2)).detach())
        if self.track_abs:
            self._add(
                self.abs, group.key, torch.bmm(rows.abs(), cols.abs().transpose(1, 2)).detach()
            )

    def _conv_grads(self, conv: nn.Module, grad: Tensor, x_padded: Tensor) -> tuple[Tensor, Tensor]:
        """A convolution's per-example weight gradients ``[B, out, in/groups·k]`` (one backward
        over batch × groups) and bias gradients ``[B, out]``, from its padded input."""
        b = self.size
        g = grad.reshape(b, grad.shape[1], *grad.shape[2:]).to(self.dtype)
        weight = grouped_conv_weight_grads(conv, g, x_padded).reshape(b, g.shape[1], -1)
        return weight, g.reshape(b, g.shape[1], -1).sum(2)

    @staticmethod
    def _add(acc: dict[str, Tensor], key: str, value: Tensor) -> None:
        prev = acc.get(key)
        acc[key] = value if prev is None else prev + value

    def _accumulate_norm(self, norm: _Norm, grad: Tensor, inputs: tuple[Tensor, ...]) -> None:
        b = self.size
        if norm.type == "GroupedConv":
            weight, bias = self._conv_grads(norm.module, grad, inputs[0])
            parts = {norm.weight: weight.reshape(b, -1), norm.bias: bias}
        elif norm.type == "BatchNorm":
            x, mean, inv_std = inputs
            g = grad.reshape(b, grad.shape[1], -1)
            g_sum = g.sum(2)
            # Σ_l g (x − μ)/σ without forming x̂
            weight = (torch.einsum("bcl,bcl->bc", g, x) - mean * g_sum) * inv_std
            parts = {norm.weight: weight, norm.bias: g_sum}
        else:
            (xhat,) = inputs
            g = grad.reshape(b, -1, xhat.shape[-1])
            parts = {norm.weight: (g * xhat).sum(1), norm.bias: g.sum(1)}
        for name, value in parts.items():
            if name is not None:
                self._add(self.norm_grads, name, value)
                if self.track_abs:
                    self._add(self.norm_abs, name, value.abs())


def padded_input(conv: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A Conv1d/Conv2d's input with the layer's own padding applied (any ``padding_mode``, string
    paddings included), in ``dtype``: what its kernel slides over with padding 0."""
    pad = conv._reversed_padding_repeated_twice
    x = x.to(dtype)
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pad, mode=mode)


def grouped_conv_weight_grads(conv: nn.Module, grad: Tensor, x_padded: Tensor) -> Tensor:
    """Per-example weight gradients ``[B, *conv.weight.shape]`` of a Conv1d/Conv2d from its padded
    input ``[B, C_in, *L_in]`` and output gradients ``[B, C_out, *L_out]``: one convolution
    backward with the batch folded into the groups (``B·groups`` groups, the weight repeated
    ``B`` times), so no patches are formed. Cost: the layer's own weight-gradient
    multiply-adds."""
    b = grad.shape[0]
    w = conv.weight
    out_ch = w.shape[0]
    # the weight's values are not read for a weight gradient: a zero-stride stand-in of its shape
    weight = torch.empty_strided(
        (b * out_ch, *w.shape[1:]), (0,) * w.ndim, dtype=grad.dtype, device=grad.device
    )
    gw = torch.ops.aten.convolution_backward(
        grad.reshape(1, b * out_ch, *grad.shape[2:]),
        x_padded.reshape(1, b * x_padded.shape[1], *x_padded.shape[2:]),
        weight,
        None,
        conv.stride,
        [0] * (w.ndim - 2),
        conv.dilation,
        False,
        [0] * (w.ndim - 2),
        b * conv.groups,
        (False, True, False),
    )[1]
    return gw.reshape(b, *w.shape)


def unfold_patches(
    x: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    stride: tuple[int, ...],
    bias: bool = False,
) -> Tensor:
    """``F.unfold(x, kernel, dilation=dilation, stride=stride)`` for 2-D inputs, by strided copies.

    ``[B, C, H, W] -> [B, C·kh·kw (+1), L]`` in ``F.unfold``'s channel-major order, with a last
    row of ones when ``bias``. Written out because ``F.unfold`` (im2col) is two orders of
    magnitude slower on the CPU for small channel counts. Each kernel offset ``(i, j)`` is one
    strided slice of the input copied into its rows: ``kh·kw`` copies of contiguous blocks,
    about 1.4x faster than one copy from a six-dimensional unfolded view.
    """
    kh, kw = kernel
    dh, dw = dilation
    sh, sw = stride
    b, c, h, w = x.shape
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    d = c * kh * kw
    out = x.new_empty(b, d + int(bias), oh * ow)
    rows = out[:, :d].view(b, c, kh, kw, oh, ow)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dh, j * dw
            rows[:, :, i, j].copy_(
                x[:, :, top : top + sh * (oh - 1) + 1 : sh, left : left + sw * (ow - 1) + 1 : sw]
            )
    if bias:
        out[:, d] = 1
    return out


@dataclass
class Capture:
    """Everything the exact engine needs about one batch's per-example gradients.

    Attributes:
        size: ``B``, the examples in the batch.
        terms: per covered group key, the ``(rows side, cols side)`` of every layer call: the
            example's canonical gradient is ``G_i = Σ_terms Σ_t r_{i,t} c_{i,t}ᵀ``. A side is
            ``[B, d, T]`` (dense) or ``[B, T]`` integer tokens (one-hot columns, −1 = none).
        formed: per demoted group key, the per-example canonical gradients ``[B, rows, cols]``
            (from ``vmap``, when the hooks could not be used for that group).
        flat: ``[B, P_dense]`` exact per-example gradients of the parameters outside the groups
            (normalization affine parameters from the hooks, the rest from ``vmap``), in the
            owner's dense order; ``None`` when there are none.
        values: ``[B]`` the per-example values that were differentiated.
    """

    size: int
    terms: dict[str, list[tuple[Tensor, Tensor]]]
    formed: dict[str, Tensor]
    flat: Tensor | None
    values: Tensor

    def slice(self, start: int, stop: int) -> Capture:
        """The examples ``[start, stop)`` of the batch (views, no copy)."""
        return Capture(
            min(stop, self.size) - start,
            {k: [(r[start:stop], c[start:stop]) for r, c in v] for k, v in self.terms.items()},
            {k: v[start:stop] for k, v in self.formed.items()},
            None if self.flat is None else self.flat[start:stop],
            self.values[start:stop],
        )
