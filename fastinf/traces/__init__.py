"""Loss traces for the zeroth-order (Z0-Inf) and Bayesian (BIF) estimators."""

from .checkpoints import checkpoint_gram, load_checkpoint, loss_table
from .loss_trace import LossTrace

__all__ = ["checkpoint_gram", "load_checkpoint", "loss_table", "LossTrace"]
