"""K-FAC and EK-FAC: Kronecker-factored Fisher blocks for Linear, Conv2d, Embedding, Conv1D.

References: Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature" (ICML 2015); Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for
convolution layers" (KFC, ICML 2016); George et al., "Fast Approximate Natural Gradient Descent
in a Kronecker-factored Eigenbasis" (EK-FAC, NeurIPS 2018); Grosse et al., "Studying Large
Language Model Generalization with Influence Functions" (2023).

**What is approximated.** The Fisher of the *mean* training loss over the ``N`` examples seen,

    F = (1/N) Σ_i g_i g_iᵀ,        g_i = ∇_θ l(z_i, θ)

(empirical Fisher with the real labels, ``sampled_labels=False``; true Fisher, ``E_{y~p_θ}``,
with labels drawn from the model, ``sampled_labels=True``, which for cross-entropy and squared
error equals the Gauss–Newton matrix in expectation). ``F`` is approximated block-diagonally,
one block per layer, and each layer's block in Kronecker form. Write the gradient of one layer
for one example as its canonical matrix (:mod:`traintrace.features.layers`) ``G_i = Σ_t r_t cᵀ_t``
of shape ``[d_out, d_in]``: for a layer that owns its orientation ``c_t = ã_t`` is the layer's
input at position ``t`` with a constant 1 appended when the bias is selected (the bias is the last
column), and ``r_t = b_t`` the gradient of ``l(z_i)`` with respect to the layer's output at
``t``. Then

    F_layer ≈ A ⊗ S,   A = (1/N) Σ_i Σ_t c_t cᵀ_t   [d_in, d_in],
                       S = (1/M) Σ_i Σ_t r_t rᵀ_t   [d_out, d_out],

where ``M = Σ_i T_i`` is the number of positions. The factors come from the *shared capture*
(:meth:`ProjectedGradients.capture <traintrace.features.ProjectedGradients.capture>`, one hooked
forward and one backward to the layer outputs per batch, the same machinery as the projections
and the exact engine): ``A`` from the captured cols sides, ``S`` from the rows sides. Positions
("tokens") are

* ``nn.Linear`` and Hugging Face ``Conv1D``: every leading index between the batch dimension and
  the features, so a ``[B, T, d]`` input is a sequence of ``T`` positions (weight sharing over
  tokens); ``Conv1D``'s ``[d_in, d_out]`` weight is transposed to the canonical ``[d_out, d_in]``;
* ``nn.Conv2d`` / ``nn.Conv1d`` (any stride, dilation, padding and padding mode): every output
  location of the convolution; activations are the unfolded input patches (``F.unfold``,
  channel-major ``C·kh·kw`` / ``C·k``), matching the weight reshaped to ``[out, C·kh·kw]`` /
  ``[out, C·k]``. A grouped convolution's Fisher block is not one Kronecker product: it gets an
  exact diagonal block;
* ``nn.Embedding`` (canonical matrix ``[d, V]``, the weight transposed): every token; the
  activation is the one-hot vector of the token, so ``A`` is *diagonal* (token counts / N) and
  is stored as a vector — no vocabulary-squared matrix is formed. Positions equal to
  ``padding_idx`` receive no gradient and are left out of ``A``, ``S`` and ``M``.

Summing ``A`` over positions and averaging ``S`` over them is KFC's convention (spatially
uncorrelated derivatives): ``(Σ_t E[c cᵀ]) ⊗ (E_t[r rᵀ])``. With one position per example both
are plain averages and ``A ⊗ S`` is exact for a single example. A module called several times
in one forward pass contributes all its calls' positions to the same example. **Tied weights**
(GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) form one block on the canonical
matrix of their first module (in ``named_modules`` order), to which every module's calls add
their positions in that orientation: for ``wte`` (Embedding, ``[d, V]``) the rows side is its
output gradient and the cols side its one-hot tokens; for ``lm_head`` (Linear, whose ``[V, d]``
matrix is the transpose) the rows side is its *input* (hidden states) and the cols side its
*output gradient* (logits). ``A`` ``[V, V]`` is then dense (memory ``V²``) and ``M`` counts the
positions of all calls. Such a block is exact for one example with one position per call, and
EK-FAC's refit makes its diagonal in the Kronecker eigenbasis exact. Inputs of shape ``[1, …]``
broadcast over the batch (position ids of Hugging Face models) are expanded by the capture, so
every example receives its own output gradient. Padded positions of a Linear/Conv input
(attention mask 0) count in ``M`` and in ``A`` although their output gradient is zero; that
rescales K-FAC's ``Λ`` per layer, while EK-FAC's refit is unaffected.

**Inverse.** With eigendecompositions ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``S = Q_S diag(λ_S) Q_Sᵀ``
and damping ``λ``, a layer's part ``V`` (as a ``[d_out, d_in]`` matrix) of a flat vector maps to

    (F_layer + λI)⁻¹ V = Q_S ((Q_Sᵀ V Q_A) ⊘ (Λ + λ)) Q_Aᵀ,

with ``Λ = λ_S λ_Aᵀ`` for K-FAC (eigenvalues clamped at 0) and, for EK-FAC, the refitted

    Λ_jk = (1/N) Σ_i ((Q_Sᵀ G_i Q_A)_jk)²

from the rotated sides of a second capture pass, ``Q_Sᵀ r_t`` and ``Q_Aᵀ c_t`` (for one position
per example the square of the outer product is the outer product of the squares; one-hot
columns are summed per token; otherwise the rotated per-example matrices are formed in chunks).
EK-FAC's ``Λ`` is the diagonal of the exact blockwise Fisher in the Kronecker eigenbasis: the best
diagonal there in Frobenius norm.

**Other parameters.** Parameters of selected modules that are not Linear/Conv2d/Embedding/Conv1D
(LayerNorm, BatchNorm affine, raw ``nn.Parameter``\\ s), grouped convolutions, Embeddings with
``max_norm``, layers with a dense factor larger than :data:`MAX_FACTOR_DIM` (16384; an untied
``lm_head`` over a real vocabulary, or GPT-2's tied ``wte``/``lm_head``, whose ``A`` would be
``[V, V]``), and layers that fail the capture's verification (their weight is also used outside
their forward, e.g. through ``F.linear``; the layer is not batch-first) get a *diagonal* block
``(1/N) Σ_i g_i²`` from the capture's exact per-example gradients (its ``flat`` and ``formed``
parts), or raise :class:`ConfigurationError` with ``unsupported="raise"``.
:attr:`KroneckerInverse.coverage` says which path each parameter took. The capture verifies the
hooks on the first batch (and the first with more than one example) against autograd, so no
silently wrong block is returned.

**True Fisher.** ``sampled_labels=True`` captures ``kind="sampled"``: the gradients of
``task.sample_loss`` with labels drawn from the model by a generator seeded with ``seed`` (the
same labels in EK-FAC's second pass). ``num_samples > 1`` captures each batch that many times.

**Cost.** Memory per Kronecker layer ``d_in² + d_out²`` for the factors and their eigenvectors
(times two) plus ``d_out·d_in`` eigenvalues, in ``dtype`` (float64 by default); an Embedding
stores ``V + d²``. K-FAC takes one hooked forward and backward (to the layer outputs; no weight
gradient is formed) per batch and label sample, plus ``B·T·(d_in² + d_out²)`` per layer for the
factors and one ``eigh`` per factor (``O(d_in³ + d_out³)``); EK-FAC a second pass with
``B·T·(d_in² + d_out²)`` for the rotations and ``B·d_out·d_in`` for the squares (``B·T·d_out·d_in``
when ``T > 1``). Diagonal blocks add the capture's exact gradients of those parameters. A
``solve`` of ``n`` vectors costs ``2n(d_out² d_in + d_out d_in²)`` per layer as four GEMMs (no
loop over vectors), so preconditioning many queries and self-influence are affordable.

**Model state.** The model is evaluated functionally at the given state
(``torch.func.functional_call``) in eval mode; forward hooks are added to the tracked modules
for the duration and removed afterwards. The user's model, its parameters and ``.grad`` are left
unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from traintrace.data import batch_size_of, to_plain
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.engine import (
    Directions,
    ExactGradients,
    _form,
    _slice_terms,
    rotate_side,
    rotate_terms,
)
from traintrace.features.hooks import Capture
from traintrace.features.layers import (
    CONVOLUTIONS,
    _Group,
    canonical_matrix,
    from_canonical,
    layer_type,
)
from traintrace.features.params import Layers, ParameterLayout
from traintrace.features.projections import ProjectedGradients
from traintrace.task import Task

__all__ = ["EKFAC", "KFAC", "KroneckerBlock", "KroneckerInverse"]

_CHUNK_ELEMENTS = 1 << 24  # cap on the per-example rotated-gradient buffer of the EK-FAC refit
_GRAM_CHUNK = 1 << 22  # cap on the per-example Gram buffer [chunk, d, d] of the factors
#: Largest side of a dense Kronecker factor (``d × d``, 2 GiB in float64 at 16384). A layer with a
#: larger one (an untied ``lm_head``'s ``S`` or a tied embedding's ``A`` over a real vocabulary)
#: gets a diagonal block instead, reported in ``coverage``.
MAX_FACTOR_DIM = 16384


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class KFAC:
    """K-FAC: ``(F + λI)⁻¹`` with ``F`` approximated per layer by ``A ⊗ S`` (one data pass).

    Args:
        damping: ``λ ≥ 0`` added to every eigenvalue (absolute, in the units of the Fisher of the
            mean loss), or a multiple of each layer's mean eigenvalue with
            ``damping_scale="mean_eigenvalue"`` (Grosse et al. 2023 use 0.1; for a diagonal
            block the mean over that parameter's entries). Can be overridden
            per call in :meth:`KroneckerInverse.solve`.
        damping_scale: ``"absolute"`` (default) or ``"mean_eigenvalue"`` (see ``damping``).
        sampled_labels: ``True`` — true Fisher, labels sampled from the model with
            ``task.sample_loss``; ``False`` — empirical Fisher with the real labels
            (``task.loss``).
        num_samples: label samples per example for the true Fisher (averaged); must be 1 for
            the empirical Fisher.
        seed: seed of the label sampler (the same labels are drawn in EK-FAC's second pass).
        unsupported: what to do with selected parameters outside Linear/Conv2d/Embedding/Conv1D
            layers: ``"diagonal"`` — a diagonal Fisher block from exact per-example gradients
            (reported in ``coverage``); ``"raise"`` — :class:`ConfigurationError`.
        dtype: floating dtype of the factors' running sums, eigendecompositions, eigenvectors
            and eigenvalues. Each batch's Gram products and eigenbasis rotations run in the
            captured gradients' own precision (float32 for a float32 model: twice the speed,
            as Kronfluence's defaults; exact for a float64 model) and are summed in ``dtype``.

    Call :meth:`prepare` to compute the factors and get a :class:`KroneckerInverse`.
    """

    damping: float = 1e-3
    damping_scale: Literal["absolute", "mean_eigenvalue"] = "absolute"
    sampled_labels: bool = True
    num_samples: int = 1
    seed: int = 0
    unsupported: Literal["diagonal", "raise"] = "diagonal"
    dtype: torch.dtype = torch.float64

    #: EK-FAC refits the eigenvalues in a second pass; K-FAC uses ``λ_S λ_Aᵀ``.
    refit_eigenvalues: ClassVar[bool] = False
    method_name: ClassVar[str] = "K-FAC"

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping)):
            raise ConfigurationError(f"{name}: damping must be a finite number, got {self.damping}")
        if self.damping < 0:
            raise ConfigurationError(f"{name}: damping must be ≥ 0, got {self.damping}")
        if self.damping_scale not in ("absolute", "mean_eigenvalue"):
            raise ConfigurationError(
                f"{name}: damping_scale must be 'absolute' or 'mean_eigenvalue', got "
                f"{self.damping_scale!r}"
            )
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ConfigurationError(
                f"{name}: num_samples must be a positive integer, got {self.num_samples!r}"
            )
        if not self.sampled_labels and self.num_samples != 1:
            raise ConfigurationError(
                f"{name}: num_samples={self.num_samples} only applies to the true Fisher "
                "(sampled_labels=True); the empirical Fisher uses the real labels once"
            )
        if self.unsupported not in ("diagonal", "raise"):
            raise ConfigurationError(
                f"{name}: unsupported must be 'diagonal' or 'raise', got {self.unsupported!r}"
            )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ConfigurationError(
                f"{name}: dtype must be a floating torch.dtype, got {self.dtype}"
            )

    def prepare(
        self,
        model: nn.Module,
        task: Task,
        state: Mapping[str, Tensor] | None,
        batches: Iterable[Any],
        layers: Layers = None,
        *,
        progress: bool = False,
    ) -> KroneckerInverse:
        """Compute the factors over ``batches`` and return the damped inverse.

        Args:
            model: the network (left unchanged).
            task: gives ``forward``, ``loss`` / ``sample_loss``.
            state: the parameters and buffers to evaluate at (e.g.
                ``Checkpoint.state_for(model)``); ``None`` for the model's current state.
            batches: a DataLoader (or list) of training batches; EK-FAC iterates it twice, so
                it must not be a one-shot iterator. Every example counts once (``N`` in total).
            layers: which parameters (see :func:`select_parameters`); the inverse acts on their
                flat layout.
            progress: show a tqdm progress bar per pass.
        """
        return _Fitter(self, model, task, state, batches, layers, progress).run()


@dataclass
class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbases with eigenvalues refitted from per-example gradients.

    ``Λ_jk = (1/N) Σ_i ((Q_Sᵀ G_i Q_A)_jk)²`` (a second pass over the data), the exact blockwise
    Fisher's diagonal in the Kronecker eigenbasis. Same arguments as :class:`KFAC`.
    """

    refit_eigenvalues: ClassVar[bool] = True
    method_name: ClassVar[str] = "EK-FAC"


# ----------------------------------------------------------------------------------------------
# result
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KroneckerBlock:
    """One layer's (or one tied weight's) Kronecker factors and eigen-decomposition.

    The parameters are viewed as one ``[d_out, d_in]`` matrix, the layer's canonical matrix
    (:mod:`traintrace.features.layers`): Linear/Conv2d weight reshaped to ``[out, in·kh·kw]``
    with the bias (if selected) as the last column; an Embedding's ``[V, d]`` weight and a
    Hugging Face ``Conv1D``'s ``[d_in, d_out]`` weight transposed (``transposed=True``); a weight
    tied between modules in its first module's orientation. In row-major vectorization of that
    matrix the block is ``S ⊗ A`` ≈ ``(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ``.

    Attributes:
        module: the (first) module's name (``""`` for the root).
        kind: ``"Linear"``, ``"Conv2d"``, ``"Embedding"``, ``"Conv1D"``, or the modules' types
            joined by ``+`` for a tied weight (``"Embedding+Linear"``).
        weight, bias: the selected parameter names the block covers (``None`` when absent).
        A: ``[d_in, d_in]``, or for an Embedding the diagonal ``[V]``.
        S: ``[d_out, d_out]``.
        Q_A: ``[d_in, d_in]`` eigenvectors of ``A`` (``None`` = identity, Embedding).
        Q_S: ``[d_out, d_out]`` eigenvectors of ``S``.
        eigenvalues: ``Λ``, ``[d_out, d_in]`` (K-FAC: ``λ_S λ_Aᵀ``; EK-FAC: refitted).
        transposed: the canonical matrix is the weight transposed (Embedding, Conv1D owners).
        key: the capture's group key (the weight's name, or the bias's when alone).
    """

    module: str
    kind: str
    weight: str | None
    bias: str | None
    A: Tensor
    S: Tensor
    Q_A: Tensor | None
    Q_S: Tensor
    eigenvalues: Tensor
    transposed: bool = False
    key: str = ""

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)


def _left(q: Tensor, m: Tensor) -> Tensor:
    """``q @ m_j`` for every ``m_j`` of ``m`` ``[n, o, i]`` as one GEMM."""
    n, o, i = m.shape
    return (q @ m.transpose(0, 1).reshape(o, n * i)).reshape(q.shape[0], n, i).transpose(0, 1)


def _right(m: Tensor, q: Tensor) -> Tensor:
    """``m_j @ q`` for every ``m_j`` of ``m`` ``[n, o, i]`` as one GEMM."""
    n, o, i = m.shape
    return (m.reshape(n * o, i) @ q).reshape(n, o, q.shape[1])


class KroneckerInverse:
    """``(F̂ + λI)⁻¹`` in traintrace's flat parameter layout, ``F̂`` block-diagonal.

    ``F̂`` approximates the Fisher of the *mean* loss, ``(1/N) Σ_i g_i g_iᵀ``; blocks are
    Kronecker (:attr:`blocks`) or diagonal (:attr:`diagonal`). Built by :meth:`KFAC.prepare` /
    :meth:`EKFAC.prepare`.

    Attributes:
        layout: the flat layout the vectors use (:class:`ParameterLayout`).
        blocks: the Kronecker blocks, in layout order.
        diagonal: ``{parameter name: (1/N) Σ_i g_i² of its shape}`` for the diagonal fallback.
        coverage: ``{parameter name: path}``, where path is ``"kronecker:<Linear|Conv2d|
            Embedding>"`` or ``"diagonal:<reason>"``; every selected parameter is listed.
        damping, damping_scale: the default damping.
        num_examples: ``N``.
        method: ``"K-FAC"`` or ``"EK-FAC"``.
    """

    def __init__(
        self,
        layout: ParameterLayout,
        blocks: list[KroneckerBlock],
        diagonal: dict[str, Tensor],
        coverage: dict[str, str],
        *,
        damping: float,
        damping_scale: str,
        num_examples: int,
        method: str,
    ) -> None:
        self.layout = layout
        self.blocks = tuple(blocks)
        self.diagonal = diagonal
        self.coverage = coverage
        self.damping = float(damping)
        self.damping_scale = damping_scale
        self.num_examples = num_examples
        self.method = method
        self._slices = layout.slices()
        self._shapes = dict(zip(layout.names, layout.shapes, strict=True))
        self._cast: dict[torch.dtype, list[tuple[Tensor, Tensor | None, Tensor]]] = {}

    def __repr__(self) -> str:
        kron = sum(len(b.params) for b in self.blocks)
        return (
            f"KroneckerInverse(method={self.method!r}, layers={len(self.blocks)}, "
            f"kronecker_params={kron}, diagonal_params={len(self.diagonal)}, "
            f"damping={self.damping}, N={self.num_examples})"
        )

    # -- the layer matrix <-> flat vector maps ---------------------------------------------
    def _to_matrix(self, block: KroneckerBlock, v: Tensor) -> Tensor:
        n = v.shape[0]
        parts = []
        if block.weight is not None:
            w = v[:, self._slices[block.weight]]
            if block.transposed:
                first, second = self._shapes[block.weight]
                parts.append(w.reshape(n, first, second).transpose(1, 2))
            else:
                parts.append(w.reshape(n, self._shapes[block.weight][0], -1))
        if block.bias is not None:
            parts.append(v[:, self._slices[block.bias]].reshape(n, -1, 1))
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def _from_matrix(self, block: KroneckerBlock, m: Tensor, out: Tensor) -> None:
        n = m.shape[0]
        if block.weight is not None:
            w = m[:, :, :-1] if block.bias is not None else m  # the bias is the last column
            w = w.transpose(1, 2) if block.transposed else w
            out[:, self._slices[block.weight]] = w.reshape(n, -1).to(out.dtype)
        if block.bias is not None:
            out[:, self._slices[block.bias]] = m[:, :, -1].to(out.dtype)

    def _block_damping(self, values: Tensor, damping: float) -> float:
        if self.damping_scale == "mean_eigenvalue":
            return damping * float(values.mean()) if values.numel() else 0.0
        return damping

    def _apply(self, v: Tensor, fn: Callable[[Tensor, str, Tensor], Tensor]) -> Tensor:
        if not isinstance(v, Tensor) or v.ndim not in (1, 2) or v.shape[-1] != self.layout.numel:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ConfigurationError(
                f"expected a flat vector [P] or a batch [n, P] with P={self.layout.numel} (the "
                f"selected parameters' layout), got {shape}"
            )
        if not v.is_floating_point():
            raise ConfigurationError(f"expected a floating-point vector, got {v.dtype}")
        single = v.ndim == 1
        v2 = v.unsqueeze(0) if single else v
        out = torch.zeros_like(v2)
        # work in the vector's precision (at least float32): a float32 gradient is rotated by
        # float32 copies of the eigenbases, a float64 one by the float64 originals
        dtype = torch.promote_types(v.dtype, torch.float32)
        # per layer, all n vectors at once: two GEMMs into the eigenbasis and two back
        for block, (q_s, q_a, lam) in zip(self.blocks, self._bases(dtype), strict=True):
            m = self._to_matrix(block, v2).to(dtype)
            r = _left(q_s.T, m)
            if q_a is not None:
                r = _right(r, q_a)
            r = fn(r, block.module or "<root>", lam)
            m = _left(q_s, r)
            if q_a is not None:
                m = _right(m, q_a.T)
            self._from_matrix(block, m, out)
        for name, diag in self.diagonal.items():
            sl = self._slices[name]
            r = fn(v2[:, sl].to(dtype), name, diag.reshape(-1).to(dtype))
            out[:, sl] = r.to(out.dtype)
        return out[0] if single else out

    def _bases(self, dtype: torch.dtype) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        if dtype not in self._cast:
            self._cast[dtype] = [
                (
                    b.Q_S.to(dtype),
                    None if b.Q_A is None else b.Q_A.to(dtype),
                    b.eigenvalues.to(dtype),
                )
                for b in self.blocks
            ]
        return self._cast[dtype]

    # -- public operations -----------------------------------------------------------------
    def solve(self, v: Tensor, damping: float | None = None) -> Tensor:
        """``(F̂ + λI)⁻¹ v`` for ``v`` of shape ``[P]`` or ``[n, P]`` (same shape and dtype back).

        ``damping`` overrides the default ``λ`` (same ``damping_scale``). The arithmetic runs
        in ``v``'s precision (at least float32) with the eigenbases cast once. Cost per vector:
        ``Σ_layers 2(d_out² d_in + d_out d_in²)`` multiply-adds plus ``O(P)`` for diagonal blocks.
        """
        lam = self.damping if damping is None else float(damping)
        if not (math.isfinite(lam) and lam >= 0):
            raise ConfigurationError(f"damping must be finite and ≥ 0, got {damping}")

        def inv(r: Tensor, where: str, values: Tensor) -> Tensor:
            denom = values + self._block_damping(values, lam)
            if not bool((denom > 0).all()):
                raise ConfigurationError(
                    f"{self.method} block {where!r} has zero curvature in some directions and "
                    f"damping={lam} ({self.damping_scale}); use damping > 0"
                )
            return r / denom

        return self._apply(v, inv)

    def matvec(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """``(F̂ + λI) v`` (``λ = 0`` by default: the approximate Fisher itself)."""

        def mul(r: Tensor, _where: str, values: Tensor) -> Tensor:
            return r * (values + self._block_damping(values, float(damping)))

        return self._apply(v, mul)

    def dense(self, damping: float = 0.0) -> Tensor:
        """The explicit ``[P, P]`` matrix ``F̂ + λI`` (small models only: ``P²`` memory)."""
        dtype = (
            self.blocks[0].Q_S.dtype if self.blocks else next(iter(self.diagonal.values())).dtype
        )
        device = self.blocks[0].Q_S.device if self.blocks else None
        eye = torch.eye(self.layout.numel, dtype=dtype, device=device)
        return self.matvec(eye, damping).T.contiguous()

    # -- on captured per-example gradients (no flat gradient formed) -------------------------
    def _check_engine(self, engine: ExactGradients) -> None:
        if tuple(engine.names) != tuple(self.layout.names):
            raise ConfigurationError(
                f"{self.method}: the capture covers parameters {list(engine.names)[:4]}..., the "
                f"inverse {list(self.layout.names)[:4]}...; build both with the same layers="
            )

    def _per_group(
        self, engine: ExactGradients, lam: float, dtype: torch.dtype
    ) -> Iterator[tuple[_Group, KroneckerBlock | None, Any]]:
        by_key = {
            b.key: (b, basis) for b, basis in zip(self.blocks, self._bases(dtype), strict=True)
        }
        for g in engine._groups:
            hit = by_key.get(g.key)
            if hit is not None and hit[0].params != g.params:
                hit = None
            if hit is None:
                if any(n not in self.diagonal for n in g.params):
                    raise ConfigurationError(
                        f"{self.method}: layer {g.key!r} is grouped differently in the capture "
                        "and in the inverse; build both from the same model and layers="
                    )
                yield g, None, None
                continue
            block, (q_s, q_a, values) = hit
            denom = values + self._block_damping(values, lam)
            if not bool((denom > 0).all()):
                raise ConfigurationError(
                    f"{self.method} block {block.module or '<root>'!r} has zero curvature in some "
                    f"directions and damping={lam} ({self.damping_scale}); use damping > 0"
                )
            yield g, block, (q_s, q_a, 1.0 / denom)

    def _diag_inverse(self, name: str, lam: float, dtype: torch.dtype) -> Tensor:
        diag = self.diagonal[name].reshape(-1).to(dtype)
        denom = diag + self._block_damping(diag, lam)
        if not bool((denom > 0).all()):
            raise ConfigurationError(
                f"{self.method} block {name!r} has zero curvature in some directions and "
                f"damping={lam} ({self.damping_scale}); use damping > 0"
            )
        return 1.0 / denom

    def quadratic(
        self,
        engine: ExactGradients,
        cap: Capture,
        damping: float | None = None,
        *,
        scale: float = 1.0,
    ) -> Tensor:
        """``g_iᵀ (F̂ + λI)⁻¹ g_i`` for every example of a capture, ``[B]`` (self-influence).

        In each Kronecker block ``Σ_jk ((Q_Sᵀ G_i Q_A)_jk)² / (Λ_jk + λ)``, from the rotated
        captured sides (``Q_Sᵀ r_t``, ``Q_Aᵀ c_t``): ``B·T·(d_out² + d_in²) + B·d_out·d_in``
        multiply-adds per layer for one position (``T = 1``), against
        ``2B·(d_out² d_in + d_out d_in²)`` for :meth:`solve` on the formed gradients. ``cap``
        comes from ``engine.capture`` (an :class:`~traintrace.features.ExactGradients` over the
        same parameters); diagonal blocks use its exact ``flat``/``formed`` parts. The result is
        multiplied by ``scale``.
        """
        self._check_engine(engine)
        lam = self.damping if damping is None else float(damping)
        dtype = torch.promote_types(cap.values.dtype, torch.float32)
        out = torch.zeros(cap.size, dtype=dtype, device=cap.values.device)
        for g, block, basis in self._per_group(engine, lam, dtype):
            if block is None:
                named = from_canonical(g, engine._group_matrix(cap, g), engine._shapes)
                for n, x in named.items():
                    w = self._diag_inverse(n, lam, dtype)
                    out += (x.to(dtype) ** 2 * w).sum(1)
                continue
            q_s, q_a, w = basis
            if g.key in cap.formed:
                m = (
                    _right(_left(q_s.T, cap.formed[g.key].to(dtype)), q_a)
                    if q_a is not None
                    else (_left(q_s.T, cap.formed[g.key].to(dtype)))
                )
                out += (m**2 * w).sum((1, 2))
                continue
            terms = cap.terms.get(g.key)
            if not terms:
                continue
            rot = rotate_terms(terms, q_s, q_a)
            if q_a is None and all(_is_tokens(c) for _, c in rot):
                keys, sums = _token_sums(rot, g.cols, dtype)
                val = (sums**2 * w[:, keys % g.cols].T).sum(1)
                out.index_add_(0, keys // g.cols, val)
                continue
            rot = _densify_tokens(rot, g.cols)
            if len(rot) == 1 and rot[0][0].shape[-1] == 1:
                r, c = rot[0][0][:, :, 0], rot[0][1][:, :, 0]
                out += ((r**2) @ w * c**2).sum(1)
                continue
            chunk = max(1, _CHUNK_ELEMENTS // (g.rows * g.cols))
            for start in range(0, cap.size, chunk):
                part = [(r[start : start + chunk], c[start : start + chunk]) for r, c in rot]
                m = _form(part, g.rows, g.cols)
                out[start : start + chunk] += (m**2 * w).sum((1, 2))
        if cap.flat is not None:
            for n, sl in engine._dense_slices.items():
                w = self._diag_inverse(n, lam, dtype)
                out += (cap.flat[:, sl].to(dtype) ** 2 * w).sum(1)
        return out * scale

    def directions(
        self,
        engine: ExactGradients,
        cap: Capture,
        damping: float | None = None,
        *,
        scale: float = 1.0,
        rotated: bool = True,
    ) -> Directions:
        """``(F̂ + λI)⁻¹ q_j`` for the captured queries, as dense engine directions.

        ``rotated=True`` (default) keeps the directions of each large Kronecker block (where
        rotating a direction back, ``d_out·d_in·(d_out + d_in)``, costs more than rotating ten
        training examples' sides, ``10·T·(d_out² + d_in²)``: dense layers, not convolutions with
        many positions and few channels) in its eigenbasis,
        ``M_j = (Q_Sᵀ G_j Q_A) ⊘ (Λ + λ)``, with ``Directions.bases`` telling the engine to rotate
        the training gradients instead (``B·T·(d_out² + d_in²)`` per batch rather than
        ``m·d_out·d_in·(d_out + d_in)`` per query block); ``rotated=False`` rotates back to the
        canonical basis:

        Each Kronecker block gives ``Q_S ((Q_Sᵀ G_j Q_A) ⊘ (Λ + λ)) Q_Aᵀ`` in the layer's
        canonical shape ``[m, d_out, d_in]``: the rotation into the eigenbasis uses the captured
        sides (``m·T·(d_out² + d_in²)`` plus ``m·T·d_out·d_in`` to form), the rotation back two
        GEMMs (``m·(d_out² d_in + d_out d_in²)``); no flat gradient is formed. Equals
        ``engine.directions_from_flat(scale * solve(engine.flatten(cap)))``.
        """
        self._check_engine(engine)
        lam = self.damping if damping is None else float(damping)
        dtype = torch.promote_types(cap.values.dtype, torch.float32)
        dense: dict[str, Tensor] = {}
        bases: dict[str, tuple[Tensor, Tensor | None]] = {}
        for g, block, basis in self._per_group(engine, lam, dtype):
            if block is None:
                named = from_canonical(g, engine._group_matrix(cap, g), engine._shapes)
                named = {
                    n: x.to(dtype) * (self._diag_inverse(n, lam, dtype) * scale)
                    for n, x in named.items()
                }
                dense[g.key] = canonical_matrix(g, named, engine._shapes)
                continue
            q_s, q_a, w = basis
            if g.key in cap.formed:
                m = _left(q_s.T, cap.formed[g.key].to(dtype))
                if q_a is not None:
                    m = _right(m, q_a)
            elif cap.terms.get(g.key):
                rot = rotate_terms(cap.terms[g.key], q_s, q_a)  # tokens stay tokens (Q_A = I)
                m = _form(rot, g.rows, g.cols)
            else:
                continue  # the layer did not run: a zero direction
            positions = sum(r.shape[-1] for r, _ in cap.terms.get(g.key, [])) or 1
            back = g.rows * g.cols * (g.rows + g.cols)  # rotating one direction back
            ahead = 10 * positions * (g.rows**2 + g.cols**2)  # rotating ~10 examples per query
            m.mul_(w * scale)  # one pass over the m directions (w is one [rows, cols] matrix)
            if rotated and back > ahead:  # large dense layers: the training sides rotate
                dense[g.key] = m
                ref_dtype = cap.values.dtype
                bases[g.key] = (q_s.to(ref_dtype), None if q_a is None else q_a.to(ref_dtype))
                continue
            m = _left(q_s, m)
            dense[g.key] = _right(m, q_a.T) if q_a is not None else m
        flat = None
        if cap.flat is not None:
            parts = [
                cap.flat[:, sl].to(dtype) * (self._diag_inverse(n, lam, dtype) * scale)
                for n, sl in engine._dense_slices.items()
            ]
            flat = torch.cat(parts, dim=1)
        ref = cap.values.dtype
        return Directions(
            cap.size,
            dense={k: v.to(ref) for k, v in dense.items()},
            flat=None if flat is None else flat.to(ref),
            bases=bases,
        )


# ----------------------------------------------------------------------------------------------
# computing the factors from the shared capture
# ----------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    """Running statistics of one Kronecker group (a layer, or a weight tied between layers)."""

    group: _Group
    a_diag: bool  # every cols side is one-hot tokens: A is diagonal, kept as a vector
    A_sum: Tensor
    S_sum: Tensor
    positions: float = 0.0
    lam_sum: Tensor | None = None
    kfac_lambda: Tensor | None = None
    Q_A: Tensor | None = None
    Q_S: Tensor | None = None
    _cast: tuple[Tensor, Tensor | None] | None = None

    @property
    def name(self) -> str:
        return self.group.roles[0].module_name

    def bases(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """``(Q_S, Q_A)`` in ``dtype`` (cast once per dtype)."""
        assert self.Q_S is not None
        if self._cast is None or self._cast[0].dtype != dtype:
            q_a = None if self.Q_A is None else self.Q_A.to(dtype)
            self._cast = (self.Q_S.to(dtype), q_a)
        return self._cast


def _form_first(rows: int, cols: int, positions: float) -> bool:
    """Whether forming an example's ``[rows, cols]`` gradient and rotating it
    (``T·rows·cols + rows·cols·(rows + cols)`` multiply-adds) costs no more than rotating its
    ``T`` positions' sides first (``T·(rows² + cols² + rows·cols)``)."""
    form = positions * rows * cols + rows * cols * (rows + cols)
    return form <= positions * (rows * rows + cols * cols + rows * cols)


def _display(name: str) -> str:
    return name or "<root>"


def _bad_examples(x: Tensor, offset: int) -> list[int]:
    rows = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).nonzero().flatten()
    return [int(r) + offset for r in rows[:10]]


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _is_tokens(side: Tensor) -> bool:
    return side.ndim == 2


def _token_sums(
    rot: list[tuple[Tensor, Tensor]], cols: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """One-hot columns: ``(keys, sums)`` with ``sums[k] = Σ r'_t`` over the positions of
    example ``keys[k] // cols`` holding token ``keys[k] % cols`` (the nonzero columns of
    ``Q_Sᵀ G_i``)."""
    b = rot[0][0].shape[0]
    keys, vals = [], []
    for r, c in rot:
        valid = c >= 0
        example = torch.arange(b, device=c.device).unsqueeze(1).expand_as(c)
        keys.append(example[valid] * cols + c[valid])
        vals.append(r.transpose(1, 2)[valid])
    uniq, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    rows = rot[0][0].shape[1]
    sums = torch.zeros(uniq.shape[0], rows, dtype=dtype, device=uniq.device)
    sums.index_add_(0, inverse, torch.cat(vals).to(dtype))
    return uniq, sums


def _densify_tokens(rot: list[tuple[Tensor, Tensor]], cols: int) -> list[tuple[Tensor, Tensor]]:
    out = []
    for r, c in rot:
        if _is_tokens(c):
            c = rotate_side(c, torch.eye(cols, dtype=r.dtype, device=r.device))
        out.append((r, c))
    return out


class _Fitter:
    """One (K-FAC) or two (EK-FAC) passes of :meth:`ProjectedGradients.capture` over the data."""

    def __init__(
        self,
        config: KFAC,
        model: nn.Module,
        task: Task,
        state: Mapping[str, Tensor] | None,
        batches: Iterable[Any],
        layers: Layers,
        progress: bool,
    ) -> None:
        self.cfg = config
        self.model = model
        self.task = task
        self.batches = batches
        self.progress = progress
        self.method = config.method_name
        self.dtype = config.dtype
        self.pg = ProjectedGradients(model, task, layers, capture=True)
        self.names = list(self.pg.names)
        self.layout = self.pg.layout
        self._shapes = dict(zip(self.layout.names, self.layout.shapes, strict=True))
        if state is None:
            state = model.state_dict()
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ConfigurationError(
                f"{self.method}: the state has no entry for the selected parameters {missing[:8]}"
            )
        self.state = state
        self.device = state[self.names[0]].device
        if config.refit_eigenvalues and isinstance(batches, Iterator):
            raise ConfigurationError(
                f"{self.method} reads the batches twice; pass a DataLoader or a list, not a "
                "one-shot iterator or generator"
            )
        self._modules = dict(model.named_modules())
        self.dense_reasons = {n: self._dense_reason(n) for n in self.pg._dense_names}
        self._by_key = {g.key: g for g in self.pg._groups}
        #: hooked groups that get an exact diagonal block instead of Kronecker factors: the reason
        self.not_factored: dict[str, str] = {}
        for g in self.pg._groups:
            groups = max(getattr(r.module, "groups", 1) for r in g.roles)
            if groups > 1 and g.weight is not None:
                self.not_factored[g.key] = (
                    f"a convolution with groups={groups} (its Fisher block is not one Kronecker "
                    "product; an exact diagonal block instead)"
                )
                continue
            a_diag = all(r.type == "Embedding" and r.out_rows for r in g.roles)
            side = max(g.rows, 0 if a_diag else g.cols)
            if side > MAX_FACTOR_DIM:
                self.not_factored[g.key] = (
                    f"a dense Kronecker factor would be [{side} x {side}] "
                    f"(> MAX_FACTOR_DIM = {MAX_FACTOR_DIM})"
                )
        listed = [f"{n} ({r})" for n, r in self.dense_reasons.items()]
        listed += [
            f"{n} ({r})" for k, r in self.not_factored.items() for n in self._by_key[k].params
        ]
        if listed and config.unsupported == "raise":
            self._refuse(listed)

    # -- which parameter takes which path --------------------------------------------------
    def _dense_reason(self, name: str) -> str:
        why = self.pg._dense_reasons.get(name, "")
        if why.startswith("per-example gradient from hooks"):
            module = self._modules.get(name.rpartition(".")[0])
            if module is not None:
                return layer_type(module)[1]
        return why or "not a Linear/Conv2d/Embedding/Conv1D parameter"

    def _refuse(self, listed: list[str]) -> None:
        raise ConfigurationError(
            f"{self.method} cannot Kronecker-factor {len(listed)} selected parameter(s): "
            f"{'; '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}. Restrict layers= to "
            "Linear, Conv2d, Embedding and Conv1D modules, or use unsupported='diagonal' for a "
            "diagonal Fisher block on them."
        )

    def _hooked(self) -> list[_Group]:
        return [g for g in self.pg._groups if g.hooked]

    def _new_stats(self, group: _Group) -> _Stats:
        # a side is one-hot tokens for an Embedding's input: cols when it owns the orientation
        a_diag = all(r.type == "Embedding" and r.out_rows for r in group.roles)
        dt, dev = self.dtype, self.device
        a_sum = (
            torch.zeros(group.cols, dtype=dt, device=dev)
            if a_diag
            else torch.zeros(group.cols, group.cols, dtype=dt, device=dev)
        )
        s_sum = torch.zeros(group.rows, group.rows, dtype=dt, device=dev)
        return _Stats(group, a_diag, a_sum, s_sum)

    # -- the passes ------------------------------------------------------------------------
    def run(self) -> KroneckerInverse:
        self._form: frozenset[str] = frozenset()
        for attempt in range(2):
            self.stats: dict[str, _Stats] = {}
            self.diag_sum: dict[str, Tensor] = {}
            self.num_examples = 0
            if self._pass(refit=False):
                break
            if attempt == 1 or isinstance(self.batches, Iterator):
                raise ConfigurationError(
                    f"{self.method}: a layer failed the hooks' check on a later batch (the first "
                    "with more than one example); pass a DataLoader or a list (read again from "
                    "the start), or put several examples in the first batch"
                )
        if self.num_examples == 0:
            raise ConfigurationError(f"{self.method}: the batches held no examples")
        self._eigen()
        if self.cfg.refit_eigenvalues:
            self._form = self._forming()
        if self.cfg.refit_eigenvalues and not self._pass(refit=True):
            raise ConfigurationError(
                f"{self.method}: the layers the hooks serve changed between the two passes; "
                "the batches must be the same on every iteration"
            )
        return self._result()

    def _forming(self) -> frozenset[str]:
        """The convolution groups whose refit forms each example's gradient first (the cheaper
        order, see :meth:`_accumulate_lambda`): the capture hands them over formed, without
        unfolding their inputs into patches."""
        keys = set()
        for key, st in self.stats.items():
            g = st.group
            if g.type not in CONVOLUTIONS or not self.num_examples:
                continue
            if _form_first(g.rows, g.cols, st.positions / self.num_examples):
                keys.add(key)
        return frozenset(keys)

    def _pass(self, refit: bool) -> bool:
        """One pass; False when the set of hooked layers changed after the first batch."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.seed)
        kind = "sampled" if self.cfg.sampled_labels else "loss"
        desc = f"{self.method} {'eigenvalues' if refit else 'factors'}"
        offset = 0
        hooked: frozenset[str] | None = None
        for raw in tqdm(self.batches, desc=desc, disable=not self.progress):
            batch = to_plain(raw, self.device)
            size = batch_size_of(batch)
            where = f"examples {offset}..{offset + size - 1}"
            for k in range(self.cfg.num_samples):
                cap = self.pg.capture(
                    self.state,
                    batch,
                    kind,  # type: ignore[arg-type]
                    offset=offset,
                    where=where,
                    generator=gen if kind == "sampled" else None,
                    form=self._form if refit else frozenset(),
                )
                now = frozenset(g.key for g in self._hooked())
                if hooked is None:
                    hooked = now
                    if not refit:
                        self._start(now)
                elif now != hooked:
                    return False
                # the refit pass reads the same data: only its loss here, its Λ at the end
                if not refit or not _finite(cap.values):
                    self._check_finite(cap, offset, where)
                if refit:
                    for key, terms in cap.terms.items():
                        if key in self.stats:
                            self._accumulate_lambda(self.stats[key], terms)
                    for key, formed in cap.formed.items():
                        if key in self.stats:  # formed by the hooks (self._form)
                            self._lambda_of_formed(self.stats[key], formed)
                else:
                    for key, terms in cap.terms.items():
                        if key in self.stats:
                            self._accumulate_factors(self.stats[key], terms, first=k == 0)
                    self._accumulate_diag(cap)
            offset += size
        if not refit:
            self.num_examples = offset
        elif offset != self.num_examples:
            raise ConfigurationError(
                f"{self.method}: the second pass saw {offset} examples, the first "
                f"{self.num_examples}; the batches must be the same on every iteration"
            )
        return True

    def _start(self, hooked: frozenset[str]) -> None:
        """After the first capture (which verified the hooks): the Kronecker groups are known."""
        demoted = [g for g in self.pg._groups if g.key not in hooked]
        if demoted and self.cfg.unsupported == "raise":
            self._refuse([f"{n} ({g.reason})" for g in demoted for n in g.params])
        self.stats = {
            g.key: self._new_stats(g)
            for g in self.pg._groups
            if g.key in hooked and g.key not in self.not_factored
        }

    # -- checks ----------------------------------------------------------------------------
    def _check_finite(self, cap: Capture, offset: int, where: str) -> None:
        for key, terms in cap.terms.items():
            group = self._by_key[key]
            for what, idx in (("input activations", 1), ("output gradients", 0)):
                for term in terms:
                    # canonical cols side = the layer's inputs when it owns the orientation
                    side = term[idx]
                    if _is_tokens(side) or _finite(side):
                        continue
                    raise NonFiniteGradientError(
                        f"{self.method}: non-finite {what} of layer "
                        f"'{_display(group.roles[0].module_name)}' ({group.type}) for examples {_bad_examples(side, offset)} "
                        f"({where}). Check those inputs for NaN/inf, the checkpoint for NaN "
                        "weights, and the loss for log(0) or overflow."
                    )
        parts = dict(cap.formed)
        if cap.flat is not None:
            parts["the parameters outside Kronecker layers"] = cap.flat
        for what, g in parts.items():
            if not _finite(g):
                raise NonFiniteGradientError(
                    f"{self.method}: non-finite per-example gradient of {what} (diagonal block) "
                    f"for examples {_bad_examples(g, offset)} ({where}). Check those inputs for "
                    "NaN/inf and the checkpoint for NaN weights."
                )
        if not _finite(cap.values):
            raise NonFiniteGradientError(
                f"{self.method}: non-finite loss for examples {_bad_examples(cap.values, offset)} "
                f"({where}); check those inputs and labels for NaN/inf and the checkpoint for "
                "NaN weights"
            )

    # -- accumulation ----------------------------------------------------------------------
    def _accumulate_factors(
        self, st: _Stats, terms: list[tuple[Tensor, Tensor]], first: bool
    ) -> None:
        """A += Σ c cᵀ, S += Σ r rᵀ (every label sample), M += positions (first sample only).

        Both sums are averaged over the ``num_samples`` label samples: the activation side of a
        layer is the same for every sample, but a tied weight's cols side may be an output
        gradient (GPT-2's ``lm_head`` logits), which is not.
        """
        for r, c in terms:
            valid = None
            if _is_tokens(c):
                valid = c >= 0
            elif _is_tokens(r):
                valid = r >= 0
            self._add_gram(st.A_sum, c, valid, diagonal=st.a_diag)
            if first:
                st.positions += (
                    float(valid.sum()) if valid is not None else r.shape[0] * r.shape[-1]
                )
            self._add_gram(st.S_sum, r, valid, diagonal=False)

    def _add_gram(self, acc: Tensor, side: Tensor, valid: Tensor | None, diagonal: bool) -> None:
        """``acc += Σ_{i,t} x_t x_tᵀ`` over valid positions (tokens: counts on the diagonal)."""
        if _is_tokens(side):
            counts = torch.bincount(side[side >= 0], minlength=acc.shape[0]).to(acc.dtype)
            if diagonal:
                acc += counts
            else:
                acc.diagonal().add_(counts)
            return
        # the batch's Gram in the capture's precision (a float64 model stays exact), summed
        # across batches in ``dtype``: float32 GEMMs are twice as fast as float64 ones, and one
        # batch's sum of B·T terms loses nothing a float64 running sum would keep
        work = torch.promote_types(side.dtype, torch.float32)
        if valid is not None:
            x = side.transpose(1, 2)[valid].to(work)  # [valid positions, d]
            acc += (x.T @ x).to(acc.dtype)
        elif side.shape[-1] == 1:
            x = side[:, :, 0].to(work)  # [B, d] (a view of the capture's storage)
            acc += (x.T @ x).to(acc.dtype)
        else:
            # Σ_b X_b X_bᵀ by batched products of a few examples at a time: no transposed copy
            # of [B·T, d] (a convolution's patches are channel-major), which costs as much as
            # the product itself, and a bmm spreads over the threads where single GEMMs of one
            # example's [d, T] do not
            x = side.to(work)
            d = x.shape[1]
            step = max(1, _GRAM_CHUNK // (d * d))
            gram = x.new_zeros(acc.shape)
            for start in range(0, x.shape[0], step):
                part = x[start : start + step]
                gram += torch.bmm(part, part.transpose(1, 2)).sum(0)
            acc += gram.to(acc.dtype)

    def _accumulate_diag(self, cap: Capture) -> None:
        """``Σ_i g_i²`` of every parameter on the diagonal path, from the capture."""
        summed: dict[str, Tensor] = {}  # squared sums over the batch
        for group in self.pg._groups:
            if group.key in cap.formed:
                for n, g in from_canonical(group, cap.formed[group.key], self._shapes).items():
                    summed[n] = g.to(self.dtype).square().sum(0)
        if cap.flat is not None:
            start = 0
            for n in self.pg._dense_names:
                size = int(self._shapes[n].numel())
                summed[n] = cap.flat[:, start : start + size].to(self.dtype).square().sum(0)
                start += size
        for key, terms in cap.terms.items():
            if key in self.stats:
                continue
            group = self._by_key[key]  # too large for Kronecker factors: Σ_i G_i² by chunks
            total = torch.zeros(1, group.rows, group.cols, dtype=self.dtype, device=self.device)
            chunk = max(1, _CHUNK_ELEMENTS // (group.rows * group.cols))
            for begin in range(0, cap.size, chunk):
                part = [(r[begin : begin + chunk], c[begin : begin + chunk]) for r, c in terms]
                total[0] += (_form(part, group.rows, group.cols).to(self.dtype) ** 2).sum(0)
            for n, sq in from_canonical(group, total, self._shapes).items():
                summed[n] = sq[0]
        for n, sq in summed.items():
            sq = sq.reshape(self._shapes[n])
            prev = self.diag_sum.get(n)
            self.diag_sum[n] = sq if prev is None else prev + sq

    def _accumulate_lambda(self, st: _Stats, terms: list[tuple[Tensor, Tensor]]) -> None:
        """EK-FAC: Λ_sum += Σ_i (Q_Sᵀ G_i Q_A)², G_i = Σ_terms Σ_t r_t c_tᵀ.

        Two orders give the same rotated gradients; the cheaper one by multiply-adds per example
        is taken: rotate the captured sides first (``T·(rows² + cols²)``, then one outer
        product per position, or the square trick ``(r')²(c')²ᵀ`` at one position), or form
        ``G_i`` first and rotate it (``T·rows·cols + rows·cols·(rows + cols)``, far cheaper for a
        convolution's many positions). The rotation runs in the capture's precision (float32 for
        a float32 model, exact for a float64 one); the squares are summed in ``dtype``.
        """
        assert st.Q_S is not None and st.lam_sum is not None
        rows, cols = st.group.rows, st.group.cols
        dense_sides = [x for term in terms for x in term if not _is_tokens(x)]
        work = (
            torch.promote_types(dense_sides[0].dtype, torch.float32) if dense_sides else self.dtype
        )
        q_s, q_a = st.bases(work)
        if q_a is None and all(_is_tokens(c) for _, c in terms):
            # one-hot columns: entry (j, v) of example i sums r'_t over its positions with token v
            uniq, sums = _token_sums(rotate_terms(terms, q_s, None), cols, work)
            st.lam_sum.index_add_(1, uniq % cols, (sums**2).T.to(st.lam_sum.dtype))
            return
        positions = sum(r.shape[-1] for r, _ in terms)
        if len(terms) == 1 and terms[0][0].shape[-1] == 1 and not _is_tokens(terms[0][1]):
            r, c = rotate_terms(terms, q_s, q_a)[0]  # one position: (r')² (c')²ᵀ
            st.lam_sum += ((r[:, :, 0] ** 2).T @ c[:, :, 0] ** 2).to(st.lam_sum.dtype)
            return
        b = terms[0][0].shape[0]
        chunk = max(1, _CHUNK_ELEMENTS // (rows * cols))
        if not _form_first(rows, cols, positions):
            rot = _densify_tokens(rotate_terms(terms, q_s, q_a), cols)
            for start in range(0, b, chunk):
                m = _form(_slice_terms(rot, start, start + chunk, work), rows, cols)
                st.lam_sum += (m**2).sum(dim=0).to(st.lam_sum.dtype)
            return
        for start in range(0, b, chunk):
            self._lambda_of_formed(
                st, _form(_slice_terms(terms, start, start + chunk, work), rows, cols)
            )

    def _lambda_of_formed(self, st: _Stats, formed: Tensor) -> None:
        """Λ_sum += Σ_i (Q_Sᵀ G_i Q_A)² for formed per-example gradients ``[B, rows, cols]``."""
        assert st.lam_sum is not None
        work = torch.promote_types(formed.dtype, torch.float32)
        q_s, q_a = st.bases(work)
        chunk = max(1, _CHUNK_ELEMENTS // (st.group.rows * st.group.cols))
        for start in range(0, formed.shape[0], chunk):
            m = _left(q_s.T, formed[start : start + chunk].to(work))
            if q_a is not None:
                m = _right(m, q_a)
            st.lam_sum += (m**2).sum(dim=0).to(st.lam_sum.dtype)

    # -- eigendecomposition and result -----------------------------------------------------
    def _factors(self, st: _Stats) -> tuple[Tensor, Tensor]:
        k = self.cfg.num_samples
        a = st.A_sum / (self.num_examples * k)
        s = st.S_sum / (st.positions * k) if st.positions else st.S_sum.clone()
        return a, s

    def _eigen(self) -> None:
        for st in self.stats.values():
            a, s = self._factors(st)
            for what, m in (("A (activations)", a), ("S (output gradients)", s)):
                if not bool(torch.isfinite(m).all()):
                    raise NonFiniteGradientError(
                        f"{self.method}: factor {what} of layer '{_display(st.name)}' is not "
                        "finite (overflow); train or evaluate in a wider dtype"
                    )
            lam_s, q_s = torch.linalg.eigh((s + s.T) / 2)
            st.Q_S = q_s.contiguous()
            if st.a_diag:
                lam_a, st.Q_A = a, None
            else:
                lam_a, q_a = torch.linalg.eigh((a + a.T) / 2)
                st.Q_A = q_a.contiguous()
            st.kfac_lambda = torch.outer(lam_s.clamp_min(0), lam_a.clamp_min(0))
            if self.cfg.refit_eigenvalues:
                st.lam_sum = torch.zeros(
                    st.group.rows, st.group.cols, dtype=self.dtype, device=a.device
                )

    def _result(self) -> KroneckerInverse:
        blocks = []
        order = {n: i for i, n in enumerate(self.names)}
        denom = self.num_examples * self.cfg.num_samples
        for st in sorted(self.stats.values(), key=lambda s: order[s.group.params[0]]):
            a, s = self._factors(st)
            if self.cfg.refit_eigenvalues:
                assert st.lam_sum is not None
                lam = st.lam_sum / denom
                if not _finite(lam):
                    raise NonFiniteGradientError(
                        f"{self.method}: the refitted eigenvalues of layer '{_display(st.name)}' "
                        "are not finite (overflow, or the data changed between the two passes); "
                        "train or evaluate in a wider dtype and pass the same batches twice"
                    )
            else:
                lam = st.kfac_lambda
            assert st.Q_S is not None and lam is not None
            g = st.group
            blocks.append(
                KroneckerBlock(
                    st.name,
                    g.type,
                    g.weight,
                    g.bias,
                    a,
                    s,
                    st.Q_A,
                    st.Q_S,
                    lam,
                    g.transposed,
                    g.key,
                )
            )
        coverage: dict[str, str] = {}
        diagonal: dict[str, Tensor] = {}
        for group in self.pg._groups:
            for n in group.params:
                if group.key in self.stats:
                    coverage[n] = f"kronecker:{group.type}"
                elif group.key in self.not_factored and group.hooked:
                    coverage[n] = f"diagonal:{self.not_factored[group.key]}"
                else:
                    coverage[n] = f"diagonal:{group.reason}"
        for n, why in self.dense_reasons.items():
            coverage[n] = f"diagonal:{why}"
        for n in self.names:
            if coverage[n].startswith("diagonal:"):
                total = self.diag_sum.get(n)
                if total is None:
                    total = torch.zeros(self._shapes[n], dtype=self.dtype, device=self.device)
                diagonal[n] = total / denom
        return KroneckerInverse(
            self.layout,
            blocks,
            diagonal,
            {n: coverage[n] for n in self.names},
            damping=self.cfg.damping,
            damping_scale=self.cfg.damping_scale,
            num_examples=self.num_examples,
            method=self.method,
        )
