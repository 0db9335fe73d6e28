"""Evaluation: metrics of METHODS.md §9 and small ready-made tasks.

``mislabel_auc``, ``detection_curve``, ``class_detection`` and ``agreement`` score influence
estimates; ``mislabel_task`` builds a synthetic end-to-end task (a LoRA-adapted model trained on
noisy labels, with per-example gradients) that runs on a CPU in about a second.
"""

from .metrics import agreement, class_detection, detection_curve, mislabel_auc, rank_average, roc_auc
from .synthetic import SyntheticTask, mislabel_task

__all__ = [
    "SyntheticTask",
    "agreement",
    "class_detection",
    "detection_curve",
    "mislabel_auc",
    "mislabel_task",
    "rank_average",
    "roc_auc",
]
