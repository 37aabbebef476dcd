"""Layer 7 — applications: what attribution and curvature tools are used for (local ensembles,
curvature spectra, unlearning)."""
