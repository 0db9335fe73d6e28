"""The linear datamodeling score with real retraining (METHODS.md §9): ``fastinf eval lds``.

* :func:`lds_experiment`: on any binary text data, build the mislabel task of
  :func:`~fastinf.eval.mislabel_experiment` (same split, flips and fine-tuning recipe), train the
  full-data model, retrain it on S seeded random subsets (a share ``fraction`` of the training set,
  one training seed per subset) and record every subset model's per-example test losses (S, m); then
  score every gradient method's (m, n) influence from the full model's gradients and report each
  method's LDS (:func:`fastinf.eval.lds`) with a bootstrap interval over test examples.
* :func:`lds_demo`: the same on Rotten Tomatoes with MiniLM + LoRA and the demo's settings.

Retrained models are cached (:class:`RetrainCache`): each subset's test losses and adapter weights
under a key of the recipe (settings, data, model, the training code), one file per subset, written
atomically, so that scoring another method never retrains and an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import io
import json
import os
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ...estimators import available_methods
from ...gradients import LoRAGradientCollector
from ...traces import loss_table
from ...utils import atomic_write, git_commit, loadavg, pm, text_table, timed, version_string, write_json
from .. import hf
from ..checkpoint_influence import collector_capture_options, needs_factors
from ..metrics import agreement, bootstrap_ci, lds, mislabel_auc
from ..report import damping_section, plot_auc_vs_damping, section, write_report
from ..runner import damping_sweep, run_gradient_methods, run_label_free, split_methods
from .common import ExperimentResult, mislabel_split, prepare_report_dir, settings_dict, train_mislabel_model
from .mislabel import MislabelSettings

__all__ = ["LDSSettings", "RetrainCache", "lds_demo", "lds_experiment"]

#: MislabelSettings fields that decide the task and the trained models (the cache key); not
#: checkpoints_per_epoch, which only decides which adapters the callback saves along the way.
RECIPE_FIELDS = ("n_train", "n_test", "flip", "epochs", "batch_size", "max_length", "lora_r", "lr_lora", "lr_head")
GCV_ROW = "exact (GCV λ)"
LABEL_FREE_ROWS = ("exact (label-free λ)", "datainf (label-free λ)")


@dataclass
class LDSSettings:
    """What the LDS run adds to the mislabel recipe: the subsets, the interval and the extra rows."""

    subsets: int = 32
    fraction: float = 0.5
    subset_seed: int = 1000  # subset k is drawn from, and trained with, seed subset_seed + k
    n_boot: int = 2000
    n_boot_subsets: int = 500  # resamples of the S subsets (0: no subset interval)
    level: float = 0.95
    label_free: bool = True  # the rows that choose λ with select_damping (GCV and the label-free default)
    damping_multipliers: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5, 1e6)
    sweeps: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.subsets, bool) or not isinstance(self.subsets, int) or self.subsets < 3:
            raise ValueError(f"LDSSettings.subsets must be an int >= 3 (a rank correlation), got {self.subsets!r}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"LDSSettings.fraction must be in (0, 1), got {self.fraction}")
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 1:
            raise ValueError(f"LDSSettings.n_boot must be a positive int, got {self.n_boot!r}")
        if not 0 < self.level < 1:
            raise ValueError(f"LDSSettings.level must be in (0, 1), got {self.level}")


# ------------------------------------------------------------------------------------ the cache
class RetrainCache:
    """Retrained models on disk: ``root/<key>/<name>.pt`` (test losses, adapter weights, timings).

    ``key`` is a SHA-256 prefix of ``recipe`` (JSON), which ``root/<key>/recipe.json`` records. A file
    that cannot be read is reported (warning) and trained again.
    """

    def __init__(self, root: str | Path, recipe: dict[str, Any]) -> None:
        text = json.dumps(recipe, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.dir = Path(root).expanduser() / self.key
        self.recipe = recipe

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.pt"

    def load(self, name: str) -> dict[str, Any] | None:
        p = self.path(name)
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged entry is retrained, not fatal
            warnings.warn(f"LDS cache: {p} is unreadable ({type(e).__name__}); training it again", stacklevel=2)
            return None

    def save(self, name: str, record: dict[str, Any]) -> None:
        if not (self.dir / "recipe.json").is_file():
            write_json(self.dir / "recipe.json", self.recipe)
        buf = io.BytesIO()
        torch.save(record, buf)
        atomic_write(self.path(name), buf.getvalue(), durable=True)


def default_cache_dir() -> Path:
    """``$FASTINF_CACHE/lds``, else ``$XDG_CACHE_HOME/fastinf/lds``, else ``~/.cache/fastinf/lds``."""
    if os.environ.get("FASTINF_CACHE"):
        return Path(os.environ["FASTINF_CACHE"]).expanduser() / "lds"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastinf" / "lds"


def _code_digest() -> str:
    """Digest of the code that builds and trains the models, docstrings left out (a change there
    invalidates the cache; a change of wording does not)."""
    import ast

    parts = []
    for f in (hf.text_classifier, hf.train_classifier, hf.trainer_args, mislabel_split, train_mislabel_model, _train):
        tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
                if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
        parts.append(ast.dump(tree))
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ task and training
def subset_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded random subset of exactly round(fraction · n) of n training examples, as (n,) booleans."""
    k = int(round(fraction * n))
    if not 1 <= k < n:
        raise ValueError(f"fraction {fraction} of n = {n} training examples gives a subset of {k}; need 1..{n - 1}")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    return mask


def _train(model, texts, labels, s: MislabelSettings, seed: int) -> tuple[Any, Any, float]:
    """(tokenizer, trained peft model, seconds): the mislabel recipe on (texts, labels) with ``seed``."""
    torch.manual_seed(seed)
    tok, net = hf.text_classifier(model, 2, s.lora_r)
    ds = hf.TextDataset(tok(list(texts), truncation=True, max_length=s.max_length), labels)
    with tempfile.TemporaryDirectory(prefix="fastinf-lds-") as work:
        t0 = time.perf_counter()
        train_mislabel_model(net, ds, tok, s, seed, Path(work) / "checkpoints", progress=False)
        sec = time.perf_counter() - t0
    return tok, net, sec


def _adapter(net) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in net.named_parameters() if p.requires_grad}


def _evaluate(net, test_loader) -> tuple[torch.Tensor, float]:
    """(per-example test losses (m,) float64, test accuracy) of the model as it is."""
    losses = loss_table(net, [_adapter(net)], test_loader, progress=False)[0]
    return losses, hf.accuracy(net, test_loader)


def _trained(cache: RetrainCache, name: str, model, texts, labels, s, seed, test_texts, test_labels, extra=None):
    """The cached record of a trained model, training (and caching) it when absent. Returns (record, net|None)."""
    rec = cache.load(name)
    if rec is not None and all(
        torch.equal(torch.as_tensor(rec.get(k)), torch.as_tensor(v)) for k, v in (extra or {}).items()
    ):
        return rec, None
    tok, net, sec = _train(model, texts, labels, s, seed)
    test_ds = hf.TextDataset(tok(list(test_texts), truncation=True, max_length=s.max_length), test_labels)
    losses, acc = _evaluate(net, hf.text_loader(test_ds, tok, s.batch_size))
    rec = {"test_losses": losses, "adapter": _adapter(net), "seconds": sec, "test_accuracy": acc, "seed": seed}
    rec.update(extra or {})
    cache.save(name, rec)
    return rec, net


# ------------------------------------------------------------------------------------ scoring
def _row(scores: list[torch.Tensor], subsets, losses, flipped, L: LDSSettings, sec, extra=None) -> dict:
    """LDS (per seed, then the mean per test example over seeds), its interval and the mislabel AUC."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per = np.nanmean([lds(sc.numpy(), subsets, losses)[1] for sc in scores], axis=0)
    excluded = int(np.isnan(per).sum())
    rec: dict[str, Any] = {
        "lds": float(np.nanmean(per)) if excluded < per.size else None,
        "lds_ci": list(bootstrap_ci(per, n_boot=L.n_boot, level=L.level)) if excluded < per.size else None,
        "per_test": per,
        "excluded_test_points": excluded,
        "auc": float(np.mean([mislabel_auc(sc.mean(0).numpy(), flipped) for sc in scores])),
        "seconds": float(np.mean(sec)),
    }
    if caught:
        rec["warnings"] = sorted({str(w.message)[:200] for w in caught})
    rec.update(extra or {})
    return rec


def _label_free_runs(gtr, gte, say) -> dict[str, Any]:
    """The rows whose λ select_damping picks, as (m, n) runs: exact at the GCV λ and the label-free rows."""
    gcv = run_label_free(gtr, gte, ["exact"], reduce=None, rule=("gcv", {}), progress=False)["exact_label_free"]
    free = run_label_free(gtr, gte, [r.split()[0] for r in LABEL_FREE_ROWS], reduce=None, progress=False)
    out = {GCV_ROW: gcv, **{row: free[f"{row.split()[0]}_label_free"] for row in LABEL_FREE_ROWS}}
    for row, run in out.items():
        if not run.error:
            say(f"{row}: {run.info['note']}: λ = {run.info['lambda']}")
    return out


# ------------------------------------------------------------------------------------ the experiment
def lds_experiment(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    model: str | Callable = "minilm",
    settings: MislabelSettings | None = None,
    lds_settings: LDSSettings | None = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """LDS of every gradient method against models retrained on random subsets (METHODS.md §9).

    The task is the mislabel experiment's for data seed ``seed`` (``settings``: sizes, flips and the
    fine-tuning recipe; default ``MislabelSettings()``). The full-data model (trained with ``seed``,
    as in the mislabel experiment) gives the per-example gradients; subset k of ``lds_settings``
    (``fraction`` of the training set) is drawn from, and its model trained with, seed
    ``subset_seed + k``. Methods: ``methods`` (gradient methods; default every registered one) with
    the settings' damping, plus "exact (GCV λ)", "exact (label-free λ)" and "datainf (label-free λ)"
    with λ from ``select_damping`` (``lds_settings.label_free``). ``cache_dir``: where retrained
    models are kept (default :func:`default_cache_dir`).

    Returns ``{row: {"lds", "lds_ci", "lds_ci_subsets", "vs_reference", "per_test", "auc", "seconds",
    "lambda", ...}}`` (intervals over test examples and over the subsets; ``vs_reference``: the paired
    difference to "exact (GCV λ)", else "exact"; ``auc``: the mislabel AUC of the same scores averaged
    over test examples) with ``.meta`` (sizes, timings,
    settings, commit), ``.sweeps`` (LDS vs damping multiplier), ``.data`` (``subsets`` (S, n) booleans
    and ``test_losses`` (S, m)) and ``.summary()``; with ``report_dir``
    report.md and results.json (with the subsets and the retrained models' test losses).

    Raises:
        ValueError: unknown or non-gradient methods, non-binary labels, too few examples, bad settings.
    """
    s = settings or MislabelSettings()
    L = lds_settings or LDSSettings()
    grad_methods, trace_methods = split_methods(methods, default=available_methods("gradients"))
    if trace_methods:
        raise ValueError(f"LDS scores gradient methods only; {', '.join(trace_methods)} take loss traces")
    y = np.asarray(labels)
    if len(texts) != len(y):
        raise ValueError(f"{len(texts)} texts but {len(y)} labels")
    if set(np.unique(y).tolist()) - {0, 1}:
        raise ValueError("lds_experiment needs binary labels 0/1")
    if s.n_train + s.n_test > len(texts):
        raise ValueError(f"n_train + n_test = {s.n_train + s.n_test} exceeds the {len(texts)} examples given")
    subset_mask(s.n_train, L.fraction, 0)  # the subset size is valid
    out = prepare_report_dir(report_dir)
    say = log or (lambda _msg: None)
    t_start = time.perf_counter()
    model_id = model if isinstance(model, str) else f"{model.__module__}.{model.__qualname__}"
    recipe = {
        "settings": {k: getattr(s, k) for k in RECIPE_FIELDS},
        "data_seed": seed,
        "fraction": L.fraction,
        "model": model_id,
        "data": hashlib.sha256(json.dumps([list(texts), y.tolist()]).encode()).hexdigest()[:16],
        "code": _code_digest(),
        # a retrained model depends on the software stack and the device too (never mixed in one table)
        "software": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft")},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    cache = RetrainCache(cache_dir or default_cache_dir(), recipe)
    tr_idx, te_idx, y_tr, flipped = mislabel_split(y, s, seed)
    tr_texts, te_texts, y_te = [texts[i] for i in tr_idx], [texts[i] for i in te_idx], y[te_idx]
    say(f"LDS: cache {cache.dir}; full-data model ({s.n_train} examples, {int(flipped.sum())} flipped)")

    full, _ = _trained(cache, "full", model, tr_texts, y_tr, s, seed, te_texts, y_te)
    seeds = [L.subset_seed + k for k in range(L.subsets)]
    masks = np.stack([subset_mask(s.n_train, L.fraction, sk) for sk in seeds])
    recs, trained_now = [], 0
    bar = tqdm(seeds, desc="retraining on subsets", unit="model", disable=not progress)
    for mask, sk in zip(masks, bar, strict=True):
        sub = np.flatnonzero(mask)
        rec, fresh = _trained(
            cache, f"subset-{sk}", model, [tr_texts[i] for i in sub], y_tr[sub], s, sk, te_texts, y_te,
            extra={"subset": torch.from_numpy(mask)},
        )  # fmt: skip
        trained_now += fresh is not None
        recs.append(rec)
    losses = torch.stack([r["test_losses"] for r in recs]).double().numpy()  # (S, m)
    retrain_sec = float(sum(r["seconds"] for r in recs))
    say(f"LDS: {L.subsets} subset models ({trained_now} trained now, {L.subsets - trained_now} from the cache)")

    # the full-data model's gradients
    torch.manual_seed(seed)
    tok, net = hf.text_classifier(model, 2, s.lora_r)
    with torch.no_grad():
        params = dict(net.named_parameters())
        for k, v in full["adapter"].items():
            params[k].copy_(v)
    enc = lambda t: tok(list(t), truncation=True, max_length=s.max_length)  # noqa: E731
    train_loader = hf.text_loader(hf.TextDataset(enc(tr_texts), y_tr), tok, s.batch_size)
    test_loader = hf.text_loader(hf.TextDataset(enc(te_texts), y_te), tok, s.batch_size)
    col = LoRAGradientCollector(net, include_modules_to_save=True)
    # K-FAC-type methods need the blocks' Kronecker factors of the training set (METHODS.md §11)
    kw = collector_capture_options(col, needs_factors(grad_methods))
    (gtr, gte), grad_sec, _ = timed(
        lambda: (col.collect(train_loader, progress=progress, **kw), col.collect(test_loader, progress=progress))
    )

    # every method's (m, n) scores and their LDS
    t0 = time.perf_counter()
    runs = run_gradient_methods(
        gtr, gte, grad_methods, reduce=None, seeds=s.rrinf_seeds, damping=s.damping, lissa_depth=s.lissa_depth,
        progress=progress,
    )  # fmt: skip
    result, scored = ExperimentResult(), {}
    for name, run in runs.items():
        if run.error or not run.scores:
            result[name] = {"lds": None, "auc": None, "error": run.error or "no scores"}
            continue
        info = {k: v for k, v in run.info.items() if k in ("lambda", "converged", "seeds")}
        result[name] = _row(run.scores, masks, losses, flipped, L, run.seconds, info)
        scored[name] = run.scores
    if L.label_free:
        for row, run in _label_free_runs(gtr, gte, say).items():
            if run.error or not run.scores:
                result[row] = {"lds": None, "auc": None, "error": run.error or "no scores"}
            else:
                info = {k: run.info[k] for k in ("lambda", "rule") if k in run.info}
                result[row] = _row(run.scores, masks, losses, flipped, L, run.seconds, info)
                scored[row] = run.scores
    sweeps: dict[str, Any] = {}
    if L.sweeps:
        swept = [m for m in ("exact", "datainf") if m in grad_methods]
        if swept:
            say("LDS vs damping multiplier (METHODS.md §9)")
            sweeps["damping"] = damping_sweep(
                gtr, gte, L.damping_multipliers, lambda sc: lds(sc, masks, losses)[0], reduce=None, methods=swept,
                progress=progress,
            )  # fmt: skip
    score_sec = time.perf_counter() - t0

    accs = [r["test_accuracy"] for r in recs]
    result.meta = {
        "task": "LDS (linear datamodeling score) on the mislabel task",
        "n_train": s.n_train,
        "n_test": s.n_test,
        "flipped": int(flipped.sum()),
        "subsets": L.subsets,
        "subset_size": int(masks[0].sum()),
        "data_seed": seed,
        "subset_seeds": seeds,
        "settings": settings_dict(s),
        "lds_settings": settings_dict(L),
        "model": hf.model_name(net, model),
        "full_model_test_accuracy": full["test_accuracy"],
        "subset_test_accuracy": [float(np.mean(accs)), float(np.std(accs))],
        "D": gtr.dim,
        "blocks": len(gtr.names),
        "retrain_seconds_total": retrain_sec,
        "retrain_seconds_per_model": retrain_sec / L.subsets,
        "full_train_seconds": full["seconds"],
        "trained_this_run": trained_now,
        "grad_seconds": grad_sec,
        "score_seconds": score_sec,
        "total_seconds": time.perf_counter() - t_start,
        "cache": str(cache.dir),
        "cache_key": cache.key,
        "recipe": recipe,
        "commit": git_commit(),
        "versions": version_string(commit=False),
        "load": loadavg(),
    }
    result.meta["reference"] = _paired(result, L)
    _subset_bootstrap(result, scored, masks, losses, L)
    scored = [r for r in result.values() if r.get("lds") is not None]
    if len(scored) >= 3:  # do LDS and the mislabel AUC of the same scores rank the rows alike?
        ag = agreement([r["lds"] for r in scored], [r["auc"] for r in scored])
        result.meta["lds_vs_auc"] = {"spearman": ag["spearman"], "rows": len(scored)}
    result.sweeps = sweeps
    result.data = {"subsets": masks, "test_losses": losses}
    return _finish(result, masks, losses, out)


def _paired(result: ExperimentResult, L: LDSSettings) -> str | None:
    """Each row's LDS minus the reference row's (exact at GCV λ, else exact), per test example, with an interval."""
    ref = GCV_ROW if result.get(GCV_ROW, {}).get("lds") is not None else "exact"
    if result.get(ref, {}).get("lds") is None:
        return None
    base = result[ref]["per_test"]
    for name, r in result.items():
        if name == ref or r.get("lds") is None:
            continue
        d = base - r["per_test"]
        r["vs_reference"] = {
            "reference": ref,
            "diff": float(np.nanmean(d)),
            "ci": list(bootstrap_ci(d, n_boot=L.n_boot, level=L.level)),
        }
    return ref


def _subset_bootstrap(result: ExperimentResult, scored: dict, masks, losses, L: LDSSettings) -> None:
    """Intervals over the subsets: resample the S (subset, retrained model) pairs with replacement and
    recompute every row's LDS on the same draw (so the paired difference to the reference shares it).
    Sets ``lds_ci_subsets`` and ``vs_reference["ci_subsets"]``."""
    rows = [k for k in scored if result[k].get("lds") is not None]
    if L.n_boot_subsets < 1 or not rows:
        return
    rng = np.random.default_rng(L.subset_seed)
    S = masks.shape[0]
    draws = np.empty((L.n_boot_subsets, len(rows)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample can repeat subsets; constant columns are left out
        for b in range(L.n_boot_subsets):
            idx = rng.integers(0, S, S)
            for c, k in enumerate(rows):
                per = np.nanmean([lds(sc.numpy(), masks[idx], losses[idx])[1] for sc in scored[k]], axis=0)
                draws[b, c] = np.nanmean(per)
    q = [(1 - L.level) / 2, (1 + L.level) / 2]
    ref = result.meta.get("reference")
    for c, k in enumerate(rows):
        result[k]["lds_ci_subsets"] = np.nanquantile(draws[:, c], q).tolist()
        vs = result[k].get("vs_reference")
        if vs is not None and ref in rows:
            vs["ci_subsets"] = np.nanquantile(draws[:, rows.index(ref)] - draws[:, c], q).tolist()
    result.meta["n_boot_subsets"] = L.n_boot_subsets
    if len(rows) >= 2:  # is the top row beyond the subset noise of the runner-up?
        top, second = sorted(range(len(rows)), key=lambda c: -result[rows[c]]["lds"])[:2]
        d = draws[:, top] - draws[:, second]
        result.meta["best_vs_runner_up"] = {
            "best": rows[top],
            "runner_up": rows[second],
            "diff": result[rows[top]]["lds"] - result[rows[second]]["lds"],
            "ci_subsets": np.nanquantile(d, q).tolist(),
        }


# ------------------------------------------------------------------------------------ report
SG = "{:+.3f}"


def _ci(ci, f: str) -> str:
    return "—" if ci is None else f"[{f.format(ci[0])}, {f.format(ci[1])}]"


def lds_table(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) sorted by LDS: LDS [CI], reference − row [CI], mislabel AUC, λ, seconds."""
    level = int(round(100 * result.meta["lds_settings"]["level"]))
    ref = result.meta.get("reference")
    headers = [
        "method",
        "LDS",
        f"{level}% CI (test points)",
        f"{level}% CI (subsets)",
        f"{ref or 'ref'} − method [CI test points; CI subsets]",
        "mislabel AUC",
        "λ",
        "seconds",
    ]
    ok = sorted((r for r in result.items() if r[1].get("lds") is not None), key=lambda kv: -kv[1]["lds"])
    rows = []
    for name, r in ok:
        vs = r.get("vs_reference")
        lam = r.get("lambda")
        lam_text = "—" if lam is None else (f"{lam:.3g}" if isinstance(lam, float) else f"{lam[0]:.2g}…{lam[1]:.2g}")
        rows.append(
            [
                name,
                f"{r['lds']:.3f}",
                f"[{r['lds_ci'][0]:.3f}, {r['lds_ci'][1]:.3f}]",
                _ci(r.get("lds_ci_subsets"), "{:.3f}"),
                "—" if vs is None else f"{vs['diff']:+.3f} {_ci(vs['ci'], '{:+.3f}')}; {_ci(vs.get('ci_subsets'), SG)}",
                f"{r['auc']:.3f}",
                lam_text,
                f"{r['seconds']:.2f}",
            ]
        )
    for name, r in result.items():
        if r.get("lds") is None:
            note = r.get("skipped") or r.get("error") or "no result"
            rows.append([name, "skipped" if r.get("skipped") else "failed", "—", "—", "—", "—", "—", note[:80]])
    return headers, rows


def _intro(meta: dict) -> str:
    s = meta["settings"]
    acc = meta["subset_test_accuracy"]
    return (
        f"Model: {meta['model']}, LoRA r={s['lora_r']} (query, value) + head, {s['epochs']} epochs (the mislabel "
        f"recipe). Task: the mislabel task of data seed {meta['data_seed']}: {meta['n_train']} training examples "
        f"({meta['flipped']} labels flipped), {meta['n_test']} test examples. {meta['subsets']} subsets of "
        f"{meta['subset_size']} examples, each retrained from scratch with its own seed (subset seeds "
        f"{meta['subset_seeds'][0]}…{meta['subset_seeds'][-1]}). Test accuracy: full model "
        f"{meta['full_model_test_accuracy']:.3f}, subset models {pm(acc[0], acc[1])}. Gradients: D = {meta['D']} "
        f"in {meta['blocks']} blocks. Time: retraining {meta['retrain_seconds_total']:.0f} s "
        f"({meta['retrain_seconds_per_model']:.1f} s per model; {meta['trained_this_run']} trained in this run), "
        f"gradients {meta['grad_seconds']:.1f} s, scoring + LDS {meta['score_seconds']:.1f} s. "
        f"Commit {meta['commit'] or '?'}; {meta['versions']}."
    )


def _finish(result: ExperimentResult, masks: np.ndarray, losses: np.ndarray, out: Path | None) -> ExperimentResult:
    meta, sweeps = result.meta, result.sweeps
    headers, rows = lds_table(result)
    level = int(round(100 * meta["lds_settings"]["level"]))
    explain = (
        f"LDS = mean over test examples of the Spearman correlation, over the {meta['subsets']} subsets, between "
        "Σ_{i∈subset} I(i, j) and the retrained model's loss on test example j (positive = harmful, so higher is "
        f"better). {level}% CIs: percentile bootstraps over test examples (the subsets fixed) and over the subsets "
        "(the (subset, retrained model) pairs resampled, every row on the same draws: this one carries the noise of "
        "retraining and of the finite set of subsets). The paired column is the reference row's LDS minus the "
        "method's (positive: the reference ranks above). mislabel AUC: the same scores averaged over test examples, "
        "on the same model."
    )
    if meta.get("best_vs_runner_up"):
        b = meta["best_vs_runner_up"]
        explain += (
            f" Top row {b['best']} − runner-up {b['runner_up']}: {b['diff']:+.3f} "
            f"{_ci(b['ci_subsets'], SG)} ({level}% CI over the subsets)."
        )
    if meta.get("lds_vs_auc"):
        c = meta["lds_vs_auc"]
        explain += f" Spearman correlation of LDS and mislabel AUC over the {c['rows']} rows: {c['spearman']:.2f}."
    text = [text_table(headers, rows), "", _intro(meta)]
    sweep_rows = damping_section(sweeps["damping"]) if sweeps.get("damping") else None
    if sweep_rows:
        text += ["", "LDS vs damping multiplier (λ = multiplier × the 'auto' λ)", text_table(*sweep_rows)]
    result.report_dir = out
    if out is not None:
        md = ["# fastinf LDS report (linear datamodeling score with retraining)", "", _intro(meta), "", explain, ""]
        md += section(None, headers, rows)
        plots = []
        if sweep_rows:
            md += section("LDS vs damping multiplier (λ = multiplier × the 'auto' λ)", *sweep_rows)
            plot_auc_vs_damping(out / "lds_vs_damping.png", sweeps["damping"], "LDS vs damping", ylabel="LDS")
            plots.append("lds_vs_damping.png")
        if plots:
            md += ["Plots: " + ", ".join(f"`{p}`" for p in plots) + "."]
        write_report(
            out,
            markdown=md,
            results={
                "methods": dict(result),
                "meta": meta,
                "sweeps": sweeps,
                "subsets": [np.flatnonzero(m).tolist() for m in masks],
                "test_losses": losses,
            },
        )
        text += ["", f"report: {out / 'report.md'} (results.json)"]
    result.summary_text = "\n".join(text)
    return result


# ------------------------------------------------------------------------------------ the command
def lds_demo(
    *,
    quick: bool = False,
    subsets: int | None = None,
    fraction: float = 0.5,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    subset_seed: int = 1000,
    methods: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    report_dir: str | Path | None = "fastinf-report-lds",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """``fastinf eval lds``: LDS on the demo's Rotten Tomatoes mislabel task with MiniLM + LoRA.

    Sizes: ``MislabelSettings()`` (the full demo's; ``quick``: ``MislabelSettings.quick()``) and 32
    subsets (``quick``: 8); ``n_train``, ``n_test`` and ``subsets`` override. The sweep is skipped
    with ``quick``. About 30–45 minutes on a 2-core CPU the first time (retraining), minutes after.

    Raises:
        ValueError: unknown methods or bad sizes.
    """
    from ...data import rotten_tomatoes

    base = MislabelSettings.quick() if quick else MislabelSettings()
    s = dataclasses.replace(base, n_train=n_train or base.n_train, n_test=n_test or base.n_test)
    L = LDSSettings(
        subsets=subsets or (8 if quick else 32), fraction=fraction, subset_seed=subset_seed, sweeps=not quick
    )
    split_methods(methods, default=[])  # unknown names fail before the data and model load
    texts, labels = rotten_tomatoes()
    if log:
        log(
            f"fastinf eval lds: Rotten Tomatoes mislabel task (n_train={s.n_train}, n_test={s.n_test}, "
            f"{s.flip:.0%} flipped), MiniLM-L6 + LoRA r={s.lora_r}, {L.subsets} subsets of {L.fraction:.0%}"
            + (" [--quick]" if quick else "")
        )
    return lds_experiment(
        texts,
        labels,
        settings=s,
        lds_settings=L,
        seed=seed,
        methods=methods,
        cache_dir=cache_dir,
        report_dir=report_dir,
        progress=progress,
        log=log,
    )
