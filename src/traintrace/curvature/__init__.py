"""Layer 4 — curvature: matrix-free operators, factored approximations (K-FAC, EK-FAC) and solvers."""
