"""Per-example gradients: the in-memory ``GradientSet``, capture from peft models
(``LoRAGradientCollector``) and the on-disk ``GradientStore``."""

from .collector import LoRAGradientCollector, random_projection
from .gradient_set import GradientSet, align_test
from .store import GradientStore, StoreError, batch_digest, check_same_model

__all__ = [
    "GradientSet",
    "GradientStore",
    "LoRAGradientCollector",
    "StoreError",
    "align_test",
    "batch_digest",
    "check_same_model",
    "random_projection",
]
