"""Layer 3 — per-example gradients, parameter layouts, projections and the on-disk feature store."""

from traintrace.features.gradients import GradientComputer, eval_mode
from traintrace.features.params import ParameterLayout, last_layer_name, select_parameters
from traintrace.features.projections import ProjectedGradients, Projection
from traintrace.features.store import FeatureStore

__all__ = [
    "FeatureStore",
    "GradientComputer",
    "ParameterLayout",
    "ProjectedGradients",
    "Projection",
    "eval_mode",
    "last_layer_name",
    "select_parameters",
]
