"""traintrace — trace a model's predictions back to the training examples responsible.

Sign convention everywhere: a positive score means the training example *helps* the query.
Score matrices are oriented ``[n_query, n_train]``.

    import traintrace as tt
    tracin = tt.TracIn(model, tt.Classification(), checkpoints=[tt.Checkpoint("ep1.pt", lr=0.1)])
    tracin.fit(train_dataset)
    scores = tracin.score(test_dataset)       # [n_test, n_train]
    top = tracin.top_k(test_dataset, k=10)    # .proponents / .opponents (.indices, .scores)
    suspicious = tracin.self_influence()      # [n_train]
"""

from traintrace import evaluation as evaluate
from traintrace.applications.clustering import ClusterResult, cluster
from traintrace.applications.forensics import (
    MitigationResult,
    TargetReport,
    identify_targets,
    mitigate,
)
from traintrace.applications.local_ensembles import LocalEnsembles
from traintrace.applications.spectrum import SpectrumResult, spectrum
from traintrace.applications.unlearning import SelectParameters, unlearn
from traintrace.checkpoints import Checkpoint
from traintrace.curvature import (
    CG,
    EKFAC,
    KFAC,
    MFAC,
    Arnoldi,
    DampingSelection,
    Exact,
    LiSSA,
    select_damping,
)
from traintrace.evaluation import MislabelDetection, mislabel_detection
from traintrace.exceptions import (
    BatchFormatError,
    CheckpointMismatchError,
    ConfigurationError,
    ConvergenceWarning,
    DataOrderError,
    DiskFullError,
    EmptyDataError,
    FeatureMemoryError,
    LabelError,
    LearningRateError,
    LearningRateWarning,
    ModelDtypeError,
    ModelOutputError,
    NonFiniteGradientError,
    NotFittedError,
    NotPositiveDefiniteError,
    RetrainingError,
    SolverDivergedError,
    StoreBusyError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreRewrittenError,
    TraintraceError,
    TraintraceWarning,
    UnsizedDataError,
)
from traintrace.features.projections import ProjectedGradients, Projection
from traintrace.features.store import FeatureStore
from traintrace.interfaces.config import RunConfig
from traintrace.interfaces.report import report
from traintrace.interfaces.results import save_scores, save_self_influence
from traintrace.methods import (
    AME,
    HYDRA,
    TRAK,
    EmbeddingKNN,
    Estimator,
    InfluenceFunction,
    LeaveOneOut,
    RepresenterPoints,
    Retrainer,
    TracIn,
    TrajectoryRecorder,
    query_measurement,
    query_predictions,
)
from traintrace.retrieval import FaissIndex, Ranking, TopK
from traintrace.task import Classification, LanguageModeling, Regression, Task

__version__ = "0.1.0"

__all__ = [
    "AME",
    "CG",
    "EKFAC",
    "HYDRA",
    "KFAC",
    "MFAC",
    "TRAK",
    "Arnoldi",
    "BatchFormatError",
    "Checkpoint",
    "CheckpointMismatchError",
    "Classification",
    "ClusterResult",
    "ConfigurationError",
    "ConvergenceWarning",
    "DampingSelection",
    "DataOrderError",
    "DiskFullError",
    "EmbeddingKNN",
    "EmptyDataError",
    "Estimator",
    "Exact",
    "FaissIndex",
    "FeatureMemoryError",
    "FeatureStore",
    "InfluenceFunction",
    "LabelError",
    "LanguageModeling",
    "LearningRateError",
    "LearningRateWarning",
    "LeaveOneOut",
    "LiSSA",
    "LocalEnsembles",
    "MislabelDetection",
    "MitigationResult",
    "ModelDtypeError",
    "ModelOutputError",
    "NonFiniteGradientError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "ProjectedGradients",
    "Projection",
    "Ranking",
    "Regression",
    "RepresenterPoints",
    "Retrainer",
    "RetrainingError",
    "RunConfig",
    "SelectParameters",
    "SolverDivergedError",
    "SpectrumResult",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreIncompleteError",
    "StoreMismatchError",
    "StoreRewrittenError",
    "TargetReport",
    "Task",
    "TopK",
    "TracIn",
    "TraintraceError",
    "TraintraceWarning",
    "TrajectoryRecorder",
    "UnsizedDataError",
    "__version__",
    "cluster",
    "evaluate",
    "identify_targets",
    "mislabel_detection",
    "mitigate",
    "query_measurement",
    "query_predictions",
    "report",
    "save_scores",
    "save_self_influence",
    "select_damping",
    "spectrum",
    "unlearn",
]
