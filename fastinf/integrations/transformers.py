"""transformers / peft glue: ready-made per-example losses and a Trainer callback that saves adapter
checkpoints during an ordinary ``Trainer`` run (so Z0-Inf needs no extra training)."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from ..gradients.losses import causal_lm_loss, default_loss_fn, model_kind, sequence_classification_loss
from ..utils import atomic_write

__all__ = ["CheckpointCallback", "causal_lm_loss", "default_loss_fn", "model_kind", "sequence_classification_loss"]


def _adapter_state(model) -> dict:
    """The trainable adapter weights in peft's saved layout (or every trainable parameter)."""
    try:
        from peft import get_peft_model_state_dict

        if hasattr(model, "peft_config"):
            return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    except ImportError:  # pragma: no cover - peft is a requirement
        pass
    return {k: p.detach().cpu().contiguous() for k, p in model.named_parameters() if p.requires_grad}


class CheckpointCallback(TrainerCallback):
    """Save the adapter every ``every_n_steps`` optimizer steps, or at the end of every epoch.

    Files ``{output_dir}/step-{global_step:08d}.safetensors`` are written atomically; their paths are
    collected in ``self.checkpoints`` (in order), ready for :func:`fastinf.loss_table` and
    :func:`fastinf.checkpoint_gram`. ``save_initial=True`` also saves the weights before training.
    """

    def __init__(self, output_dir: str | os.PathLike, *, every_n_steps: int | None = None, save_initial: bool = False):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive int or None (each epoch), got {every_n_steps!r}")
        self.output_dir = Path(output_dir)
        self.every_n_steps = every_n_steps
        self.save_initial = save_initial
        self.checkpoints: list[Path] = []

    def _save(self, model, step: int) -> None:
        from safetensors.torch import save

        path = self.output_dir / f"step-{step:08d}.safetensors"
        if path in self.checkpoints:
            return
        atomic_write(path, save(_adapter_state(model)))
        self.checkpoints.append(path)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.save_initial and model is not None:
            self._save(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and model is not None and state.global_step % self.every_n_steps == 0:
            self._save(model, state.global_step)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps is None and model is not None:
            self._save(model, state.global_step)
