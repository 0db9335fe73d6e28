"""Gradient-based influence estimators (METHODS.md §1–6), one module per method."""

from .base import Estimator, EstimatorOptions, available_methods, get_estimator, influence
from .datainf import DataInf
from .exact import Exact
from .lissa import LiSSA
from .rrinf import RRInf, RRInfFixedPoint
from .simple import DiagonalFisher, HessianFree

__all__ = [
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
