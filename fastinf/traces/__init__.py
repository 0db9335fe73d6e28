"""Loss traces for the zeroth-order (Z0-Inf) and Bayesian (BIF) estimators."""

from .checkpoints import checkpoint_gram, load_checkpoint, loss_table
from .loss_trace import LossTrace
from .sampler import sample_posterior_traces

__all__ = ["checkpoint_gram", "load_checkpoint", "loss_table", "LossTrace", "sample_posterior_traces"]
