"""``P`` of the one formula: what is applied to the query gradients before the inner product.

    score(z, z') = Σ_c w_c · ⟨P_c ∇f(z', θ_c), R ∇l(z, θ_c)⟩

A preconditioner is applied once per block of queries, never per training example, and offers
the quadratic form ``gᵀ P g`` for self-influence. Two featurizers consume it
(:mod:`traintrace.methods.gradient`): the exact engine (``directions`` / ``quadratic`` on
captured per-layer factors) and the projected store (``apply_features`` /
``quadratic_features`` on ``k``-dimensional stored features).

==================== =============================== ==========================================
preconditioner       ``P``                            used by
==================== =============================== ==========================================
:class:`Identity`    ``I``                            TracIn, GAS
:class:`InverseCurvature` ``scale · (C + λI)⁻¹``      influence functions (exact, CG, LiSSA,
                                                      Arnoldi's low rank, K-FAC/EK-FAC, M-FAC)
:class:`Gram`        ``(ΦᵀΦ + λI)⁻¹`` in ``k`` dims   TRAK
==================== =============================== ==========================================
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from traintrace.exceptions import ConfigurationError
from traintrace.features.engine import Directions, ExactGradients
from traintrace.features.hooks import Capture

__all__ = ["Gram", "Identity", "InverseCurvature", "Preconditioner"]


class Preconditioner(Protocol):
    """What a featurizer needs from ``P`` (each method may raise where a path does not apply)."""

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        """``P ∇f(z')`` for a captured block of queries, as engine directions (exact path)."""
        ...

    def quadratic(self, engine: ExactGradients, cap: Capture) -> Tensor:
        """``∇l(z)ᵀ P ∇l(z)`` for a captured batch of training examples, ``[B]`` (exact path)."""
        ...

    def apply_features(self, q: Tensor) -> Tensor:
        """``P q`` for projected query features ``[m, k]`` (store path)."""
        ...

    def quadratic_features(self, g: Tensor) -> Tensor:
        """``gᵀ P g`` for projected training features ``[B, k]`` (store path)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able settings."""
        ...


class Identity:
    """``P = I`` (TracIn): the query's captured gradient is contracted as it is (factored)."""

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        return engine.directions(cap)

    def quadratic(self, engine: ExactGradients, cap: Capture) -> Tensor:
        return engine.sq_norms(cap)

    def apply_features(self, q: Tensor) -> Tensor:
        return q

    def quadratic_features(self, g: Tensor) -> Tensor:
        return g.square().sum(1)

    def describe(self) -> dict[str, Any]:
        return {"preconditioner": "identity"}


class InverseCurvature:
    """``P = scale · (C + λI)⁻¹`` through any inverse operator with ``solve(v [m, P])``.

    The query gradients of a block are formed once (``m × P``), solved, and contracted densely
    per layer. Self-influence forms the training gradients ``~2^26 / P`` examples at a time.
    K-FAC/EK-FAC inverses work layer by layer from the captured factors instead (their
    ``directions`` / ``quadratic``: rotated sides in the Kronecker eigenbasis). A low-rank
    inverse (Arnoldi, ``U diag(1/λ) Uᵀ + (I − UUᵀ)/λ_c``) computes self-influence from the ``r``
    coordinates ``Uᵀ g`` and ``‖g‖²`` through the engine (``r`` contractions per example, no
    per-example gradient); other inverses form each training batch's gradients and solve.
    """

    def __init__(self, inverse: Any, scale: float) -> None:
        self.reset(inverse, scale)

    def reset(self, inverse: Any, scale: float) -> None:
        """Use another inverse (an estimator's ``fit`` builds it once the data is known)."""
        self.inverse = inverse
        self.scale = float(scale)
        self._basis: Directions | None = None

    def _low_rank(self) -> bool:
        return hasattr(self.inverse, "eigenvectors") and hasattr(self.inverse, "project")

    def _layered(self) -> bool:
        """K-FAC/EK-FAC: precondition and take quadratic forms layer by layer, in the
        Kronecker eigenbasis, from the captured factors (no flat gradient formed)."""
        return hasattr(self.inverse, "directions") and hasattr(self.inverse, "quadratic")

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        if self._layered():
            return self.inverse.directions(engine, cap, scale=self.scale)
        q = engine.flatten(cap)
        solved = self.inverse.solve(q).to(q.dtype) * self.scale
        return engine.directions_from_flat(solved)

    def quadratic(self, engine: ExactGradients, cap: Capture) -> Tensor:
        if self._layered():
            return self.inverse.quadratic(engine, cap, scale=self.scale)
        if self._low_rank():
            if self._basis is None:
                u = self.inverse.eigenvectors
                self._basis = engine.directions_from_flat(u.T.to(cap.values.dtype))
            coords = engine.dot(cap, self._basis)  # [r, B]
            lam = self.inverse.eigenvalues.to(coords)
            complement = getattr(self.inverse, "complement", None)
            if complement is None:
                return (coords.square() / lam[:, None]).sum(0) * self.scale
            # gᵀ(U Λ⁻¹ Uᵀ + (I − UUᵀ)/λ_c)g = Σ_j c_j² (1/λ_j − 1/λ_c) + ‖g‖²/λ_c
            inside = (coords.square() * (1.0 / lam[:, None] - 1.0 / complement)).sum(0)
            return (inside + engine.sq_norms(cap) / complement) * self.scale
        # form the training gradients a few at a time: at most ~2^26 numbers (256 MB) at once
        step = max(1, 2**26 // max(1, engine.layout.numel))
        parts = []
        for start in range(0, cap.size, step):
            g = engine.flatten(cap.slice(start, start + step))
            parts.append((self.inverse.solve(g).to(g.dtype) * g).sum(1))
        return torch.cat(parts) * self.scale

    def apply_features(self, q: Tensor) -> Tensor:
        raise ConfigurationError("an inverse curvature acts on exact gradients, not projections")

    quadratic_features = apply_features

    def describe(self) -> dict[str, Any]:
        return {"preconditioner": repr(self.inverse), "scale": self.scale}


class Gram:
    """``P = (ΦᵀΦ + λI)⁻¹`` on ``k``-dimensional projected features (TRAK).

    ``Φ`` ``[n, k]`` holds the projected gradients of the training set's measurement (the loss
    gradients themselves when the measurement is the loss). Built by :meth:`accumulate` over
    blocks of rows and :meth:`finish` (Cholesky, float64); ``λ`` defaults to ``1e-6 · tr/k``.
    """

    def __init__(self, k: int, damping: float | None) -> None:
        self.k = k
        self.damping = damping
        self.reset()

    def reset(self) -> None:
        """Start accumulating ``ΦᵀΦ`` afresh (a refit)."""
        self._kernel = torch.zeros(self.k, self.k, dtype=torch.float64)
        self.inverse: Tensor | None = None

    def accumulate(self, rows: Tensor) -> None:
        rows = rows.detach().double().cpu()
        self._kernel += rows.T @ rows

    def finish(self, where: str, n: int) -> float:
        """Factor ``ΦᵀΦ + λI``; returns the damping used."""
        from traintrace.exceptions import NotPositiveDefiniteError

        kernel = self._kernel
        damping = self.damping
        if damping is None:
            damping = 1e-6 * float(kernel.diagonal().sum()) / self.k
        kernel.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:
            raise NotPositiveDefiniteError(
                f"TRAK: ΦᵀΦ + λI (λ={damping:g}) is not positive definite for {where}; with {n} "
                f"training examples and k={self.k} features, use a smaller projection or "
                "damping > 0"
            )
        self.inverse = torch.cholesky_inverse(factor)
        return float(damping)

    def _require(self) -> Tensor:
        if self.inverse is None:
            raise ConfigurationError("Gram preconditioner used before finish()")
        return self.inverse

    def directions(self, engine: ExactGradients, cap: Capture) -> Directions:
        raise ConfigurationError("TRAK's Gram preconditioner acts on projected features")

    quadratic = directions

    def apply_features(self, q: Tensor) -> Tensor:
        return (q.cpu().double() @ self._require()).to(q.dtype)

    def quadratic_features(self, g: Tensor) -> Tensor:
        g64 = g.double()
        return ((g64 @ self._require()) * g64).sum(1)

    def describe(self) -> dict[str, Any]:
        return {"preconditioner": "gram", "k": self.k, "damping": self.damping}
