"""Evaluation: metrics (METHODS.md §9), the papers' experiments on any data, and reports.

* metrics: ``mislabel_auc``, ``detection_curve``, ``class_detection``, ``agreement``, ``roc_auc``,
  ``lds`` (the linear datamodeling score) and ``bootstrap_ci``;
* experiments (:mod:`fastinf.eval.experiments`): ``mislabel_experiment``,
  ``class_detection_experiment``, ``diffusion_class_detection_experiment``, the synthetic
  ``synthetic_mislabel_experiment`` / ``mislabel_task``, ``run_task`` for the named tasks, and
  ``lds_experiment`` / ``lds_demo`` (LDS with retrained models, ``fastinf eval lds``);
* :mod:`fastinf.eval.runner` (per-method runners), :mod:`fastinf.eval.report` (report writer and
  plots), :mod:`fastinf.eval.hf` (Hugging Face set-up), :mod:`fastinf.eval.jobs` (what the CLI runs).

Importing this package imports neither transformers nor diffusers.
"""

from .experiments import (
    TASKS,
    ClassDetectionSettings,
    DiffusionSettings,
    ExperimentResult,
    MislabelSettings,
    class_detection_experiment,
    diffusion_class_detection_experiment,
    failed_methods,
    mislabel_demo,
    mislabel_experiment,
    run_task,
    synthetic_mislabel_experiment,
)
from .experiments.lds import LDSSettings, lds_demo, lds_experiment
from .metrics import (
    agreement,
    bootstrap_ci,
    class_detection,
    detection_curve,
    lds,
    mislabel_auc,
    rank_average,
    roc_auc,
)
from .synthetic import SyntheticTask, mislabel_task

__all__ = [
    "TASKS",
    "ClassDetectionSettings",
    "DiffusionSettings",
    "ExperimentResult",
    "LDSSettings",
    "MislabelSettings",
    "SyntheticTask",
    "agreement",
    "bootstrap_ci",
    "class_detection",
    "class_detection_experiment",
    "detection_curve",
    "diffusion_class_detection_experiment",
    "failed_methods",
    "lds",
    "lds_demo",
    "lds_experiment",
    "mislabel_auc",
    "mislabel_demo",
    "mislabel_experiment",
    "mislabel_task",
    "rank_average",
    "roc_auc",
    "run_task",
    "synthetic_mislabel_experiment",
]
