"""Experiment reports: ``report.md`` (tables), ``results.json`` (everything) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fmt", "markdown_table", "plot_auc_vs_damping", "plot_detection_curves", "plot_time_vs_auc", "write_json"]


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}f}"
    return str(x)


def pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if mean is None:
        return "—"
    return fmt(mean, digits) if not std else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cols = [list(map(str, c)) for c in zip(headers, *rows, strict=False)]
    w = [max(len(x) for x in c) for c in cols]
    out = ["  ".join(h.ljust(w[i]) for i, h in enumerate(headers)), "  ".join("-" * x for x in w)]
    out += ["  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(out)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1))
    os.replace(tmp, path)


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
