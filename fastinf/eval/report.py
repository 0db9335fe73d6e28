"""Experiment reports: ``report.md`` (tables), ``results.json`` (everything) and PNG plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..utils import atomic_write, fmt, markdown_table, pm, write_json

__all__ = [
    "ROWS_NOTE",
    "accuracy_text",
    "answer_lines",
    "damping_section",
    "lambda_text",
    "paired_section",
    "plot_auc_by_method",
    "plot_auc_vs_damping",
    "plot_detection_curves",
    "plot_time_vs_auc",
    "section",
    "sweep_tables",
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


#: what the baseline, label-free and checkpoint rows of a mislabel table are
ROWS_NOTE = (
    "Rows: the gradient methods score the influence on the mean test loss; '(label-free λ)' runs the method at the "
    "λ the damping rule picks from the training gradients alone; tracin_cp = −Σ_t η_t ⟨g_t(i), ḡ_t(test)⟩ over the "
    "checkpoints; '(checkpoint ensemble)' = the mean of that method's scores over the checkpoints after the initial "
    "one. Rows that need no test set rank by the final training loss, the gradient norm ‖g_i‖ or the self-influence "
    "−I(i, i) = g_iᵀH⁻¹g_i of a method (high = suspicious)."
)


def accuracy_text(meta: dict) -> str:
    """Test accuracy of an experiment's meta: the value, or mean ± sd and the per-seed values."""
    acc = f"{meta['test_accuracy']:.3f}"
    if meta.get("per_seed") and len(meta["per_seed"]) > 1:
        per = ", ".join(f"{p['test_accuracy']:.3f}" for p in meta["per_seed"])
        acc += f" ± {meta.get('test_accuracy_sd', 0):.3f} (per seed {per})"
    return acc


def lambda_text(lam: Any) -> str:
    """A λ cell: one value, ``min…max`` for [min, max] (over blocks or seeds), ``—`` for none."""
    if lam is None:
        return "—"
    if isinstance(lam, (list, tuple)):
        return f"{lam[0]:.2g}…{lam[1]:.2g}"
    return f"{lam:.3g}"


def _p_text(p: float | None) -> str:
    return "—" if p is None else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def paired_section(
    paired: Mapping[str, Mapping[str, Any]], label: Any = str, reference: str = "datainf"
) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of paired differences against ``reference`` over data seeds (largest mean first)."""
    headers = [
        "method",
        f"AUC − {reference} per seed",
        "mean ± sd",
        "wins",
        "paired t",
        "p (two-sided)",
        "beyond seed noise",
    ]
    rows = []
    for m, r in sorted(paired.items(), key=lambda kv: -kv[1]["mean"]):
        t = r.get("t")
        rows.append(
            [
                label(m),
                ", ".join(f"{d:+.3f}" for d in r["diffs"]),
                f"{r['mean']:+.3f} ± {r['sd']:.3f}",
                f"{r['wins']}/{r['k']}",
                "—" if t is None else f"{t:+.2f}",
                _p_text(r.get("p")),
                "yes" if r["beyond_noise"] else "no",
            ]
        )
    return headers, rows


def answer_lines(
    result: Mapping[str, Mapping[str, Any]], paired: Mapping[str, Any], label: Any = str, metric: str = "AUC"
) -> list[str]:
    """The report's opening: which method to use on this data and how sure the seeds make us.

    ``result``: ``{method: {"auc", "auc_std", "seconds", ...}}``; ``paired``: ``{"best", "vs_best",
    "reference", "vs_reference"}`` from the experiment (empty with one seed: then the answer says that
    one seed cannot separate the methods)."""
    ok = {m: r for m, r in result.items() if r.get("auc") is not None}
    if not ok:
        return ["No method produced scores."]
    best = paired.get("best") or max(ok, key=lambda m: ok[m]["auc"])
    b = ok[best]
    k = len(next(iter(ok.values())).get("seed_aucs") or [None])
    head = (
        f"**Use {label(best)}** on this data: {metric} {b['auc']:.3f} ± {b.get('auc_std') or 0:.3f} "
        f"({'mean ± sd over ' + str(k) + ' data seeds' if k > 1 else 'one data seed'}), "
        f"{b['seconds']:.1f} s to score."
    )
    lines = [head]
    if not paired:
        lines.append(
            "How sure: not at all from this run alone: one data seed cannot tell methods apart (the spread "
            "between data seeds on this task is about ±0.1 AUC); run more seeds (`--data-seeds`)."
        )
        return lines
    vs_best = paired.get("vs_best", {})
    tied = [m for m, r in vs_best.items() if not r["beyond_noise"]]
    worse = [m for m, r in vs_best.items() if r["beyond_noise"] and r["mean"] < 0]
    if tied:
        lines.append(
            f"How sure: {label(best)} is ahead of every other method on average, but not beyond seed noise against "
            f"{len(tied)} of them ({', '.join(label(m) for m in sorted(tied, key=lambda m: -ok[m]['auc'])[:5])}"
            f"{', …' if len(tied) > 5 else ''}): those are statistical ties at {k} seeds. It is ahead beyond "
            f"noise of {len(worse)} methods."
        )
        cheap = min([best, *tied], key=lambda m: ok[m]["seconds"])
        if cheap != best:
            lines.append(
                f"The cheapest method tied with it is {label(cheap)} ({metric} {ok[cheap]['auc']:.3f}, "
                f"{ok[cheap]['seconds']:.2f} s)."
            )
    else:
        lines.append(f"How sure: {label(best)} is ahead of every other method beyond seed noise ({k} seeds).")
    ref, vs_ref = paired.get("reference"), paired.get("vs_reference", {})
    if ref and best != ref and best in vs_ref:
        r = vs_ref[best]
        lines.append(
            f"Against {label(ref)} (the default): {r['mean']:+.3f} ± {r['sd']:.3f} {metric} per seed, "
            f"{r['wins']}/{r['k']} seeds higher, paired t p = {_p_text(r.get('p'))}: "
            + ("beyond seed noise." if r["beyond_noise"] else "within seed noise.")
        )
    if ref and vs_ref:
        beyond = [m for m, r in vs_ref.items() if r["beyond_noise"]]
        lines.append(
            f"Beyond seed noise against {label(ref)}: "
            + (", ".join(f"{label(m)} ({vs_ref[m]['mean']:+.3f})" for m in beyond) if beyond else "none")
            + f". Rule: paired t-test over the {k} data seeds, two-sided, p < 0.05"
            + (f" (with {k} seeds: |mean difference| > {_t_crit(k):.2f} · sd/√{k})." if k > 1 else ".")
        )
    return lines


def _t_crit(k: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df=k - 1))


def sweep_tables(sweeps: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of each sweep run: damping (AUC vs multiplier) and RRInf iterations."""
    out = []
    if sweeps.get("damping"):
        out.append(("AUC vs damping multiplier (λ = multiplier × the 'auto' λ)", *damping_section(sweeps["damping"])))
    if sweeps.get("rrinf_iterations"):
        rows = [[f"{k:,} iterations", pm(*v)] for k, v in sweeps["rrinf_iterations"].items()]
        rows.append(["rrinf_fixed_point (closed form)", f"{sweeps['rrinf_fixed_point']:.3f}"])
        out.append(("RRInf iterations vs its fixed point", ["RRInf", "AUC"], rows))
    return out


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


def plot_time_vs_auc(
    path: Path,
    points: Mapping[str, tuple[float, float]],
    title: str,
    ylabel: str = "AUC",
    errors: Mapping[str, float] | None = None,
) -> None:
    """Seconds (log) vs the metric, one labelled point per method; ``errors``: ± bars (seed sd)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, (sec, auc) in points.items():
        err = (errors or {}).get(name)
        if err:
            ax.errorbar([max(sec, 1e-4)], [auc], yerr=[err], fmt="o", ms=5, capsize=3)
        else:
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


def plot_auc_by_method(
    path: Path, values: Mapping[str, tuple[float, float]], title: str, ylabel: str = "AUC", chance: float = 0.5
) -> None:
    """Horizontal bars of the metric per method (sorted), with ± sd error bars and the chance line."""
    plt = _plt()
    items = sorted(values.items(), key=lambda kv: kv[1][0])
    fig, ax = plt.subplots(figsize=(6.8, 0.28 * len(items) + 1.4))
    ys = np.arange(len(items))
    ax.barh(ys, [v[0] for _, v in items], xerr=[v[1] for _, v in items], capsize=3, color="#4c72b0", alpha=0.85)
    ax.set_yticks(ys, [k for k, _ in items], fontsize=8)
    ax.axvline(chance, color="k", ls=":", lw=1)
    lo = min(v[0] - v[1] for _, v in items)
    ax.set_xlim(max(0.0, min(chance, lo) - 0.05), 1.0)
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
