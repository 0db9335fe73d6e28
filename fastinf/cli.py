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
        return 0


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
    help = "synthetic end-to-end mislabelled-data detection with every method (CPU, seconds)"
    description = (
        "Train a small LoRA-adapted model on synthetic data with 20 % of the training labels flipped,\n"
        "compute per-example gradients, score the training set with every method (influence on the\n"
        "mean test loss; positive = harmful) and report how well each ranks the flipped examples\n"
        "(ROC AUC), how it agrees with the exact influence, its damping and its run time."
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
        parser.add_argument("--quick", action="store_true", help="smaller task and no sensitivity sweeps")
        parser.add_argument(
            "--sweep",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="damping / iteration sensitivity sweeps (default: on, off with --quick)",
        )
        parser.add_argument(
            "--report-dir", type=Path, default=None, metavar="DIR", help="write results.json and report.md here"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
