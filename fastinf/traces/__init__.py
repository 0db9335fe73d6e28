"""Loss traces for the zeroth-order (Z0-Inf) and Bayesian (BIF) estimators."""

from .loss_trace import LossTrace

__all__ = ["LossTrace"]
