"""The exact engine: inner products with per-example gradients, without forming them.

For a covered layer (:mod:`traintrace.features.layers`) the per-example gradient is the canonical
matrix ``G_i = Σ_t r_t c_tᵀ`` (output gradient × input over positions ``t``; a tied weight adds
every module's calls). Its inner product with any matrix ``D`` of the same shape is

    ⟨G_i, D⟩ = Σ_t r_tᵀ D c_t,

and when ``D`` is itself a captured gradient ``Σ_s ρ_s γ_sᵀ`` (a query),

    ⟨G_i, D⟩ = Σ_{t,s} (r_t·ρ_s)(c_t·γ_s)                                  ("factored").

One capture of ``(r, c)`` per training batch (:meth:`ExactGradients.capture`, one forward and one
backward to the layer outputs) and a few small products per layer give **exact** scores; nothing
of size ``n × P`` is formed or stored. Per layer and batch the cheapest of three contractions is
chosen by multiply-add count:

=============== ========================================== =========================================
path            cost per batch of ``B`` (``m`` directions)  when
=============== ========================================== =========================================
factored        ``B·m·T·T_q·(rows + cols)``                 queries captured, short sequences
bilinear/gather ``B·m·rows·cols`` (``T = 1``);              dense directions (preconditioned
                ``B·m·rows·T`` for one-hot (Embedding)      queries, eigenvectors)
formed          ``B·T·rows·cols + B·m·rows·cols``           long sequences with dense directions
=============== ========================================== =========================================

Squared norms use the same identity on the example with itself,
``‖G_i‖² = Σ_{t,s} (r_t·r_s)(c_t·c_s)`` (``‖r‖²‖c‖²`` for one position), or the formed matrix,
whichever is cheaper. Parameters outside covered layers (raw ``nn.Parameter``\\ s, grouped
convolutions, layers whose hooks fail their check) use exact ``vmap`` gradients restricted to them;
:attr:`ExactGradients.coverage` lists every parameter's path.

Embedding inputs stay integer tokens (their one-hot side is never formed): Gram products become
token equality and dense directions are gathered by column.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.hooks import Capture
from traintrace.features.layers import CONVOLUTIONS, _Group, canonical_matrix, from_canonical
from traintrace.features.params import Layers
from traintrace.features.projections import ProjectedGradients
from traintrace.task import Task
from traintrace.validation import check_model_dtype

__all__ = ["Directions", "ExactGradients"]

Kind = Literal["loss", "measurement"]

#: Elements of a per-example formed block (``chunk × rows × cols``) held at once.
_FORM_ELEMENTS = 2**24
#: Elements of a factored Gram block (``B × m × T × T_q``) held at once.
_GRAM_ELEMENTS = 2**24
#: cap on the [m', rows, B] products of a one-position dense contraction (cache-sized blocks
#: of directions: one [m·rows, B] product of a 1024-wide layer was 100 MB, twice per batch)
_DOT_ELEMENTS = 2**22


@dataclass
class Directions:
    """``m`` directions in parameter space, kept per layer group in the cheapest form.

    ``factored[key]`` holds captured terms ``(rows side [m, rows, T], cols side [m, cols, T])``
    (a query's own gradient); ``dense[key]`` the canonical matrices ``[m, rows, cols]`` (a
    preconditioned query, an eigenvector), in a rotated basis where ``bases`` says so (then
    ``⟨G_i, D⟩ = ⟨Q_Sᵀ G_i Q_A, M⟩``: the training sides are rotated, ``B·T·(rows² + cols²)``,
    instead of rotating every direction back, ``m·rows·cols·(rows + cols)``); ``flat`` the
    ``[m, P_dense]`` part outside the groups.
    A factored group's dense form is built on demand and cached.
    """

    m: int
    factored: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)
    dense: dict[str, Tensor] = field(default_factory=dict)
    flat: Tensor | None = None
    #: per group key, ``(Q_S, Q_A)``: that group's ``dense`` matrices are expressed in the rotated
    #: basis ``Q_Sᵀ · Q_A`` (K-FAC/EK-FAC's eigenbasis), and training gradients are rotated the
    #: same way before the contraction (``Q_A = None``: the columns are not rotated)
    bases: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)

    def flush_(self) -> Directions:
        """Set negligible entries to zero, in place: in every dense matrix (and the flat part),
        an entry below ``eps² · max_k |d_jk|`` of its direction ``j`` in that layer (``eps`` of
        the dtype: 1.4e-14 relative in float32). Returns ``self``.

        Such an entry moves a dot product by less than ``eps²`` of the layer's largest term,
        far below the rounding of the sum itself, but its products with activations fall in the
        subnormal range, which CPUs compute 10-100x slower: the preconditioned queries of
        confidently classified examples made the scoring GEMM 1.4x slower. Run once per query
        block on directions the caller owns, ``O(m·P)``, a few rows at a time (no ``m·P``
        temporary).
        """
        for x in (*self.dense.values(), *([] if self.flat is None else [self.flat])):
            if not x.is_floating_point() or x.numel() == 0:
                continue
            eps2 = torch.finfo(x.dtype).eps ** 2
            width = x[0].numel()
            step = max(1, _FORM_ELEMENTS // 4 // max(1, width))
            buf = x.new_empty(min(step, x.shape[0]), *x.shape[1:])
            for s in range(0, x.shape[0], step):
                part = x[s : s + step]  # any strides: the mask has the part's shape
                a = torch.abs(part, out=buf[: part.shape[0]])
                tiny = a.view(part.shape[0], -1).amax(1).mul_(eps2)
                part.masked_fill_(a < tiny.view(-1, *[1] * (x.ndim - 1)), 0)
        return self


def _is_tokens(side: Tensor) -> bool:
    return side.ndim == 2


def _positions(side: Tensor) -> int:
    return side.shape[-1]


def _width(side: Tensor, full: int) -> int:
    """Multiply-adds per position pair of a side's Gram product (1 for tokens)."""
    return 1 if _is_tokens(side) else full


def _valid(tokens: Tensor, dtype: torch.dtype) -> Tensor:
    return (tokens >= 0).to(dtype)


def _cross_gram(x: Tensor, y: Tensor) -> Tensor:
    """``[B, m, T, T_q]`` dot products of the positions of ``x`` (``B`` rows) and ``y`` (``m``)."""
    if not _is_tokens(x) and not _is_tokens(y):
        b, d, t = x.shape
        m, _, s = y.shape
        if t == 1 and s == 1:  # one GEMM, no permuted copies
            return (x[:, :, 0] @ y[:, :, 0].T).view(b, m, 1, 1)
        xt = x.transpose(1, 2).reshape(b * t, d)
        ys = y.permute(1, 0, 2).reshape(d, m * s)
        return (xt @ ys).view(b, t, m, s).transpose(1, 2)
    if _is_tokens(x) and _is_tokens(y):
        eq = x[:, None, :, None] == y[None, :, None, :]
        return (eq & (x >= 0)[:, None, :, None]).to(torch.get_default_dtype())
    if _is_tokens(x):  # y dense [m, V, Tq]: column tok of y
        g = y[:, x.clamp(min=0), :]  # [m, B, T, Tq]
        return g.permute(1, 0, 2, 3) * _valid(x, y.dtype)[:, None, :, None]
    g = x[:, y.clamp(min=0), :]  # x dense [B, V, T] -> [B, m, Tq, T]
    return g.transpose(2, 3) * _valid(y, x.dtype)[None, :, None, :]


def _factored_macs(
    train: list[tuple[Tensor, Tensor]], query: list[tuple[Tensor, Tensor]], g: _Group, m: int
) -> int:
    """Multiply-adds per training example of ``⟨G_i, D_j⟩`` from the factors' cross Grams."""
    return sum(
        m
        * _positions(r)
        * _positions(rq)
        * (min(_width(r, g.rows), _width(rq, g.rows)) + min(_width(c, g.cols), _width(cq, g.cols)))
        for r, c in train
        for rq, cq in query
    )


def _formed_macs(train: list[tuple[Tensor, Tensor]], g: _Group, m: int) -> int:
    """Multiply-adds per training example of forming ``G_i`` and taking ``m`` dot products."""
    return sum(_positions(r) for r, _ in train) * g.rows * g.cols + m * g.rows * g.cols


def _self_gram(x: Tensor, y: Tensor) -> Tensor:
    """``[B, T_x, T_y]`` dot products between the positions of ``x`` and ``y`` per example."""
    if not _is_tokens(x) and not _is_tokens(y):
        if x.shape[2] == 1 and y.shape[2] == 1:
            return (x[:, :, 0] * y[:, :, 0]).sum(1).view(-1, 1, 1)
        return torch.bmm(x.transpose(1, 2), y)
    if _is_tokens(x) and _is_tokens(y):
        eq = x[:, :, None] == y[:, None, :]
        return (eq & (x >= 0)[:, :, None]).to(torch.get_default_dtype())
    if _is_tokens(y):
        idx = y.clamp(min=0)[:, :, None].expand(-1, -1, x.shape[2])
        g = x.gather(1, idx)  # [B, T_y, T_x]
        return g.transpose(1, 2) * _valid(y, x.dtype)[:, None, :]
    return _self_gram(y, x).transpose(1, 2)


def _form(terms: list[tuple[Tensor, Tensor]], rows: int, cols: int) -> Tensor:
    """Per-example canonical matrices ``[B, rows, cols]`` from captured terms."""
    r0, c0 = terms[0]
    b = r0.shape[0]
    dense = r0 if not _is_tokens(r0) else c0
    out: Tensor | None = None
    if not _is_tokens(r0) and not _is_tokens(c0):  # the common case: one bmm, no zero fill
        out = torch.bmm(r0, c0.transpose(1, 2))
        terms = terms[1:]
    if out is None:
        out = dense.new_zeros(b, rows, cols)
    for r, c in terms:
        if not _is_tokens(r) and not _is_tokens(c):
            out.baddbmm_(r, c.transpose(1, 2))
        elif _is_tokens(c):  # columns are one-hot tokens
            vals = r * _valid(c, r.dtype)[:, None, :]
            idx = c.clamp(min=0)[:, None, :].expand(-1, rows, -1)
            out.scatter_add_(2, idx, vals)
        elif _is_tokens(r):  # rows are one-hot tokens
            vals = (c * _valid(r, c.dtype)[:, None, :]).transpose(1, 2)
            idx = r.clamp(min=0)[:, :, None].expand(-1, -1, cols)
            out.scatter_add_(1, idx, vals)
    return out


def _slice_terms(
    terms: list[tuple[Tensor, Tensor]], start: int, stop: int, dtype: torch.dtype | None = None
) -> list[Any]:
    """Examples ``start:stop`` of every term; dense sides cast to ``dtype`` when given (tokens
    stay integer)."""

    def cut(x: Tensor) -> Tensor:
        x = x[start:stop]
        return x if dtype is None or _is_tokens(x) else x.to(dtype)

    return [(cut(r), cut(c)) for r, c in terms]


def rotate_side(side: Tensor, q: Tensor | None) -> Tensor:
    """``Qᵀ x_t`` for every position, ``[B, d, T]`` (tokens: rows of ``Q``; padding 0)."""
    if q is None:
        return side
    if _is_tokens(side):
        rows = q[side.clamp(min=0)] * (side >= 0).unsqueeze(-1).to(q.dtype)  # [B, T, d]
        return rows.transpose(1, 2)
    b, d, t = side.shape  # one GEMM over all positions: [B·T, d] @ Q
    flat = side.transpose(1, 2).reshape(b * t, d).to(q.dtype) @ q
    return flat.reshape(b, t, q.shape[1]).transpose(1, 2)


def rotate_terms(
    terms: list[tuple[Tensor, Tensor]], q_s: Tensor, q_a: Tensor | None
) -> list[tuple[Tensor, Tensor]]:
    """The captured terms of ``Q_Sᵀ G_i Q_A``: rotated rows and cols sides."""
    return [(rotate_side(r, q_s), rotate_side(c, q_a)) for r, c in terms]


class ExactGradients:
    """Exact inner products with per-example gradients of ``l`` (or the measurement) at a state.

    Args:
        model: the network (evaluated functionally at the state given per call, in eval mode).
        task: reads batches; gives the training loss and the oriented query measurement.
        layers: which parameters (``None`` all, ``"last"``, module names).

    The per-example gradient of example ``i`` is never formed unless that is the cheapest
    contraction for a layer (then only ``chunk × rows × cols`` at a time). Memory per batch: the
    activations and output gradients of the covered layers, as in one training step.
    """

    def __init__(self, model: nn.Module, task: Task, layers: Layers = None) -> None:
        check_model_dtype(model)
        self._pg = ProjectedGradients(model, task, layers, capture=True)
        self.model = model
        self.task = task
        self.names: list[str] = list(self._pg.names)
        self.layout = self._pg.layout
        self._groups: list[_Group] = list(self._pg._groups)
        self._dense_names: list[str] = list(self._pg._dense_names)
        self._shapes = self._pg._shapes
        offsets, start = {}, 0
        for n in self._dense_names:
            size = int(self._shapes[n].numel())
            offsets[n] = slice(start, start + size)
            start += size
        self._dense_slices: dict[str, slice] = offsets
        units: dict[str, list[str]] = {}
        for n in self._dense_names:
            units.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
        self._dense_units = units

    # -- description -----------------------------------------------------------------------------
    @property
    def coverage(self) -> dict[str, str]:
        """``{parameter: path}``: ``"hooks:<Linear|Conv2d|Embedding|Conv1D|...>"`` (contracted
        from the captured factors), ``"vmap"`` (exact per-example gradient, with the reason in
        :meth:`report`)."""
        out: dict[str, str] = {}
        for g in self._groups:
            for n in g.params:
                out[n] = f"hooks:{g.type}" if g.hooked else f"vmap ({g.reason})"
        for n in self._dense_names:
            why = self._pg._dense_reasons.get(n, "")
            if why.startswith("per-example gradient from hooks on GroupedConv"):
                out[n] = "hooks:grouped-conv"
            elif why.startswith("per-example gradient from hooks"):
                out[n] = "hooks:norm"
            else:
                out[n] = "vmap"
        return {n: out[n] for n in self.names}

    @property
    def units(self) -> list[str]:
        """The layers of layer-wise quantities: one per covered group, one per other module."""
        return [g.key for g in self._groups] + list(self._dense_units)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (for fingerprints): parameters, shapes, groups."""
        return {
            "engine": "exact/1",
            "parameters": list(self.names),
            "shapes": [list(s) for s in self.layout.shapes],
            "groups": [{"key": g.key, "params": list(g.params)} for g in self._groups],
        }

    # -- capture -----------------------------------------------------------------------------
    def capture(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind = "loss",
        *,
        offset: int = 0,
        where: str = "",
        form: frozenset[str] = frozenset(),
    ) -> Capture:
        """One forward + backward: the per-layer factors of the batch's per-example gradients.

        ``form``: group keys to return formed (``Capture.formed``) rather than as factors, where
        the hooks can (single ungrouped convolutions: one convolution backward, no patches);
        :meth:`forming` gives the keys a contraction with given directions would form anyway.
        """
        cap = self._pg.capture(state, batch, kind, offset=offset, where=where, form=form)
        if not bool(torch.isfinite(cap.values).all()):
            bad = (~torch.isfinite(cap.values)).nonzero().flatten()[:10]
            raise NonFiniteGradientError(
                f"non-finite {'loss' if kind == 'loss' else 'measurement'}"
                f"{' at ' + where if where else ''} for examples "
                f"{[int(i) + offset for i in bad]}. Check those inputs and labels for NaN/inf, "
                "and the checkpoint for NaN weights"
            )
        return cap

    def directions(self, cap: Capture) -> Directions:
        """The captured gradients themselves as directions (``m = cap.size``), factored."""
        dense = dict(cap.formed)
        return Directions(cap.size, factored=dict(cap.terms), dense=dense, flat=cap.flat)

    def directions_from_flat(self, flat: Tensor) -> Directions:
        """Directions from flat vectors ``[m, P]`` in :attr:`layout` order (e.g. ``H⁻¹ q``)."""
        if flat.ndim != 2 or flat.shape[1] != self.layout.numel:
            raise ConfigurationError(
                f"directions must be [m, P={self.layout.numel}], got {tuple(flat.shape)}"
            )
        named = {n: flat[:, sl] for n, sl in self._pg._slices.items()}
        dense = {g.key: canonical_matrix(g, named, self._shapes) for g in self._groups}
        extra = None
        if self._dense_names:
            extra = torch.cat([named[n] for n in self._dense_names], dim=1)
        return Directions(flat.shape[0], dense=dense, flat=extra)

    def flatten(self, cap: Capture) -> Tensor:
        """The per-example gradients ``[B, P]`` in :attr:`layout` order (forms them: small only)."""
        named: dict[str, Tensor] = {}
        for g in self._groups:
            named.update(from_canonical(g, self._group_matrix(cap, g), self._shapes))
        for n, sl in self._dense_slices.items():
            assert cap.flat is not None
            named[n] = cap.flat[:, sl]
        ref = next(iter(named.values()))
        out = ref.new_zeros(cap.size, self.layout.numel)
        for n, sl in self._pg._slices.items():
            if n in named:
                out[:, sl] = named[n].reshape(cap.size, -1)
        return out

    def _group_matrix(self, cap: Capture, g: _Group) -> Tensor:
        if g.key in cap.formed:
            return cap.formed[g.key]
        terms = cap.terms.get(g.key)
        if not terms:  # the layer did not run on this batch: zero gradient
            ref = cap.values
            return ref.new_zeros(cap.size, g.rows, g.cols)
        return _form(terms, g.rows, g.cols)

    def _dense_of(self, dirs: Directions, g: _Group) -> Tensor | None:
        if g.key not in dirs.dense:
            terms = dirs.factored.get(g.key)
            if not terms:
                return None
            dirs.dense[g.key] = _form(terms, g.rows, g.cols)
        return dirs.dense[g.key]

    def forming(self, dirs: list[Directions]) -> frozenset[str]:
        """Keys of the convolution groups whose training gradients :meth:`dot` with every one of
        ``dirs`` would form per example (dense directions in the layer's own basis, or factored
        ones where forming is cheaper): capturing them formed skips their patches."""
        if not dirs:
            return frozenset()
        return frozenset(
            g.key
            for g in self._groups
            if g.type in CONVOLUTIONS and all(self._forms(d, g) for d in dirs)
        )

    @staticmethod
    def _forms(dirs: Directions, g: _Group) -> bool:
        """Whether :meth:`_dot_group` forms the training gradients of ``g`` against ``dirs``
        (the same cost model, per example)."""
        if g.key in dirs.bases:
            return False  # the training sides are rotated instead
        if g.key in dirs.dense:
            return True  # many positions: the dense path forms
        q_terms = dirs.factored.get(g.key)
        if not q_terms:
            return False  # a zero direction: nothing is computed
        # the training terms are not captured yet: the queries' own stand in for them (the same
        # layer on inputs of the same size)
        return _factored_macs(q_terms, q_terms, g, dirs.m) > _formed_macs(q_terms, g, dirs.m)

    # -- contractions ---------------------------------------------------------------------------
    def dot(self, cap: Capture, dirs: Directions, *, per_unit: bool = False) -> Tensor:
        """``⟨g_i, d_j⟩`` for the batch's examples and the directions: ``[m, B]``.

        With ``per_unit=True``, ``[U, m, B]``: one slice per :attr:`units` entry (layer-wise).
        """
        parts: list[Tensor] = []
        ref = cap.values
        for g in self._groups:
            parts.append(self._dot_group(cap, dirs, g, ref))
        flat_parts = self._dot_flat(cap, dirs, ref)
        if per_unit:
            return torch.stack([*parts, *flat_parts]) if parts or flat_parts else ref.new_zeros(0)
        total = ref.new_zeros(dirs.m, cap.size)
        for p in (*parts, *flat_parts):
            total += p
        return total

    def _dot_flat(self, cap: Capture, dirs: Directions, ref: Tensor) -> list[Tensor]:
        if not self._dense_names:
            return []
        assert cap.flat is not None and dirs.flat is not None
        out = []
        for names in self._dense_units.values():
            cols = torch.cat(
                [
                    torch.arange(self._dense_slices[n].start, self._dense_slices[n].stop)
                    for n in names
                ]
            ).to(cap.flat.device)
            out.append(dirs.flat[:, cols] @ cap.flat[:, cols].T)
        return out

    def _dot_group(self, cap: Capture, dirs: Directions, g: _Group, ref: Tensor) -> Tensor:
        m, b = dirs.m, cap.size
        zero = ref.new_zeros(m, b)
        train_terms = cap.terms.get(g.key)
        basis = dirs.bases.get(g.key)
        if g.key in cap.formed:
            d = self._dense_of(dirs, g)
            if d is None:
                return zero
            formed = cap.formed[g.key]
            if basis is not None:
                q_s, q_a = basis
                formed = q_s.T.to(formed) @ formed
                formed = formed if q_a is None else formed @ q_a.to(formed)
            return d.reshape(m, -1) @ formed.reshape(b, -1).T
        if not train_terms:
            return zero
        if basis is not None:
            q_s, q_a = basis
            rotated = rotate_terms(train_terms, q_s, q_a)
            return self._dot_dense(rotated, dirs.dense[g.key], g, ref)
        q_terms = dirs.factored.get(g.key) if g.key not in dirs.dense else None
        if q_terms is not None and _factored_macs(train_terms, q_terms, g, m) <= _formed_macs(
            train_terms, g, m
        ):
            return self._dot_factored(train_terms, q_terms, m, b, ref)
        d = self._dense_of(dirs, g)
        if d is None:
            return zero
        return self._dot_dense(train_terms, d, g, ref)

    @staticmethod
    def _dot_factored(
        train: list[tuple[Tensor, Tensor]],
        query: list[tuple[Tensor, Tensor]],
        m: int,
        b: int,
        ref: Tensor,
    ) -> Tensor:
        out = ref.new_zeros(b, m)
        for r, c in train:
            for rq, cq in query:
                per_row = m * _positions(r) * _positions(rq)
                step = max(1, _GRAM_ELEMENTS // max(1, per_row))
                for s in range(0, b, step):
                    rr = _cross_gram(r[s : s + step], rq).to(ref.dtype)
                    cc = _cross_gram(c[s : s + step], cq).to(ref.dtype)
                    out[s : s + step] += (rr * cc).sum((2, 3))
        return out.T

    @staticmethod
    def _dot_dense(train: list[tuple[Tensor, Tensor]], d: Tensor, g: _Group, ref: Tensor) -> Tensor:
        """``Σ_t r_tᵀ D_j c_t`` for dense directions ``D`` ``[m, rows, cols]``."""
        m = d.shape[0]
        b = train[0][0].shape[0]
        out = ref.new_zeros(m, b)
        simple = all(not _is_tokens(r) and (_is_tokens(c) or _positions(r) == 1) for r, c in train)
        if simple and any(_is_tokens(c) for _, c in train):
            # gathering D's token columns moves m·rows·T numbers per example (memory-bound: x4);
            # forming the example's sparse [rows, V] gradient costs rows·V·(T + m) multiply-adds
            t_total = sum(_positions(r) for r, _ in train)
            simple = 4 * m * g.rows * t_total < g.rows * g.cols * (t_total + m)
        if simple:
            for r, c in train:
                if _is_tokens(c):  # gather the token columns of D: [m, rows, B, T]
                    step = max(1, _FORM_ELEMENTS // max(1, m * g.rows * c.shape[1]))
                    for s in range(0, b, step):
                        cs, rs = c[s : s + step], r[s : s + step]
                        cols = d[:, :, cs.clamp(min=0)]  # [m, rows, b', T]
                        w = rs * _valid(cs, rs.dtype)[:, None, :]
                        out[:, s : s + step] += torch.einsum("mrbt,brt->mb", cols, w)
                else:  # one position: (D c) · r, D's rows leading (the faster GEMM order),
                    # a few directions at a time: the [m', rows, B] product stays small
                    flat_d = d.reshape(m * g.rows, g.cols)
                    cols_t, rows_t = c[:, :, 0].T, r[:, :, 0].T  # [cols, B], [rows, B]
                    step = max(1, _DOT_ELEMENTS // max(1, g.rows * b))
                    for j in range(0, m, step):
                        dc = (flat_d[j * g.rows : (j + step) * g.rows] @ cols_t).view(-1, g.rows, b)
                        out[j : j + step] += (dc * rows_t).sum(1)
            return out
        step = max(1, _FORM_ELEMENTS // max(1, g.rows * g.cols))
        flat_d = d.reshape(m, -1)
        for s in range(0, b, step):
            formed = _form(_slice_terms(train, s, s + step), g.rows, g.cols)
            out[:, s : s + step] = flat_d @ formed.reshape(formed.shape[0], -1).T
        return out

    def sq_norms(self, cap: Capture, *, per_unit: bool = False) -> Tensor:
        """``‖g_i‖²`` for the batch's examples, ``[B]`` (``[U, B]`` with ``per_unit=True``)."""
        ref = cap.values
        parts = []
        for g in self._groups:
            if g.key in cap.formed:
                parts.append(cap.formed[g.key].reshape(cap.size, -1).square().sum(1))
                continue
            terms = cap.terms.get(g.key)
            if not terms:
                parts.append(ref.new_zeros(cap.size))
                continue
            t_total = sum(_positions(r) for r, _ in terms)
            gram = cap.size * t_total**2 * (g.rows + g.cols)
            formed = cap.size * t_total * g.rows * g.cols
            if gram <= formed:
                acc = ref.new_zeros(cap.size)
                for r1, c1 in terms:
                    for r2, c2 in terms:
                        acc += (
                            _self_gram(r1, r2).to(ref.dtype) * _self_gram(c1, c2).to(ref.dtype)
                        ).sum((1, 2))
                parts.append(acc)
            else:
                acc = ref.new_zeros(cap.size)
                step = max(1, _FORM_ELEMENTS // max(1, g.rows * g.cols))
                for s in range(0, cap.size, step):
                    formed_m = _form(_slice_terms(terms, s, s + step), g.rows, g.cols)
                    acc[s : s + step] = formed_m.reshape(formed_m.shape[0], -1).square().sum(1)
                parts.append(acc)
        if self._dense_names:
            assert cap.flat is not None
            for names in self._dense_units.values():
                parts.append(sum(cap.flat[:, self._dense_slices[n]].square().sum(1) for n in names))
        out = torch.stack(parts) if parts else ref.new_zeros(0, cap.size)
        return out if per_unit else out.sum(0)
