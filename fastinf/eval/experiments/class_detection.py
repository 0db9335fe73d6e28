"""Class detection (Task 2 of the DataInf / RRInf papers; METHODS.md §9) for text generation.

:func:`class_detection_experiment` LoRA-fine-tunes a causal LM on texts from several classes and asks,
for every test example, whether the training examples of its own class are the most helpful (most
negative influence): AUC and recall@k per test example, every gradient method, Z0-Inf from the
checkpoints and (opt-in) the BIF. The scoring and report steps (:func:`score_class_detection`,
:func:`z0inf_record`, :func:`finish_report`) are shared with the diffusion experiment.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...utils import pm, text_table, timed
from .. import hf
from ..checkpoint_influence import checkpoint_influence, collect_with_losses, needs_factors
from ..metrics import agreement, class_detection
from ..report import damping_section, lambda_text, plot_auc_vs_damping, plot_time_vs_auc, section, write_report
from ..runner import (
    MethodRun,
    damping_sweep,
    row_label,
    run_bif,
    run_gradient_methods,
    run_label_free,
    run_z0inf,
    split_methods,
)
from .common import ExperimentResult, prepare_report_dir, settings_dict

__all__ = [
    "ClassDetectionSettings",
    "class_detection_experiment",
    "class_detection_table",
    "extra_class_rows",
    "finish_report",
    "score_class_detection",
    "z0inf_record",
]

GRAD_FIELDS = ("text", "answer", "prompt")
CLASS_LABELS = {"self_influence": "self-influence (every gradient method)"}


@dataclass
class ClassDetectionSettings:
    """Sizes and hyper-parameters of a class-detection run (what the report states)."""

    epochs: int = 2
    batch_size: int = 8
    max_length: int = 96
    lora_r: int = 8
    lr: float = 3e-4
    grad_field: str = "text"  # the tokens whose loss the gradients are taken on (see class_detection_experiment)
    checkpoints_per_epoch: int = 2
    damping: float | str = "auto"
    lissa_depth: int = 100
    rrinf_seeds: tuple[int, ...] = (0, 1, 2)
    bif_chains: int = 2
    bif_draws: int = 6
    bif_burnin: int = 2
    bif_step_size: float = 1e-6
    bif_localization: float = 1e4
    damping_multipliers: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5, 1e6)
    sweeps: bool = True
    baselines: bool = True  # label-free λ rows, and the test-free baselines listed as n/a
    checkpoint_methods: bool = True  # TracIn-CP and checkpoint ensembles (captures at every checkpoint)
    ensemble_methods: tuple[str, ...] = ("datainf", "exact")

    def __post_init__(self) -> None:
        if self.grad_field not in GRAD_FIELDS:
            raise ValueError(f"grad_field must be one of {', '.join(GRAD_FIELDS)}, got {self.grad_field!r}")
        for name in ("epochs", "batch_size", "lora_r", "lissa_depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ClassDetectionSettings.{name} must be a positive int, got {v!r}")
        if not self.rrinf_seeds:
            raise ValueError("ClassDetectionSettings.rrinf_seeds must name at least one seed")


# ------------------------------------------------------------------------------------ shared scoring steps
def record(run: MethodRun, ytr: np.ndarray, yte: np.ndarray, exact: torch.Tensor | None) -> dict[str, Any]:
    """Class-detection record of one run: AUC and recall@k (mean, std over test points; the first seed's,
    or the mean over seeds with the seeds' spread in ``auc_seed_std``), seconds, agreement with exact."""
    if run.error or not run.scores:
        return {"auc": None, "recall": None, "seconds": None, "error": run.error or "no scores"}
    mets = [class_detection(sc, ytr, yte) for sc in run.scores]
    aucs = [m["auc"][0] for m in mets]
    recs = [m["recall"][0] for m in mets]
    one = len(mets) == 1
    rec: dict[str, Any] = {
        "auc": mets[0]["auc"] if one else (float(np.mean(aucs)), float(np.mean([m["auc"][1] for m in mets]))),
        "recall": mets[0]["recall"] if one else (float(np.mean(recs)), float(np.mean([m["recall"][1] for m in mets]))),
        "auc_seed_std": None if one else float(np.std(aucs)),
        "seconds": float(np.mean(run.seconds)),
        "peak_mb": run.peak_mb,
        **{k: v for k, v in run.info.items() if k in ("lambda", "converged", "note", "seeds")},
    }
    if exact is not None:
        rec["corr_with_exact"] = float(np.mean([agreement(sc, exact)["pearson"] for sc in run.scores]))
    return rec


def score_class_detection(
    gtr: Any, gte: Any, methods: Sequence[str], ytr: np.ndarray, yte: np.ndarray, settings: Any, progress: bool
) -> tuple[ExperimentResult, torch.Tensor | None]:
    """Records of every gradient method (scores (m, n)); returns (records, exact scores).
    ``settings`` supplies ``rrinf_seeds``, ``damping`` and ``lissa_depth``."""
    runs = run_gradient_methods(
        gtr,
        gte,
        methods,
        reduce=None,
        seeds=settings.rrinf_seeds,
        damping=settings.damping,
        lissa_depth=settings.lissa_depth,
        progress=progress,
    )
    exact = runs["exact"].scores[0] if "exact" in runs and runs["exact"].scores else None
    out = ExperimentResult()
    for name, run in runs.items():
        out[name] = record(run, ytr, yte, exact)
    return out, exact


def z0inf_record(
    model, checkpoints, tr_loader, te_loader, ytr, yte, exact, progress, loss_fn=None, tables=None
) -> dict:
    """Z0-Inf class-detection record from adapter checkpoints (|Spearman| weights, K = min(4, T − 1));
    ``tables``: the (train, test) loss tables when the checkpoint captures already measured them."""
    run, _ = run_z0inf(
        model, checkpoints, tr_loader, te_loader, reduce=None, loss_fn=loss_fn, tables=tables, progress=progress
    )
    rec = record(run, ytr, yte, exact)
    if rec.get("auc") is not None:
        rec["note"] = f"T={len(checkpoints)} checkpoints"
    return rec


def class_damping_sweep(gtr, gte, ytr, yte, settings: Any, methods: Sequence[str], progress: bool) -> dict:
    """Class-detection AUC of exact and datainf (those of ``methods``) over the damping multipliers."""
    swept = [m for m in ("exact", "datainf") if m in methods]
    if not settings.sweeps or not swept:
        return {}

    def metric(sc):
        return class_detection(sc, ytr, yte)["auc"][0]

    return {
        "damping": damping_sweep(
            gtr, gte, settings.damping_multipliers, metric, reduce=None, methods=swept, progress=progress
        )
    }


#: why the test-free rankings have no class-detection AUC
NO_TEST_DEPENDENCE = (
    "n/a: no test dependence (one ranking serves every test point: the per-test AUC averages to 0.5 with "
    "balanced classes)"
)


def extra_class_rows(
    model,
    checkpoints,
    learning_rates,
    tr_loader,
    te_loader,
    gtr,
    gte,
    ytr,
    yte,
    exact,
    settings,
    methods,
    progress,
    loss_fn=None,
) -> tuple[dict[str, dict], tuple | None]:
    """The label-free λ rows, TracIn-CP and checkpoint ensembles (scores (m, n)) and the test-free
    baselines (listed as n/a: :data:`NO_TEST_DEPENDENCE`), as class-detection records; returns
    (records, the checkpoints' (train, test) loss tables or None)."""
    out: dict[str, dict] = {}
    if settings.baselines:
        runs = run_label_free(
            gtr, gte, [m for m in ("exact", "datainf") if m in methods], reduce=None, progress=progress
        )
        out.update({n: record(r, ytr, yte, exact) for n, r in runs.items()})
    tables = None
    if settings.checkpoint_methods and len(checkpoints) > 0:
        ck = checkpoint_influence(
            model,
            checkpoints,
            tr_loader,
            te_loader,
            learning_rates=learning_rates,
            methods=[m for m in settings.ensemble_methods if m in methods],
            reduce=None,
            damping=settings.damping,
            loss_fn=loss_fn,
            progress=progress,
        )
        out.update({n: record(r, ytr, yte, exact) for n, r in ck.runs.items() if n != "tracin_cp_self"})
        tables = (ck.train_losses, ck.test_losses)
    if settings.baselines:
        for key in ("train_loss", "grad_norm", "self_influence"):
            out[key] = {"auc": None, "recall": None, "seconds": None, "skipped": NO_TEST_DEPENDENCE}
    return out, tables


# ------------------------------------------------------------------------------------ the experiment
def class_detection_experiment(
    train_texts: Sequence[str],
    train_classes: Sequence[Any],
    test_texts: Sequence[str],
    test_classes: Sequence[Any],
    *,
    model: str | Callable = "smollm2",
    methods: Sequence[str] | None = None,
    train_prompts: Sequence[str] | None = None,
    test_prompts: Sequence[str] | None = None,
    settings: ClassDetectionSettings | None = None,
    dataset: str = "",
    report_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """Class detection for generation (Task 2 of the DataInf / RRInf papers) on any texts with classes.

    LoRA-fine-tunes a causal LM (``"smollm2"``: the bundled SmolLM2-135M-Instruct; or a callable
    returning ``(tokenizer, model)``) on ``train_texts``; takes per-example gradients of the loss on
    ``settings.grad_field`` ("text": every token; "answer": the tokens after the prompt; "prompt": the
    prompt only — the last two need ``*_prompts``); scores every (test, train) pair and, per test
    example, measures how well −I ranks the training examples of its own class first
    (AUC and recall@k, k = number of training examples of the class; METHODS.md §9). Returns
    ``{method: {"auc": (mean, std), "recall": (mean, std), "seconds": float, ...}}`` with ``.meta``,
    ``.sweeps`` and ``.summary()``. Default methods: every gradient method and Z0-Inf (the BIF is
    opt-in: each SGLD draw costs a forward pass over every example). ``dataset`` names the data in
    the report.

    Raises:
        ValueError: unknown methods, mismatched lengths, a test class without training examples,
            a ``grad_field`` that needs prompts without them.
    """
    s = settings or ClassDetectionSettings()
    default = [*split_methods(None)[0], "z0inf"]  # every gradient method and Z0-Inf; the BIF is opt-in
    grad_methods, trace_methods = split_methods(methods if methods is not None else default)
    if len(train_texts) != len(train_classes) or len(test_texts) != len(test_classes):
        raise ValueError("texts and classes must have the same lengths")
    if s.grad_field != "text" and (train_prompts is None or test_prompts is None):
        raise ValueError(f"grad_field={s.grad_field!r} needs train_prompts and test_prompts")
    classes = sorted({str(c) for c in train_classes})
    missing = sorted({str(c) for c in test_classes} - set(classes))
    if missing:
        raise ValueError(f"test classes {missing} have no training examples")
    out_dir = prepare_report_dir(report_dir)
    cid = {c: i for i, c in enumerate(classes)}
    ytr = np.array([cid[str(c)] for c in train_classes])
    yte = np.array([cid[str(c)] for c in test_classes])
    say = log or (lambda _m: None)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    tok, net = hf.causal_lm(model, s.lora_r)
    # fine-tune on the whole text; gradients on `grad_field`
    train_fit = hf.encode_lm(tok, train_texts, None, "text", s.max_length)
    tr_ds = hf.encode_lm(tok, train_texts, train_prompts, s.grad_field, s.max_length)
    te_ds = hf.encode_lm(tok, test_texts, test_prompts, s.grad_field, s.max_length)
    collate = hf.LMCollator(tok.pad_token_id)
    meta: dict[str, Any] = {
        "task": "class detection",
        "dataset": dataset,
        "n_train": len(train_texts),
        "n_test": len(test_texts),
        "classes": len(classes),
        "grad_field": s.grad_field,
        "seed": seed,
        "settings": settings_dict(s),
        "model": hf.model_name(net, model),
    }
    say(f"training: {len(train_texts)} examples in {len(classes)} classes, {s.epochs} epochs, LoRA r={s.lora_r} on q/v")
    with tempfile.TemporaryDirectory(prefix="fastinf-exp-") as work:
        t0 = time.perf_counter()
        checkpoints = hf.train_lm(
            net,
            train_fit,
            collate,
            batch_size=s.batch_size,
            epochs=s.epochs,
            lr=s.lr,
            checkpoints_per_epoch=s.checkpoints_per_epoch,
            seed=seed,
            ck_dir=Path(work) / "checkpoints",
            progress=progress,
        )
        meta["train_seconds"] = time.perf_counter() - t0
        tr_loader = torch.utils.data.DataLoader(tr_ds, batch_size=s.batch_size, collate_fn=collate)
        te_loader = torch.utils.data.DataLoader(te_ds, batch_size=s.batch_size, collate_fn=collate)
        say("capturing per-example gradients")
        ((gtr, gte), _), sec, _ = timed(
            lambda: collect_with_losses(
                net, [tr_loader, te_loader], factors=needs_factors(grad_methods), progress=progress
            )
        )
        meta.update(grad_seconds=sec, D=gtr.dim, blocks=len(gtr.names))
        out, exact = score_class_detection(gtr, gte, grad_methods, ytr, yte, s, progress)
        if s.checkpoint_methods:
            say(f"label-free λ, TracIn-CP and checkpoint ensembles: captures at {len(checkpoints)} checkpoints")
        extra, tables = extra_class_rows(
            net,
            checkpoints,
            checkpoints.learning_rates,
            tr_loader,
            te_loader,
            gtr,
            gte,
            ytr,
            yte,
            exact,
            s,
            grad_methods,
            progress,
        )
        out.update(extra)
        meta["checkpoints"] = len(checkpoints)
        if "z0inf" in trace_methods:
            say(f"Z0-Inf: losses at {len(checkpoints)} checkpoints")
            out["z0inf"] = z0inf_record(
                net, checkpoints, tr_loader, te_loader, ytr, yte, exact, progress, tables=tables
            )
    if "bif" in trace_methods:
        say(f"BIF: {s.bif_chains} chains × {s.bif_draws} draws")
        sgld = torch.utils.data.DataLoader(
            train_fit,
            batch_size=s.batch_size,
            collate_fn=collate,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        b = run_bif(
            net,
            sgld,
            tr_loader,
            te_loader,
            reduce=None,
            n_beta=float(len(train_texts)),
            localization=s.bif_localization,
            step_size=s.bif_step_size,
            chains=s.bif_chains,
            draws=s.bif_draws,
            burnin=s.bif_burnin,
            seed=seed,
            progress=progress,
        )
        b.info["note"] = f"{s.bif_chains}×{s.bif_draws} draws"
        out["bif"] = record(b, ytr, yte, exact)
    if s.sweeps:
        say("damping sweep (METHODS.md §9)")
    out.sweeps = class_damping_sweep(gtr, gte, ytr, yte, s, grad_methods, progress)
    meta["total_seconds"] = time.perf_counter() - t_start
    out.meta = meta
    return finish_report(out, out_dir)


# ------------------------------------------------------------------------------------ report
def class_detection_table(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): AUC and recall@k (mean ± std over test points), agreement with exact, λ, seconds."""
    headers = ["method", "AUC (mean ± std over test points)", "recall@k", "corr. with exact", "λ", "seconds", "note"]
    rows = []
    for m, r in result.items():
        label = CLASS_LABELS.get(m) or row_label(m)
        if r.get("auc") is None:
            skipped = r.get("skipped") or ""
            cell = "n/a" if skipped.startswith("n/a") else ("skipped" if skipped else "failed")
            rows.append([label, cell, "—", "—", "—", "—", (skipped or r.get("error") or "")[:160]])
            continue
        name = label + (f" ({len(r['seeds'])} seeds)" if r.get("seeds") and len(r["seeds"]) > 1 else "")
        note = r.get("note", "")
        if r.get("auc_seed_std") is not None:
            note = (note + "; " if note else "") + f"AUC std over seeds {r['auc_seed_std']:.3f}"
        if r.get("converged") is False:
            note = (
                note + "; " if note else ""
            ) + f"not converged at depth {result.meta['settings'].get('lissa_depth')}"
        rows.append(
            [
                name,
                pm(*r["auc"]),
                pm(*r["recall"]),
                pm(r.get("corr_with_exact"), None),
                lambda_text(r.get("lambda")),
                f"{r['seconds']:.2f}",
                note,
            ]
        )
    return headers, rows


def _context(meta: dict) -> str:
    return (
        f"Model: {meta['model']} + LoRA r={meta['settings']['lora_r']}; {meta['n_train']} training / "
        f"{meta['n_test']} test examples in {meta['classes']} classes; gradients on the `{meta['grad_field']}` field; "
        f"D = {meta['D']}; total {meta['total_seconds']:.0f} s."
    )


def finish_report(result: ExperimentResult, out: Path | None) -> ExperimentResult:
    """Set ``result.summary()`` and, with ``out``, write report.md, results.json and the plots."""
    meta = result.meta
    headers, rows = class_detection_table(result)
    text = [text_table(headers, rows), "", _context(meta)]
    sweep = result.sweeps.get("damping")
    if sweep:
        text += ["", "AUC vs damping multiplier", text_table(*damping_section(sweep))]
    result.report_dir = out
    if out is not None:
        pts = {row_label(m): (r["seconds"], r["auc"][0]) for m, r in result.items() if r.get("auc") is not None}
        plot_time_vs_auc(out / "time_vs_auc.png", pts, "Time vs class-detection AUC", ylabel="class-detection AUC")
        if sweep:
            plot_auc_vs_damping(
                out / "auc_vs_damping.png", sweep, "Class-detection AUC vs damping", ylabel="class-detection AUC"
            )
        md = [
            f"# fastinf class-detection report ({meta.get('dataset', '')})",
            "",
            _context(meta),
            "",
            "Per test example: AUC = roc_auc(same class, −I[j, :]); recall@k = share of its class among the k most "
            "negative scores, k = training examples of the class. Mean ± std over test examples. "
            "'(label-free λ)': the method at the λ the damping rule picks from the training gradients alone; "
            "tracin_cp = −Σ_t η_t ⟨g_t(i), g_t(j)⟩ over the checkpoints; '(checkpoint ensemble)': the mean of the "
            "method's scores over the checkpoints after the initial one. The test-free baselines (training loss, "
            "gradient norm, self-influence) are " + NO_TEST_DEPENDENCE + ".",
            "",
            *section(None, headers, rows),
        ]
        if sweep:
            md += section("AUC vs damping multiplier", *damping_section(sweep))
        write_report(out, markdown=md, results={"methods": dict(result), "meta": meta, "sweeps": result.sweeps})
        text += ["", f"report: {out / 'report.md'}"]
    result.summary_text = "\n".join(text)
    return result
