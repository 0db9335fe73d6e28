"""The ``fastinf`` command line: ``fastinf <command> [options]`` (also ``python -m fastinf``).

Commands live in a registry: a subclass of :class:`Command` decorated with :func:`register_command`
becomes a subcommand with its own ``--help``. ``main`` turns user errors (bad arguments, invalid
input, a ``ValueError`` from the library) into one line on stderr and a non-zero exit status;
``--debug`` shows the traceback instead.

Exit status: 0 success, 1 the command failed, 2 bad command line, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["COMMANDS", "Command", "CommandError", "build_parser", "main", "register_command"]

PROG = "fastinf"


class CommandError(Exception):
    """A failure the user can act on: printed as ``fastinf <cmd>: error: <message>``, exit status 1."""


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) and go through :func:`main`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------ registry
class Command:
    """A subcommand. Subclasses set ``name`` and ``help`` and implement ``add_arguments`` and ``run``."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    description: ClassVar[str | None] = None  # longer text for ``--help`` (default: ``help``)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's options to its subparser."""

    def run(self, args: argparse.Namespace) -> int:  # pragma: no cover - overridden
        """Execute; return the exit status. Raise :class:`CommandError` (or ``ValueError``) for user errors."""
        raise NotImplementedError


COMMANDS: dict[str, type[Command]] = {}


def register_command(cls: type[Command]) -> type[Command]:
    """Class decorator: make ``cls`` available as ``fastinf <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    COMMANDS[cls.name] = cls
    return cls


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # In subparsers the defaults are suppressed so that `fastinf -v demo` and `fastinf demo -v` both work.
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {"default": False}
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what the library decides (backends, ...)", **d
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors", **d)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="fastinf: fast training-data influence for LoRA-tuned models.",
        epilog=f"Run '{PROG} <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, cls in COMMANDS.items():
        cmd = cls()
        p = sub.add_parser(
            name,
            help=cls.help,
            description=cls.description or cls.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _common_options(p, suppress=True)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastinf`` / ``python -m fastinf``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_command", None) is None:
            raise UsageError(f"{PROG}: error: missing command; choose from {', '.join(COMMANDS)} (see '{PROG} --help')")
        debug = args.debug
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(levelname)s: %(message)s"
        )
        return int(args._command.run(args) or 0)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, OSError, RuntimeError) as e:
        if debug:
            raise
        where = f"{PROG} {argv[0]}" if argv and argv[0] in COMMANDS else PROG
        msg = " ".join(str(e).split()) or type(e).__name__
        kind = "" if isinstance(e, CommandError) else f"{type(e).__name__}: "
        print(f"{where}: error: {kind}{msg}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------ helpers
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return v


def _damping(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive number, got {text!r}")
    return v


def _progress(iterable: Any, *, desc: str, enabled: bool, total: int | None = None) -> Any:
    """A tqdm bar on stderr (hidden when stderr is not a terminal, or when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False, file=sys.stderr)


def _fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _fmt_pm(mean: float | None, std: float | None, digits: int = 3) -> str:
    if std is None:
        return _fmt_num(mean, digits)
    return f"{_fmt_num(mean, digits)} ± {_fmt_num(std, digits)}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """A plain-text (aligned, first column left, others right) or GitHub-markdown table."""
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ info
@register_command
class InfoCommand(Command):
    name = "info"
    help = "versions, compute backends, devices and available methods"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the information as JSON")

    @staticmethod
    def collect() -> dict[str, Any]:
        import numpy
        import torch

        import fastinf

        devices = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                prop = torch.cuda.get_device_properties(i)
                devices.append(
                    {
                        "index": i,
                        "name": prop.name,
                        "memory_gib": round(prop.total_memory / 2**30, 1),
                        "capability": f"{prop.major}.{prop.minor}",
                    }
                )
        return {
            "fastinf": fastinf.__version__,
            "fastinf_path": str(Path(fastinf.__file__).parent),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(),
            "backends": fastinf.ops.backends(),
            "cuda_devices": devices,
            "methods": fastinf.available_methods(),
            "data": _data_report(),
        }

    def run(self, args: argparse.Namespace) -> int:
        info = self.collect()
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"fastinf   {info['fastinf']}  ({info['fastinf_path']})")
        print(f"python    {info['python']}  ({info['platform']})")
        cuda = f"CUDA {info['torch_cuda']}" if info["torch_cuda"] else "CPU-only build"
        print(f"torch     {info['torch']}  ({cuda}, {info['torch_threads']} threads)")
        print(f"numpy     {info['numpy']}")
        print("backends:")
        for name, state in info["backends"].items():
            print(f"  {name:<8}{state}")
        print("CUDA devices:")
        if not info["cuda_devices"]:
            print("  none")
        for d in info["cuda_devices"]:
            print(f"  cuda:{d['index']}  {d['name']}  {d['memory_gib']} GiB  (compute capability {d['capability']})")
        print(f"methods:  {', '.join(info['methods'])}")
        print("models and data:")
        for name, d in (info.get("data") or {}).items():
            where = d.get("path") or ""
            state = "found" if d.get("found") else f"MISSING ({d.get('install', 'see requirements-data.txt')})"
            ver = f" {d['version']}" if d.get("version") else ""
            extra = (
                f", cache {d['cache']} ({'ready' if d.get('cached') else 'built on first use'})" if "cache" in d else ""
            )
            print(f"  {name:<16}{d.get('package', '')}{ver}: {state}  {where}{extra}")
        return 0


def _data_report() -> dict[str, Any]:
    try:
        from .data import data_report

        return data_report()
    except Exception as e:  # noqa: BLE001 - info must always print
        return {"error": {"found": False, "install": f"{type(e).__name__}: {e}"}}


# ------------------------------------------------------------------------------------ demo
# Methods whose scores depend on the seed: run with --seeds seeds and reported as mean ± std.
STOCHASTIC_METHODS = ("rrinf",)
DAMPING_MULTIPLIERS = (1, 10, 100, 10**3, 10**4, 10**5, 10**6)
RRINF_ITERS = (10**3, 10**4)


def _method_options(name: str, *, damping: float | str, seed: int | None) -> dict[str, Any]:
    """Options for ``get_estimator``: an explicit ``damping`` and, where the method takes one, ``seed``."""
    import dataclasses

    import fastinf

    options_cls = getattr(type(fastinf.get_estimator(name)), "Options", None)
    fields = {f.name for f in dataclasses.fields(options_cls)} if dataclasses.is_dataclass(options_cls) else set()
    opts: dict[str, Any] = {}
    if damping != "auto" and "damping" in fields:
        opts["damping"] = damping
    if seed is not None and "seed" in fields:
        opts["seed"] = seed
    return opts


def _uses_damping(est: Any) -> bool:
    return bool(getattr(est, "requires_positive_damping", True))


def _lambda_summary(lams: dict[str, float] | None) -> str:
    if not lams:
        return "—"
    vals = sorted(set(lams.values()))
    if len(vals) == 1:
        return f"{vals[0]:.2e}"
    return f"{vals[0]:.1e}…{vals[-1]:.1e}"


def _mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    import numpy as np

    a = np.asarray(xs, dtype=np.float64)
    if a.size == 1:
        return float(a[0]), None
    return float(a.mean()), float(a.std(ddof=1))


def _score_mean(name: str, opts: dict[str, Any], train: Any, test: Any) -> tuple[Any, Any, float]:
    """(estimator, aggregated scores (n,), seconds for fit + score)."""
    import fastinf

    t0 = time.perf_counter()
    est = fastinf.get_estimator(name, **opts)
    with warnings.catch_warnings():
        # non-convergence is reported in the table (converged_ -> '*'), not as a warning per call
        warnings.filterwarnings("ignore", message="LiSSA did not reach", category=RuntimeWarning)
        scores = est.fit(train).score(test, reduce="mean")
    return est, scores, time.perf_counter() - t0


def run_mislabel_methods(
    task: Any,
    methods: Sequence[str],
    *,
    seed: int = 0,
    n_seeds: int = 3,
    damping: float | str = "auto",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Every method on the task's gradients: mislabel AUC, agreement with ``exact``, λ, seconds.

    Returns ``{method: {"status", "auc", "auc_std", "pearson", "spearman", "corr_with_exact",
    "seconds", "seeds", "lambda", ...}}``. A method that fails is recorded with ``status="error: ..."``.
    """
    import fastinf

    from .eval.metrics import agreement, mislabel_auc

    order = sorted(methods, key=lambda m: m != "exact")  # the reference first
    reference = None
    results: dict[str, dict[str, Any]] = {}
    bar = _progress(order, desc="methods", enabled=progress)
    for name in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)
        seeds = [seed + i for i in range(n_seeds)] if name in STOCHASTIC_METHODS else [seed]
        rec: dict[str, Any] = {"status": "ok", "seeds": seeds if name in STOCHASTIC_METHODS else None}
        try:
            probe = fastinf.get_estimator(name, **_method_options(name, damping=damping, seed=None))
            if not isinstance(probe, fastinf.Estimator):
                rec["status"] = "skipped: needs loss traces, not gradients"
                results[name] = rec
                continue
            aucs, pears, spears, secs = [], [], [], []
            for s in seeds:
                est, scores, sec = _score_mean(
                    name, _method_options(name, damping=damping, seed=s), task.train, task.test
                )
                if not bool(scores.isfinite().all()):
                    raise ValueError("the scores contain NaN or inf")
                aucs.append(mislabel_auc(scores, task.is_flipped))
                secs.append(sec)
                if name == "exact" and reference is None:
                    reference = scores
                if reference is not None:
                    ag = agreement(scores, reference)
                    pears.append(ag["pearson"])
                    spears.append(ag["spearman"])
            rec["auc"], rec["auc_std"] = _mean_std(aucs)
            rec["aucs"] = aucs
            rec["pearson"], rec["pearson_std"] = _mean_std(pears) if pears else (None, None)
            rec["spearman"], rec["spearman_std"] = _mean_std(spears) if spears else (None, None)
            rec["corr_with_exact"] = rec["pearson"]
            rec["seconds"] = sum(secs) / len(secs)
            rec["lambda"] = est.lambdas_ if _uses_damping(est) else None
            rec["blockwise"] = bool(getattr(est.options, "blockwise", False))
            converged = getattr(est, "converged_", None)  # iterative solvers that track it (LiSSA)
            rec["converged"] = None if converged is None else bool(converged)
        except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
            rec["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())}"
        results[name] = rec
    return {m: results[m] for m in order}


def run_sweeps(
    task: Any,
    *,
    seed: int = 0,
    n_seeds: int = 3,
    damping: float | str = "auto",
    progress: bool = True,
    available: Sequence[str] = (),
) -> dict[str, Any]:
    """METHODS.md §9 sensitivity: mislabel AUC of exact/datainf vs a multiplier of the 'auto' λ, and of
    RRInf vs its iteration count beside its closed-form fixed point (at ``damping``)."""
    from .eval.metrics import mislabel_auc

    jobs: list[tuple[str, str, Any, dict[str, Any]]] = []
    for name in ("exact", "datainf"):
        if name in available:
            for mult in DAMPING_MULTIPLIERS:
                jobs.append(("damping", name, mult, {"damping_factor": 0.1 * mult}))
    if "rrinf" in available:
        for iters in RRINF_ITERS:
            for i in range(n_seeds):
                opts = {**_method_options("rrinf", damping=damping, seed=seed + i), "iters": iters}
                jobs.append(("rrinf_iters", "rrinf", iters, opts))
    if "rrinf_fixed_point" in available:
        opts = _method_options("rrinf_fixed_point", damping=damping, seed=None)
        jobs.append(("rrinf_iters", "rrinf_fixed_point", "fixed point", opts))
    raw: dict[str, dict[str, dict[Any, list[float]]]] = {"damping": {}, "rrinf_iters": {}}
    for kind, name, key, opts in _progress(jobs, desc="sweeps", enabled=progress):
        _, scores, _ = _score_mean(name, opts, task.train, task.test)
        raw[kind].setdefault(name, {}).setdefault(key, []).append(mislabel_auc(scores, task.is_flipped))
    out: dict[str, Any] = {"damping_multipliers": list(DAMPING_MULTIPLIERS), "damping": {}, "rrinf_iters": {}}
    for name, per in raw["damping"].items():
        out["damping"][name] = {str(k): v[0] for k, v in per.items()}
    for name, per in raw["rrinf_iters"].items():
        out["rrinf_iters"][name] = {
            str(k): dict(zip(("auc", "auc_std"), _mean_std(v), strict=True)) for k, v in per.items()
        }
    return out


def _damping_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Group methods by the λ they used (to 3 significant digits): one line per distinct set of values."""
    groups: dict[str, list[str]] = {}
    for name, r in results.items():
        lams = r.get("lambda")
        if not lams:
            continue
        vals = {f"{v:.3g}" for v in lams.values()}
        if len(vals) == 1:
            desc = f"global λ = {vals.pop()}"
        else:
            desc = "per block: " + ", ".join(f"{k} {v:.3g}" for k, v in lams.items())
        groups.setdefault(desc, []).append(name)
    return [f"  {desc}  ({', '.join(names)})" for desc, names in groups.items()]


@register_command
class DemoCommand(Command):
    name = "demo"
    help = "the main job: mislabelled-data detection on Rotten Tomatoes with MiniLM + LoRA and every method"
    description = (
        "Task 1 of the DataInf/RRInf papers on real data, offline: LoRA-fine-tune the bundled MiniLM\n"
        "encoder (with a classification head) on Rotten Tomatoes critic snippets with 20 % of the\n"
        "training labels flipped (HF Trainer + fastinf's checkpoint callback), capture per-example\n"
        "gradients, score with every method (influence on the mean test loss; positive = harmful),\n"
        "Z0-Inf from the saved checkpoints and the BIF from SGLD traces, run the damping and iteration\n"
        "sweeps, print one table (AUC, agreement with exact, time, memory) and write a report\n"
        "directory (report.md, results.json, scores.json, PNG plots). About 10 minutes on a 2-core\n"
        "CPU; --quick: under 3 minutes. --synthetic: the seconds-long synthetic variant."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--n-train",
            type=_positive_int,
            default=None,
            metavar="N",
            help="training examples (default 1000; --quick: 400)",
        )
        parser.add_argument(
            "--n-test", type=_positive_int, default=None, metavar="M", help="test examples (default 200; --quick: 100)"
        )
        parser.add_argument(
            "--seed",
            type=_non_negative_int,
            default=0,
            metavar="S",
            help="seed of the data, model and methods (default 0)",
        )
        parser.add_argument(
            "--seeds",
            type=_positive_int,
            default=3,
            metavar="K",
            help=f"seeds for the seed-dependent methods ({', '.join(STOCHASTIC_METHODS)}); default 3",
        )
        parser.add_argument(
            "--methods", default=None, metavar="LIST", help="comma-separated subset of the methods (default: all)"
        )
        parser.add_argument(
            "--damping",
            type=_damping,
            default="auto",
            metavar="LAMBDA",
            help="'auto' (0.1 × mean squared gradient entry, METHODS.md §0) or an absolute λ",
        )
        parser.add_argument("--quick", action="store_true", help="smaller run (CI smoke test)")
        parser.add_argument(
            "--synthetic", action="store_true", help="the synthetic task (a tiny LoRA MLP on Gaussian data; seconds)"
        )
        parser.add_argument(
            "--sweep",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="damping / iteration sensitivity sweeps (default: on, off with --quick)",
        )
        parser.add_argument(
            "--report-dir",
            type=Path,
            default=None,
            metavar="DIR",
            help="write the report here (real demo default: ./fastinf-report; --synthetic: no report by default)",
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        if not args.synthetic:
            return run_real_demo(args)
        import fastinf

        from .eval.synthetic import mislabel_task

        available = fastinf.available_methods()
        methods = available
        if args.methods:
            methods = [m.strip().lower().replace("-", "_") for m in args.methods.split(",") if m.strip()]
            unknown = [m for m in methods if m not in available]
            if unknown:
                raise CommandError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(available)}")
            if "exact" not in methods and "exact" in available:
                methods = ["exact", *methods]  # the reference of the correlations
        n_train = args.n_train or (400 if args.quick else 1000)
        n_test = args.n_test or (100 if args.quick else 200)
        sweep = (not args.quick) if args.sweep is None else args.sweep
        if round(0.2 * n_train) < 1:
            raise CommandError(f"--n-train {n_train} is too small: 20% of it must be at least one example")
        progress = not args.no_progress
        if args.report_dir is not None:
            if args.report_dir.exists() and not args.report_dir.is_dir():
                raise CommandError(f"--report-dir {args.report_dir} exists and is not a directory")
            args.report_dir.mkdir(parents=True, exist_ok=True)

        t0 = time.perf_counter()
        task = mislabel_task(n_train, n_test, seed=args.seed)
        t_task = time.perf_counter() - t0
        results = run_mislabel_methods(
            task, methods, seed=args.seed, n_seeds=args.seeds, damping=args.damping, progress=progress
        )
        sweeps = (
            run_sweeps(
                task, seed=args.seed, n_seeds=args.seeds, damping=args.damping, progress=progress, available=methods
            )
            if sweep
            else None
        )
        total = time.perf_counter() - t0

        report = self._render(task, results, sweeps, args, t_task, total)
        print(report["text"])
        if args.report_dir is not None:
            payload = {
                "command": "demo",
                "arguments": {
                    "n_train": n_train,
                    "n_test": n_test,
                    "seed": args.seed,
                    "seeds": args.seeds,
                    "damping": args.damping,
                    "quick": args.quick,
                    "sweep": sweep,
                    "methods": methods,
                },
                "task": task.info,
                "results": results,
                "sweeps": sweeps,
                "seconds": {"task": t_task, "total": total},
                "versions": InfoCommand.collect(),
            }
            _write_atomic(args.report_dir / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
            _write_atomic(args.report_dir / "report.md", report["markdown"] + "\n")
            print(f"\nwrote {args.report_dir / 'results.json'} and {args.report_dir / 'report.md'}")
        failed = [m for m, r in results.items() if r["status"].startswith("error")]
        if failed:
            for m in failed:
                print(f"{PROG} demo: method {m} failed: {results[m]['status'][len('error: ') :]}", file=sys.stderr)
            return 1
        return 0

    @staticmethod
    def _render(
        task: Any,
        results: dict[str, dict[str, Any]],
        sweeps: dict[str, Any] | None,
        args: argparse.Namespace,
        t_task: float,
        total: float,
    ) -> dict[str, str]:
        info = task.info
        headers = ["method", "mislabel AUC", "Pearson (exact)", "Spearman (exact)", "λ", "seconds"]
        rows = []
        for name, r in results.items():
            if r["status"] != "ok":
                rows.append([name, r["status"], "", "", "", ""])
                continue
            label = f"{name} ({len(r['seeds'])} seeds)" if r.get("seeds") else name
            if r.get("converged") is False:
                label += " *"
            lam = _lambda_summary(r["lambda"])
            if r["lambda"] and len(set(r["lambda"].values())) > 1:
                lam += " (per block)"
            rows.append(
                [
                    label,
                    _fmt_pm(r["auc"], r["auc_std"]),
                    _fmt_pm(r["pearson"], r["pearson_std"]),
                    _fmt_pm(r["spearman"], r["spearman_std"]),
                    lam,
                    f"{r['seconds']:.3f}",
                ]
            )
        blocks = ", ".join(f"{k} {v}" for k, v in info["blocks"].items())
        head = [
            f"fastinf demo: synthetic mislabelled-data detection (CPU, seed {args.seed})",
            f"model: {info['model']}, {info['steps']} steps of full-batch GD",
            f"  accuracy: train {info['train_acc_noisy_labels']:.3f} on its noisy labels "
            f"({info['train_acc_true_labels']:.3f} on the true ones), test {info['test_acc']:.3f}",
            f"n = {info['n_train']} training examples ({info['n_flipped']} labels flipped), m = {info['n_test']} test "
            f"examples, D = {info['D']}",
            f"  blocks: {blocks}",
            "damping: " + ("'auto' = 0.1 × mean squared gradient entry" if args.damping == "auto" else "explicit λ"),
            *_damping_lines(results),
        ]
        notes = [
            "AUC: roc_auc(is_flipped, influence on the mean test loss), positive = harmful; 0.5 = chance.",
            "Pearson/Spearman: correlation of the same (n,) scores with `exact`. "
            + (
                f"Seed-dependent methods: mean ± std over seeds {args.seed}..{args.seed + args.seeds - 1}."
                if args.seeds > 1
                else ""
            ),
        ]
        if any(r.get("converged") is False for r in results.values()):
            notes.append("*: the iterative solve did not reach its tolerance (converged_ = False): a truncated series.")
        sweep_text, sweep_md = [], []
        if sweeps:
            mults = sweeps["damping_multipliers"]
            if sweeps["damping"]:
                h = ["damping ×", *[f"{m:g}" for m in mults]]
                rws = [[name, *[_fmt_num(v[str(m)]) for m in mults]] for name, v in sweeps["damping"].items()]
                title = "Mislabel AUC vs the damping multiplier (λ = multiplier × the 'auto' λ)"
                sweep_text += ["", title, format_table(h, rws)]
                sweep_md += ["", f"### {title}", "", format_table(h, rws, markdown=True)]
            if sweeps["rrinf_iters"]:
                h = ["RRInf", "mislabel AUC"]
                rws = []
                for name, per in sweeps["rrinf_iters"].items():
                    for k, v in per.items():
                        lab = f"{name}, {int(k):,} iterations" if k.isdigit() else name
                        rws.append([lab, _fmt_pm(v["auc"], v["auc_std"])])
                title = "RRInf: iterations vs its closed-form fixed point"
                sweep_text += ["", title, format_table(h, rws)]
                sweep_md += ["", f"### {title}", "", format_table(h, rws, markdown=True)]
        footer = f"total {total:.1f} s (task: data + training + per-example gradients {t_task:.1f} s)"
        text = "\n".join([*head, "", format_table(headers, rows), *notes, *sweep_text, "", footer])
        md = "\n".join(
            [
                "# fastinf demo report",
                "",
                *[f"- {line.strip()}" for line in head],
                "",
                format_table(headers, rows, markdown=True),
                "",
                *notes,
                *sweep_md,
                "",
                footer,
            ]
        )
        return {"text": text, "markdown": md}


# ------------------------------------------------------------------------------------ the real main job
def _check_report_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise CommandError(f"--report-dir {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parse_methods(text: str | None, allowed: Sequence[str]) -> list[str] | None:
    if not text:
        return None
    methods = [m.strip().lower().replace("-", "_") for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in allowed]
    if unknown:
        raise CommandError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(allowed)}")
    if "exact" not in methods and "exact" in allowed:
        methods = ["exact", *methods]
    return methods


def run_real_demo(args: argparse.Namespace) -> int:
    from .data import rotten_tomatoes
    from .eval.tasks import ALL_METHODS, MislabelSettings, format_mislabel_console, mislabel_experiment

    methods = _parse_methods(args.methods, ALL_METHODS)
    if args.quick:
        s = MislabelSettings(
            n_train=160,
            n_test=40,
            epochs=3,
            bif_chains=2,
            bif_draws=6,
            bif_burnin=10,
            bif_thin=2,
            damping_multipliers=(1, 100, 1e4),
            rrinf_iterations=(1000, 10_000),
            rrinf_seeds=(0, 1, 2),
        )
    else:
        s = MislabelSettings()
    if args.n_train:
        s.n_train = args.n_train
    if args.n_test:
        s.n_test = args.n_test
    s.rrinf_seeds = tuple(range(args.seed, args.seed + args.seeds))
    if args.sweep is not None:
        s.sweeps = args.sweep
    if round(s.flip * s.n_train) < 1:
        raise CommandError(f"--n-train {s.n_train} is too small: 20% of it must be at least one example")
    out = _check_report_dir(args.report_dir or Path("fastinf-report"))
    texts, labels = rotten_tomatoes()
    print(
        f"fastinf demo: mislabelled-data detection on Rotten Tomatoes critic snippets ({len(texts)} available), "
        f"MiniLM-L6 + LoRA r={s.lora_r}; n_train={s.n_train} (20 % flipped), n_test={s.n_test}, {s.epochs} epochs, "
        f"checkpoints every 1/{s.checkpoints_per_epoch} epoch, BIF {s.bif_chains}×{s.bif_draws} SGLD draws"
        + (" [--quick]" if args.quick else ""),
        flush=True,
    )
    res = mislabel_experiment(
        texts,
        labels,
        n_train=s.n_train,
        n_test=s.n_test,
        methods=methods,
        seeds=(args.seed,),
        settings=s,
        report_dir=out,
        progress=not args.no_progress,
    )
    m = res.meta
    print()
    print(format_mislabel_console(res))
    print(
        f"\nn_train={m['n_train']} ({m['flipped']} flipped), n_test={m['n_test']}, D={m['D']} in {m['blocks']} blocks, "
        f"test accuracy {m['test_accuracy']:.3f}; Z0-Inf from {m.get('checkpoints', '—')} checkpoints; "
        f"train {m['train_seconds']:.0f}s, gradients {m['grad_seconds']:.0f}s, total {m['total_seconds']:.0f}s"
    )
    sw = res.sweeps
    if sw.get("damping"):
        mults = sorted(next(iter(sw["damping"].values())))
        print("\nAUC vs damping multiplier")
        print(
            format_table(
                ["method", *[f"×{x:g}" for x in mults]],
                [[k, *[f"{v[x]:.3f}" for x in mults]] for k, v in sw["damping"].items()],
            )
        )
        print("\nRRInf iterations vs its fixed point")
        rows = [[f"{k:,} iterations", _fmt_pm(*v)] for k, v in sw["rrinf_iterations"].items()]
        print(format_table(["RRInf", "AUC"], [*rows, ["rrinf_fixed_point", f"{sw['rrinf_fixed_point']:.3f}"]]))
    print(
        f"\nreport: {out / 'report.md'} (results.json, scores.json, detection_curves.png, time_vs_auc.png, "
        "auc_vs_damping.png)"
    )
    failed = [k for k, v in res.items() if v.get("auc") is None]
    for k in failed:
        print(f"{PROG} demo: method {k} failed: {res[k].get('error')}", file=sys.stderr)
    return 1 if failed else 0


@register_command
class EvalCommand(Command):
    name = "eval"
    help = "run an experiment by task name: mislabel | math | gsm | digits"
    description = (
        "mislabel: Task 1 (Rotten Tomatoes, MiniLM) — like `demo`.\n"
        "math:     Task 2, class detection on the DataInf math-with-reason task with SmolLM2-135M + LoRA on q/v\n"
        "          (a subset: --classes × --per-class training, 10 test per class).\n"
        "gsm:      the harder class-detection variant: reasoning-gym gsm_symbolic templates as classes.\n"
        "digits:   diffusion class detection: class-conditional UNet2DModel on scikit-learn's digits."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("task", choices=["mislabel", "math", "gsm", "digits"])
        parser.add_argument("--quick", action="store_true", help="smaller run")
        parser.add_argument("--classes", type=_positive_int, default=None, help="classes (math: 4, gsm: 8)")
        parser.add_argument("--per-class", type=_positive_int, default=None, help="training examples per class")
        parser.add_argument("--per-class-test", type=_positive_int, default=None, help="test examples per class")
        parser.add_argument(
            "--grad-field",
            choices=["text", "answer", "prompt"],
            default=None,
            help="tokens whose loss the gradients use (math: text; gsm: answer)",
        )
        parser.add_argument("--methods", default=None, metavar="LIST", help="comma-separated methods")
        parser.add_argument("--seed", type=_non_negative_int, default=0)
        parser.add_argument("--report-dir", type=Path, default=None, metavar="DIR")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from .eval.tasks import ALL_METHODS, ClassDetectionSettings, class_detection_experiment
        from .eval.tasks import format_class_detection_console as fmt_cd

        out = _check_report_dir(args.report_dir or Path(f"fastinf-report-{args.task}"))
        methods = _parse_methods(args.methods, ALL_METHODS)
        progress = not args.no_progress
        if args.task == "mislabel":
            ns = argparse.Namespace(
                methods=args.methods,
                quick=args.quick,
                n_train=None,
                n_test=None,
                seed=args.seed,
                seeds=3,
                sweep=None,
                report_dir=out,
                no_progress=args.no_progress,
            )
            return run_real_demo(ns)
        if args.task == "digits":
            from .data import digits
            from .eval.diffusion import DiffusionSettings, diffusion_class_detection_experiment

            x, y = digits(seed=args.seed)
            ds = DiffusionSettings(base_epochs=8, lora_epochs=4) if args.quick else DiffusionSettings()
            n_train = (args.per_class or (10 if args.quick else 20)) * 10
            n_test = (args.per_class_test or (2 if args.quick else 5)) * 10
            res = diffusion_class_detection_experiment(
                x,
                y,
                n_base=600 if args.quick else 1200,
                n_train=n_train,
                n_test=n_test,
                methods=methods,
                settings=ds,
                seed=args.seed,
                report_dir=out,
                progress=progress,
            )
        else:
            from .data import datainf_task, gsm_symbolic

            k = args.classes or (4 if args.task == "math" else 8)
            per = args.per_class or (12 if args.quick else (45 if args.task == "math" else 20))
            per_te = args.per_class_test or (3 if args.quick else (10 if args.task == "math" else 5))
            if args.task == "math":
                tr = datainf_task("math_with_reason", "train", classes=k, per_class=per)
                te = datainf_task("math_with_reason", "test", classes=k, per_class=per_te)
                cls_key, field = "variation", args.grad_field or "text"
            else:
                tr, te = gsm_symbolic(n_templates=k, per_template_train=per, per_template_test=per_te, seed=args.seed)
                cls_key, field = "template", args.grad_field or "answer"
            cs = ClassDetectionSettings(grad_field=field, epochs=1 if args.quick else 2)
            if args.quick:
                cs.damping_multipliers = (1, 100, 1e4)
            res = class_detection_experiment(
                [r["text"] for r in tr],
                [r[cls_key] for r in tr],
                [r["text"] for r in te],
                [r[cls_key] for r in te],
                train_prompts=[r["prompt"] for r in tr],
                test_prompts=[r["prompt"] for r in te],
                methods=methods,
                settings=cs,
                seed=args.seed,
                report_dir=out,
                progress=progress,
            )
            res.meta["dataset"] = "DataInf math_with_reason" if args.task == "math" else "reasoning-gym gsm_symbolic"
            from .eval.tasks import _write_cd_report

            _write_cd_report(res, out)  # again, now with the data set's name
        print(fmt_cd(res))
        m = res.meta
        print(
            f"\nn_train={m['n_train']}, n_test={m['n_test']}, classes={m['classes']}, gradients on "
            f"{m['grad_field']}, D={m['D']}; total {m['total_seconds']:.0f}s; report: {out / 'report.md'}"
        )
        failed = [k for k, v in res.items() if v.get("auc") is None]
        return 1 if failed else 0


@register_command
class GradsCommand(Command):
    name = "grads"
    help = "capture per-example LoRA gradients of a JSON-lines data set into a GradientStore"
    description = (
        "Loads a bundled model (--model minilm | smollm2) with a LoRA adapter — a saved peft adapter\n"
        "directory (--adapter) or a fresh one (--r, --targets) — and writes the per-example gradients of\n"
        "every row of --data (JSON lines; --text-field, and --label-field for classification) to --out,\n"
        "a resumable GradientStore (re-run the same command to resume after an interruption)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", choices=["minilm", "smollm2"], required=True)
        parser.add_argument("--data", type=Path, required=True, help="JSON-lines file")
        parser.add_argument("--out", type=Path, required=True, help="GradientStore directory")
        parser.add_argument("--adapter", type=Path, default=None, help="peft adapter directory (save_pretrained)")
        parser.add_argument("--text-field", default="text")
        parser.add_argument("--label-field", default="label", help="class label field (minilm)")
        parser.add_argument("--num-labels", type=_positive_int, default=2)
        parser.add_argument("--r", type=_positive_int, default=8, help="LoRA rank of a fresh adapter")
        parser.add_argument("--batch-size", type=_positive_int, default=16)
        parser.add_argument("--max-length", type=_positive_int, default=128)
        parser.add_argument("--projection", type=_positive_int, default=None, help="random projection dim per block")
        parser.add_argument("--overwrite", action="store_true", help="replace a store made with other arguments")
        parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of a fresh adapter's weights")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        import fastinf

        if not args.data.is_file():
            raise CommandError(f"--data {args.data} does not exist")
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
        if not rows:
            raise CommandError(f"--data {args.data} has no rows")
        if args.text_field not in rows[0]:
            raise CommandError(f"--text-field {args.text_field!r} not in the data (fields: {sorted(rows[0])})")
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model

        if args.model == "minilm":
            from .data import load_minilm

            tok, base = load_minilm(num_labels=args.num_labels)
            task, targets = "SEQ_CLS", ["query", "value"]
            if args.label_field not in rows[0]:
                raise CommandError(f"--label-field {args.label_field!r} not in the data (fields: {sorted(rows[0])})")
        else:
            from .data import load_smollm2

            tok, base = load_smollm2()
            task, targets = "CAUSAL_LM", ["q_proj", "v_proj"]
        if args.adapter is not None:
            model = PeftModel.from_pretrained(base, str(args.adapter), is_trainable=True)
        else:
            torch.manual_seed(args.seed)  # a fresh adapter must be the same on a resumed run
            cfg = LoraConfig(
                task_type=task, r=args.r, lora_alpha=2 * args.r, target_modules=targets, init_lora_weights=False
            )
            model = get_peft_model(base, cfg)
        texts = [r[args.text_field] for r in rows]

        def batches():
            for i in range(0, len(texts), args.batch_size):
                enc = tok(
                    texts[i : i + args.batch_size],
                    truncation=True,
                    max_length=args.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                b = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
                if args.model == "minilm":
                    b["labels"] = torch.tensor([int(r[args.label_field]) for r in rows[i : i + args.batch_size]])
                else:
                    b["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
                yield b

        class _Loader:
            def __len__(self):
                return (len(texts) + args.batch_size - 1) // args.batch_size

            def __iter__(self):
                return batches()

        col = fastinf.LoRAGradientCollector(
            model, include_modules_to_save=args.model == "minilm", projection=args.projection
        )
        try:
            store = col.collect(_Loader(), store=args.out, progress=not args.no_progress, overwrite=args.overwrite)
        except fastinf.gradients.StoreError as e:
            raise CommandError(str(e).replace("pass overwrite=True", "pass --overwrite")) from None
        print(f"{store.n} examples × {len(store.names)} blocks (D = {store.dim}) in {args.out}")
        return 0


@register_command
class ScoreCommand(Command):
    name = "score"
    help = "score a training GradientStore against a test store with one method"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--train", type=Path, required=True, help="GradientStore of the training examples")
        parser.add_argument("--test", type=Path, required=True, help="GradientStore of the query examples")
        parser.add_argument("--method", default="datainf")
        parser.add_argument("--reduce", choices=["mean"], default=None, help="influence on the mean test loss")
        parser.add_argument("--topk", type=_positive_int, default=None, help="only the k largest per query")
        parser.add_argument("--smallest", action="store_true", help="with --topk: the k most helpful instead")
        parser.add_argument("--damping", type=_damping, default="auto")
        parser.add_argument("--out", type=Path, required=True, help="output .safetensors (or .csv)")

    def run(self, args: argparse.Namespace) -> int:
        import fastinf

        grad_methods = [m for m in fastinf.available_methods() if m not in ("z0inf", "bif")]
        if args.method not in grad_methods:
            raise CommandError(f"--method must be one of {', '.join(grad_methods)}")
        train, test = fastinf.GradientStore.open(args.train), fastinf.GradientStore.open(args.test)
        opts = {} if args.method == "hessian_free" else {"damping": args.damping}
        est = fastinf.get_estimator(args.method, **opts).fit(train)
        if args.topk:
            vals, idx = est.topk(test, args.topk, largest=not args.smallest)
            tensors = {"values": vals.float().contiguous(), "indices": idx.contiguous()}
        else:
            tensors = {"scores": est.score(test, reduce=args.reduce).float().contiguous()}
        if args.out.suffix == ".csv":
            import numpy as np

            key = "scores" if "scores" in tensors else "values"
            np.savetxt(args.out, np.atleast_2d(tensors[key].numpy()), delimiter=",")
            if "indices" in tensors:
                np.savetxt(args.out.with_suffix(".indices.csv"), tensors["indices"].numpy(), delimiter=",", fmt="%d")
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(args.out), metadata={"method": args.method, "sign": "positive = harmful"})
        shape = {k: tuple(v.shape) for k, v in tensors.items()}
        print(f"{args.method}: {shape} -> {args.out} (rows = test examples, columns = training examples)")
        return 0


@register_command
class BenchCommand(Command):
    name = "bench"
    help = "run a benchmark script from the repository's bench/ directory"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("which", choices=["estimators", "capture", "traces", "ops"])
        parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script (e.g. --quick)")

    def run(self, args: argparse.Namespace) -> int:
        import runpy

        here = Path(__file__).resolve().parent.parent / "bench" / f"bench_{args.which}.py"
        if not here.is_file():
            raise CommandError(f"{here} not found: the benchmarks live in the repository checkout's bench/ directory")
        sys.argv = [str(here), *args.rest]
        try:
            runpy.run_path(str(here), run_name="__main__")
        except SystemExit as e:
            return int(e.code or 0)
        return 0


if __name__ == "__main__":
    sys.exit(main())
