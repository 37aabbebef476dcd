"""Layer 3 — per-example gradients, parameter layouts (and, later, projections and stores)."""

from traintrace.features.gradients import GradientComputer, eval_mode
from traintrace.features.params import ParameterLayout, last_layer_name, select_parameters

__all__ = [
    "GradientComputer",
    "ParameterLayout",
    "eval_mode",
    "last_layer_name",
    "select_parameters",
]
