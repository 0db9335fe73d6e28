"""What every experiment shares: the result container and small argument checks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import hf
from ..runner import mean_std

__all__ = [
    "mislabel_split",
    "train_mislabel_model",
    "ExperimentResult",
    "aggregate_seeds",
    "failed_methods",
    "lambda_range",
    "paired_comparison",
    "paired_over_seeds",
    "prepare_report_dir",
    "row_order",
    "seed_meta",
    "seed_stats",
]

#: the paired test's two-sided level: a difference "exceeds seed noise" when the paired t-test rejects at it
PAIRED_ALPHA = 0.05


class ExperimentResult(dict):
    """``{method: record}`` (the record's keys depend on the experiment) with the run's context:

    * ``meta``: sizes, settings, timings, model name;
    * ``sweeps``: the damping / iteration sensitivity results (empty when not run);
    * ``paired``: the paired comparisons over data seeds (empty with one seed);
    * ``report_dir``: where ``report.md``, ``results.json`` and the plots were written, or None;
    * :meth:`summary`: the console text of the result (tables and a one-line context).
    """

    meta: dict
    sweeps: dict
    report_dir: Path | None
    summary_text: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: paired comparisons over data seeds (:func:`paired_comparison`); empty with one data seed
        self.paired: dict = {}

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


def seed_stats(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample sd with ddof = 1) of one metric over data seeds; sd 0 for a single seed.

    Raises:
        ValueError: no values or a non-finite one.
    """
    a = np.asarray(list(values), dtype=np.float64)
    if a.size == 0 or not np.isfinite(a).all():
        raise ValueError(f"seed_stats needs finite values, got {list(values)}")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def paired_comparison(
    per_seed: Mapping[str, Sequence[float | None]], reference: str, *, alpha: float = PAIRED_ALPHA
) -> dict[str, dict[str, Any]]:
    """Each method against ``reference`` over the same data seeds: ``{method: record}`` with
    ``diffs`` (method − reference, per seed), ``mean``, ``sd`` (ddof = 1), ``t`` and ``p`` (two-sided
    paired t-test, df = k − 1; None with fewer than 2 seeds or zero spread), ``wins`` (seeds where the
    method is higher), ``k`` and ``beyond_noise``: p < ``alpha``. A seed where either is None is left
    out of that pair. The rule is stated so that a report can quote it: with k = 3 seeds a
    difference must exceed t₀.₉₇₅(2) · sd/√3 ≈ 2.48 sd.

    Raises:
        ValueError: ``reference`` is not in ``per_seed``.
    """
    from scipy import stats

    if reference not in per_seed:
        raise ValueError(f"reference method {reference!r} has no per-seed values")
    ref = list(per_seed[reference])
    out: dict[str, dict[str, Any]] = {}
    for m, vals in per_seed.items():
        if m == reference:
            continue
        pairs = [(v, r) for v, r in zip(vals, ref, strict=False) if v is not None and r is not None]
        if not pairs:
            continue
        d = np.asarray([v - r for v, r in pairs], dtype=np.float64)
        k = d.size
        sd = float(d.std(ddof=1)) if k > 1 else 0.0
        t = p = None
        if k > 1 and sd > 0:
            t = float(d.mean() / (sd / math.sqrt(k)))
            p = float(2 * stats.t.sf(abs(t), df=k - 1))
        elif k > 1 and d.mean() != 0:  # identical non-zero differences in every seed
            t, p = math.copysign(math.inf, float(d.mean())), 0.0
        out[m] = {
            "diffs": d.tolist(),
            "mean": float(d.mean()),
            "sd": sd,
            "t": t,
            "p": p,
            "wins": int((d > 0).sum()),
            "k": k,
            "beyond_noise": p is not None and p < alpha,
        }
    return out


# ------------------------------------------------------------------------------------ over data seeds
def lambda_range(values: list) -> float | list[float] | None:
    """One λ over seeds: the value when every seed chose it, else [min, max] over seeds (and blocks)."""
    flat = [x for v in values if v is not None for x in (v if isinstance(v, (list, tuple)) else [v])]
    if not flat:
        return None
    return flat[0] if len(set(flat)) == 1 else [min(flat), max(flat)]


def aggregate_seeds(per_seed: list[dict], rows: list[str]) -> ExperimentResult:
    """One record per method over the data seeds: ``auc`` ± ``auc_std`` is the mean ± sample sd over
    data seeds of each seed's AUC (a stochastic method's AUC in a seed: the mean over its method seeds);
    with one data seed, ± is the spread over method seeds. ``seed_aucs``: per data seed (None where it
    failed); ``aucs``: every (data seed × method seed) AUC, data seed first."""
    out = ExperimentResult()
    for m in rows:
        recs = [p["methods"].get(m) or {} for p in per_seed]
        skipped = next((r["skipped"] for r in recs if r.get("skipped")), None)
        ok = [r for r in recs if r.get("auc") is not None]
        if not ok:
            err = next((r.get("error") for r in recs if r.get("error")), None if skipped else "not run")
            out[m] = {"auc": None, "auc_std": None, "seconds": None, "corr_with_exact": None}
            out[m].update({"skipped": skipped} if skipped else {"error": err})
            continue
        aucs = [a for r in ok for a in r["aucs"]]
        seed_aucs = [float(np.mean(r["aucs"])) if r.get("auc") is not None else None for r in recs]
        if len(ok) > 1:
            auc, auc_std = seed_stats([a for a in seed_aucs if a is not None])
        else:
            auc, auc_std = float(np.mean(aucs)), float(np.std(aucs)) if len(aucs) > 1 else 0.0
        out[m] = {
            "auc": auc,
            "auc_std": auc_std,
            "seed_aucs": seed_aucs,
            "aucs": aucs,
            "seconds": float(np.mean([r["seconds"] for r in ok])),
            "peak_mb": float(np.max([r.get("peak_mb", 0.0) for r in ok])),
            "corr_with_exact": mean_std([r.get("pearson") for r in ok])[0],
            "spearman_with_exact": mean_std([r.get("spearman") for r in ok])[0],
            **{k: v for k, v in ok[0].items() if k in ("converged", "note", "diagnostics", "seeds", "rule")},
        }
        if any("converged" in r for r in ok):  # converged only if it converged in every data seed
            out[m]["converged"] = all(bool(r.get("converged", True)) for r in ok)
        lam = lambda_range([r.get("lambda") for r in ok])
        if lam is not None:
            out[m]["lambda"] = lam
        if len(ok) < len(recs):
            out[m]["failed_seeds"] = [
                p["meta"]["seed"] for p, r in zip(per_seed, recs, strict=True) if r.get("auc") is None
            ]
    return out


def row_order(per_seed: list[dict]) -> list[str]:
    """Influence rows first (the gradient methods, label-free λ, checkpoint methods, trace methods),
    then the rows that need no test set (training loss, gradient norm, self-influence)."""
    keys = list(dict.fromkeys(k for p in per_seed for k in p["methods"]))
    no_test = ("train_loss", "grad_norm")
    first = [k for k in keys if k not in no_test and not k.endswith("_self")]
    return first + [k for k in keys if k not in first]


def seed_meta(per_seed: list[dict], seeds: list[int]) -> dict[str, Any]:
    """The first seed's meta with the seeds' accuracies and times (mean ± sd) and a per-seed list."""
    meta = {**per_seed[0]["meta"], "seeds": seeds}
    keys = ("test_accuracy", "train_accuracy_true_labels", "train_seconds", "grad_seconds", "total_seconds")
    meta["per_seed"] = [{"seed": p["meta"]["seed"], **{k: p["meta"].get(k) for k in keys}} for p in per_seed]
    for k in keys:
        vals = [p["meta"][k] for p in per_seed if p["meta"].get(k) is not None]
        if vals:
            meta[k], meta[k + "_sd"] = seed_stats(vals)
    meta["total_seconds_all_seeds"] = float(sum(p["meta"].get("total_seconds", 0.0) for p in per_seed))
    return meta


def paired_over_seeds(result: ExperimentResult, reference: str) -> dict[str, Any]:
    """Paired comparisons over data seeds (:func:`paired_comparison`): every method against
    ``reference``, and the best method (highest mean AUC) against each other; empty with one data seed."""
    per_seed = {m: r["seed_aucs"] for m, r in result.items() if r.get("seed_aucs")}
    if len(result.meta["seeds"]) < 2 or not per_seed:
        return {}
    out: dict[str, Any] = {"reference": reference if reference in per_seed else None}
    if out["reference"]:
        out["vs_reference"] = paired_comparison(per_seed, reference)
    best = max(per_seed, key=lambda m: result[m]["auc"])
    out["best"], out["vs_best"] = best, paired_comparison(per_seed, best)
    return out


def mislabel_split(labels: np.ndarray, s: Any, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The mislabel task of data seed ``seed`` (``s``: its ``n_train``, ``n_test`` and ``flip``, e.g.
    :class:`.mislabel.MislabelSettings`): (train indices, test indices, training labels with flips, flipped
    mask (n_train,)). One seeded permutation gives the split, the same generator then flips
    round(flip · n_train) training labels; :mod:`.lds` builds its task with it too."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(labels))
    tr_idx, te_idx = perm[: s.n_train], perm[s.n_train : s.n_train + s.n_test]
    y_tr = labels[tr_idx].copy()
    n_flip = int(round(s.flip * s.n_train))
    flipped = np.zeros(s.n_train, dtype=bool)
    flipped[rng.choice(s.n_train, n_flip, replace=False)] = True
    y_tr[flipped] = 1 - y_tr[flipped]
    return tr_idx, te_idx, y_tr, flipped


def train_mislabel_model(net: Any, train_ds: Any, tok: Any, s: Any, seed: int, ck_dir: Path, *, progress: bool = False):
    """The mislabel recipe (``s``: a :class:`.mislabel.MislabelSettings`): :func:`fastinf.eval.hf.train_classifier`
    with the settings' batch size, epochs, learning rates and checkpoints per epoch. The one place the recipe is
    spelled out, so that the experiment, ``fastinf eval lds``'s retrained models and the benchmarks train alike.
    Returns the checkpoints."""
    return hf.train_classifier(
        net,
        train_ds,
        tok,
        batch_size=s.batch_size,
        epochs=s.epochs,
        lr_lora=s.lr_lora,
        lr_head=s.lr_head,
        checkpoints_per_epoch=s.checkpoints_per_epoch,
        seed=seed,
        ck_dir=ck_dir,
        progress=progress,
    )
