"""The papers' experiments, one module per experiment, and the named tasks of ``fastinf eval``.

* :mod:`.mislabel`: mislabelled-data detection (real text or the synthetic task) and ``fastinf demo``;
* :mod:`.class_detection`: class detection for text generation;
* :mod:`.diffusion`: class detection for a class-conditional diffusion model.

:func:`run_task` runs a named task on the bundled data with the sizes the README reports:
``"mislabel"`` (Rotten Tomatoes, MiniLM), ``"math"`` (DataInf math_with_reason, SmolLM2),
``"gsm"`` (reasoning-gym gsm_symbolic templates as classes, SmolLM2) and ``"digits"`` (scikit-learn
digits, a class-conditional UNet2DModel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .class_detection import ClassDetectionSettings, class_detection_experiment
from .common import ExperimentResult, failed_methods
from .diffusion import DiffusionSettings, diffusion_class_detection_experiment
from .mislabel import MislabelSettings, mislabel_demo, mislabel_experiment, synthetic_mislabel_experiment

__all__ = [
    "TASKS",
    "ClassDetectionSettings",
    "DiffusionSettings",
    "ExperimentResult",
    "MislabelSettings",
    "class_detection_experiment",
    "diffusion_class_detection_experiment",
    "failed_methods",
    "mislabel_demo",
    "mislabel_experiment",
    "run_task",
    "synthetic_mislabel_experiment",
]

TASKS = ("mislabel", "math", "gsm", "digits", "lds")
LDS_OPTIONS = ("subsets", "fraction", "subset_seed", "n_train", "n_test", "cache_dir")


def run_task(
    task: str,
    *,
    quick: bool = False,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    classes: int | None = None,
    per_class: int | None = None,
    per_class_test: int | None = None,
    grad_field: str | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    **lds_options: Any,
) -> ExperimentResult:
    """Run the named task on the bundled data (``fastinf eval <task>``); the report goes to
    ``report_dir`` (default ``fastinf-report-<task>``).

    ``lds``: :func:`.lds.lds_demo`, which alone takes ``lds_options`` (``subsets``, ``fraction``,
    ``subset_seed``, ``n_train``, ``n_test``, ``cache_dir``; None keeps its default).

    Sizes (``quick`` in brackets): math 4 classes × 45 train / 10 test per class (12 / 3, 1 epoch);
    gsm 8 templates × 20 / 5 (12 / 3); digits 20 / 5 images per digit on a UNet trained on 1200
    (10 / 2 on 600, fewer epochs); mislabel as ``fastinf demo``. ``classes``, ``per_class`` and
    ``per_class_test`` override. ``grad_field``: the tokens the gradients use (math: text; gsm: answer).

    Raises:
        ValueError: an unknown task or method, or options that do not apply to the task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    out = report_dir if report_dir is not None else Path(f"fastinf-report-{task}")
    lds_given = {k: v for k, v in lds_options.items() if v is not None}
    unknown = sorted(set(lds_options) - set(LDS_OPTIONS))
    if unknown:
        raise ValueError(f"run_task: unknown option(s) {', '.join(unknown)}")
    if task != "lds" and lds_given:
        raise ValueError(f"{', '.join(lds_given)} apply to the lds task only")
    class_opts = {"classes": classes, "per_class": per_class, "per_class_test": per_class_test}
    given = [k for k, v in {**class_opts, "grad_field": grad_field}.items() if v is not None]
    if task in ("mislabel", "lds") and given:
        raise ValueError(f"{', '.join(given)} do not apply to the {task} task")
    if task == "lds":
        from . import lds

        return lds.lds_demo(
            quick=quick, seed=seed, methods=methods, report_dir=out, progress=progress, log=log, **lds_given
        )
    if methods is not None and "exact" not in methods:
        methods = ["exact", *methods]  # the reference of the correlations
    if task == "mislabel":
        return mislabel_demo(quick=quick, seed=seed, methods=methods, report_dir=out, progress=progress, log=log)
    if task == "digits":
        return _digits(quick, seed, methods, per_class, per_class_test, out, progress, log)
    return _text_classes(task, quick, seed, methods, classes, per_class, per_class_test, grad_field, out, progress, log)


def _digits(quick, seed, methods, per_class, per_class_test, out, progress, log) -> ExperimentResult:
    from ...data import digits

    x, y = digits(seed=seed)
    settings = DiffusionSettings(base_epochs=8, lora_epochs=4) if quick else DiffusionSettings()
    return diffusion_class_detection_experiment(
        x,
        y,
        n_base=600 if quick else 1200,
        n_train=(per_class or (10 if quick else 20)) * 10,
        n_test=(per_class_test or (2 if quick else 5)) * 10,
        methods=methods,
        settings=settings,
        seed=seed,
        report_dir=out,
        progress=progress,
        log=log,
    )


def _text_classes(
    task, quick, seed, methods, classes, per_class, per_class_test, grad_field, out, progress, log
) -> ExperimentResult:
    from ...data import datainf_task, gsm_symbolic

    k = classes or (4 if task == "math" else 8)
    per = per_class or (12 if quick else (45 if task == "math" else 20))
    per_te = per_class_test or (3 if quick else (10 if task == "math" else 5))
    if task == "math":
        tr = datainf_task("math_with_reason", "train", classes=k, per_class=per)
        te = datainf_task("math_with_reason", "test", classes=k, per_class=per_te)
        cls_key, field, dataset = "variation", grad_field or "text", "DataInf math_with_reason"
    else:
        tr, te = gsm_symbolic(n_templates=k, per_template_train=per, per_template_test=per_te, seed=seed)
        cls_key, field, dataset = "template", grad_field or "answer", "reasoning-gym gsm_symbolic"
    opts: dict[str, Any] = {"grad_field": field, "epochs": 1 if quick else 2}
    if quick:
        opts["damping_multipliers"] = (1, 100, 1e4)
    return class_detection_experiment(
        [r["text"] for r in tr],
        [r[cls_key] for r in tr],
        [r["text"] for r in te],
        [r[cls_key] for r in te],
        train_prompts=[r["prompt"] for r in tr],
        test_prompts=[r["prompt"] for r in te],
        methods=methods,
        settings=ClassDetectionSettings(**opts),
        dataset=dataset,
        seed=seed,
        report_dir=out,
        progress=progress,
        log=log,
    )
