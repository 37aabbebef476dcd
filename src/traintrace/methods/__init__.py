"""Layer 5 — the estimators users call."""

from traintrace.methods.base import Estimator
from traintrace.methods.embedding_knn import EmbeddingKNN
from traintrace.methods.hydra import HYDRA, TrajectoryRecorder
from traintrace.methods.influence import InfluenceFunction
from traintrace.methods.representer import RepresenterPoints
from traintrace.methods.retraining import (
    AME,
    LeaveOneOut,
    Retrainer,
    query_measurement,
    query_predictions,
)
from traintrace.methods.tracin import TracIn
from traintrace.methods.trak import TRAK

__all__ = [
    "AME",
    "HYDRA",
    "TRAK",
    "EmbeddingKNN",
    "Estimator",
    "InfluenceFunction",
    "LeaveOneOut",
    "RepresenterPoints",
    "Retrainer",
    "TracIn",
    "TrajectoryRecorder",
    "query_measurement",
    "query_predictions",
]
