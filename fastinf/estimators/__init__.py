"""Influence estimators, one module per method: gradient-based (METHODS.md §1–6) and from loss traces
(§7–8). The registry (:func:`available_methods`, :func:`method_info`) knows each method's facts."""

from .base import (
    BaseEstimator,
    Estimator,
    EstimatorOptions,
    MethodInfo,
    available_methods,
    get_estimator,
    influence,
    method_info,
)
from .bif import BIF
from .damping import LABEL_FREE_RULE, select_damping
from .datainf import DataInf
from .exact import Exact
from .kfac import EKFAC, KFAC
from .lissa import LiSSA
from .rrinf import RRInf, RRInfFixedPoint
from .simple import DiagonalFisher, HessianFree
from .trace_base import TraceEstimator
from .z0inf import Z0Inf

__all__ = [
    "BIF",
    "EKFAC",
    "KFAC",
    "LABEL_FREE_RULE",
    "BaseEstimator",
    "MethodInfo",
    "TraceEstimator",
    "method_info",
    "Z0Inf",
    "DataInf",
    "DiagonalFisher",
    "Estimator",
    "EstimatorOptions",
    "Exact",
    "HessianFree",
    "LiSSA",
    "RRInf",
    "RRInfFixedPoint",
    "available_methods",
    "get_estimator",
    "influence",
    "select_damping",
]
