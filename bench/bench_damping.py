"""Label-free damping: which λ rule to trust (issue 12 §1; METHODS.md §10).

Protocol, so that nothing is tuned on the numbers it reports:

1. **Choose** each rule's constant on Rotten Tomatoes only (mislabel task, MiniLM + LoRA, n = 600,
   3 data seeds): ``mean_eig`` c and ``dof`` share, each over a grid, maximising the mean mislabel AUC
   over seeds — for exact influence on the mean test gradient (global λ) and for DataInf (block-wise λ)
   separately. ``gcv`` and ``paper`` have no constant.
2. **Validate** the chosen constants unchanged on the held-out class-detection tasks: ``math``
   (SmolLM2, DataInf's math_with_reason), ``gsm`` (reasoning-gym templates) and ``digits`` (a class-
   conditional UNet), 2 seeds each at their ``fastinf eval`` sizes.
3. Report every rule on every task: AUC mean ± sd over seeds, the chosen λ relative to the papers' λ, and
   the default DataInf (papers' λ) baseline; exact at the best multiple of the papers' λ in hindsight
   (an oracle that reads the labels, for scale only).

The gradients are captured by the experiments' own functions (``fastinf.eval.experiments``): the
scoring step of each experiment is swapped for one that keeps the gradients, which are cached under
``--cache`` (default /tmp/fastinf-bench-damping), so a rerun only scores. Exact influence for every λ
comes from one float64 eigendecomposition of the n×n Gram per task and seed (scores = −T Pᵀ U
diag(1/(σ_k/n + λ)) Uᵀ), checked against ``fastinf.Exact`` at one λ (100 × the papers') per task and seed; DataInf is
``fastinf.DataInf`` with the dict of per-block λ that ``fastinf.select_damping(..., blockwise=True)``
returns.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/bench_damping.py            # ~35-40 CPU-minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_damping.py --capture-only        # fill the cache
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_damping.py --quick               # RT only, 1 seed, n = 160

Writes ``bench/results/bench_damping.csv`` (one row per task × seed × method × rule: AUC in ``throughput``
with unit ``AUC``, λ/λ_paper in the note) and ``bench_damping.md`` (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402
from fastinf.eval.metrics import class_detection, mislabel_auc  # noqa: E402
from fastinf.utils import atomic_write, markdown_table  # noqa: E402

TUNE_TASK = "mislabel"
HELD_OUT = ("math", "gsm", "digits")
# the constants searched on Rotten Tomatoes
MEAN_EIG_CS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
DOF_SHARES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
ORACLE_EXPONENTS = tuple(range(-2, 8))  # exact at paper λ × 10^k (hindsight, for scale)


# ------------------------------------------------------------------------------------ capture
def _capture_mislabel(seed: int, n_train: int, n_test: int) -> dict:
    from fastinf.data import rotten_tomatoes
    from fastinf.eval.experiments import mislabel as ml

    got: dict = {}

    def keep(gtr, gte, flipped, s, methods, progress, say):
        got.update(train=gtr, test=gte, flipped=np.asarray(flipped))
        return {"methods": {}, "scores": {}, "exact": None, "sweeps": {}}

    texts, labels = rotten_tomatoes()
    settings = ml.MislabelSettings(n_train=n_train, n_test=n_test, sweeps=False)
    with mock.patch.object(ml, "_score_gradients", keep):
        res = ml.mislabel_experiment(
            texts, labels, methods=["exact"], seeds=(seed,), settings=settings, progress=False, log=print
        )
    meta = {k: res.meta.get(k) for k in ("test_accuracy", "train_seconds", "grad_seconds", "D", "n_train", "n_test")}
    return {**got, "meta": meta}


def _capture_classes(task: str, seed: int) -> dict:
    from fastinf.eval.experiments import class_detection as cd
    from fastinf.eval.experiments import diffusion as dm
    from fastinf.eval.experiments import run_task
    from fastinf.eval.experiments.common import ExperimentResult

    got: dict = {}

    def keep(gtr, gte, methods, ytr, yte, settings, progress):
        got.update(train=gtr, test=gte, ytr=np.asarray(ytr), yte=np.asarray(yte))
        return ExperimentResult(), None

    patches = [mock.patch.object(mod, "score_class_detection", keep) for mod in (cd, dm)]
    patches += [mock.patch.object(mod, "class_damping_sweep", lambda *a, **k: {}) for mod in (cd, dm)]
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        for p in patches:
            stack.enter_context(p)
        try:
            run_task(task, seed=seed, methods=["exact"], report_dir=Path(tmp) / "r", progress=False, log=print)
        except Exception as e:  # the report of an empty result may fail after the capture; the gradients are kept
            if "train" not in got:
                raise
            print(f"[{task} seed {seed}] report step failed after the capture ({type(e).__name__}: {e}); ignored")
    return {**got, "meta": {"seconds": time.perf_counter() - t0, "D": got["train"].dim}}


def cache_path(task: str, seed: int, cache: Path, n_train: int) -> Path:
    return cache / (f"{task}_s{seed}" + (f"_n{n_train}" if task == TUNE_TASK else "") + ".pt")


def captured(task: str, seed: int, cache: Path, n_train: int, n_test: int) -> dict:
    """The task's gradients and labels for one seed: from the cache, or captured (and cached)."""
    path = cache_path(task, seed, cache, n_train)
    if path.exists():
        d = torch.load(path, weights_only=False)
    else:
        print(f"capturing {task} seed {seed} ...", flush=True)
        t0 = time.perf_counter()
        d = _capture_mislabel(seed, n_train, n_test) if task == TUNE_TASK else _capture_classes(task, seed)
        d["train"], d["test"] = d["train"].blocks(), d["test"].blocks()
        d["meta"]["capture_seconds"] = time.perf_counter() - t0
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(d, tmp)
        tmp.replace(path)
        print(f"captured {task} seed {seed} in {d['meta']['capture_seconds']:.0f} s", flush=True)
    d["train"] = fastinf.GradientSet(d["train"], validate=False)
    d["test"] = fastinf.GradientSet(d["test"], validate=False)
    return d


# ------------------------------------------------------------------------------------ scoring
class ExactPath:
    """Exact influence for any global λ from one float64 eigendecomposition of the n×n Gram K = PPᵀ:
    scores (m, n) = −T Pᵀ (K/n + λI)⁻¹ = −A U diag(1/(σ_k/n + λ)) Uᵀ, A = T Pᵀ (or its mean row)."""

    def __init__(self, train: fastinf.GradientSet, test: fastinf.GradientSet, mean: bool) -> None:
        n = train.n
        K = torch.zeros(n, n, dtype=torch.float64)
        A = torch.zeros(test.n, n, dtype=torch.float64)
        for k in train.names:
            X = train[k].double()
            K += X @ X.T
            A += test[k].double() @ X.T
        self.n, self.mean = n, mean
        self.sig, self.U = torch.linalg.eigh(K)
        self.sig = self.sig.clamp_min(0)
        self.AU = (A.mean(0, keepdim=True) if mean else A) @ self.U

    def scores(self, lam: float) -> torch.Tensor:
        s = -(self.AU / (self.sig / self.n + lam)) @ self.U.T
        return s[0] if self.mean else s


def metric(task: str, d: dict, scores: torch.Tensor) -> float:
    if task == TUNE_TASK:
        return mislabel_auc(scores, d["flipped"])
    return class_detection(scores, d["ytr"], d["yte"])["auc"][0]


def configs(tuned: dict[str, dict[str, tuple]] | None, method: str) -> list[tuple[str, str, dict]]:
    """(label, rule, options) to run: every constant of the grids (tuning), or the chosen ones."""
    out = [("paper", "paper", {}), ("gcv", "gcv", {})]
    if tuned is None:
        out += [(f"mean_eig c={c:g}", "mean_eig", {"c": c}) for c in MEAN_EIG_CS]
        out += [(f"dof share={s:g}", "dof", {"share": s}) for s in DOF_SHARES]
    else:
        for rule in ("mean_eig", "dof"):
            opts = tuned[method][rule]
            out.append((f"{rule} {', '.join(f'{k}={v:g}' for k, v in opts.items())}", rule, opts))
    return out


def lambdas(d: dict, rule: str, opts: dict, specs: dict, names: list[str]) -> tuple[float, dict[str, float]]:
    """(global λ, per-block λ) of a rule, by the library's rule functions on the task's spectra."""
    from fastinf.estimators.damping import check_rule, rule_lambda

    rule, opts = check_rule(rule, opts)
    glob = rule_lambda(rule, opts, specs[tuple(names)])
    block = {k: rule_lambda(rule, opts, specs[(k,)]) for k in names}
    return glob, block


def score_task(task: str, seed: int, d: dict, tuned, rows: list[dict], cache: Path | None = None) -> None:
    """Every rule (constants: the grids, or the chosen ones) for exact and DataInf on one task and seed.
    With ``cache``: the rows are kept in a JSON file named by the task, seed and configurations (reruns
    reuse them)."""
    key = json.dumps([task, seed, tuned, MEAN_EIG_CS, DOF_SHARES, ORACLE_EXPONENTS], sort_keys=True)
    path = cache / f"rows_{task}_s{seed}_{hashlib.sha1(key.encode()).hexdigest()[:12]}.json" if cache else None
    if path is not None and path.exists():
        rows.extend(json.loads(path.read_text()))
        return
    new: list[dict] = []
    _score_task(task, seed, d, tuned, new)
    if path is not None:
        atomic_write(path, json.dumps(new))
    rows.extend(new)


def _score_task(task: str, seed: int, d: dict, tuned, rows: list[dict]) -> None:
    from fastinf.estimators.damping import group_spectra

    train, test = d["train"], d["test"]
    names, n, mean = train.names, train.n, task == TUNE_TASK
    t0 = time.perf_counter()
    tmean = {k: test[k].double().mean(0) for k in names}
    rows_fn = lambda a, b: train.iter_chunks(256, start=a, stop=b) if b > a else ()  # noqa: E731
    groups = [names] + [[k] for k in names]
    specs = group_spectra(rows_fn, n, train.dims, groups, test_mean=tmean)
    paper_g = specs[tuple(names)].paper_lambda
    paper_b = {k: specs[(k,)].paper_lambda for k in names}
    path = ExactPath(train, test, mean)
    # the library end to end must give the same λ and scores as the shortcuts above
    lam_gcv = fastinf.select_damping(train, test, rule="gcv")
    assert math.isclose(lam_gcv, lambdas(d, "gcv", {}, specs, names)[0], rel_tol=1e-9), "select_damping != spectra"
    for lam in (paper_g * 100,):
        ex = fastinf.Exact(damping=lam).fit(train)
        ref = ex.score(test, reduce="mean") if mean else ex.score(test)
        err = float((path.scores(lam) - ref).abs().max() / ref.abs().max())
        assert err < 1e-6, f"{task} seed {seed}: eigen-path exact differs from fastinf.Exact by {err:.2e}"
    base = {"op": f"damping:{task}", "shape": f"n={n},m={test.n},D={train.dim},blocks={len(names)}",
            "dtype": "float64", "unit": "AUC"}  # fmt: skip
    for method in ("exact", "datainf"):
        for label, rule, opts in configs(tuned, method):
            glob, block = lambdas(d, rule, opts, specs, names)
            t1 = time.perf_counter()
            if method == "exact":
                auc, lam_note = metric(task, d, path.scores(glob)), glob / paper_g
            else:
                est = fastinf.DataInf(damping=block).fit(train)
                auc = metric(task, d, est.score(test, reduce="mean") if mean else est.score(test))
                lam_note = math.exp(np.mean([math.log(block[k] / paper_b[k]) for k in names]))
            rows.append(
                {
                    **base,
                    "method": method,
                    "backend": label,
                    "rule": rule,
                    "opts": opts,
                    "task": task,
                    "seed": seed,
                    "auc": auc,
                    "ratio": lam_note,
                    "seconds": time.perf_counter() - t1,
                }  # fmt: skip
            )
    for k in ORACLE_EXPONENTS:  # exact at paper λ × 10^k: hindsight, for scale only
        rows.append({**base, "method": "exact", "backend": f"oracle paper×1e{k}", "rule": "oracle", "opts": {"k": k},
                     "task": task, "seed": seed, "auc": metric(task, d, path.scores(paper_g * 10.0**k)),
                     "ratio": 10.0**k, "seconds": 0.0})  # fmt: skip
    print(f"[{task} seed {seed}] scored in {time.perf_counter() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------ analysis
def by(rows, **want):
    return [r for r in rows if all(r[k] == v for k, v in want.items())]


def mean_sd(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=float)
    return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def choose(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """The constant of each rule with the highest mean Rotten Tomatoes AUC over seeds, per method."""
    out: dict[str, dict[str, dict]] = {}
    for method in ("exact", "datainf"):
        out[method] = {}
        for rule, key, grid in (("mean_eig", "c", MEAN_EIG_CS), ("dof", "share", DOF_SHARES)):
            means = {v: np.mean([r["auc"] for r in by(rows, method=method, rule=rule) if r["opts"][key] == v])
                     for v in grid}  # fmt: skip
            out[method][rule] = {key: max(grid, key=lambda v: (means[v], -abs(math.log(v))))}
    return out


def summary(rows: list[dict], tasks: list[str]) -> list[list]:
    """One line per (method, config): AUC mean ± sd over seeds and mean λ/λ_paper, per task."""
    keys = []
    for r in rows:
        if r["rule"] != "oracle" and (r["method"], r["backend"]) not in keys:
            keys.append((r["method"], r["backend"]))
    out = []
    for method, label in keys:
        line = [f"{method} ({label})"]
        for t in tasks:
            rs = by(rows, method=method, backend=label, task=t)
            if not rs:
                line += ["—", "—"]
                continue
            m, sd = mean_sd([r["auc"] for r in rs])
            ratio = math.exp(np.mean([math.log(r["ratio"]) for r in rs]))
            line += [f"{m:.3f} ± {sd:.3f}", f"{ratio:.3g}"]
        out.append(line)
    return out


def oracle_line(rows: list[dict], tasks: list[str]) -> list:
    line = ["exact (hindsight best paper × 10^k, reads the labels)"]
    for t in tasks:
        rs = by(rows, task=t, rule="oracle")
        if not rs:
            line += ["—", "—"]
            continue
        ks = sorted({r["opts"]["k"] for r in rs})
        best = max(ks, key=lambda k: np.mean([r["auc"] for r in rs if r["opts"]["k"] == k]))
        m, sd = mean_sd([r["auc"] for r in rs if r["opts"]["k"] == best])
        line += [f"{m:.3f} ± {sd:.3f}", f"1e{best}"]
    return line


def paired(rows: list[dict], tasks: list[str], a: tuple[str, str], b: tuple[str, str]) -> dict:
    """Paired differences a − b over every (task, seed) of ``tasks``: mean, sd, standard error, n."""
    diffs = []
    for t in tasks:
        for s in sorted({r["seed"] for r in by(rows, task=t)}):
            ra = by(rows, task=t, seed=s, method=a[0], backend=a[1])
            rb = by(rows, task=t, seed=s, method=b[0], backend=b[1])
            if ra and rb:
                diffs.append(ra[0]["auc"] - rb[0]["auc"])
    if not diffs:
        return {"n": 0}
    m, sd = mean_sd(diffs)
    return {"n": len(diffs), "mean": m, "sd": sd, "se": sd / math.sqrt(len(diffs)), "diffs": diffs}


def study(args, cache: Path, tune_seeds, held_seeds, tasks, n_train, n_test) -> int:
    t0 = time.perf_counter()
    tune_rows: list[dict] = []
    meta: dict = {}
    for seed in tune_seeds:
        d = captured(TUNE_TASK, seed, cache, n_train, n_test)
        meta[f"{TUNE_TASK}_s{seed}"] = d["meta"]
        score_task(TUNE_TASK, seed, d, None, tune_rows, cache)
    tuned = choose(tune_rows)
    print(f"chosen on Rotten Tomatoes: {json.dumps(tuned)}", flush=True)
    # the RT rows of the chosen configurations, relabelled like the held-out rows
    rows = [r for r in tune_rows if r["rule"] in ("paper", "gcv", "oracle")]
    for method in ("exact", "datainf"):
        for rule in ("mean_eig", "dof"):
            ((key, v),) = tuned[method][rule].items()
            for r in by(tune_rows, method=method, rule=rule):
                if r["opts"][key] == v:
                    rows.append({**r, "backend": f"{rule} {key}={v:g}"})
    # the best label-free configuration, fixed on Rotten Tomatoes before any held-out number is seen
    cands = [(m, lab) for m in ("exact", "datainf") for lab, rule, _ in configs(tuned, m) if rule != "paper"]
    best = max(cands, key=lambda c: np.mean([r["auc"] for r in by(rows, method=c[0], backend=c[1])]))
    print(f"best label-free configuration on Rotten Tomatoes: {best}", flush=True)
    for task in tasks:
        for seed in held_seeds:
            if args.cached_only and not cache_path(task, seed, cache, n_train).exists():
                print(f"[{task} seed {seed}] not in the cache: skipped (--cached-only)", flush=True)
                continue
            d = captured(task, seed, cache, n_train, n_test)
            meta[f"{task}_s{seed}"] = d["meta"]
            score_task(task, seed, d, tuned, rows, cache)
    write_results(args, rows, tune_rows, tuned, best, tasks, meta, time.perf_counter() - t0)
    return 0


# ------------------------------------------------------------------------------------ output
def _fmt_pair(p: dict) -> str:
    if not p.get("n"):
        return "—"
    return f"{p['mean']:+.3f} ± {p['sd']:.3f} (se {p['se']:.3f}, {p['n']} pairs)"


def write_results(args, rows, tune_rows, tuned, best, tasks, meta, seconds) -> None:
    rb = bu.RowBuilder("cpu")
    held = [r for r in rows if r["task"] != TUNE_TASK]
    for r in tune_rows + held:
        rb.add(op=r["op"], method=r["method"], backend=r["backend"], shape=r["shape"], dtype=r["dtype"],
               median_s=r["seconds"], throughput=r["auc"], unit="AUC",
               note=f"seed={r['seed']} lambda/paper={r['ratio']:.4g}")  # fmt: skip
    csv_path = bu.write_csv(rb.rows, bu.output_path(args, "bench_damping"), append=args.append)
    all_tasks = [TUNE_TASK, *tasks]
    lines = [
        "# bench_damping: label-free damping rules (issue 12 §1, METHODS.md §10)",
        "",
        f"{rb.version}, {rb.date}; this run {seconds / 60:.1f} min (captured gradients and scored rows are cached "
        f"under {args.cache}; bench/README.md states the cost of a cold run).",
        "",
        "Protocol: each rule's constant is chosen on Rotten Tomatoes only (mislabel AUC, mean over seeds), per method;"
        " then validated unchanged on the held-out class-detection tasks. λ/λ_paper: the chosen λ over the papers' λ"
        " (0.1 × mean squared entry): global for exact, the geometric mean over blocks for DataInf (block-wise).",
        "",
        "## Rotten Tomatoes: the constants searched (mislabel AUC, mean ± sd over seeds)",
        "",
    ]
    grid_rows = []
    for label, _, _ in configs(None, "exact"):
        line = [label]
        for m in ("exact", "datainf"):
            rs = by(tune_rows, method=m, backend=label)
            mu, sd = mean_sd([r["auc"] for r in rs])
            ratio = math.exp(np.mean([math.log(r["ratio"]) for r in rs]))
            line += [f"{mu:.3f} ± {sd:.3f}", f"{ratio:.3g}"]
        grid_rows.append(line)
    lines += [markdown_table(["rule", "exact AUC", "exact λ/λ_paper", "datainf AUC", "datainf λ/λ_paper"], grid_rows)]
    lines += ["", f"Chosen: {json.dumps(tuned)}. Best label-free configuration on Rotten Tomatoes: "
              f"**{best[0]} ({best[1]})**.", ""]  # fmt: skip
    headers = ["method (rule)"]
    for t in all_tasks:
        headers += [f"{t} AUC", "λ/λ_paper"]
    lines += ["## Every rule on every task (AUC mean ± sd over seeds)", ""]
    lines += [markdown_table(headers, [*summary(rows, all_tasks), oracle_line(rows, all_tasks)]), ""]
    seeds = {t: sorted({r["seed"] for r in by(rows, task=t)}) for t in all_tasks}
    lines += [f"Seeds: {json.dumps(seeds)}. Rotten Tomatoes: mislabel AUC ({rows[0]['shape']}); held-out: "
              "class-detection AUC (mean over test points).", ""]  # fmt: skip
    default = ("datainf", "paper")
    goal = paired(rows, tasks, best, default)
    met = goal.get("n", 0) > 0 and goal["mean"] >= 0.05 and goal["mean"] > 2 * goal["se"]
    lines += [
        "## Goal: best label-free configuration vs default DataInf on the held-out tasks",
        "",
        f"{best[0]} ({best[1]}) − datainf (paper), paired over held-out task × seed: {_fmt_pair(goal)}; per pair "
        f"{', '.join(f'{x:+.3f}' for x in goal.get('diffs', []))}.",
        f"Goal (≥ +0.05 AUC and beyond seed noise, mean > 2 se): **{'met' if met else 'not met'}**.",
        "",
        "## Each rule against its method's papers' λ on the held-out tasks (paired over task × seed)",
        "",
    ]
    cmp_rows = []
    for m in ("exact", "datainf"):
        for label, rule, _ in configs(tuned, m):
            if rule == "paper":
                continue
            p = paired(rows, tasks, (m, label), (m, "paper"))
            q = paired(rows, tasks, (m, label), default)
            mu = np.mean([r["auc"] for r in held if r["method"] == m and r["backend"] == label]) if held else math.nan
            cmp_rows.append([f"{m} ({label})", f"{mu:.3f}", _fmt_pair(p), _fmt_pair(q)])
    lines += [markdown_table(["method (rule)", "held-out mean AUC", "− same method at paper λ",
                              "− datainf (paper)"], cmp_rows), ""]  # fmt: skip
    lines += ["## Capture", "", "```", json.dumps(meta, indent=1, default=str), "```", ""]
    md = csv_path.with_suffix(".md")
    atomic_write(md, "\n".join(lines))
    js = {"tuned": tuned, "best": list(best), "goal": {k: v for k, v in goal.items()}, "goal_met": bool(met),
          "rows": [{k: v for k, v in r.items() if k not in ("op", "dtype", "unit")} for r in rows]}  # fmt: skip
    atomic_write(csv_path.with_suffix(".json"), json.dumps(js, indent=1, default=float))
    print("\n".join(lines), flush=True)
    print(f"wrote {csv_path}, {md}", flush=True)


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="/tmp/fastinf-bench-damping", help="captured gradients, per task and seed")
    ap.add_argument("--capture-only", action="store_true", help="fill the cache and stop")
    ap.add_argument("--held-out-only", action="store_true", help="with --capture-only: the held-out tasks only")
    ap.add_argument("--cached-only", action="store_true", help="score only the held-out task × seed already cached")
    ap.add_argument("--tune-seeds", type=int, nargs="+", default=None, help="Rotten Tomatoes seeds (default 0 1 2)")
    ap.add_argument("--held-out-seeds", type=int, nargs="+", default=None, help="held-out seeds (default 0 1)")
    ap.add_argument("--tasks", nargs="+", default=list(HELD_OUT), choices=list(HELD_OUT), help="held-out tasks")
    bu.add_output_args(ap, "bench_damping", quick_help="Rotten Tomatoes only, 1 seed, n = 160 (a smoke test)")
    return ap


def plan(args) -> tuple[list[int], list[int], list[str], int, int]:
    if args.quick:
        return args.tune_seeds or [0], [], [], 160, 40
    return args.tune_seeds or [0, 1, 2], args.held_out_seeds or [0, 1], list(args.tasks), 600, 150


def body(args) -> int:
    bu.set_torch_threads()
    cache = Path(args.cache)
    tune_seeds, held_seeds, tasks, n_train, n_test = plan(args)
    jobs = [] if args.held_out_only else [(TUNE_TASK, s) for s in tune_seeds]
    jobs += [(t, s) for t in tasks for s in held_seeds]
    if args.capture_only:
        for task, seed in jobs:
            captured(task, seed, cache, n_train, n_test)
        return 0
    return study(args, cache, tune_seeds, held_seeds, tasks, n_train, n_test)


def main(argv: list[str] | None = None) -> int:
    return bu.run_script(build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
