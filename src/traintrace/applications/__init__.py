"""Layer 7 — applications: what attribution and curvature tools are used for (local ensembles,
curvature spectra, unlearning, training-set attack forensics)."""

from traintrace.applications.forensics import (
    MitigationResult,
    TargetReport,
    identify_targets,
    mitigate,
    robust_tail,
)

__all__ = ["MitigationResult", "TargetReport", "identify_targets", "mitigate", "robust_tail"]
