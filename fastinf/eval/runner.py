"""Per-method runners shared by every experiment (and ``fastinf demo --synthetic``).

Each runner fits and scores one family of methods and returns :class:`MethodRun` records: the raw
scores (one entry per seed for a stochastic method), wall time and peak memory, the λ used and
convergence flags. Turning scores into a task metric (mislabel AUC, class-detection AUC, ...) is
the experiment's job; the sweeps take that metric as a callable.

Which method takes gradients or loss traces, uses damping or depends on a seed comes from the
estimator registry (:func:`fastinf.estimators.method_info`), never from lists of names here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..estimators import BIF, RRInf, RRInfFixedPoint, Z0Inf, available_methods, get_estimator, method_info
from ..traces import LossTrace, checkpoint_gram, loss_table, sample_posterior_traces
from ..utils import PeakMemory, timed

__all__ = [
    "BASELINE_LABELS",
    "MethodRun",
    "damping_sweep",
    "error_text",
    "grad_norms",
    "label_free_damping",
    "row_label",
    "run_baselines",
    "run_label_free",
    "method_options",
    "rrinf_iteration_sweep",
    "run_bif",
    "run_gradient_methods",
    "run_z0inf",
]

Metric = Callable[[torch.Tensor], float]


@dataclass
class MethodRun:
    """Scores of one method (one entry per seed for stochastic methods), with time and memory.

    ``info`` may hold ``lambda`` (a float, or [min, max] over blocks), ``converged``, ``seeds``,
    ``note``, ``diagnostics`` and ``warnings``. ``error`` is set (and ``scores`` empty) when it failed.
    """

    name: str
    scores: list[torch.Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def error_text(e: BaseException) -> str:
    """An exception as one line: ``"TypeName: message"``."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def method_options(
    name: str, *, damping: float | str = "auto", damping_factor: float = 0.1, seed: int = 0, lissa_depth: int = 100
) -> dict[str, Any]:
    """Options the experiments use for a gradient method: damping (where the method uses it), the
    seed (where it is stochastic) and LiSSA's recursion depth (a depth that fits a demo)."""
    info = method_info(name)
    opts: dict[str, Any] = {}
    if info.uses_damping:
        opts["damping"] = damping
        opts["damping_factor"] = damping_factor
    if info.stochastic and "seed" in info.options:
        opts["seed"] = seed
    if "depth" in info.options:
        opts["depth"] = lissa_depth
    return opts


def _lambda_info(est: Any) -> float | list[float] | None:
    if not method_info(est.name).uses_damping:
        return None
    lams = getattr(est, "lambdas_", None)
    if not lams:
        return None
    vals = list(lams.values())
    return vals[0] if len(set(vals)) == 1 else [min(vals), max(vals)]


def run_gradient_methods(
    train: Any,
    test: Any,
    methods: Sequence[str],
    *,
    reduce: str | None = "mean",
    seeds: Sequence[int] = (0, 1, 2),
    damping: float | str = "auto",
    lissa_depth: int = 100,
    progress: bool = True,
) -> dict[str, MethodRun]:
    """Fit + score every gradient method on (train, test); a stochastic method once per seed in
    ``seeds``. Scores are (n,) with ``reduce="mean"`` or (m, n) with ``reduce=None``. A failing method
    records its error instead of stopping the others. Methods that take loss traces are rejected."""
    kinds = {m: method_info(m).input_kind for m in methods}
    wrong = [m for m, k in kinds.items() if k != "gradients"]
    if wrong:
        raise ValueError(f"{', '.join(wrong)} take loss traces, not gradients (use run_z0inf / run_bif)")
    runs: dict[str, MethodRun] = {}
    for name in tqdm(list(methods), desc="influence methods", unit="method", disable=not progress):
        run = MethodRun(name)
        stochastic = method_info(name).stochastic
        run_seeds = list(seeds) if stochastic else [seeds[0] if seeds else 0]
        if stochastic:
            run.info["seeds"] = run_seeds
        try:
            est = None
            for s in run_seeds:
                est = get_estimator(name, **method_options(name, damping=damping, seed=s, lissa_depth=lissa_depth))
                with warnings.catch_warnings():
                    # non-convergence is reported in the tables (converged = False), not once per call
                    warnings.filterwarnings("ignore", message="LiSSA did not reach", category=RuntimeWarning)
                    scores, sec, mb = timed(lambda est=est: est.fit(train).score(test, reduce=reduce))
                if not bool(torch.isfinite(scores).all()):
                    raise ValueError("non-finite scores")
                run.scores.append(scores.detach().cpu().double())
                run.seconds.append(sec)
                run.peak_mb = max(run.peak_mb, mb)
            if hasattr(est, "converged_"):
                run.info["converged"] = bool(est.converged_)
            lam = _lambda_info(est)
            if lam is not None:
                run.info["lambda"] = lam
            run.info["blockwise"] = bool(getattr(est.options, "blockwise", False))
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            run.scores, run.error = [], error_text(e)
        runs[name] = run
    return runs


def run_z0inf(
    model: Any,
    checkpoints: Sequence[Any],
    train_loader: Any,
    test_loader: Any,
    *,
    reduce: str | None = "mean",
    loss_fn: Any = None,
    neighbors: int = 4,
    self_influence: bool = False,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> tuple[MethodRun, MethodRun | None]:
    """Z0-Inf from adapter checkpoints: per-example loss tables at every checkpoint, the checkpoint
    Gram, K = min(``neighbors``, T − 1) neighbours with |Spearman| weights. Returns the test-influence
    run and, with ``self_influence=True``, a run of −self-influence (high = suspicious, no test set).
    ``tables``: the (T, n) train and (T, m) test loss tables when already measured (e.g. by
    :func:`fastinf.eval.checkpoint_influence.checkpoint_influence`); the time then counts the Gram and
    scoring only."""
    run = MethodRun("z0inf")
    self_run = MethodRun("z0inf_self") if self_influence else None
    try:
        with PeakMemory() as mem:
            (Ltr, Lte, gram), t_tables, _ = timed(
                lambda: (
                    *(
                        tables
                        if tables is not None
                        else (
                            loss_table(model, checkpoints, train_loader, loss_fn=loss_fn, progress=progress),
                            loss_table(model, checkpoints, test_loader, loss_fn=loss_fn, progress=progress),
                        )
                    ),
                    checkpoint_gram(checkpoints),
                )
            )
            est = Z0Inf(neighbors=min(neighbors, len(checkpoints) - 1), weight_by_correlation="abs")
            scores, t_score, _ = timed(lambda: est.fit(LossTrace(Ltr, gram)).score(LossTrace(Lte), reduce=reduce))
            self_scores = est.self_influence("fd") if self_influence else None
        T = len(checkpoints)
        run.scores, run.seconds, run.peak_mb = [scores.double()], [t_tables + t_score], mem.mb
        what = "Gram (loss tables from the checkpoint captures)" if tables is not None else "loss tables"
        run.info["note"] = f"{what} {t_tables:.1f}s + scoring {t_score:.2f}s, T={T}, abs-Spearman weights"
        run.info["checkpoints"] = T
        if self_run is not None:
            self_run.scores, self_run.seconds, self_run.peak_mb = [-self_scores.double()], run.seconds, mem.mb
            self_run.info["note"] = "self-influence Σ_t‖ĝ_t‖² (no test set)"
    except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
        run.scores, run.error = [], error_text(e)
        if self_run is not None:
            self_run.scores, self_run.error = [], run.error
    return run, self_run


def run_bif(
    model: Any,
    sgld_loader: Any,
    train_loader: Any,
    test_loader: Any,
    *,
    reduce: str | None = "mean",
    n_beta: float,
    localization: float,
    step_size: float,
    chains: int,
    draws: int,
    burnin: int = 0,
    thin: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> MethodRun:
    """The local Bayesian influence function from SGLD loss traces of the train and test examples."""
    run = MethodRun("bif")
    try:
        with PeakMemory() as mem, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            (traces, scores), sec, _ = timed(
                lambda: _bif_scores(
                    model,
                    sgld_loader,
                    {"train": train_loader, "test": test_loader},
                    reduce=reduce,
                    n_beta=n_beta,
                    localization=localization,
                    step_size=step_size,
                    chains=chains,
                    draws=draws,
                    burnin=burnin,
                    thin=thin,
                    seed=seed,
                    progress=progress,
                )
            )
        run.scores, run.seconds, run.peak_mb = [scores.double()], [sec], mem.mb
        run.info["note"] = f"{chains} chains × {draws} draws, nβ={n_beta:g}, γ={localization:g}, ε={step_size:g}"
        diag = getattr(traces, "diagnostics", None)
        if diag is not None:
            run.info["diagnostics"] = diag.to_dict() if hasattr(diag, "to_dict") else str(diag)
        if caught:
            run.info["warnings"] = sorted({str(w.message)[:200] for w in caught})
    except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
        run.scores, run.error = [], error_text(e)
    return run


def _bif_scores(model, sgld_loader, eval_sets, *, reduce, **kw):
    traces = sample_posterior_traces(model, sgld_loader, eval_sets, **kw)
    return traces, BIF().fit(traces["train"]).score(traces["test"], reduce=reduce)


def damping_sweep(
    train: Any,
    test: Any,
    multipliers: Sequence[float],
    metric: Metric,
    *,
    reduce: str | None = "mean",
    methods: Sequence[str] = ("exact", "datainf"),
    base_factor: float = 0.1,
    progress: bool = True,
) -> dict[str, dict[float, float]]:
    """METHODS.md §9 sensitivity: ``metric(scores)`` of each method at λ = multiplier × the 'auto' λ
    (damping_factor = ``base_factor`` × multiplier). Returns ``{method: {multiplier: value}}``."""
    out: dict[str, dict[float, float]] = {}
    for name in methods:
        out[name] = {}
        for mult in tqdm(multipliers, desc=f"{name} damping sweep", disable=not progress):
            est = get_estimator(name, **method_options(name, damping_factor=base_factor * mult))
            out[name][float(mult)] = float(metric(est.fit(train).score(test, reduce=reduce)))
    return out


def rrinf_iteration_sweep(
    train: Any,
    test: Any,
    iterations: Sequence[int],
    seeds: Sequence[int],
    metric: Metric,
    *,
    reduce: str | None = "mean",
    progress: bool = True,
) -> dict[str, Any]:
    """``metric`` of RRInf after each iteration count (mean, std over ``seeds``) beside its closed-form
    fixed point: ``{"rrinf_iterations": {iters: (mean, std)}, "rrinf_fixed_point": value}``."""
    its: dict[int, tuple[float, float]] = {}
    for iters in tqdm(iterations, desc="rrinf iteration sweep", disable=not progress):
        vals = [float(metric(RRInf(iters=int(iters), seed=s).fit(train).score(test, reduce=reduce))) for s in seeds]
        its[int(iters)] = (float(np.mean(vals)), float(np.std(vals)))
    fp = float(metric(RRInfFixedPoint().fit(train).score(test, reduce=reduce)))
    return {"rrinf_iterations": its, "rrinf_fixed_point": fp}


def split_methods(methods: Sequence[str] | None, default: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Validate method names against the registry; returns (gradient methods, trace methods) in order.

    Raises:
        ValueError: an unknown method name (the message lists the available ones).
    """
    names = list(methods) if methods is not None else list(default if default is not None else available_methods())
    known = available_methods()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(known)}")
    grads = [m for m in names if method_info(m).input_kind == "gradients"]
    return grads, [m for m in names if m not in grads]


def mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, population std) of the finite values; (None, None) when there are none."""
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=np.float64)
    if a.size == 0:
        return None, None
    return float(a.mean()), float(a.std())


def scores_for_report(runs: Mapping[str, MethodRun]) -> dict[str, torch.Tensor]:
    """The first-seed scores of every run that produced any."""
    return {n: r.scores[0] for n, r in runs.items() if r.scores}


# ------------------------------------------------------------------------------------ baselines and label-free λ
BASELINE_LABELS = {
    "train_loss": "final training loss",
    "grad_norm": "gradient norm",
    "tracin_cp": "tracin_cp",
    "tracin_cp_self": "tracin_cp (self-influence)",
    "z0inf_self": "z0inf (self-influence)",
}


def row_label(key: str) -> str:
    """The table label of a result key: ``"datainf_self"`` → ``"datainf (self-influence)"``,
    ``"exact_label_free"`` → ``"exact (label-free λ)"``, ``"datainf_ckpt_ensemble"`` →
    ``"datainf (checkpoint ensemble)"``."""
    if key in BASELINE_LABELS:
        return BASELINE_LABELS[key]
    for suffix, text in (
        ("_self", "self-influence"),
        ("_label_free", "label-free λ"),
        ("_ckpt_ensemble", "checkpoint ensemble"),
    ):
        if key.endswith(suffix):
            return f"{key[: -len(suffix)]} ({text})"
    return key


def grad_norms(train: Any, chunk_size: int = 4096) -> torch.Tensor:
    """‖g_i‖ over every block (float64, (n,)), read in row chunks (a GradientStore is streamed)."""
    out = torch.empty(train.n, dtype=torch.float64)
    for start, ch in train.iter_chunks(chunk_size):
        sq = sum(v.to(torch.float64) for v in ch.sq_norms(torch.float64).values())
        out[start : start + ch.n] = sq.cpu()
    return out.sqrt()


def run_baselines(
    train: Any,
    train_losses: torch.Tensor | None,
    methods: Sequence[str],
    *,
    seed: int = 0,
    damping: float | str = "auto",
    lissa_depth: int = 100,
    skip_self: Mapping[str, str] | None = None,
    progress: bool = True,
) -> dict[str, MethodRun]:
    """The test-free baselines, as suspicion scores (high = rank first): ``train_loss`` (the final
    model's per-example loss, when given), ``grad_norm`` (‖g_i‖) and ``<method>_self`` for every
    gradient method in ``methods``: −I(i, i), i.e. g_iᵀ H⁻¹ g_i with that method's H (one fit, the
    first seed of a stochastic method). A failing method records its error; a method in ``skip_self``
    ({method: reason}) is not run and its run carries ``info["skipped"]``."""
    runs: dict[str, MethodRun] = {}
    for name, why in (skip_self or {}).items():
        if name in methods:
            runs[f"{name}_self"] = MethodRun(f"{name}_self", info={"skipped": why})
    methods = [m for m in methods if m not in (skip_self or {})]
    if train_losses is not None:
        runs["train_loss"] = MethodRun("train_loss", scores=[train_losses.detach().cpu().double()], seconds=[0.0])
        runs["train_loss"].info["note"] = "loss of the final model under the (noisy) training label"
    (norms, sec, mb) = timed(lambda: grad_norms(train))
    runs["grad_norm"] = MethodRun("grad_norm", scores=[norms], seconds=[sec], peak_mb=mb)
    for name in tqdm(list(methods), desc="self-influence", unit="method", disable=not progress):
        run = MethodRun(f"{name}_self")
        try:
            est = get_estimator(name, **method_options(name, damping=damping, seed=seed, lissa_depth=lissa_depth))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LiSSA did not reach", category=RuntimeWarning)
                sc, sec, mb = timed(lambda est=est: -est.fit(train).self_influence())
            if not bool(torch.isfinite(sc).all()):
                raise ValueError("non-finite self-influence")
            run.scores, run.seconds, run.peak_mb = [sc.detach().cpu().double()], [sec], mb
            run.info["note"] = "−I(i, i) (no test set)"
            lam = _lambda_info(est)
            if lam is not None:
                run.info["lambda"] = lam
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            run.error = error_text(e)
        runs[run.name] = run
    return runs


def label_free_damping(
    train: Any, test: Any = None, *, blockwise: bool = False, rule: tuple[str, Mapping[str, float]] | None = None
) -> tuple[Any, str]:
    """λ from the gradients alone with ``rule`` (``(name, options)``; default the label-free default
    :data:`fastinf.estimators.damping.LABEL_FREE_RULE`): ``(λ (a float, or {block: λ} when blockwise),
    "rule(options)")``. ``test`` is used only by a rule that needs it (GCV)."""
    from ..estimators.damping import LABEL_FREE_RULE, select_damping

    name, opts = rule or LABEL_FREE_RULE
    lam = select_damping(train, test if name == "gcv" else None, rule=name, blockwise=blockwise, **opts)
    text = name + ("(" + ", ".join(f"{k}={v:g}" for k, v in opts.items()) + ")" if opts else "")
    return lam, text


def run_label_free(
    train: Any,
    test: Any,
    methods: Sequence[str] = ("exact", "datainf"),
    *,
    reduce: str | None = "mean",
    rule: tuple[str, Mapping[str, float]] | None = None,
    suffix: str = "_label_free",
    progress: bool = True,
) -> dict[str, MethodRun]:
    """``<method><suffix>`` runs: each method at λ from :func:`label_free_damping` with ``rule`` (default
    the label-free default; a global λ for a global method such as exact, one λ per block for a block-wise one
    such as DataInf). The λ (or [min, max] over blocks) and the rule are in ``info``; the selection time is
    in the seconds. A failing method records its error."""
    runs: dict[str, MethodRun] = {}
    for name in tqdm(list(methods), desc="label-free λ", unit="method", disable=not progress):
        run = MethodRun(f"{name}{suffix}")
        try:
            blockwise = bool(getattr(get_estimator(name).options, "blockwise", False))
            (lam, rule_text), t_sel, _ = timed(
                lambda blockwise=blockwise: label_free_damping(train, test, blockwise=blockwise, rule=rule)
            )
            opts = {k: v for k, v in method_options(name).items() if k != "damping_factor"}
            opts["damping"] = lam
            est = get_estimator(name, **opts)
            sc, sec, mb = timed(lambda est=est: est.fit(train).score(test, reduce=reduce))
            if not bool(torch.isfinite(sc).all()):
                raise ValueError("non-finite scores")
            run.scores, run.seconds, run.peak_mb = [sc.detach().cpu().double()], [sec + t_sel], mb
            vals = list(lam.values()) if isinstance(lam, Mapping) else [float(lam)]
            run.info["lambda"] = vals[0] if len(set(vals)) == 1 else [min(vals), max(vals)]
            run.info["note"] = f"rule {rule_text}" + (", per block" if isinstance(lam, Mapping) else "")
            run.info["rule"] = rule_text
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            run.error = error_text(e)
        runs[run.name] = run
    return runs
