"""Layer 8 — evaluation: how far to trust an estimator (``tt.evaluate``).

* :func:`loo_correlation` / :func:`loo_benchmark` — predicted vs actual leave-one-out change;
* :func:`lds` with :class:`SubsetMeasurements` — the linear datamodeling score (TRAK), whose
  retrained subset measurements are computed once and reused across estimators;
* :func:`mislabel_detection` — recall of flipped labels when inspecting a ranking;
* :func:`brittleness` — the fewest top proponents whose removal flips a prediction;
* :func:`pbrf` / :func:`pbrf_scores` — the proximal Bregman response, the ground truth that
  influence functions approximate in non-convex models.
"""

from traintrace.evaluation.brittleness import Brittleness, brittleness
from traintrace.evaluation.lds import LDSResult, SubsetMeasurements, lds, sample_subsets
from traintrace.evaluation.loo import LOOCorrelation, loo_benchmark, loo_correlation
from traintrace.evaluation.mislabel import MislabelDetection, mislabel_detection
from traintrace.evaluation.pbrf import PBRF, PBRFSolution, pbrf, pbrf_scores

__all__ = [
    "PBRF",
    "Brittleness",
    "LDSResult",
    "LOOCorrelation",
    "MislabelDetection",
    "PBRFSolution",
    "SubsetMeasurements",
    "brittleness",
    "lds",
    "loo_benchmark",
    "loo_correlation",
    "mislabel_detection",
    "pbrf",
    "pbrf_scores",
    "sample_subsets",
]
