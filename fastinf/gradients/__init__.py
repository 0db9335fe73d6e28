"""Per-example gradients: the in-memory ``GradientSet`` (capture and on-disk store come later)."""

from .gradient_set import GradientSet, align_test

__all__ = ["GradientSet", "align_test"]
