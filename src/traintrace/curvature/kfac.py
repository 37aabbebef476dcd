"""K-FAC and EK-FAC: Kronecker-factored Fisher blocks for Linear, Conv2d and Embedding layers.

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
for one example as a matrix ``G_i = Σ_t b_t ãᵀ_t`` of shape ``[d_out, d_in]``: ``ã_t`` is the
layer's input activation at position ``t`` with a constant 1 appended when the bias is selected
(the bias is the last column), and ``b_t`` the gradient of ``l(z_i)`` with respect to the
layer's pre-activation output at ``t``. Then

    F_layer ≈ A ⊗ S,   A = (1/N) Σ_i Σ_t ã_t ãᵀ_t   [d_in, d_in],
                       S = (1/M) Σ_i Σ_t b_t bᵀ_t   [d_out, d_out],

where ``M = Σ_i T_i`` is the number of positions. Positions ("tokens") are

* ``nn.Linear``: every leading index between the batch dimension and the features, so a
  ``[B, T, d]`` input is a sequence of ``T`` positions (weight sharing over tokens);
* ``nn.Conv2d``: every output location of the convolution; activations are the unfolded input
  patches (``F.unfold``, channel-major ``C·kh·kw``), matching the weight reshaped to
  ``[out, C·kh·kw]``;
* ``nn.Embedding``: every token; the activation is the one-hot vector of the token, so ``A`` is
  *diagonal* (token counts / N) and is stored as a vector — no vocabulary-squared matrix is
  formed. Positions equal to ``padding_idx`` receive no gradient and are left out.

Summing ``A`` over positions and averaging ``S`` over them is KFC's convention (spatially
uncorrelated derivatives): ``(Σ_t E[ã ãᵀ]) ⊗ (E_t[b bᵀ])``. With one position per example both
are plain averages and ``A ⊗ S`` is exact for a single example. A module called several times
in one forward pass contributes all its calls' positions to the same example. Padded positions
of a Linear/Conv2d input (attention mask 0) count in ``M`` and in ``A`` although their output
gradient is zero; that rescales K-FAC's ``Λ`` per layer, while EK-FAC's refit is unaffected.
Every layer is assumed batch-first (the leading dimension of its input is the example); a
sequence-first layer is refused when its leading size differs from the batch size, and would
only be detected there (K-FAC's factors do not depend on how positions group into examples,
EK-FAC's refit does).

**Inverse.** With eigendecompositions ``A = Q_A diag(λ_A) Q_Aᵀ`` and ``S = Q_S diag(λ_S) Q_Sᵀ``
and damping ``λ``, a layer's part ``V`` (as a ``[d_out, d_in]`` matrix) of a flat vector maps to

    (F_layer + λI)⁻¹ V = Q_S ((Q_Sᵀ V Q_A) ⊘ (Λ + λ)) Q_Aᵀ,

with ``Λ = λ_S λ_Aᵀ`` for K-FAC (eigenvalues clamped at 0) and, for EK-FAC, the refitted

    Λ_jk = (1/N) Σ_i ((Q_Sᵀ G_i Q_A)_jk)²

from exact per-example layer gradients (a second pass). EK-FAC's ``Λ`` is the diagonal of the
exact blockwise Fisher in the Kronecker eigenbasis: the best diagonal there in Frobenius norm.

**Other parameters.** Parameters of selected modules that are not Linear/Conv2d/Embedding
(LayerNorm, BatchNorm affine, raw ``nn.Parameter``\\ s), parameters tied between two different
modules, grouped convolutions, and modules whose ``forward`` never runs (weights used through
``F.linear``) get a *diagonal* block ``(1/N) Σ_i g_i²`` from exact per-example gradients (the
same Fisher, diagonal approximation), or raise :class:`ConfigurationError` with
``unsupported="raise"``. :attr:`KroneckerInverse.coverage` says which path each parameter took.
Each batch also checks that ``Σ_i G_i`` rebuilt from the hooks equals the batch gradient that
autograd gives for the layer's parameters; a mismatch (a weight also used outside its module)
raises instead of returning a silently wrong block.

**Cost.** Memory per Kronecker layer ``d_in² + d_out²`` for the factors and their eigenvectors
(times two) plus ``d_out·d_in`` eigenvalues, in ``dtype`` (float64 by default); an Embedding
stores ``V + d²``. K-FAC takes one forward and ``num_samples`` backward passes over the data
plus one ``eigh`` per factor (``O(d_in³ + d_out³)``); EK-FAC a second such pass. Diagonal blocks
add one vmapped backward per batch. A ``solve`` costs ``O(n·(d_out² d_in + d_out d_in²))`` per
layer for ``n`` vectors, so self-influence (one solve per training gradient) is affordable.

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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from traintrace.data import batch_size_of, to_plain
from traintrace.exceptions import ConfigurationError, NonFiniteGradientError
from traintrace.features.gradients import TaskForward, eval_mode
from traintrace.features.params import Layers, ParameterLayout, select_parameters
from traintrace.task import Task

__all__ = ["EKFAC", "KFAC", "KroneckerBlock", "KroneckerInverse"]

Kind = Literal["Linear", "Conv2d", "Embedding"]
_CHUNK_ELEMENTS = 1 << 24  # cap on the per-example rotated-gradient buffer of the EK-FAC refit


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
        unsupported: what to do with selected parameters outside Linear/Conv2d/Embedding
            layers: ``"diagonal"`` — a diagonal Fisher block from exact per-example gradients
            (reported in ``coverage``); ``"raise"`` — :class:`ConfigurationError`.
        dtype: floating dtype of the factors, eigenvectors and eigenvalues.

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
        return _Preparer(self, model, task, state, batches, layers, progress).run()


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
    """One layer's Kronecker factors and eigen-decomposition.

    The layer's parameters are viewed as one ``[d_out, d_in]`` matrix: Linear/Conv2d weight
    reshaped to ``[out, in·kh·kw]`` with the bias (if selected) as the last column; an
    Embedding's ``[V, d]`` weight transposed to ``[d, V]``. In row-major vectorization of that
    matrix the block is ``S ⊗ A`` ≈ ``(Q_S ⊗ Q_A) diag(vec Λ) (Q_S ⊗ Q_A)ᵀ``.

    Attributes:
        module: the module's name (``""`` for the root).
        kind: ``"Linear"``, ``"Conv2d"`` or ``"Embedding"``.
        weight, bias: the selected parameter names the block covers (``None`` when absent).
        A: ``[d_in, d_in]``, or for an Embedding the diagonal ``[V]``.
        S: ``[d_out, d_out]``.
        Q_A: ``[d_in, d_in]`` eigenvectors of ``A`` (``None`` = identity, Embedding).
        Q_S: ``[d_out, d_out]`` eigenvectors of ``S``.
        eigenvalues: ``Λ``, ``[d_out, d_in]`` (K-FAC: ``λ_S λ_Aᵀ``; EK-FAC: refitted).
    """

    module: str
    kind: Kind
    weight: str | None
    bias: str | None
    A: Tensor
    S: Tensor
    Q_A: Tensor | None
    Q_S: Tensor
    eigenvalues: Tensor

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)


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
            if block.kind == "Embedding":
                vocab, dim = self._shapes[block.weight]
                parts.append(w.reshape(n, vocab, dim).transpose(1, 2))
            else:
                parts.append(w.reshape(n, self._shapes[block.weight][0], -1))
        if block.bias is not None:
            parts.append(v[:, self._slices[block.bias]].reshape(n, -1, 1))
        return torch.cat(parts, dim=2)

    def _from_matrix(self, block: KroneckerBlock, m: Tensor, out: Tensor) -> None:
        n = m.shape[0]
        if block.weight is not None:
            w = m.transpose(1, 2) if block.kind == "Embedding" else m
            if block.bias is not None:
                w = w[:, :, :-1]
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
        for block, (q_s, q_a, lam) in zip(self.blocks, self._bases(dtype), strict=True):
            m = self._to_matrix(block, v2).to(dtype)
            r = q_s.T @ m
            if q_a is not None:
                r = r @ q_a
            r = fn(r, block.module or "<root>", lam)
            m = q_s @ r
            if q_a is not None:
                m = m @ q_a.T
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


# ----------------------------------------------------------------------------------------------
# computing the factors
# ----------------------------------------------------------------------------------------------
@dataclass
class _Spec:
    """A tracked module and its running statistics."""

    name: str
    module: nn.Module
    kind: Kind
    weight: str | None
    bias: str | None
    d_in: int
    d_out: int
    A_sum: Tensor
    S_sum: Tensor
    positions: float = 0.0
    lam_sum: Tensor | None = None
    kfac_lambda: Tensor | None = None
    Q_A: Tensor | None = None
    Q_S: Tensor | None = None

    def params(self) -> tuple[str, ...]:
        return tuple(n for n in (self.weight, self.bias) if n is not None)


def _display(name: str) -> str:
    return name or "<root>"


def _unsupported_reason(module: nn.Module, leaf: str) -> str | None:
    """None when (module, leaf) can be Kronecker-factored, else why not."""
    if leaf not in ("weight", "bias"):
        return f"parameter {leaf!r} of {type(module).__name__} is not a layer weight or bias"
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 is Kronecker-factored)"
        return None
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "Embedding with max_norm (renormalizes weights in forward)"
        if module.scale_grad_by_freq:
            return "Embedding with scale_grad_by_freq"
        return None
    return f"unsupported module {type(module).__name__}"


class _Recorder:
    """Forward hooks that keep each tracked module's activations and output-gradient hooks."""

    def __init__(self, specs: list[_Spec], dtype: torch.dtype) -> None:
        self.specs = specs
        self.dtype = dtype
        self.batch_size = 0
        self.capture = True
        self.acts: dict[str, list[Tensor]] = {}  # module name -> one entry per call
        self.grads: dict[str, dict[int, Tensor]] = {}  # module name -> call -> output gradient
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        for spec in self.specs:
            self.handles.append(
                spec.module.register_forward_hook(self._hook(spec), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def reset(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.acts = {}
        self.grads = {}

    def _hook(self, spec: _Spec) -> Callable[..., None]:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(x, Tensor) or not isinstance(out, Tensor):
                raise ConfigurationError(
                    f"K-FAC: layer '{_display(spec.name)}' ({spec.kind}) was called with "
                    f"{type(x).__name__} and returned {type(out).__name__}; expected tensors"
                )
            calls = self.acts.setdefault(spec.name, [])
            k = len(calls)
            calls.append(self._activation(spec, module, x))
            if out.requires_grad:
                out.register_hook(self._grad_hook(spec.name, k))

        return hook

    def _grad_hook(self, name: str, k: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor) -> None:
            if self.capture:
                self.grads.setdefault(name, {})[k] = g.detach()

        return hook

    def _activation(self, spec: _Spec, module: nn.Module, x: Tensor) -> Tensor:
        b = self.batch_size
        if x.ndim < (1 if spec.kind == "Embedding" else 2) or x.shape[0] != b:
            raise ConfigurationError(
                f"K-FAC: layer '{_display(spec.name)}' ({spec.kind}) got an input of shape "
                f"{tuple(x.shape)} whose leading dimension is not the batch ({b}); K-FAC assumes "
                "batch-first layers. Restrict layers= to batch-first modules."
            )
        with torch.no_grad():
            if spec.kind == "Embedding":
                return x.reshape(b, -1)
            if spec.kind == "Linear":
                a = x.reshape(b, -1, x.shape[-1])
            else:
                if x.ndim != 4:
                    raise ConfigurationError(
                        f"K-FAC: Conv2d '{_display(spec.name)}' got input of shape "
                        f"{tuple(x.shape)}; expected [batch, channels, height, width]"
                    )
                conv: nn.Conv2d = module  # type: ignore[assignment]
                mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
                padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
                a = F.unfold(
                    padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride
                ).transpose(1, 2)
            parts = []
            if spec.weight is not None:
                parts.append(a.to(self.dtype))
            if spec.bias is not None:
                parts.append(torch.ones(b, a.shape[1], 1, dtype=self.dtype, device=a.device))
            return torch.cat(parts, dim=-1)

    def activations(self, spec: _Spec) -> Tensor | None:
        """``ã`` as ``[B, positions, d_in]`` (token ids ``[B, positions]`` for an Embedding)."""
        calls = self.acts.get(spec.name)
        return None if not calls else torch.cat(calls, dim=1)

    def output_grads(self, spec: _Spec) -> Tensor | None:
        """``b`` as ``[B, positions, d_out]``; zeros for calls the loss did not reach."""
        calls = self.acts.get(spec.name)
        if not calls:
            return None
        got = self.grads.get(spec.name, {})
        b, parts = self.batch_size, []
        for k, a in enumerate(calls):
            g = got.get(k)
            if g is None:
                parts.append(
                    torch.zeros(b, a.shape[1], spec.d_out, dtype=self.dtype, device=a.device)
                )
            elif spec.kind == "Conv2d":
                parts.append(g.reshape(b, spec.d_out, -1).transpose(1, 2).to(self.dtype))
            else:
                parts.append(g.reshape(b, -1, spec.d_out).to(self.dtype))
        return torch.cat(parts, dim=1)


def _bad_examples(x: Tensor, offset: int) -> list[int]:
    rows = (~torch.isfinite(x.reshape(x.shape[0], -1))).any(dim=1).nonzero().flatten()
    return [int(r) + offset for r in rows[:10]]


class _Preparer:
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
        self.names = select_parameters(model, layers)
        self.layout = ParameterLayout.of(model, self.names)
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
        self.coverage: dict[str, str] = {}
        self.specs: list[_Spec] = []
        self.diag_names: list[str] = []
        self._classify()

    # -- which parameter takes which path --------------------------------------------------
    def _classify(self) -> None:
        modules = dict(self.model.named_modules())
        owners: dict[int, set[int]] = {}
        for _, mod in self.model.named_modules(remove_duplicate=False):
            for p in mod._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), set()).add(id(mod))
        params = dict(self.model.named_parameters())
        by_module: dict[str, dict[str, str]] = {}
        reasons: dict[str, str] = {}
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            reason = _unsupported_reason(module, leaf)
            if reason is None and len(owners.get(id(params[name]), ())) > 1:
                reason = "parameter shared with another module (tied weights)"
            if reason is None:
                by_module.setdefault(owner, {})[leaf] = name
            else:
                reasons[name] = reason
        for owner, leaves in by_module.items():
            module = modules[owner]
            weight, bias = leaves.get("weight"), leaves.get("bias")
            if isinstance(module, nn.Embedding):
                kind: Kind = "Embedding"
                d_in, d_out = module.num_embeddings, module.embedding_dim
                a_sum = torch.zeros(d_in, dtype=self.dtype, device=self.device)
            else:
                kind = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
                w = params[f"{owner}.weight" if owner else "weight"]
                d_out = w.shape[0]
                d_in = (w[0].numel() if weight is not None else 0) + (bias is not None)
                a_sum = torch.zeros(d_in, d_in, dtype=self.dtype, device=self.device)
            s_sum = torch.zeros(d_out, d_out, dtype=self.dtype, device=self.device)
            self.specs.append(_Spec(owner, module, kind, weight, bias, d_in, d_out, a_sum, s_sum))
            for n in (weight, bias):
                if n is not None:
                    self.coverage[n] = f"kronecker:{kind}"
        if reasons and self.cfg.unsupported == "raise":
            listed = [f"{n} ({r})" for n, r in reasons.items()]
            self._refuse(listed)
        for name, reason in reasons.items():
            self._to_diagonal([name], reason)

    def _refuse(self, listed: list[str]) -> None:
        raise ConfigurationError(
            f"{self.method} cannot Kronecker-factor {len(listed)} selected parameter(s): "
            f"{'; '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}. Restrict layers= to "
            "Linear, Conv2d and Embedding modules, or use unsupported='diagonal' for a diagonal "
            "Fisher block on them."
        )

    def _to_diagonal(self, names: list[str], reason: str) -> None:
        if self.cfg.unsupported == "raise":
            self._refuse([f"{n} ({reason})" for n in names])
        for n in names:
            self.coverage[n] = f"diagonal:{reason}"
            self.diag_names.append(n)

    # -- the passes ------------------------------------------------------------------------
    def run(self) -> KroneckerInverse:
        wrapper = TaskForward(self.model, self.task)
        param_keys = [k for k, _ in self.model.named_parameters()]
        buffer_keys = [k for k, _ in self.model.named_buffers()]
        # fresh leaves for the selected parameters: gradients land on them, not on the model
        self.leaves = {n: self.state[n].detach().requires_grad_(True) for n in self.names}
        values: dict[str, Tensor] = {}
        for k in param_keys + buffer_keys:
            if k in self.leaves:
                values["model." + k] = self.leaves[k]
            elif k in self.state:
                values["model." + k] = self.state[k].detach()
        self._values, self._wrapper = values, wrapper
        self.diag_sum: dict[str, Tensor] = {}
        self.num_examples = 0
        with eval_mode(self.model):
            self._pass(refit=False)
            if self.num_examples == 0:
                raise ConfigurationError(f"{self.method}: the batches held no examples")
            self._eigen()
            if self.cfg.refit_eigenvalues:
                self._pass(refit=True)
        return self._result()

    def _pass(self, refit: bool) -> None:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.cfg.seed)
        desc = f"{self.method} {'eigenvalues' if refit else 'factors'}"
        offset = 0
        first = True
        with _Recorder(self.specs, self.dtype) as rec:
            for raw in tqdm(self.batches, desc=desc, disable=not self.progress):
                batch = to_plain(raw, self.device)
                size = batch_size_of(batch)
                self._batch(rec, batch, size, offset, gen, refit, first and not refit)
                first = False
                offset += size
        if not refit:
            self.num_examples = offset
        elif offset != self.num_examples:
            raise ConfigurationError(
                f"{self.method}: the second pass saw {offset} examples, the first "
                f"{self.num_examples}; the batches must be the same on every iteration"
            )

    def _batch(
        self,
        rec: _Recorder,
        batch: Any,
        size: int,
        offset: int,
        gen: torch.Generator,
        refit: bool,
        first: bool,
    ) -> None:
        rec.reset(size)
        where = f"examples {offset}..{offset + size - 1}"
        outputs = functional_call(self._wrapper, self._values, (batch,))
        if first:
            self._drop_unfired(rec)
        acts = {spec.name: rec.activations(spec) for spec in self.specs}
        for spec in self.specs:
            a = acts[spec.name]
            if a is None:
                continue
            if spec.kind != "Embedding" and not bool(torch.isfinite(a).all()):
                self._nonfinite(spec, "input activations", a, offset, where)
            if not refit:
                self._accumulate_a(spec, a)
        leaves = list(self.leaves.values())
        diag_leaves = [self.leaves[n] for n in self.diag_names]
        for _ in range(self.cfg.num_samples):
            if self.cfg.sampled_labels:
                losses = self.task.sample_loss(outputs, batch, gen)
            else:
                losses = self.task.loss(outputs, batch)
            if losses.ndim != 1 or losses.shape[0] != size:
                raise ConfigurationError(
                    f"the task's loss returned shape {tuple(losses.shape)}, expected one value "
                    f"per example ([{size}])"
                )
            if not bool(torch.isfinite(losses).all()):
                raise NonFiniteGradientError(
                    f"{self.method}: non-finite loss for examples {_bad_examples(losses, offset)}; "
                    "check those inputs and labels for NaN/inf and the checkpoint for NaN weights"
                )
            rec.capture = True
            rec.grads = {}
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, retain_graph=True)
            grad_of = dict(zip(self.names, grads, strict=True))
            for spec in self.specs:
                a, b = acts[spec.name], rec.output_grads(spec)
                if a is None or b is None:
                    continue
                if not bool(torch.isfinite(b).all()):
                    self._nonfinite(spec, "output gradients", b, offset, where)
                if refit:
                    self._accumulate_lambda(spec, a, b)
                else:
                    self._accumulate_s(spec, a, b)
                    self._check_sum(spec, a, b, grad_of, where)
            if diag_leaves and not refit:
                rec.capture = False
                self._accumulate_diag(losses, diag_leaves, offset, where)
                rec.capture = True

    def _drop_unfired(self, rec: _Recorder) -> None:
        """Layers whose forward did not run on the first batch go to the diagonal path."""
        unfired = [spec for spec in self.specs if not rec.acts.get(spec.name)]
        for spec in unfired:
            self._to_diagonal(
                list(spec.params()),
                f"{spec.kind} '{_display(spec.name)}' was not called through its forward on the "
                "first batch (its weights are used functionally, or the layer is skipped)",
            )
        if unfired:
            self.specs = [s for s in self.specs if rec.acts.get(s.name)]
            self.diag_names.sort(key=self.names.index)

    # -- accumulation ----------------------------------------------------------------------
    def _nonfinite(self, spec: _Spec, what: str, x: Tensor, offset: int, where: str) -> None:
        raise NonFiniteGradientError(
            f"{self.method}: non-finite {what} of layer '{_display(spec.name)}' ({spec.kind}) "
            f"for examples {_bad_examples(x, offset)} ({where}). Check those inputs for NaN/inf, "
            "the checkpoint for NaN weights, and the loss for log(0) or overflow."
        )

    def _accumulate_a(self, spec: _Spec, a: Tensor) -> None:
        if spec.kind == "Embedding":
            tokens = a
            if tokens.is_floating_point() or tokens.is_complex():
                raise ConfigurationError(
                    f"Embedding '{_display(spec.name)}' got {tokens.dtype} input; expected ids"
                )
            mask = self._mask(spec, tokens)
            spec.A_sum += torch.bincount(tokens[mask], minlength=spec.d_in).to(self.dtype)
            spec.positions += float(mask.sum())
            return
        flat = a.reshape(-1, spec.d_in)
        spec.A_sum += flat.T @ flat
        spec.positions += float(flat.shape[0])

    @staticmethod
    def _mask(spec: _Spec, tokens: Tensor) -> Tensor:
        pad = getattr(spec.module, "padding_idx", None)
        if pad is None:
            return torch.ones_like(tokens, dtype=torch.bool)
        return tokens != pad

    def _accumulate_s(self, spec: _Spec, a: Tensor, b: Tensor) -> None:
        flat = b[self._mask(spec, a)] if spec.kind == "Embedding" else b.reshape(-1, spec.d_out)
        spec.S_sum += flat.T @ flat

    def _check_sum(
        self, spec: _Spec, a: Tensor, b: Tensor, grad_of: dict[str, Tensor | None], where: str
    ) -> None:
        """Σ_i G_i from the hooks must equal autograd's batch gradient of the layer."""
        if spec.kind == "Embedding":
            mask = self._mask(spec, a)
            tok, bm = a[mask], b[mask]
            rebuilt = torch.zeros(spec.d_out, spec.d_in, dtype=self.dtype, device=b.device)
            rebuilt.index_add_(1, tok, bm.T)
            scale = torch.zeros_like(rebuilt).index_add_(1, tok, bm.abs().T)
        else:
            af, bf = a.reshape(-1, spec.d_in), b.reshape(-1, spec.d_out)
            rebuilt = bf.T @ af
            scale = bf.abs().T @ af.abs()
        parts = []
        if spec.weight is not None:
            g = grad_of[spec.weight]
            g = torch.zeros(self._shape(spec.weight), device=self.device) if g is None else g
            g = g.to_dense() if g.is_sparse else g
            g = g.T if spec.kind == "Embedding" else g.reshape(spec.d_out, -1)
            parts.append(g.to(self.dtype))
        if spec.bias is not None:
            g = grad_of[spec.bias]
            g = torch.zeros(spec.d_out, device=self.device) if g is None else g
            parts.append(g.reshape(spec.d_out, 1).to(self.dtype))
        actual = torch.cat(parts, dim=1)
        eps = torch.finfo(self.leaves[spec.params()[0]].dtype).eps
        tol = max(1e-3, 64 * eps)
        err = float((rebuilt - actual).abs().max())
        if err > tol * (float(scale.max()) + 1e-30):
            raise ConfigurationError(
                f"{self.method}: the gradient of layer '{_display(spec.name)}' ({spec.kind}) "
                f"rebuilt from its inputs and output gradients differs from autograd's by {err:.3g} "
                f"({where}): its parameters are also used outside its forward (tied or "
                "functional use), or the layer is not batch-first. Leave it out with layers=, or "
                "use the exact/CG solvers."
            )

    def _shape(self, name: str) -> torch.Size:
        return self.layout.shapes[self.names.index(name)]

    def _accumulate_lambda(self, spec: _Spec, a: Tensor, b: Tensor) -> None:
        """EK-FAC: Λ_sum += Σ_i (Q_Sᵀ G_i Q_A)², G_i = Σ_t b_t ãᵀ_t, without forming G_i in full."""
        assert spec.Q_S is not None and spec.lam_sum is not None
        b_rot = b @ spec.Q_S
        if spec.kind == "Embedding":
            mask = self._mask(spec, a)
            vocab = spec.d_in
            example = torch.arange(a.shape[0], device=a.device).unsqueeze(1).expand_as(a)
            keys = example[mask] * vocab + a[mask]
            uniq, inverse = torch.unique(keys, return_inverse=True)
            sums = torch.zeros(uniq.shape[0], spec.d_out, dtype=self.dtype, device=b.device)
            sums.index_add_(0, inverse, b_rot[mask])
            spec.lam_sum.index_add_(1, uniq % vocab, (sums**2).T)
            return
        assert spec.Q_A is not None
        a_rot = a @ spec.Q_A
        if a.shape[1] == 1:
            spec.lam_sum += (b_rot[:, 0] ** 2).T @ (a_rot[:, 0] ** 2)
            return
        chunk = max(1, _CHUNK_ELEMENTS // (spec.d_in * spec.d_out))
        for start in range(0, a.shape[0], chunk):
            g = torch.einsum(
                "bto,bti->boi", b_rot[start : start + chunk], a_rot[start : start + chunk]
            )
            spec.lam_sum += (g**2).sum(dim=0)

    def _accumulate_diag(
        self, losses: Tensor, leaves: list[Tensor], offset: int, where: str
    ) -> None:
        size = losses.shape[0]
        eye = torch.eye(size, dtype=losses.dtype, device=losses.device)
        try:
            per = torch.autograd.grad(
                losses,
                leaves,
                grad_outputs=eye,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
        except RuntimeError:
            rows = [
                torch.autograd.grad(losses[i], leaves, retain_graph=True, allow_unused=True)
                for i in range(size)
            ]
            per = tuple(
                None if rows[0][j] is None else torch.stack([r[j] for r in rows])
                for j in range(len(leaves))
            )
        for name, g in zip(self.diag_names, per, strict=True):
            if g is None:
                g = torch.zeros(size, *self._shape(name), device=losses.device)
            if not bool(torch.isfinite(g).all()):
                raise NonFiniteGradientError(
                    f"{self.method}: non-finite per-example gradient of {name!r} (diagonal block) "
                    f"for examples {_bad_examples(g, offset)} ({where}). Check those inputs for "
                    "NaN/inf and the checkpoint for NaN weights."
                )
            sq = (g.to(self.dtype) ** 2).sum(dim=0)
            self.diag_sum[name] = self.diag_sum.get(name, 0) + sq

    # -- eigendecomposition and result -----------------------------------------------------
    def _factors(self, spec: _Spec) -> tuple[Tensor, Tensor]:
        n, k = self.num_examples, self.cfg.num_samples
        a = spec.A_sum / n
        s = spec.S_sum / (spec.positions * k) if spec.positions else spec.S_sum.clone()
        return a, s

    def _eigen(self) -> None:
        for spec in self.specs:
            a, s = self._factors(spec)
            for what, m in (("A (activations)", a), ("S (output gradients)", s)):
                if not bool(torch.isfinite(m).all()):
                    raise NonFiniteGradientError(
                        f"{self.method}: factor {what} of layer '{_display(spec.name)}' is not "
                        "finite (overflow); train or evaluate in a wider dtype"
                    )
            lam_s, q_s = torch.linalg.eigh((s + s.T) / 2)
            spec.Q_S = q_s.contiguous()
            if spec.kind == "Embedding":
                lam_a, spec.Q_A = a, None
            else:
                lam_a, q_a = torch.linalg.eigh((a + a.T) / 2)
                spec.Q_A = q_a.contiguous()
            spec.kfac_lambda = torch.outer(lam_s.clamp_min(0), lam_a.clamp_min(0))
            if self.cfg.refit_eigenvalues:
                spec.lam_sum = torch.zeros(spec.d_out, spec.d_in, dtype=self.dtype, device=a.device)

    def _result(self) -> KroneckerInverse:
        blocks = []
        order = {n: i for i, n in enumerate(self.names)}
        for spec in sorted(self.specs, key=lambda s: order[s.params()[0]]):
            a, s = self._factors(spec)
            if self.cfg.refit_eigenvalues:
                assert spec.lam_sum is not None
                lam = spec.lam_sum / (self.num_examples * self.cfg.num_samples)
            else:
                lam = spec.kfac_lambda
            assert spec.Q_S is not None and lam is not None
            blocks.append(
                KroneckerBlock(
                    spec.name, spec.kind, spec.weight, spec.bias, a, s, spec.Q_A, spec.Q_S, lam
                )
            )
        denom = self.num_examples * self.cfg.num_samples
        diagonal = {}
        for name in self.diag_names:
            total = self.diag_sum.get(name)
            if not isinstance(total, Tensor):
                total = torch.zeros(self._shape(name), dtype=self.dtype, device=self.device)
            diagonal[name] = total / denom
        coverage = {n: self.coverage[n] for n in self.names}
        return KroneckerInverse(
            self.layout,
            blocks,
            diagonal,
            coverage,
            damping=self.cfg.damping,
            damping_scale=self.cfg.damping_scale,
            num_examples=self.num_examples,
            method=self.method,
        )
