"""Gradient-based influence estimators (METHODS.md §1–6), one module per method."""

from .base import Estimator, EstimatorOptions, available_methods, get_estimator, influence
from .bif import BIF
from .datainf import DataInf
from .exact import Exact
from .lissa import LiSSA
from .rrinf import RRInf, RRInfFixedPoint
from .simple import DiagonalFisher, HessianFree
from .z0inf import Z0Inf

__all__ = [
    "BIF",
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
]
