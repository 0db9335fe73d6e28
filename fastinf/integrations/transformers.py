"""transformers / peft: ready-made per-example losses for gradient capture."""

from ..gradients.losses import causal_lm_loss, default_loss_fn, model_kind, sequence_classification_loss

__all__ = ["causal_lm_loss", "default_loss_fn", "model_kind", "sequence_classification_loss"]
