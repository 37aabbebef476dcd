"""Layer 4 — curvature: matrix-free operators, factored approximations (K-FAC, EK-FAC) and solvers.

Operators act on flat vectors in the :class:`~traintrace.features.ParameterLayout` order and
average over the examples of the given batches (``(1/N) Σ_i``) plus damping ``λI``. Solvers and
factored approximations return inverse operators whose ``solve`` takes a vector ``[P]`` or rows
``[n, P]`` (one vector per row, like per-example gradients).
"""

from traintrace.curvature.kfac import EKFAC, KFAC, KroneckerInverse
from traintrace.curvature.lanczos import SpectralDensity, lanczos, slq_density, top_eigenpairs
from traintrace.curvature.laplace import DampingSelection, LaplaceEvidence, select_damping
from traintrace.curvature.operators import (
    CurvatureOperator,
    EmpiricalFisher,
    GaussNewton,
    Hessian,
    MatrixOperator,
)
from traintrace.curvature.solvers import (
    CG,
    MFAC,
    Arnoldi,
    Exact,
    InverseOperator,
    LiSSA,
    LowRankInverse,
    Solver,
    WoodburyInverse,
    make_solver,
)

__all__ = [
    "CG",
    "EKFAC",
    "KFAC",
    "MFAC",
    "Arnoldi",
    "CurvatureOperator",
    "DampingSelection",
    "EmpiricalFisher",
    "Exact",
    "GaussNewton",
    "Hessian",
    "InverseOperator",
    "KroneckerInverse",
    "LaplaceEvidence",
    "LiSSA",
    "LowRankInverse",
    "MatrixOperator",
    "Solver",
    "SpectralDensity",
    "WoodburyInverse",
    "lanczos",
    "make_solver",
    "select_damping",
    "slq_density",
    "top_eigenpairs",
]
