"""Random projections of per-example gradients: ``R g`` in ``k`` dimensions, chosen by ``projection=``.

Every gradient-based estimator only needs inner products ``⟨g, g'⟩`` of per-example gradients.
A random ``R`` (``k × P``) with ``E[Rᵀ R] = I`` keeps them in expectation,

    E_R ⟨R g, R g'⟩ = ⟨g, g'⟩,

and, for ``k ≳ log(n) / ε²``, within ``ε ‖g‖ ‖g'‖`` for all pairs of ``n`` points with high
probability (Johnson–Lindenstrauss). Storing ``R g`` instead of ``g`` makes the training-set
features ``k`` wide instead of ``P``. ``R`` is a deterministic function of the settings
(:class:`Projection`), the selected parameter names and shapes: the *same* ``R`` is used for every
batch, every checkpoint and for the query and the training side.

Kinds (``Projection.kind``)
---------------------------

``"gaussian"`` / ``"rademacher"`` — dense ``R`` with i.i.d. entries ``N(0, 1)/√k`` or ``±1/√k``.
Exact per-example gradients (:class:`~traintrace.features.GradientComputer`) are multiplied by
``R`` in seeded blocks of :data:`BLOCK_ROWS` rows (of the ``P`` dimension): block ``j`` is drawn
from its own generator seeded by ``(seed, kind, j)``, so ``R`` never exists in full (memory
``BLOCK_ROWS × k`` plus an optional cache of blocks, ``cache_mib``) and does not depend on batch
size or on how much is cached. Cost per batch: ``B·P·k`` multiply-adds plus drawing ``P·k``
numbers for blocks not in the cache.

``"sjlt"`` — sparse Johnson–Lindenstrauss (Kane & Nelson's block construction): the ``k`` outputs
are split into ``s`` (``nonzeros``) contiguous blocks, and each input coordinate is hashed to one
output in every block with a random sign, scaled ``1/√s``. Applied with ``index_add_`` on the exact
gradients; the hashes are drawn per block of rows like the dense kinds. Cost ``B·P·s``.

``"kronecker"`` (default) — per layer, the LoGra trick. For a Linear/Conv/Embedding layer the
per-example gradient is a matrix ``G = Σ_t b_t ãᵀ_t`` (``[d_out, d_in(+1)]``: ``b_t`` the gradient
of the example's loss with respect to the layer's output at position ``t``, ``ã_t`` its input with
a 1 appended when the bias is selected; the bias is the last column). With Gaussian
``P_out [k_out, d_out]`` and ``P_in [k_in, d_in(+1)]`` (entries ``N(0, 1)/√k_out`` and
``N(0, 1)/√k_in``; independent, so ``E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = I``), the feature is

    vec(P_out G P_inᵀ) = Σ_t (P_out b_t) ⊗ (P_in ã_t)        (row-major, [k_out · k_in])

computed in **one forward and one backward pass** per batch: a forward hook projects the input
side (``P_in ã_t``) and records the gradient edge of the layer's output; one ``autograd.grad``
with respect to those edges gives ``b_t``, projected to ``P_out b_t``. No per-example gradient is
formed, and not even the weight gradients a training step computes. Positions ``t``: every index between the batch and
the feature dimension of a Linear/Conv1D input (``[B, T, d]`` sums ``T`` tokens:
``einsum('btk,btl->bkl')``), every output location of a Conv2d (``P_in`` is applied to the input
patches as a convolution with ``P_in`` as kernels, which equals projecting ``F.unfold`` patches),
every token of an Embedding (the input is one-hot, so ``P_in ã_t`` is column ``token_t`` of
``P_in``; ``padding_idx`` tokens contribute nothing). A module called several times in a forward
pass adds all its calls.

The *canonical matrix* of a layer, on which ``P_out ⊗ P_in`` acts, is ``[d_out, d_in(+1)]``:
``nn.Linear`` weight as is; ``nn.Conv2d`` weight reshaped to ``[out, in·kh·kw]``; ``nn.Embedding``
weight ``[V, d]`` transposed to ``[d, V]``; Hugging Face ``Conv1D`` weight ``[d_in, d_out]``
transposed to ``[d_out, d_in]``; the selected bias as the last column. A weight shared by several
of these modules (GPT-2 ties ``lm_head.weight`` to ``transformer.wte.weight``) keeps the canonical
matrix of its first module (in ``named_modules`` order) and every module's contributions are
added in that orientation (``lm_head``'s ``b aᵀ`` enters transposed); the owners' biases then form
groups of their own. A bias selected without its weight is a group with ``d_in = 1`` (``ã = 1``).

**How** ``dim`` **is split.** Every Kronecker layer is one group, and all remaining parameters
form one *dense group*. ``dim`` is shared equally among the groups by water-filling: groups
smaller than their share (``d_out·d_in`` numbers) get their size, the rest is shared among the
others. A layer's share ``b`` becomes ``k_out × k_in`` with ``k_out ≈ k_in ≈ √b``, each capped at
its dimension (``k_out·k_in ≤ b``); a side with ``k = d`` uses the identity (exact on that side),
so a layer with ``d_out·d_in ≤ b`` is stored exactly. The actual :attr:`ProjectedGradients.width`
is therefore at most ``dim`` (usually within a few percent); :meth:`ProjectedGradients.report`
lists each group's shape. The dense group gets a Gaussian ``R`` of its share, or the identity when
it has no more numbers than its share (then it is stored exactly).

**Coverage** (:attr:`ProjectedGradients.coverage`: every selected parameter and its path).

* ``"kronecker:<Linear|Conv2d|Embedding|Conv1D>"`` (``"kronecker:Embedding+Linear"`` for a tied
  weight): hooks, as above.
* ``"exact+kronecker:<...>"``: the same Kronecker ``R`` applied to the exact per-example gradient
  (vmap), when the hooks cannot give per-example gradients: the layer's input is not batch-first,
  its weight is also used outside its forward (detected by comparing ``Σ_i G_i`` with autograd's
  batch gradient), or one example alone gives a different feature than inside the batch. ``R`` is
  identical on both paths, so features do not depend on which was taken.
* ``"exact+gaussian"`` / ``"exact"``: the dense group — LayerNorm/RMSNorm/BatchNorm affine
  parameters (exact per-example gradients from hooks: ``Σ_t b_t ⊙ x̂_t``), raw ``nn.Parameter``\\ s
  (position embeddings, class tokens), grouped convolutions, Embeddings with ``max_norm`` or
  ``scale_grad_by_freq``, weights tied to other kinds of modules and anything else
  (:class:`~traintrace.features.GradientComputer` restricted to those names); then Gaussian, or
  nothing when tiny.

Inputs whose leading size is 1 while the batch has ``B > 1`` (position embeddings indexed by a
``[1, T]`` tensor and broadcast over the batch) have their output expanded to ``B`` copies, so
each example receives its own output gradient. Hooked paths are verified on the first batch and on
the first batch with ``B > 1``: losses equal those of a plain forward, ``Σ_i`` features equal the
projected autograd batch gradient, and example 0 alone gives the feature it got inside the batch;
a layer failing any check moves to the exact path (``coverage`` and :meth:`report` say why; the
features keep their values, since ``R`` is the same). The checks cost a few extra passes on those
two batches only. A layer that mixes examples in a way example 0 alone does not reveal is not
detected.

**Cost** (Kronecker). Time: the forward and the input-gradient half of the backward of a training
step, plus per call of a layer ``B·T·(d_in k_in + d_out k_out + k_in k_out)`` multiply-adds (for
Conv2d, ``P_in`` is a convolution with ``k_in`` output channels). Memory: the output gradients
of one batch (as in training) and ``[B, k_in, T]`` per layer call. The dense group adds one
vmapped pass restricted to its parameters unless they are all normalization layers (hooked).

Everything runs functionally at the given ``state`` (``torch.func.functional_call``) in eval mode;
hooks exist only during a call; the user's model, its parameters and ``.grad`` are unchanged.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from traintrace.data import batch_size_of, index_batch, to_plain
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.gradients import GradientComputer
from traintrace.features.hooks import Capture, HookedPass
from traintrace.features.layers import (
    CONVOLUTIONS,
    TRANSPOSED,
    _Group,
    _Norm,
    _Role,
    canonical_matrix,
    layer_type,
    norm_type,
)
from traintrace.features.params import Layers, ParameterLayout, select_parameters
from traintrace.task import Task

__all__ = ["BLOCK_ROWS", "ProjectedGradients", "Projection"]

#: an ungrouped convolution is captured formed (when asked) from this many input channels on
FORM_MIN_CHANNELS = 8

Kind = Literal["loss", "measurement", "sampled"]
ProjectionKind = Literal["kronecker", "gaussian", "rademacher", "sjlt"]

#: Rows (of the parameter dimension ``P``) per seeded block of a dense or sparse ``R``.
BLOCK_ROWS = 1024
_KINDS = ("kronecker", "gaussian", "rademacher", "sjlt")
_SJLT_NONZEROS = 4
_FORMAT = "traintrace.projection/1"
_DENSE_KEY = "dense"


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """How per-example gradients are projected to ``dim`` numbers.

    Args:
        dim: target feature width ``k`` (the dense kinds use exactly ``dim``; ``"kronecker"``
            splits it across layers and may use slightly fewer, see the module docs).
        kind: ``"kronecker"`` — per-layer ``P_out ⊗ P_in`` from hooks, never forming per-example
            gradients (default, fastest); ``"gaussian"`` — dense ``N(0, 1)/√k``; ``"rademacher"``
            — dense ``±1/√k``; ``"sjlt"`` — sparse JL, ``nonzeros`` entries ``±1/√s`` per input
            coordinate. The last three apply ``R`` to exact per-example gradients.
        seed: seed of ``R``. Everything random is derived from it and the parameter names.
        nonzeros: ``s`` for ``"sjlt"`` (default ``min(4, dim)``); not accepted for other kinds.

    All kinds are unbiased: ``E_R[⟨R g, R g'⟩] = ⟨g, g'⟩``; the variance for unit vectors is at
    most ``2/k`` for the dense and sparse kinds. ``ProjectedGradients(projection=4096)`` means
    ``Projection(dim=4096)``.
    """

    dim: int
    kind: ProjectionKind = "kronecker"
    seed: int = 0
    nonzeros: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigurationError(
                f"Projection: dim must be a positive integer, got {self.dim!r}"
            )
        if self.kind not in _KINDS:
            raise ConfigurationError(
                f"Projection: kind must be one of {list(_KINDS)}, got {self.kind!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigurationError(f"Projection: seed must be an integer, got {self.seed!r}")
        if self.nonzeros is not None:
            if self.kind != "sjlt":
                raise ConfigurationError(
                    f"Projection: nonzeros only applies to kind='sjlt', not {self.kind!r}; "
                    "leave it out"
                )
            if (
                isinstance(self.nonzeros, bool)
                or not isinstance(self.nonzeros, int)
                or not 1 <= self.nonzeros <= self.dim
            ):
                raise ConfigurationError(
                    f"Projection: nonzeros must be an integer in [1, dim={self.dim}], got "
                    f"{self.nonzeros!r}"
                )

    @property
    def sjlt_nonzeros(self) -> int:
        """``s`` of the sparse JL projection (only meaningful for ``kind="sjlt"``)."""
        return self.nonzeros if self.nonzeros is not None else min(_SJLT_NONZEROS, self.dim)

    def describe(self) -> dict[str, Any]:
        """JSON-able settings that determine ``R`` (for store metadata: refuse a mismatch)."""
        out: dict[str, Any] = {
            "format": _FORMAT,
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "block_rows": BLOCK_ROWS,
        }
        if self.kind == "sjlt":
            out["nonzeros"] = self.sjlt_nonzeros
        return out

    @classmethod
    def coerce(cls, value: Projection | int | None) -> Projection | None:
        """``None`` → no projection; an int → ``Projection(dim=int)``; a Projection as is."""
        if value is None or isinstance(value, Projection):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(dim=value)
        raise ConfigurationError(
            f"projection must be None, an int (the dimension) or a traintrace Projection, got "
            f"{value!r}"
        )


# ----------------------------------------------------------------------------------------------
# seeded random blocks
# ----------------------------------------------------------------------------------------------
def _derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels; stable across processes and platforms."""
    text = repr((int(seed), *(str(p) for p in parts))).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _generator(seed: int, *parts: object) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(_derive_seed(seed, *parts))
    return gen


def _gaussian(rows: int, cols: int, seed: int, *parts: object) -> Tensor:
    """``N(0, 1)`` entries drawn in float32 (so ``R`` is the same for every working dtype)."""
    return torch.randn(rows, cols, generator=_generator(seed, *parts), dtype=torch.float32)


class _RandomMap:
    """``x ↦ x R`` for ``R`` ``[rows, k]`` (dense Gaussian/Rademacher or SJLT), in seeded blocks."""

    def __init__(
        self, kind: str, seed: int, stream: str, rows: int, k: int, nonzeros: int, cache_bytes: int
    ) -> None:
        self.kind, self.seed, self.stream = kind, seed, stream
        self.rows, self.k, self.s = rows, k, nonzeros
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple[int, torch.dtype, torch.device], Any] = {}
        self._cached = 0

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // BLOCK_ROWS)

    def _span(self, j: int) -> tuple[int, int]:
        return j * BLOCK_ROWS, min(self.rows, (j + 1) * BLOCK_ROWS)

    def _draw(self, j: int, dtype: torch.dtype, device: torch.device) -> Any:
        start, stop = self._span(j)
        n = stop - start
        gen = _generator(self.seed, self.kind, self.stream, j)
        if self.kind == "gaussian":
            block = torch.randn(n, self.k, generator=gen, dtype=torch.float32)
            return block.to(device=device, dtype=dtype).mul_(1.0 / math.sqrt(self.k))
        if self.kind == "rademacher":
            # 8 signs per random byte: bit i of byte c is the sign of column 8c + i
            raw = torch.randint(0, 256, (n, -(-self.k // 8)), generator=gen, dtype=torch.uint8)
            bits = (raw.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
            signs = bits.reshape(n, -1)[:, : self.k].to(device=device, dtype=dtype)
            return signs.mul_(2.0 / math.sqrt(self.k)).sub_(1.0 / math.sqrt(self.k))
        # sjlt: output block r is [r·k/s, (r+1)·k/s); one bucket per output block, random sign
        bounds = [r * self.k // self.s for r in range(self.s + 1)]
        buckets = torch.stack(
            [torch.randint(bounds[r], bounds[r + 1], (n,), generator=gen) for r in range(self.s)],
            dim=1,
        )
        signs = torch.randint(0, 2, (n, self.s), generator=gen, dtype=torch.int8)
        values = signs.to(dtype).mul_(2.0 / math.sqrt(self.s)).sub_(1.0 / math.sqrt(self.s))
        return buckets.reshape(-1).to(device), values.to(device)

    def _block(self, j: int, dtype: torch.dtype, device: torch.device) -> Any:
        key = (j, dtype, device)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        block = self._draw(j, dtype, device)
        parts = block if isinstance(block, tuple) else (block,)
        size = sum(t.numel() * t.element_size() for t in parts)
        if self._cached + size <= self.cache_bytes:
            self._cache[key] = block
            self._cached += size
        return block

    def apply(self, x: Tensor) -> Tensor:
        """``x @ R`` for ``x`` ``[n, rows]``."""
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        for j in range(self.num_blocks):
            start, stop = self._span(j)
            block = self._block(j, x.dtype, x.device)
            xs = x[:, start:stop]
            if self.kind == "sjlt":
                buckets, values = block
                out.index_add_(1, buckets, (xs.unsqueeze(-1) * values).reshape(x.shape[0], -1))
            else:
                out.addmm_(xs, block)
        return out

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The explicit ``R`` ``[rows, k]``, assembled from the same seeded blocks (small only)."""
        parts = []
        for j in range(self.num_blocks):
            start, stop = self._span(j)
            block = self._draw(j, dtype, torch.device("cpu"))
            if self.kind == "sjlt":
                buckets, values = block
                dense = torch.zeros(stop - start, self.k, dtype=dtype)
                rows = torch.arange(stop - start).repeat_interleave(self.s)
                dense.index_put_((rows, buckets), values.reshape(-1), accumulate=True)
                block = dense
            parts.append(block)
        return torch.cat(parts)


def _allocate(dim: int, caps: list[int]) -> list[int]:
    """Share ``dim`` equally among groups by water-filling; a group gets at most its cap."""
    alloc = [0] * len(caps)
    remaining = dim
    order = sorted(range(len(caps)), key=caps.__getitem__)
    for pos, i in enumerate(order):
        alloc[i] = min(caps[i], remaining // (len(caps) - pos))
        remaining -= alloc[i]
    return alloc


def _factor_sizes(budget: int, rows: int, cols: int) -> tuple[int, int]:
    """``k_rows × k_cols ≤ budget``, as square as the caps ``rows``, ``cols`` allow."""
    if budget >= rows * cols:
        return rows, cols
    k_rows = min(rows, max(1, math.isqrt(budget)))
    k_cols = min(cols, max(1, budget // k_rows))
    k_rows = min(rows, max(1, budget // k_cols))
    return k_rows, k_cols


# ----------------------------------------------------------------------------------------------
# the featurizer
# ----------------------------------------------------------------------------------------------
class ProjectedGradients:
    """Projected per-example gradients ``R ∇l(z, θ)`` (or of the oriented measurement).

    Args:
        model: the network; evaluated functionally at the state given to :meth:`features`, in
            eval mode. It is not modified.
        task: reads batches, gives the loss and the measurement.
        layers: which parameters (see :func:`~traintrace.features.select_parameters`).
        projection: a :class:`Projection`, an int ``k`` (``Projection(dim=k)``: Kronecker), or
            ``None`` for no projection (exact gradients, ``width = P``).
        cache_mib: memory for caching drawn blocks of a dense/sparse ``R`` between batches
            (MiB). It changes speed only, never the result.

    Attributes:
        names: the selected parameter names, in layout order.
        layout: their :class:`~traintrace.features.ParameterLayout` (``P`` = ``layout.numel``).
        width: the feature dimension.
        coverage: ``{parameter name: path}`` for every selected parameter (module docs).
        columns: ``{group key: slice of the feature columns}``; the key of a Kronecker group is
            its weight name (or bias name when alone), the dense group's key is ``"dense"``.

    Features are ``[batch, width]`` in the parameters' dtype; ``⟨features(z), features(z')⟩``
    estimates ``⟨∇l(z), ∇l(z')⟩`` without bias (module docs for the variance).
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        layers: Layers = None,
        projection: Projection | int | None = None,
        *,
        cache_mib: float = 256.0,
        capture: bool = False,
    ) -> None:
        self.model = model
        self.task = task
        self.projection = Projection.coerce(projection)
        if not (isinstance(cache_mib, (int, float)) and cache_mib >= 0):
            raise ConfigurationError(f"cache_mib must be a number ≥ 0, got {cache_mib!r}")
        self._cache_bytes = int(cache_mib * 2**20)
        self.names = select_parameters(model, layers)
        self.layout = ParameterLayout.of(model, self.names)
        self._slices = self.layout.slices()
        self._shapes = dict(zip(self.layout.names, self.layout.shapes, strict=True))
        self._all = GradientComputer(model, task, self.names)
        self._exact: dict[tuple[str, ...], GradientComputer] = {}
        self._groups: list[_Group] = []
        self._norms: list[_Norm] = []
        self._norm_off: set[str] = set()  # hooked norm params moved to vmap
        self._dense_names: list[str] = []
        self._dense_map: _RandomMap | None = None
        self._dense_reasons: dict[str, str] = {}
        self._expand = True
        self._checked_single = False
        self._checked_multi = False
        self.coverage: dict[str, str] = {}
        self.columns: dict[str, slice] = {}
        self._capture = capture
        self._sampler_state: tuple[Tensor, torch.device] | None = None  # kind="sampled" only
        self._last_sampler: torch.Generator | None = None
        proj = self.projection
        if capture:
            if proj is not None:
                raise ConfigurationError("capture=True plans the exact factors: projection=None")
            # every group at full size: identity factors, so the hooks see the raw (b, ã)
            self._plan_kronecker(Projection(dim=max(1, self.layout.numel) * 2))
            self.projection = None
            return
        if proj is None:
            self.width = self.layout.numel
            self.coverage = dict.fromkeys(self.names, "exact")
            return
        if proj.kind != "kronecker":
            self.width = proj.dim
            self._dense_names = list(self.names)
            self._dense_map = _RandomMap(
                proj.kind,
                proj.seed,
                "all",
                self.layout.numel,
                proj.dim,
                proj.sjlt_nonzeros,
                self._cache_bytes,
            )
            self.coverage = dict.fromkeys(self.names, f"exact+{proj.kind}")
            self.columns = {_DENSE_KEY: slice(0, proj.dim)}
            return
        self._plan_kronecker(proj)

    # -- planning ----------------------------------------------------------------------------
    def _plan_kronecker(self, proj: Projection) -> None:
        modules = dict(self.model.named_modules())
        # the modules using each parameter (a module registered under two names counts once)
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        seen: set[tuple[int, int]] = set()
        for mname, module in self.model.named_modules(remove_duplicate=False):
            for leaf, p in module._parameters.items():
                if p is not None and (id(p), id(module)) not in seen:
                    seen.add((id(p), id(module)))
                    owners.setdefault(id(p), []).append((mname, module, leaf))
        params = dict(self.model.named_parameters())
        weight_groups: dict[str, _Group] = {}
        bias_of: dict[str, str] = {}  # module name -> selected bias name, for modules with groups
        dense_reason: dict[str, str] = {}
        norm_params: dict[str, dict[str, str]] = {}
        for name in self.names:
            users = owners[id(params[name])]
            mname, module, leaf = users[0]
            ltype, why = layer_type(module)
            if leaf not in ("weight", "bias"):
                dense_reason[name] = f"'{leaf}' is a raw parameter of {type(module).__name__}"
            elif ltype is None:
                if len(users) == 1 and norm_type(module) is not None:
                    norm_params.setdefault(mname, {})[leaf] = name
                    dense_reason[name] = f"per-example gradient from hooks on {norm_type(module)}"
                else:
                    dense_reason[name] = why
            elif len(users) > 1:
                if leaf != "weight" or any(u[2] != "weight" for u in users):
                    dense_reason[name] = "a bias shared between modules"
                    continue
                group = self._tied_group(name, users, dense_reason)
                if group is not None:
                    weight_groups[name] = group
            elif leaf == "weight":
                weight_groups[name] = self._single_group(name, mname, module, ltype)
            else:
                bias_of[mname] = name
        # attach biases to their module's weight group, else make bias-only groups
        by_module = {g.roles[0].module_name: g for g in weight_groups.values() if len(g.roles) == 1}
        for mname, bias in bias_of.items():
            group = by_module.get(mname)
            if group is not None:
                group.bias = bias
                group.cols += 1
                group.roles[0].bias = True
            else:
                module = modules[mname]
                ltype = layer_type(module)[0]
                assert ltype is not None
                d_out = params[bias].numel()
                role = _Role(mname, module, ltype, weight=False, bias=True, out_rows=True)
                weight_groups[bias] = _Group(bias, None, bias, ltype, [role], d_out, 1, False)
        order = {n: i for i, n in enumerate(self.names)}
        self._groups = sorted(weight_groups.values(), key=lambda g: order[g.params[0]])
        for group in self._groups:
            for n in group.params:
                dense_reason.pop(n, None)
        self._dense_names = [n for n in self.names if n in dense_reason]
        self._dense_reasons = {n: dense_reason[n] for n in self._dense_names}
        for mname, leaves in norm_params.items():
            module = modules[mname]
            ntype = norm_type(module)
            assert ntype is not None
            self._norms.append(
                _Norm(mname, module, ntype, leaves.get("weight"), leaves.get("bias"))
            )
        # split dim
        dense_numel = sum(self._shapes[n].numel() for n in self._dense_names)
        caps = [g.rows * g.cols for g in self._groups] + ([dense_numel] if dense_numel else [])
        if proj.dim < len(caps):
            raise ConfigurationError(
                f"projection dim={proj.dim} is smaller than the number of parameter groups "
                f"({len(caps)}: one per Kronecker layer plus the dense group); use dim ≥ "
                f"{len(caps)} or select fewer layers with layers="
            )
        alloc = _allocate(proj.dim, caps)
        start = 0
        for group, budget in zip(self._groups, alloc, strict=False):
            group.k_rows, group.k_cols = _factor_sizes(budget, group.rows, group.cols)
            group.columns = slice(start, start + group.width)
            self.columns[group.key] = group.columns
            start += group.width
            for n in group.params:
                self.coverage[n] = f"kronecker:{group.type}"
        if dense_numel:
            k = alloc[-1]
            if k < dense_numel:
                self._dense_map = _RandomMap(
                    "gaussian", proj.seed, "dense", dense_numel, k, 1, self._cache_bytes
                )
            else:
                k = dense_numel
            self.columns[_DENSE_KEY] = slice(start, start + k)
            start += k
            path = "exact" if self._dense_map is None else "exact+gaussian"
            for n in self._dense_names:
                self.coverage[n] = path
        self.width = start
        self.coverage = {n: self.coverage[n] for n in self.names}

    def _single_group(self, name: str, mname: str, module: nn.Module, ltype: str) -> _Group:
        shape = self._shapes[name]
        if ltype == "Embedding" or ltype == "Conv1D":
            rows, cols = int(shape[1]), int(shape[0])
        else:
            rows, cols = int(shape[0]), int(shape[1:].numel())
        role = _Role(mname, module, ltype, weight=True, bias=False, out_rows=True)
        return _Group(name, name, None, ltype, [role], rows, cols, TRANSPOSED[ltype])

    def _tied_group(
        self, name: str, users: list[tuple[str, nn.Module, str]], dense_reason: dict[str, str]
    ) -> _Group | None:
        """A weight used by several modules: Kronecker if all are 2-D layers, else dense."""
        types = [layer_type(m)[0] for _, m, _ in users]
        first = types[0]
        assert first is not None
        if any(t not in ("Linear", "Embedding", "Conv1D") for t in types):
            listed = ", ".join(f"{u[0]} ({type(u[1]).__name__})" for u in users)
            dense_reason[name] = f"weight tied between {listed}"
            return None
        group = self._single_group(name, users[0][0], users[0][1], first)
        group.roles = [
            _Role(
                mname,
                module,
                t,  # type: ignore[arg-type]
                weight=True,
                bias=False,
                out_rows=TRANSPOSED[t] == TRANSPOSED[first],  # type: ignore[index]
            )
            for (mname, module, _), t in zip(users, types, strict=True)
        ]
        group.type = "+".join(dict.fromkeys(t for t in types if t is not None))
        return group

    # -- demotion to the exact path ------------------------------------------------------------
    def _set_exact_coverage(self, group: _Group) -> None:
        for n in group.params:
            self.coverage[n] = f"exact+kronecker:{group.type}"

    def _demote(self, group: _Group, why: str | None) -> None:
        if group.hooked:
            group.hooked = False
            group.reason = why or "hooks unavailable"
            self._set_exact_coverage(group)

    def _demote_norm(self, norm: _Norm, why: str | None) -> None:
        for n in norm.params:
            if n not in self._norm_off:
                self._norm_off.add(n)
                self._dense_reasons[n] = f"vmap: {why}"

    def _norm_hooked(self, norm: _Norm) -> bool:
        return not any(n in self._norm_off for n in norm.params)

    def _hooked_modules(
        self,
    ) -> dict[str, tuple[nn.Module, list[tuple[_Group, _Role]], list[_Norm]]]:
        out: dict[str, tuple[nn.Module, list[tuple[_Group, _Role]], list[_Norm]]] = {}
        for group in self._groups:
            if group.hooked:
                for role in group.roles:
                    out.setdefault(role.module_name, (role.module, [], []))[1].append((group, role))
        for norm in self._norms:
            if self._norm_hooked(norm):
                out.setdefault(norm.module_name, (norm.module, [], []))[2].append(norm)
        return out

    # -- the random factors --------------------------------------------------------------------
    def _factors(
        self, group: _Group, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        key = (dtype, device)
        if key not in group._factors:
            if (torch.float64, torch.device("cpu")) not in group._factors:
                group._factors[(torch.float64, torch.device("cpu"))] = (
                    self._factor(group, "rows", group.k_rows, group.rows),
                    self._factor(group, "cols", group.k_cols, group.cols),
                )
            master = group._factors[(torch.float64, torch.device("cpu"))]
            group._factors[key] = (
                master[0].to(device=device, dtype=dtype),
                master[1].to(device=device, dtype=dtype),
            )
        return group._factors[key]

    def _factor(self, group: _Group, side: str, k: int, d: int) -> Tensor:
        if k == d:
            return torch.eye(d, dtype=torch.float64)
        assert self.projection is not None
        raw = _gaussian(k, d, self.projection.seed, "kronecker", group.key, side)
        return raw.double() / math.sqrt(k)

    def kronecker_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{group key: (P_out [k_out, d_out], P_in [k_in, d_in(+1)])}`` in float64.

        The group's features are ``vec(P_out G P_inᵀ)`` (row-major) of its canonical matrix
        ``G`` (module docs); a factor with ``k = d`` is the identity.
        """
        cpu = torch.device("cpu")
        return {g.key: self._factors(g, torch.float64, cpu) for g in self._groups}

    def dense_matrix(self) -> Tensor | None:
        """The explicit dense/sparse ``R`` ``[P_dense, k]`` in float64 (``None`` = identity).

        ``P_dense`` is all selected parameters for the dense and sparse kinds, the dense group's
        parameters (in layout order) for ``"kronecker"``. Assembled from the same seeded blocks
        the features use; for small models and tests (memory ``P_dense × k``).
        """
        return None if self._dense_map is None else self._dense_map.matrix()

    # -- public ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able description of the map ``g ↦ R g`` (settings, parameters, group shapes)."""
        groups = [
            {
                "key": g.key,
                "params": list(g.params),
                "matrix": [g.rows, g.cols],
                "factors": [g.k_rows, g.k_cols],
            }
            for g in self._groups
        ]
        return {
            "projection": None if self.projection is None else self.projection.describe(),
            "width": self.width,
            "parameters": list(self.names),
            "shapes": [list(s) for s in self.layout.shapes],
            "kronecker_groups": groups,
            "dense": {
                "params": list(self._dense_names),
                "k": None if self._dense_map is None else self._dense_map.k,
            },
        }

    def report(self) -> str:
        """A readable table: every parameter group, its path, shape and feature columns."""
        proj = self.projection
        head = "no projection (exact gradients)" if proj is None else f"{proj}"
        lines = [
            f"ProjectedGradients: {head}",
            f"  {len(self.names)} parameters, P = {self.layout.numel:,}, width = {self.width:,}",
        ]
        for g in self._groups:
            path = f"kronecker:{g.type} (hooks)" if g.hooked else f"exact+kronecker:{g.type}"
            lines.append(
                f"  [{g.columns.start}:{g.columns.stop}] {', '.join(g.params)}: {path}, "
                f"[{g.rows} x {g.cols}] -> {g.k_rows} x {g.k_cols}"
                + ("" if g.hooked else f" — {g.reason}")
            )
        if self._dense_names:
            if proj is None or proj.kind == "kronecker":
                sl = self.columns.get(_DENSE_KEY, slice(0, self.width))
                what = "exact" if self._dense_map is None else f"gaussian -> {self._dense_map.k}"
                lines.append(f"  [{sl.start}:{sl.stop}] dense group ({what}):")
                for n in self._dense_names:
                    lines.append(f"    {n}: {self.coverage[n]} — {self._dense_reasons.get(n, '')}")
            else:
                lines.append(f"  all parameters: exact gradients (vmap) then {proj.kind}")
        elif proj is None:
            lines.append("  all parameters: exact gradients (vmap)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ProjectedGradients(projection={self.projection}, width={self.width}, "
            f"parameters={len(self.names)})"
        )

    def project(self, grads: Tensor) -> Tensor:
        """Apply ``R`` to flat exact gradients ``[n, P]`` (layout order): ``[n, width]``.

        The same map as :meth:`features`, for gradients computed elsewhere.
        """
        if not isinstance(grads, Tensor) or grads.ndim != 2 or grads.shape[1] != self.layout.numel:
            shape = tuple(grads.shape) if isinstance(grads, Tensor) else type(grads).__name__
            raise ConfigurationError(
                f"project expects [n, P={self.layout.numel}] gradients in the layout of "
                f"{len(self.names)} selected parameters, got {shape}"
            )
        if self.projection is None:
            return grads
        if self.projection.kind != "kronecker":
            assert self._dense_map is not None
            return self._dense_map.apply(grads)
        out = torch.empty(grads.shape[0], self.width, dtype=grads.dtype, device=grads.device)
        named = {n: grads[:, sl] for n, sl in self._slices.items()}
        for group in self._groups:
            out[:, group.columns] = self._project_group(group, named)
        self._fill_dense(out, named)
        return out

    def _require_state(self, state: Mapping[str, Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ConfigurationError(
                f"the state has no entry for the selected parameters {missing[:8]}; pass the "
                "model's full state dict (e.g. Checkpoint.state_for(model))"
            )

    def features(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind = "loss",
        *,
        offset: int = 0,
        where: str = "",
    ) -> Tensor:
        """Projected per-example gradients ``[batch, width]`` of ``kind`` at ``state``.

        Args:
            state: a full state dict of the model (parameters and buffers).
            batch: a batch the task can read (tuple, mapping, tensor).
            kind: ``"loss"`` — the training loss; ``"measurement"`` — the task's oriented
                measurement (lower is better), for the query side.
            offset: index of the batch's first example (for error messages).
            where: context for error messages (e.g. the checkpoint).

        Raises:
            NonFiniteGradientError: naming the examples (``offset`` + position) and parameters.
        """
        if kind not in ("loss", "measurement"):
            raise ConfigurationError(f"kind must be 'loss' or 'measurement', got {kind!r}")
        self._require_state(state)
        batch = to_plain(batch)
        if self.projection is None:
            return self._all.per_example(state, batch, kind, offset=offset, where=where)
        if self.projection.kind != "kronecker":
            g = self._all.per_example(state, batch, kind, offset=offset, where=where)
            assert self._dense_map is not None
            out = self._dense_map.apply(g)
        else:
            out = self._kronecker_features(state, batch, kind, offset, where)
        self._check_finite(out, offset, where)
        return out

    # -- the exact capture (capture=True) -------------------------------------------------------
    def capture(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind = "loss",
        *,
        offset: int = 0,
        where: str = "",
        generator: torch.Generator | None = None,
        form: frozenset[str] = frozenset(),
    ) -> Capture:
        """The raw per-layer factors of a batch's per-example gradients (``capture=True`` only).

        ``form``: group keys whose per-example gradients the caller will form anyway (it
        contracts them with dense directions): those of single, ungrouped convolutions come back
        in ``Capture.formed``, made by one convolution backward over batch × groups, without
        unfolding the input into patches (others are ignored).

        One hooked forward and one backward to the layer outputs; groups the hooks cannot serve
        and the dense group's parameters get exact ``vmap`` gradients. The hooked paths are
        verified (on the first batch and the first batch with more than one example) on at most
        three examples, so the check never forms more than three per-example gradients.

        ``kind="sampled"`` differentiates ``task.sample_loss`` (labels drawn from the model with
        ``generator``, the true Fisher's gradients). Every evaluation inside the capture draws
        from a copy of ``generator`` in the same state, so the hooked pass, its verification and
        the exact parameters see the same labels (the verification's sub-batches see those of
        their leading examples when the task draws row by row, as the built-in tasks do);
        ``generator`` is then advanced as by one draw for the batch. Parameters outside the hooked
        layers get their per-example gradients from batched autograd instead of ``vmap``.
        """
        if not self._capture:
            raise ConfigurationError("capture() needs ProjectedGradients(..., capture=True)")
        self._require_state(state)
        self._last_sampler = None
        if kind == "sampled":
            if not isinstance(generator, torch.Generator):
                raise ConfigurationError(
                    "capture(kind='sampled') draws labels from the model: pass generator= a "
                    f"torch.Generator, got {type(generator).__name__}"
                )
            self._sampler_state = (generator.get_state(), generator.device)
        else:
            self._sampler_state = None
        try:
            cap = self._capture_batch(state, batch, kind, offset, where, self._formable(form))
        finally:
            state_used, self._sampler_state = self._sampler_state, None
        if state_used is not None and self._last_sampler is not None:
            assert generator is not None
            generator.set_state(self._last_sampler.get_state())
        return cap

    def _sampler(self) -> torch.Generator | None:
        """A fresh copy of the capture's label generator (``kind="sampled"``), else None."""
        if self._sampler_state is None:
            return None
        gen_state, device = self._sampler_state
        gen = torch.Generator(device=device)
        gen.set_state(gen_state)
        self._last_sampler = gen
        return gen

    def _formable(self, keys: frozenset[str]) -> frozenset[str]:
        """The keys of ``keys`` the hooks form: a hooked group with one role, an ungrouped
        Conv1d/Conv2d with at least :data:`FORM_MIN_CHANNELS` input channels (with fewer, the
        batch-grouped convolution backward is slower than unfolding the input: 3.6 vs 1.6 ms
        for 1 → 16 channels of 28×28, 2.9 vs 6.3 ms for 16 → 32 of 14×14, B = 256)."""
        return frozenset(
            g.key
            for g in self._groups
            if g.key in keys
            and g.hooked
            and len(g.roles) == 1
            and g.type in CONVOLUTIONS
            and g.roles[0].out_rows
            and getattr(g.roles[0].module, "groups", 1) == 1
            and getattr(g.roles[0].module, "in_channels", 0) >= FORM_MIN_CHANNELS
        )

    def _capture_batch(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind,
        offset: int,
        where: str,
        form: frozenset[str] = frozenset(),
    ) -> Capture:
        batch = to_plain(batch)
        size = batch_size_of(batch)
        ref = state[self.names[0]]
        dtype, device = ref.dtype, ref.device
        if not self._checked_single or (size > 1 and not self._checked_multi):
            small = min(size, 3)
            sub = batch if small == size else index_batch(batch, slice(0, small), size)
            run = self._hooked_pass(state, sub, kind, small, dtype, device, True)
            self._verify(state, sub, kind, small, dtype, device, run)
        run = self._hooked_pass(
            state, batch, kind, size, dtype, device, False, capture=True, offset=offset, form=form
        )
        exact_names = [n for g in self._groups if not g.hooked for n in g.params]
        exact_names += [n for n in self._dense_names if n not in run.norm_grads]
        named: dict[str, Tensor] = dict(run.norm_grads)
        values = run.values
        if exact_names:
            computer = self._exact_computer(exact_names)
            flat = computer.per_example(
                state, batch, kind, offset=offset, where=where, generator=self._sampler()
            )
            for n, sl in computer.layout.slices().items():
                named[n] = flat[:, sl]
        if values is None:  # nothing hooked: the values of a plain forward
            values = self._all.values(state, batch, kind, generator=self._sampler()).detach()
        formed = {
            g.key: canonical_matrix(g, named, self._shapes) for g in self._groups if not g.hooked
        }
        formed.update(
            (k, v)
            for k, v in run.formed.items()
            if any(g.key == k and g.hooked for g in self._groups)
        )
        dense = None
        if self._dense_names:
            dense = torch.cat([named[n].reshape(size, -1) for n in self._dense_names], dim=1)
        terms = {
            k: v for k, v in run.terms.items() if any(g.key == k and g.hooked for g in self._groups)
        }
        return Capture(size, terms, formed, dense, values)

    # -- the Kronecker path --------------------------------------------------------------------
    def _kronecker_features(
        self, state: Mapping[str, Tensor], batch: Any, kind: Kind, offset: int, where: str
    ) -> Tensor:
        size = batch_size_of(batch)
        ref = state[self.names[0]]
        dtype, device = ref.dtype, ref.device
        verify = not self._checked_single or (size > 1 and not self._checked_multi)
        run = self._hooked_pass(state, batch, kind, size, dtype, device, verify)
        if verify:
            run = self._verify(state, batch, kind, size, dtype, device, run)
        out = torch.empty(size, self.width, dtype=dtype, device=device)
        exact_names = [n for g in self._groups if not g.hooked for n in g.params]
        exact_names += [n for n in self._dense_names if n not in run.norm_grads]
        named: dict[str, Tensor] = dict(run.norm_grads)
        if exact_names:
            computer = self._exact_computer(exact_names)
            flat = computer.per_example(state, batch, kind, offset=offset, where=where)
            for n, sl in computer.layout.slices().items():
                named[n] = flat[:, sl]
        for group in self._groups:
            if not group.hooked:
                out[:, group.columns] = self._project_group(group, named)
            elif group.key in run.feats:
                out[:, group.columns] = run.feats[group.key].reshape(size, -1)
            else:  # the layer did not run on this batch: zero gradient
                out[:, group.columns] = 0.0
        self._fill_dense(out, named)
        return out

    def _exact_computer(self, names: list[str]) -> GradientComputer:
        key = tuple(sorted(names, key=self.names.index))
        if key not in self._exact:
            self._exact[key] = GradientComputer(self.model, self.task, list(key))
        return self._exact[key]

    def _hooked_pass(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        track_abs: bool,
        capture: bool = False,
        offset: int = 0,
        form: frozenset[str] = frozenset(),
    ) -> HookedPass:
        run = HookedPass(self, size, dtype, device, track_abs, capture, form)
        modules = self._hooked_modules()
        if not modules:
            return run
        # the hooked layers' parameters are leaves that require grad (so their outputs have
        # gradient edges), but only the edges are differentiated: no weight gradient is formed
        hooked = {n for g in self._groups if g.hooked for n in g.params}
        hooked.update(n for norm in self._norms if self._norm_hooked(norm) for n in norm.params)
        params = {
            n: state[n].detach().requires_grad_(True) if n in hooked else state[n].detach()
            for n in self.names
        }
        fn = self._all.function_of_params(state, batch, kind, offset, generator=self._sampler())
        with torch.enable_grad():
            try:
                with run.installed():
                    values = fn(params)
            except (RuntimeError, TypeError, ValueError):  # Task.forward re-raises as TypeError
                if not (run.broadcast and self._expand):
                    raise
                # expanding a [1, ...] output over the batch broke the model: stop expanding
                self._stop_expanding(run, "the model failed when its output was expanded")
                return self._hooked_pass(
                    state, batch, kind, size, dtype, device, track_abs, capture, offset, form
                )
            if values.ndim != 1 or values.shape[0] != size:
                raise ConfigurationError(
                    f"the task returned shape {tuple(values.shape)}, expected one value per "
                    f"example ([{size}])"
                )
            run.backward(values)
        # a norm whose module was demoted during the pass has no complete gradient
        for n in self._norm_off:
            run.norm_grads.pop(n, None)
        return run

    def _verify(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        run: HookedPass,
    ) -> HookedPass:
        """Check the hooked groups against autograd (batch sum) and against example 0 alone."""
        if run.values is not None and not bool(torch.isfinite(run.values).all()):
            return run  # nothing to compare; the finiteness check names the examples
        self._checked_single = True
        self._checked_multi = self._checked_multi or size > 1
        hooked = [g for g in self._groups if g.hooked]
        norm_names = [n for norm in self._norms if self._norm_hooked(norm) for n in norm.params]
        if not hooked and not norm_names:
            return run
        tol = max(1e-3, 100 * torch.finfo(dtype).eps)
        names = [n for g in hooked for n in g.params] + norm_names
        leaves = {n: state[n].detach().clone().requires_grad_(True) for n in names}
        params = {n: leaves.get(n, state[n].detach()) for n in self.names}
        with torch.enable_grad():
            values = self._all.function_of_params(state, batch, kind, generator=self._sampler())(
                params
            )
            grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
        batch_grad = {
            n: (torch.zeros_like(leaves[n]) if g is None else g).reshape(1, -1)
            for n, g in zip(leaves, grads, strict=True)
        }
        hooked_values = run.values
        if hooked_values is not None and not torch.allclose(
            hooked_values,
            values.detach(),
            rtol=tol,
            atol=tol * float(values.detach().abs().max()) + 1e-30,
        ):
            if run.broadcast and self._expand:
                self._stop_expanding(run, "the losses changed when its output was expanded")
                return self._rerun(state, batch, kind, size, dtype, device)
            for g in hooked:
                self._demote(g, "hooks changed the model's output on this model")
            for norm in self._norms:
                self._demote_norm(norm, "hooks changed the model's output on this model")
            return self._rerun(state, batch, kind, size, dtype, device)
        changed = False
        for group in hooked:
            if not group.hooked:
                continue
            expected = self._project_group(group, batch_grad)[0].to(dtype)
            got = run.feats.get(group.key)
            got = torch.zeros_like(expected) if got is None else got.sum(0).reshape(-1)
            scale = run.abs.get(group.key)
            scale_v = 0.0 if scale is None else float(scale.sum(0).max())
            scale_v += float(expected.abs().max())
            if float((got - expected).abs().max()) > tol * scale_v + 1e-30:
                self._demote(
                    group,
                    "Σ_i G_i from the hooks differs from autograd's batch gradient (the weight is "
                    "also used outside the module's forward)",
                )
                changed = True
        for norm in self._norms:
            if not self._norm_hooked(norm):
                continue
            for n in norm.params:
                got = run.norm_grads.get(n)
                expected = batch_grad[n][0].to(dtype)
                got_sum = torch.zeros_like(expected) if got is None else got.sum(0)
                scale_v = float(expected.abs().max())
                if got is not None:
                    scale_v += float(run.norm_abs[n].sum(0).max())
                if float((got_sum - expected).abs().max()) > tol * scale_v + 1e-30:
                    self._demote_norm(
                        norm, "its hooked gradient differs from autograd's batch gradient"
                    )
                    changed = True
                    break
        if size > 1:
            one = index_batch(batch, slice(0, 1), size)
            alone = self._hooked_pass(state, one, kind, 1, dtype, device, True)
            for group in self._groups:
                if not group.hooked:
                    continue
                full = run.feats.get(group.key)
                single = alone.feats.get(group.key)
                if full is None and single is None:
                    continue
                full0 = torch.zeros_like(single[0]) if full is None else full[0]
                single0 = torch.zeros_like(full0) if single is None else single[0]
                scale_v = 0.0
                for src in (run.abs.get(group.key), alone.abs.get(group.key)):
                    if src is not None:
                        scale_v += float(src[0].max())
                if float((full0 - single0).abs().max()) > tol * scale_v + 1e-30:
                    self._demote(
                        group,
                        "example 0 alone gives a different gradient than inside the batch (the "
                        "layer mixes examples: not batch-first)",
                    )
                    changed = True
            for norm in self._norms:
                if not self._norm_hooked(norm):
                    continue
                for n in norm.params:
                    full = run.norm_grads.get(n)
                    single = alone.norm_grads.get(n)
                    if full is None or single is None:
                        continue
                    scale_v = float(run.norm_abs[n][0].max() + alone.norm_abs[n][0].max())
                    if float((full[0] - single[0]).abs().max()) > tol * scale_v + 1e-30:
                        self._demote_norm(norm, "example 0 alone gives a different gradient")
                        changed = True
                        break
        if changed:
            return self._rerun(state, batch, kind, size, dtype, device)
        return run

    def _stop_expanding(self, run: HookedPass, why: str) -> None:
        """Layers whose ``[1, ...]`` input was broadcast over the batch move to the exact path."""
        self._expand = False
        for group in self._groups:
            if group.key in run.broadcast:
                self._demote(group, why)
        for norm in self._norms:
            if any(n in run.broadcast for n in norm.params):
                self._demote_norm(norm, why)

    def _rerun(
        self,
        state: Mapping[str, Tensor],
        batch: Any,
        kind: Kind,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> HookedPass:
        return self._hooked_pass(state, batch, kind, size, dtype, device, False)

    def _project_group(self, group: _Group, named: Mapping[str, Tensor]) -> Tensor:
        """``vec(P_out G P_inᵀ)`` ``[n, k_out·k_in]`` from exact gradients of the group's params."""
        m = canonical_matrix(group, named, self._shapes)
        if group.k_rows == group.rows and group.k_cols == group.cols:
            return m.reshape(m.shape[0], -1)  # both sides at full size: the identity
        p_rows, p_cols = self._factors(group, m.dtype, m.device)
        if group.k_rows != group.rows:  # a side kept at full size is the identity: skip it
            m = p_rows @ m
        if group.k_cols != group.cols:
            m = m @ p_cols.T
        return m.reshape(m.shape[0], -1)

    def _fill_dense(self, out: Tensor, named: Mapping[str, Tensor]) -> None:
        if not self._dense_names:
            return
        n = out.shape[0]
        flat = torch.cat([named[name].reshape(n, -1) for name in self._dense_names], dim=1)
        cols = self.columns[_DENSE_KEY]
        out[:, cols] = flat if self._dense_map is None else self._dense_map.apply(flat)

    def _check_finite(self, out: Tensor, offset: int, where: str) -> None:
        if bool(torch.isfinite(out.sum())):
            return
        finite = torch.isfinite(out)
        if bool(finite.all()):
            return
        bad_rows = (~finite).any(dim=1).nonzero().flatten()
        if self.projection is not None and self.projection.kind == "kronecker":
            bad = []
            for group in self._groups:
                if not bool(finite[:, group.columns].all()):
                    bad.extend(group.params)
            dense = self.columns.get(_DENSE_KEY)
            if dense is not None and not bool(finite[:, dense].all()):
                bad.extend(self._dense_names)
        else:
            bad = list(self.names)
        examples = [int(i) + offset for i in bad_rows[:10]]
        raise NonFiniteGradientError(
            f"non-finite projected gradient{' at ' + where if where else ''} for examples "
            f"{examples}{' ...' if len(bad_rows) > 10 else ''} in parameters {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}. Check those inputs for NaN/inf, the checkpoint "
            "for NaN weights, and the loss for log(0) or overflow."
        )
