"""Glue for Hugging Face transformers / peft / diffusers: per-example losses and training callbacks.

Submodules import their frameworks lazily; importing ``fastinf`` imports none of them."""
