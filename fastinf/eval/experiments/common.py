"""What every experiment shares: the result container and small argument checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["ExperimentResult", "failed_methods", "prepare_report_dir"]


class ExperimentResult(dict):
    """``{method: record}`` (the record's keys depend on the experiment) with the run's context:

    * ``meta``: sizes, settings, timings, model name;
    * ``sweeps``: the damping / iteration sensitivity results (empty when not run);
    * ``report_dir``: where ``report.md``, ``results.json`` and the plots were written, or None;
    * :meth:`summary`: the console text of the result (tables and a one-line context).
    """

    meta: dict
    sweeps: dict
    report_dir: Path | None
    summary_text: str = ""

    def summary(self) -> str:
        """The result as console text: the method table, the sweeps and where the report is."""
        return self.summary_text


def failed_methods(result: ExperimentResult) -> dict[str, str]:
    """``{method: error}`` of the methods that ran and produced no result (skipped ones excluded)."""
    return {
        k: str(v.get("error") or "no result")
        for k, v in result.items()
        if v.get("auc") is None and not v.get("skipped")
    }


def prepare_report_dir(path: str | Path | None) -> Path | None:
    """``path`` as a directory (created); None stays None.

    Raises:
        ValueError: ``path`` exists and is not a directory.
    """
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"report directory {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def settings_dict(settings: Any) -> dict[str, Any]:
    """A settings dataclass as a plain dict (for results.json)."""
    return dict(vars(settings))
