"""fastinf: fast training-data influence for LoRA-tuned models.

Public re-exports only. Importing fastinf never compiles anything or touches CUDA.
Sign convention everywhere: a score is the derivative of the test loss with respect to up-weighting
the training example, so positive = harmful, negative = helpful (METHODS.md §0).
"""

from . import ops
from .estimators import (
    BIF,
    EKFAC,
    KFAC,
    LABEL_FREE_RULE,
    DataInf,
    DiagonalFisher,
    Estimator,
    Exact,
    HessianFree,
    LiSSA,
    MethodInfo,
    RRInf,
    RRInfFixedPoint,
    Z0Inf,
    available_methods,
    get_estimator,
    influence,
    method_info,
    select_damping,
)
from .gradients import GradientSet, GradientStore, LoRAGradientCollector
from .traces import LossTrace, checkpoint_gram, loss_table, sample_posterior_traces
from .version import __version__

__all__ = [
    "BIF",
    "LABEL_FREE_RULE",
    "LossTrace",
    "sample_posterior_traces",
    "Z0Inf",
    "DataInf",
    "DiagonalFisher",
    "EKFAC",
    "Estimator",
    "Exact",
    "GradientSet",
    "GradientStore",
    "HessianFree",
    "KFAC",
    "LiSSA",
    "LoRAGradientCollector",
    "MethodInfo",
    "RRInf",
    "RRInfFixedPoint",
    "__version__",
    "available_methods",
    "checkpoint_gram",
    "loss_table",
    "method_info",
    "get_estimator",
    "influence",
    "ops",
    "select_damping",
]
