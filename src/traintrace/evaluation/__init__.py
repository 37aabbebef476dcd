"""Layer 8 — evaluation: how far to trust an estimator."""

from traintrace.evaluation.mislabel import MislabelDetection, mislabel_detection

__all__ = ["MislabelDetection", "mislabel_detection"]
