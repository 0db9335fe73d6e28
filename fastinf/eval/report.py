"""Experiment reports: ``report.md`` (tables), ``results.json`` (everything) and PNG plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write, fmt, markdown_table, write_json

__all__ = [
    "damping_section",
    "plot_auc_vs_damping",
    "plot_detection_curves",
    "plot_time_vs_auc",
    "section",
    "write_report",
]


def section(title: str | None, headers: Sequence[Any], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Markdown lines of a titled table (``## title``, blank line, table, blank line)."""
    head = [f"## {title}", ""] if title else []
    return [*head, markdown_table(headers, rows), ""]


def damping_section(sweep: Mapping[str, Mapping[float, float]]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a damping sweep ``{method: {multiplier: value}}``."""
    mults = sorted(next(iter(sweep.values())))
    return ["method", *[f"×{m:g}" for m in mults]], [[k, *[fmt(v[m]) for m in mults]] for k, v in sweep.items()]


def write_report(
    out: str | Path,
    *,
    markdown: Sequence[str],
    results: Mapping[str, Any],
    scores: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``report.md`` (the lines of ``markdown``), ``results.json`` and, when given, ``scores.json``
    into ``out`` (created if needed), each atomically. Returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    if scores is not None:
        write_json(out / "scores.json", scores)
    atomic_write(out / "report.md", "\n".join(markdown).rstrip("\n") + "\n")
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_detection_curves(path: Path, curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> None:
    """Fraction of flipped points found vs fraction inspected, one line per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, lw=1.6)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="random")
    ax.set_xlabel("fraction of training data inspected (by descending score)")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_vs_auc(path: Path, points: Mapping[str, tuple[float, float]], title: str, ylabel: str = "AUC") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, (sec, auc) in points.items():
        ax.scatter([max(sec, 1e-4)], [auc], s=30)
        ax.annotate(name, (max(sec, 1e-4), auc), fontsize=8, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (fit + score, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auc_vs_damping(
    path: Path, sweeps: Mapping[str, Mapping[float, float]], title: str, ylabel: str = "AUC"
) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, pts in sweeps.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("damping multiplier (× the 'auto' λ = 0.1 × mean squared gradient)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
