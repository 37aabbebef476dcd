"""Layer 5 — the estimators users call."""

from traintrace.methods.base import Estimator
from traintrace.methods.embedding_knn import EmbeddingKNN
from traintrace.methods.hydra import HYDRA, TrajectoryRecorder
from traintrace.methods.influence import InfluenceFunction
from traintrace.methods.representer import RepresenterPoints
from traintrace.methods.tracin import TracIn

__all__ = [
    "HYDRA",
    "EmbeddingKNN",
    "Estimator",
    "InfluenceFunction",
    "RepresenterPoints",
    "TracIn",
    "TrajectoryRecorder",
]
