"""Mislabelled-data detection (Task 1 of the DataInf / RRInf papers; METHODS.md §9).

* :func:`mislabel_experiment`: LoRA-fine-tune a text classifier on binary labels with a share flipped,
  rank the training examples by every method's influence on the mean test loss (positive = harmful)
  and report the AUC of finding the flipped ones, agreement with ``exact``, time and memory; Z0-Inf
  from the Trainer's checkpoints and the BIF from SGLD traces.
* :func:`synthetic_mislabel_experiment`: the same scoring and report on the seconds-long synthetic
  task (:func:`fastinf.eval.mislabel_task`), gradient methods only.
* :func:`mislabel_demo`: ``fastinf demo`` (and ``fastinf eval mislabel``): one of the two with the
  demo's sizes.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...utils import loadavg, pm, text_table, timed
from .. import hf
from ..checkpoint_influence import checkpoint_influence, collect_with_losses, needs_factors
from ..metrics import agreement, detection_curve, mislabel_auc
from ..report import (
    ROWS_NOTE,
    accuracy_text,
    answer_lines,
    lambda_text,
    paired_section,
    plot_auc_by_method,
    plot_auc_vs_damping,
    plot_detection_curves,
    plot_time_vs_auc,
    section,
    sweep_tables,
    write_report,
)
from ..runner import (
    MethodRun,
    damping_sweep,
    row_label,
    rrinf_iteration_sweep,
    run_baselines,
    run_bif,
    run_gradient_methods,
    run_label_free,
    run_z0inf,
    scores_for_report,
    split_methods,
)
from ..synthetic import mislabel_task
from .common import (
    ExperimentResult,
    aggregate_seeds,
    mislabel_split,
    paired_over_seeds,
    prepare_report_dir,
    row_order,
    seed_meta,
    settings_dict,
    train_mislabel_model,
)

__all__ = ["MislabelSettings", "mislabel_demo", "mislabel_experiment", "synthetic_mislabel_experiment"]

#: the reference of the paired comparison over data seeds
REFERENCE = "datainf"
#: the opt-in BIF's row when it is not run
BIF_OPT_IN = "opt-in (fastinf demo --bif): SGLD traces cost ~400 s per data seed on 2 CPU cores"
# (n_train, n_test) of the synthetic demo: full and --quick
SYNTHETIC_SIZES = {"full": (1000, 200), "quick": (400, 100)}
TRACE_SKIP = "skipped: needs checkpoints or loss traces (SGLD), which the synthetic task has not"


@dataclass
class MislabelSettings:
    """Sizes and hyper-parameters of a mislabel run (what the report states)."""

    # 384 / 96 examples and a checkpoint per epoch: three data seeds of the full run (every method, a
    # gradient capture at each of the 5 checkpoints) fit ~15 minutes on 2 CPU cores (measured: one seed
    # with 9 checkpoints took 329 CPU-s, a third of it in the checkpoint captures)
    n_train: int = 384
    n_test: int = 96
    flip: float = 0.2
    epochs: int = 4
    batch_size: int = 16
    max_length: int = 48
    lora_r: int = 8
    lr_lora: float = 2e-3
    lr_head: float = 2e-2
    checkpoints_per_epoch: int = 1
    damping: float | str = "auto"  # the gradient methods' λ: 'auto' (METHODS.md §0) or an absolute value
    lissa_depth: int = 100
    rrinf_seeds: tuple[int, ...] = (0, 1, 2)
    bif_chains: int = 2
    bif_draws: int = 12
    bif_burnin: int = 60
    bif_thin: int = 10
    bif_step_size: float = 1e-4
    bif_localization: float = 1e3
    bif_n_beta: float | None = None  # None: n_train (β = 1)
    damping_multipliers: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5, 1e6)
    rrinf_iterations: tuple[int, ...] = (1000, 10_000, 100_000)
    sweeps: bool = True  # on the first data seed only
    baselines: bool = True  # training loss, gradient norm, self-influence, label-free λ rows
    checkpoint_methods: bool = True  # TracIn-CP and checkpoint ensembles (captures at every checkpoint)
    ensemble_methods: tuple[str, ...] = ("datainf", "exact")
    # methods whose self-influence is left out, with the reason (LiSSA: one recursion per training example)
    self_influence_skip: tuple[str, ...] = ("lissa",)

    @classmethod
    def quick(cls, **overrides: Any) -> MislabelSettings:
        """The CI-sized run of ``fastinf demo --quick``."""
        base = dict(
            n_train=160,
            n_test=40,
            epochs=3,
            bif_chains=2,
            bif_draws=6,
            bif_burnin=10,
            bif_thin=2,
            damping_multipliers=(1, 100, 1e4),
            rrinf_iterations=(1000, 10_000),
        )
        return cls(**{**base, **overrides})

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "epochs", "batch_size", "lora_r", "lissa_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MislabelSettings.{name} must be a positive int, got {v!r}")
        if not 0 < self.flip < 1:
            raise ValueError(f"MislabelSettings.flip must be in (0, 1), got {self.flip}")
        if not self.rrinf_seeds:
            raise ValueError("MislabelSettings.rrinf_seeds must name at least one seed")
        self.rrinf_seeds = tuple(int(s) for s in self.rrinf_seeds)


# ------------------------------------------------------------------------------------ records
def _record(run: MethodRun, flipped: np.ndarray, exact: torch.Tensor | None) -> dict[str, Any]:
    if run.info.get("skipped"):
        return {"auc": None, "skipped": run.info["skipped"]}
    if run.error or not run.scores:
        return {"auc": None, "error": run.error or "no scores"}
    aucs = [mislabel_auc(sc, flipped) for sc in run.scores]
    rec: dict[str, Any] = {
        "aucs": aucs,
        "auc": float(np.mean(aucs)),
        "seconds": float(np.mean(run.seconds)),
        "peak_mb": run.peak_mb,
        **run.info,
    }
    if exact is not None:
        ag = [agreement(sc, exact) for sc in run.scores]
        rec["pearson"] = float(np.mean([a["pearson"] for a in ag]))
        rec["spearman"] = float(np.mean([a["spearman"] for a in ag]))
    return rec


def _score_gradients(gtr, gte, flipped, s: MislabelSettings, methods, progress, say) -> dict[str, Any]:
    """Every gradient method and the sweeps on one seed's gradients: records, scores, sweeps."""
    runs = run_gradient_methods(
        gtr,
        gte,
        methods,
        reduce="mean",
        seeds=s.rrinf_seeds,
        damping=s.damping,
        lissa_depth=s.lissa_depth,
        progress=progress,
    )
    exact = runs["exact"].scores[0] if "exact" in runs and runs["exact"].scores else None
    sweeps: dict[str, Any] = {}
    if s.sweeps:
        say("damping and iteration sweeps (METHODS.md §9)")

        def metric(sc):
            return mislabel_auc(sc, flipped)

        swept = [m for m in ("exact", "datainf") if m in methods]
        if swept:
            sweeps["damping"] = damping_sweep(gtr, gte, s.damping_multipliers, metric, methods=swept, progress=progress)
        if "rrinf" in methods:  # the iteration sweep runs RRInf (and its fixed point beside it)
            sweeps.update(rrinf_iteration_sweep(gtr, gte, s.rrinf_iterations, s.rrinf_seeds, metric, progress=progress))
    return {
        "methods": {n: _record(r, flipped, exact) for n, r in runs.items()},
        "scores": scores_for_report(runs),
        "exact": exact,
        "sweeps": sweeps,
    }


# ------------------------------------------------------------------------------------ the experiment
def mislabel_experiment(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    model: str | Callable = "minilm",
    n_train: int | None = None,
    n_test: int | None = None,
    flip: float | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    report_dir: str | Path | None = None,
    settings: MislabelSettings | None = None,
    skipped: dict[str, str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """Mislabelled-data detection (Task 1 of the DataInf / RRInf papers) on any binary text data.

    Splits ``texts``/``labels`` (seeded) into ``n_train`` training and ``n_test`` test examples,
    flips the labels of a random ``flip`` share of the training examples, LoRA-fine-tunes ``model``
    (``"minilm"``: the bundled MiniLM encoder with a classification head; or a callable returning
    ``(tokenizer, model)``), captures per-example gradients and ranks training examples by each
    method's influence on the mean test loss (positive = harmful). ``n_train``, ``n_test``, ``flip``
    and ``epochs`` override ``settings`` (which is not modified).

    Returns ``{method: {"auc", "auc_std", "seconds", "corr_with_exact", ...}}`` (mean ± std over
    ``seeds``; a stochastic method additionally over ``settings.rrinf_seeds``), plus ``.meta``,
    ``.sweeps`` and ``.summary()``; with ``report_dir``: report.md, results.json, scores.json and plots.

    Raises:
        ValueError: unknown methods, non-binary labels, too few examples, bad sizes.
    """
    overrides = {
        k: v for k, v in dict(n_train=n_train, n_test=n_test, flip=flip, epochs=epochs).items() if v is not None
    }
    s = dataclasses.replace(settings or MislabelSettings(), **overrides)
    grad_methods, trace_methods = split_methods(methods)
    labels_arr = np.asarray(labels)
    if len(texts) != len(labels_arr):
        raise ValueError(f"{len(texts)} texts but {len(labels_arr)} labels")
    if set(np.unique(labels_arr).tolist()) - {0, 1}:
        raise ValueError("mislabel_experiment needs binary labels 0/1")
    if s.n_train + s.n_test > len(texts):
        raise ValueError(f"n_train + n_test = {s.n_train + s.n_test} exceeds the {len(texts)} examples given")
    if round(s.flip * s.n_train) < 1:
        raise ValueError(f"n_train = {s.n_train} is too small: {s.flip:.0%} of it must be at least one example")
    if not seeds:
        raise ValueError("seeds must name at least one data seed")
    out = prepare_report_dir(report_dir)
    say = log or (lambda _msg: None)
    per_seed = []
    for i, seed in enumerate(seeds):  # the sweeps on the first data seed only
        si = s if i == 0 else dataclasses.replace(s, sweeps=False)
        per_seed.append(_one_seed(list(texts), labels_arr, si, grad_methods, trace_methods, seed, model, progress, say))
    for p in per_seed:
        for m, why in (skipped or {}).items():
            p["methods"].setdefault(m, {"auc": None, "skipped": why})
    result = aggregate_seeds(per_seed, row_order(per_seed))
    result.meta = {**seed_meta(per_seed, list(seeds)), "load": loadavg()}
    result.sweeps = per_seed[0]["sweeps"]
    result.paired = paired_over_seeds(result, REFERENCE)
    return _finish(result, per_seed[0], out)


def _one_seed(texts, labels, s: MislabelSettings, grad_methods, trace_methods, seed, model, progress, say) -> dict:
    t_start = time.perf_counter()
    tr_idx, te_idx, y_tr, flipped = mislabel_split(labels, s, seed)
    n_flip = int(flipped.sum())
    y_te = labels[te_idx]
    torch.manual_seed(seed)
    tok, net = hf.text_classifier(model, 2, s.lora_r)

    def enc(idx):
        return tok([texts[i] for i in idx], truncation=True, max_length=s.max_length)

    train_ds, test_ds = hf.TextDataset(enc(tr_idx), y_tr), hf.TextDataset(enc(te_idx), y_te)
    meta: dict[str, Any] = {
        "task": "mislabelled-data detection",
        "n_train": s.n_train,
        "n_test": s.n_test,
        "flipped": n_flip,
        "seed": seed,
        "settings": settings_dict(s),
        "model": hf.model_name(net, model),
        "training": f"LoRA r={s.lora_r} (query, value) and a trained classification head; {s.epochs} epochs",
    }
    say(f"[seed {seed}] training: {s.n_train} examples ({n_flip} flipped), {s.epochs} epochs, LoRA r={s.lora_r}")
    with tempfile.TemporaryDirectory(prefix="fastinf-exp-") as work:
        t0 = time.perf_counter()
        checkpoints = train_mislabel_model(net, train_ds, tok, s, seed, Path(work) / "checkpoints", progress=progress)
        meta["train_seconds"] = time.perf_counter() - t0
        test_loader = hf.text_loader(test_ds, tok, s.batch_size)
        train_eval = hf.text_loader(hf.TextDataset(train_ds.enc, labels[tr_idx]), tok, s.batch_size)
        meta["test_accuracy"] = hf.accuracy(net, test_loader)
        meta["train_accuracy_true_labels"] = hf.accuracy(net, train_eval)
        say(f"[seed {seed}] test accuracy {meta['test_accuracy']:.3f}; capturing per-example gradients")
        train_loader = hf.text_loader(train_ds, tok, s.batch_size)
        opts = {"include_modules_to_save": True}
        ((gtr, gte), (loss_tr, _)), sec, _ = timed(
            lambda: collect_with_losses(
                net,
                [train_loader, test_loader],
                factors=needs_factors(grad_methods),
                progress=progress,
                **opts,
            )
        )
        meta.update(grad_seconds=sec, D=gtr.dim, blocks=len(gtr.names))
        part = _score_gradients(gtr, gte, flipped, s, grad_methods, progress, say)
        res, scores, exact = part["methods"], part["scores"], part["exact"]
        if s.baselines:
            say(f"[seed {seed}] baselines: training loss, gradient norm, self-influence; label-free λ")
            extra = _extra_rows(gtr, gte, loss_tr, s, grad_methods, seed, progress)
            res.update({n: _record(r, flipped, exact) for n, r in extra.items()})
            scores.update(scores_for_report(extra))
        tables = None
        if s.checkpoint_methods:
            say(f"[seed {seed}] TracIn-CP and checkpoint ensembles: captures at {len(checkpoints)} checkpoints")
            ck = checkpoint_influence(
                net,
                checkpoints,
                train_loader,
                test_loader,
                learning_rates=checkpoints.learning_rates,  # the LoRA group's; the head trains at lr_head
                block_lr_scale={k: s.lr_head / s.lr_lora for k in gtr.names if "modules_to_save" in k},
                methods=[m for m in s.ensemble_methods if m in grad_methods],
                reduce="mean",
                damping=s.damping,
                collector_options=opts,
                progress=progress,
            )
            res.update({n: _record(r, flipped, exact) for n, r in ck.runs.items()})
            scores.update(scores_for_report(ck.runs))
            tables = (ck.train_losses, ck.test_losses)
            meta["checkpoint_capture_seconds"] = ck.capture_seconds
        if "z0inf" in trace_methods:
            say(f"[seed {seed}] Z0-Inf: losses at {len(checkpoints)} checkpoints")
            z, z_self = run_z0inf(
                net,
                checkpoints,
                train_loader,
                test_loader,
                reduce="mean",
                self_influence=True,
                tables=tables,
                progress=progress,
            )
            res["z0inf"], res["z0inf_self"] = _record(z, flipped, exact), _record(z_self, flipped, exact)
            scores.update(scores_for_report({"z0inf": z, "z0inf_self": z_self}))
        meta["checkpoints"] = len(checkpoints)
        if "bif" in trace_methods:
            say(f"[seed {seed}] BIF: {s.bif_chains} SGLD chains × {s.bif_draws} draws")
            b = run_bif(
                net,
                hf.text_loader(train_ds, tok, s.batch_size, shuffle=True, seed=seed),
                train_loader,
                test_loader,
                reduce="mean",
                n_beta=s.bif_n_beta or float(s.n_train),
                localization=s.bif_localization,
                step_size=s.bif_step_size,
                chains=s.bif_chains,
                draws=s.bif_draws,
                burnin=s.bif_burnin,
                thin=s.bif_thin,
                seed=seed,
                progress=progress,
            )
            res["bif"] = _record(b, flipped, exact)
            scores.update(scores_for_report({"bif": b}))
    meta["total_seconds"] = time.perf_counter() - t_start
    return {"methods": res, "meta": meta, "sweeps": part["sweeps"], "scores": scores, "flipped": flipped}


_SELF_SKIP = "left out: one LiSSA recursion per training example (n × depth HVPs; > 5 min at n = 600)"


def _extra_rows(gtr, gte, loss_tr, s: MislabelSettings, grad_methods, seed, progress) -> dict[str, MethodRun]:
    """Baselines (training loss, gradient norm, each method's self-influence) and the label-free λ rows."""
    skip = {m: _SELF_SKIP for m in s.self_influence_skip}
    opts = dict(seed=seed, damping=s.damping, lissa_depth=s.lissa_depth, skip_self=skip, progress=progress)
    runs = run_baselines(gtr, loss_tr, grad_methods, **opts)
    return {
        **runs,
        **run_label_free(gtr, gte, [m for m in ("exact", "datainf") if m in grad_methods], progress=progress),
    }


def synthetic_mislabel_experiment(
    *,
    n_train: int = 1000,
    n_test: int = 200,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    settings: MislabelSettings | None = None,
    report_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """The mislabel scoring and report on the synthetic task (a tiny LoRA MLP on a Gaussian mixture,
    :func:`fastinf.eval.mislabel_task`; seconds on a CPU). Gradient methods only: the methods that need
    loss traces are listed as skipped. ``settings`` supplies the method options and sweeps; its
    model/training fields do not apply.

    Raises:
        ValueError: unknown methods or sizes too small to flip one label.
    """
    s = dataclasses.replace(settings or MislabelSettings(), n_train=n_train, n_test=n_test)
    if round(s.flip * n_train) < 1:
        raise ValueError(f"n_train = {n_train} is too small: {s.flip:.0%} of it must be at least one example")
    grad_methods, trace_methods = split_methods(methods)
    out = prepare_report_dir(report_dir)
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    task = mislabel_task(n_train, n_test, seed=seed, flip=s.flip)
    t_task = time.perf_counter() - t0
    flipped = task.is_flipped.numpy().astype(bool)
    part = _score_gradients(task.train, task.test, flipped, s, grad_methods, progress, say)
    if s.baselines:
        extra = _extra_rows(task.train, task.test, None, s, grad_methods, seed, progress)
        part["methods"].update({n: _record(r, flipped, part["exact"]) for n, r in extra.items()})
        part["scores"].update(scores_for_report(extra))
    for m in [*trace_methods, *(["tracin_cp"] if s.checkpoint_methods and methods is None else [])]:
        part["methods"][m] = {"auc": None, "skipped": TRACE_SKIP}
    info = task.info
    meta = {
        "task": "mislabelled-data detection (synthetic)",
        "n_train": n_train,
        "n_test": n_test,
        "flipped": int(flipped.sum()),
        "seed": seed,
        "seeds": [seed],
        "settings": settings_dict(s),
        "model": info["model"],
        "training": f"{info['steps']} steps of full-batch GD",
        "test_accuracy": info["test_acc"],
        "train_accuracy_true_labels": info["train_acc_true_labels"],
        "D": task.train.dim,
        "blocks": len(task.train.names),
        "task_seconds": t_task,
        "total_seconds": time.perf_counter() - t0,
    }
    part["meta"], part["flipped"] = meta, flipped
    result = aggregate_seeds([part], row_order([part]))
    result.meta, result.sweeps = meta, part["sweeps"]
    return _finish(result, part, out)


# ------------------------------------------------------------------------------------ report
def mislabel_table(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the method table: AUC, agreement with exact, λ, seconds, peak MB, note."""
    depth = result.meta.get("settings", {}).get("lissa_depth")
    k = len(result.meta.get("seeds") or [0])
    auc_head = f"mislabel AUC (mean ± sd, {k} data seeds)" if k > 1 else "mislabel AUC"
    headers = ["method", auc_head, "corr. with exact (Pearson)", "Spearman", "λ", "seconds", "peak MB", "note"]
    rows = []
    for m, r in result.items():
        name = row_label(m)
        if r.get("seeds") and len(r["seeds"]) > 1:
            name += f" ({len(r['seeds'])} seeds)"
        if r.get("auc") is None:
            auc_cell, note = ("skipped", r["skipped"]) if r.get("skipped") else ("failed", (r.get("error") or "")[:80])
            rows.append([name, auc_cell, "—", "—", "—", "—", "—", note])
            continue
        note = r.get("note", "")
        if r.get("converged") is False:
            note = (note + "; " if note else "") + f"not converged at depth {depth}"
        if r.get("failed_seeds"):
            note = (note + "; " if note else "") + f"failed in seeds {r['failed_seeds']}"
        rows.append(
            [
                name,
                pm(r["auc"], r.get("auc_std")),
                pm(r.get("corr_with_exact"), None),
                pm(r.get("spearman_with_exact"), None),
                lambda_text(r.get("lambda")),
                f"{r['seconds']:.2f}",
                f"{r.get('peak_mb', 0):.0f}",
                note,
            ]
        )
    return headers, rows


def _intro(meta: dict) -> str:
    s = meta["settings"]
    seeds = meta["seeds"]
    return (
        f"Model: {meta.get('model')}; {meta.get('training')}. Training examples: {meta['n_train']} "
        f"({meta['flipped']} label{'' if meta['flipped'] == 1 else 's'} flipped), test examples: {meta['n_test']}. "
        f"Test accuracy "
        f"{accuracy_text(meta)}. Gradient dimension D = {meta['D']} in {meta['blocks']} blocks. "
        f"Checkpoints (Z0-Inf, TracIn-CP, ensembles): {meta.get('checkpoints', '—')}. Data seeds: {seeds} "
        f"(each its own train/test split, flip set, LoRA init and training order). "
        f"Damping: {s['damping']!r} (papers' factor 0.1); LiSSA depth {s['lissa_depth']}."
        + (
            f" Wall time {meta['total_seconds_all_seeds']:.0f} s ({meta.get('load', '')} at the end)."
            if meta.get("total_seconds_all_seeds")
            else ""
        )
    )


def _seed_note(result: ExperimentResult) -> str:
    """What ± means."""
    k = len(result.meta["seeds"])
    if k > 1:
        return (
            f"± = sample sd over the {k} data seeds {result.meta['seeds']} (a stochastic method's AUC in a seed is "
            f"the mean over its method seeds {list(result.meta['settings']['rrinf_seeds'])}). "
        )
    multi = [m for m, r in result.items() if len(r.get("aucs") or []) > 1]
    if not multi:
        return ""
    seeds = result.meta["settings"]["rrinf_seeds"]
    return f"{', '.join(multi)}: mean ± std over method seeds {list(seeds)} (one data seed). "


def _finish(result: ExperimentResult, first: dict, out: Path | None) -> ExperimentResult:
    """Console summary and, with ``out``, the report directory."""
    meta, sweeps, paired = result.meta, result.sweeps, result.paired
    headers, rows = mislabel_table(result)
    answer = answer_lines(result, paired, row_label)
    text = ["", *answer, "", text_table(headers[:-1], [r[:-1] for r in rows])]
    text += [f"  {r[0]}: {r[-1]}" for r in rows if r[1] in ("skipped", "failed")]
    seed_note = _seed_note(result)
    text += ["", _intro(meta) + (" " + seed_note if seed_note else "")]
    vs_ref = paired.get("vs_reference")
    if vs_ref:
        text += [
            "",
            f"Paired differences against {REFERENCE} over data seeds",
            text_table(*paired_section(vs_ref, row_label)),
        ]
    for title, h, r in sweep_tables(sweeps):
        text += ["", title + (" (first data seed)" if len(meta["seeds"]) > 1 else ""), text_table(h, r)]
    result.report_dir = out
    if out is not None:
        curves = {row_label(n): detection_curve(sc, first["flipped"]) for n, sc in first["scores"].items()}
        plot_detection_curves(
            out / "detection_curves.png",
            curves,
            f"Mislabelled-data detection (n={meta['n_train']}, {meta['flipped']} flipped; seed {meta['seeds'][0]})",
        )
        ok = {row_label(m): r for m, r in result.items() if r.get("auc") is not None}
        k = len(meta["seeds"])
        sd_of = {n: r.get("auc_std") or 0.0 for n, r in ok.items()} if k > 1 else None
        pts = {n: (r["seconds"], r["auc"]) for n, r in ok.items()}
        plot_time_vs_auc(
            out / "time_vs_auc.png",
            pts,
            "Time vs mislabel AUC" + (f" (± sd, {k} seeds)" if k > 1 else ""),
            errors=sd_of,
        )
        plot_auc_by_method(
            out / "auc_by_method.png",
            {n: (r["auc"], (r.get("auc_std") or 0.0) if k > 1 else 0.0) for n, r in ok.items()},
            "Mislabel AUC by method" + (f" (mean ± sd over {k} data seeds)" if k > 1 else ""),
        )
        plots = ["detection_curves.png", "time_vs_auc.png", "auc_by_method.png"]
        if sweeps.get("damping"):
            plot_auc_vs_damping(out / "auc_vs_damping.png", sweeps["damping"], "Mislabel AUC vs damping")
            plots.append("auc_vs_damping.png")
        md = [
            f"# fastinf mislabelled-data detection report ({meta['task']})",
            "",
            "## Which method to use",
            "",
            *answer,
            "",
            _intro(meta),
            "",
            "AUC = roc_auc(is_flipped, score); positive = harmful; 0.5 = chance. "
            + seed_note
            + "Correlations are with `exact` on the same (n,) scores (first data seed). λ: the value used "
            "(a range: over blocks or seeds).",
            "",
            ROWS_NOTE,
            "",
            *section(None, headers, rows),
        ]
        if vs_ref:
            md += section(f"Paired differences against {REFERENCE} over data seeds", *paired_section(vs_ref, row_label))
        for title, h, r in sweep_tables(sweeps):
            md += section(title + (" (first data seed)" if k > 1 else ""), h, r)
        md += ["Plots: " + ", ".join(f"`{p}`" for p in plots) + "."]
        write_report(
            out,
            markdown=md,
            results={"methods": dict(result), "meta": meta, "sweeps": sweeps, "paired": paired, "answer": answer},
            scores={
                "seed": meta["seeds"][0],
                "is_flipped": first["flipped"].astype(int).tolist(),
                "scores": {k2: v.tolist() for k2, v in first["scores"].items()},
            },
        )
        text += ["", f"report: {out / 'report.md'} (results.json, scores.json, {', '.join(plots)})"]
    result.summary_text = "\n".join(text)
    return result


# ------------------------------------------------------------------------------------ the demo
def mislabel_demo(
    *,
    quick: bool = False,
    synthetic: bool = False,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    seeds: int = 3,
    data_seeds: int | None = None,
    bif: bool = False,
    methods: Sequence[str] | None = None,
    damping: float | str = "auto",
    sweeps: bool | None = None,
    report_dir: str | Path | None = "fastinf-report",
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """``fastinf demo``: mislabelled-data detection on Rotten Tomatoes with the bundled MiniLM + LoRA
    (``synthetic=False``) or on the synthetic task, every method, one report.

    Sizes: real ``MislabelSettings()`` / ``MislabelSettings.quick()``, synthetic :data:`SYNTHETIC_SIZES`;
    ``n_train`` / ``n_test`` override. ``data_seeds``: how many data seeds (``seed``, ``seed+1``, ...:
    each its own split, flip set and training run; default 3, ``quick`` and synthetic 1); the report
    gives mean ± sd over them and paired differences against DataInf. ``seeds``: how many seeds a
    stochastic method runs. ``bif``: also the BIF (opt-in: SGLD traces cost minutes per data seed;
    named ``methods`` decide instead when given). ``sweeps``: damping / iteration sweeps on the first
    data seed (default: on, off with ``quick`` for the synthetic task). ``exact`` is always run: it is
    the reference of the correlations.

    Raises:
        ValueError: unknown methods, sizes too small to flip one label, ``data_seeds`` < 1.
    """
    if methods is not None and "exact" not in methods:
        methods = ["exact", *methods]
    k = data_seeds if data_seeds is not None else (1 if quick or synthetic else 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"data_seeds must be a positive int, got {data_seeds!r}")
    overrides: dict[str, Any] = {"rrinf_seeds": tuple(range(seed, seed + seeds)), "damping": damping}
    if sweeps is not None:
        overrides["sweeps"] = sweeps
    if synthetic:
        if sweeps is None:
            overrides["sweeps"] = not quick
        s = MislabelSettings(rrinf_iterations=(1000, 10_000), **overrides)
        size = SYNTHETIC_SIZES["quick" if quick else "full"]
        return synthetic_mislabel_experiment(
            n_train=n_train or size[0],
            n_test=n_test or size[1],
            seed=seed,
            methods=methods,
            settings=s,
            report_dir=report_dir,
            progress=progress,
            log=log,
        )
    from ...data import rotten_tomatoes

    skipped = {}
    if methods is None and not bif:
        methods = [m for m in split_methods(None)[0] + split_methods(None)[1] if m != "bif"]
        skipped["bif"] = BIF_OPT_IN
    s = MislabelSettings.quick(**overrides) if quick else MislabelSettings(**overrides)
    s = dataclasses.replace(s, n_train=n_train or s.n_train, n_test=n_test or s.n_test)
    if round(s.flip * s.n_train) < 1:
        raise ValueError(f"n_train = {s.n_train} is too small: {s.flip:.0%} of it must be at least one example")
    split_methods(methods)  # unknown names fail before the data and model load
    texts, labels = rotten_tomatoes()
    if log:
        log(
            f"fastinf demo: mislabelled-data detection on Rotten Tomatoes critic snippets ({len(texts)} available), "
            f"MiniLM-L6 + LoRA r={s.lora_r}; n_train={s.n_train} ({s.flip:.0%} flipped), n_test={s.n_test}, "
            f"{s.epochs} epochs, checkpoints every 1/{s.checkpoints_per_epoch} epoch, data seeds "
            f"{list(range(seed, seed + k))}"
            + ("" if "bif" in skipped else f", BIF {s.bif_chains}×{s.bif_draws} draws")
            + (" [--quick]" if quick else "")
        )
    return mislabel_experiment(
        texts,
        labels,
        methods=methods,
        seeds=tuple(range(seed, seed + k)),
        settings=s,
        skipped=skipped,
        report_dir=report_dir,
        progress=progress,
        log=log,
    )
