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
import sys
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
    from .version import __version__

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
        return _run(args)
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
        for option, flag in _FLAGS.items():  # the library names its options; the user typed flags
            msg = msg.replace(f"pass {option}=True", f"pass {flag}")
        kind = "" if isinstance(e, CommandError) else f"{type(e).__name__}: "
        print(f"{where}: error: {kind}{msg}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    """Run the command; under torchrun (``WORLD_SIZE`` > 1) join the process group first, and let only
    rank 0 print results (every rank runs the same command on its share of the work)."""
    import contextlib
    import io

    from .distributed import init_from_env, is_main

    if not init_from_env() or is_main():
        return int(args._command.run(args) or 0)
    with contextlib.redirect_stdout(io.StringIO()):
        return int(args._command.run(args) or 0)


DAMPING_HELP = "'auto' (each method's default rule), a rule ('paper', 'mean_eig', 'dof'; METHODS.md §10) or λ"

DEMO_DAMPING_HELP = "λ of the plain method rows: 'auto' (the papers' rule), a rule or an absolute λ"
# library option -> the command-line flag that sets it (for error messages)
_FLAGS = {"overwrite": "--overwrite", "allow_incomplete": "--allow-incomplete", "allow_mismatch": "--allow-mismatch"}


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
    from .estimators.damping import ESTIMATOR_RULES

    if text == "auto" or text in ESTIMATOR_RULES:
        return text
    expected = f"expected 'auto', a rule ({', '.join(ESTIMATOR_RULES)}) or a positive number"
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}")
    return v


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def _methods(text: str) -> list[str]:
    """A comma-separated list of method names (validated by the library against its registry)."""
    return [m.lower().replace("-", "_") for m in _names(text)]


def _print_result(command: str, result: Any) -> int:
    """Print an experiment's summary, and one stderr line per failed method; 1 if any failed."""
    from .eval import failed_methods

    print()
    print(result.summary())
    failed = failed_methods(result)
    for method, error in failed.items():
        print(f"{PROG} {command}: method {method} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------ commands
@register_command
class InfoCommand(Command):
    name = "info"
    help = "versions, compute backends, devices and available methods"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the information as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from .eval.jobs import format_info, system_info

        info = system_info()
        print(json.dumps(info, indent=2) if args.json else format_info(info))
        return 0


@register_command
class DemoCommand(Command):
    name = "demo"
    help = "the main job: mislabelled-data detection on Rotten Tomatoes with MiniLM + LoRA and every method"
    description = (
        "Task 1 of the DataInf/RRInf papers on real data, offline: LoRA-fine-tune the bundled MiniLM\n"
        "encoder (with a classification head) on Rotten Tomatoes critic snippets with 20 % of the\n"
        "training labels flipped (HF Trainer + fastinf's checkpoint callback), capture per-example\n"
        "gradients, score with every method (influence on the mean test loss; positive = harmful),\n"
        "the baselines (training loss, gradient norm, self-influence), label-free λ, TracIn-CP,\n"
        "checkpoint ensembles and Z0-Inf from the saved checkpoints (the BIF with --bif), over 3 data\n"
        "seeds: which method to use and how sure (mean ± sd, paired differences against DataInf),\n"
        "one table (AUC, agreement with exact, λ, time, memory), the damping and iteration sweeps and\n"
        "a report directory (report.md, results.json, scores.json, PNG plots). About 15 minutes on a\n"
        "2-core CPU; --quick (one seed): a few minutes. --synthetic: the seconds-long synthetic variant\n"
        "(gradient methods only), same table and report files."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from .eval.experiments.mislabel import SYNTHETIC_SIZES, MislabelSettings

        full, quick, syn = MislabelSettings(), MislabelSettings.quick(), SYNTHETIC_SIZES
        parser.add_argument(
            "--n-train",
            type=_positive_int,
            default=None,
            metavar="N",
            help=f"training examples (default {full.n_train}, --quick {quick.n_train}; "
            f"--synthetic: {syn['full'][0]}, --quick {syn['quick'][0]})",
        )
        parser.add_argument(
            "--n-test",
            type=_positive_int,
            default=None,
            metavar="M",
            help=f"test examples (default {full.n_test}, --quick {quick.n_test}; "
            f"--synthetic: {syn['full'][1]}, --quick {syn['quick'][1]})",
        )
        parser.add_argument(
            "--seed", type=_non_negative_int, default=0, metavar="S", help="seed of data, model, methods"
        )
        parser.add_argument("--seeds", type=_positive_int, default=3, metavar="K", help="seeds of rrinf: S, S+1, ...")
        parser.add_argument(
            "--data-seeds",
            type=_positive_int,
            default=None,
            metavar="K",
            help="data seeds S, S+1, ... (each its own split, flip set and training run; mean ± sd and paired "
            "differences against DataInf over them); default 3, --quick and --synthetic 1",
        )
        parser.add_argument("--bif", action="store_true", help="also the BIF (SGLD traces: minutes per data seed)")
        parser.add_argument("--methods", type=_methods, metavar="LIST", help="comma-separated methods (default: all)")
        parser.add_argument("--damping", type=_damping, default="auto", metavar="LAMBDA", help=DEMO_DAMPING_HELP)
        parser.add_argument("--quick", action="store_true", help="smaller run (CI smoke test)")
        parser.add_argument("--synthetic", action="store_true", help="the synthetic task (tiny LoRA MLP; seconds)")
        parser.add_argument(
            "--sweep", action=argparse.BooleanOptionalAction, help="damping/iteration sweeps (default on)"
        )
        parser.add_argument("--report-dir", type=Path, metavar="DIR", help="default ./fastinf-report[-synthetic]")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(self, args: argparse.Namespace) -> int:
        from .eval import mislabel_demo

        default = Path("fastinf-report-synthetic" if args.synthetic else "fastinf-report")
        report_dir = args.report_dir or default
        result = mislabel_demo(
            quick=args.quick,
            synthetic=args.synthetic,
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            seeds=args.seeds,
            data_seeds=args.data_seeds,
            bif=args.bif,
            methods=args.methods,
            damping=args.damping,
            sweeps=args.sweep,
            report_dir=report_dir,
            progress=not args.no_progress,
            log=lambda msg: print(msg, flush=True),
        )
        return _print_result(self.name, result)


@register_command
class EvalCommand(Command):
    name = "eval"
    help = "run an experiment by task name: mislabel | math | gsm | digits | lds"
    description = (
        "mislabel: Task 1 (Rotten Tomatoes, MiniLM) — like `demo`.\n"
        "math:     Task 2, class detection on the DataInf math-with-reason task with SmolLM2-135M + LoRA on q/v\n"
        "          (a subset: --classes × --per-class training, 10 test per class).\n"
        "gsm:      the harder class-detection variant: reasoning-gym gsm_symbolic templates as classes.\n"
        "digits:   diffusion class detection: class-conditional UNet2DModel on scikit-learn's digits.\n"
        "lds:      the linear datamodeling score: retrain MiniLM + LoRA on --subsets seeded random halves of the\n"
        "          mislabel task (cached in --cache-dir: a second run or another method never retrains) and rank\n"
        "          every gradient method by LDS with a bootstrap CI (about 30-45 min on a 2-core CPU the first time)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("task", choices=["mislabel", "math", "gsm", "digits", "lds"])
        parser.add_argument("--quick", action="store_true", help="smaller run")
        parser.add_argument("--classes", type=_positive_int, default=None, help="classes (math: 4, gsm: 8)")
        parser.add_argument("--per-class", type=_positive_int, default=None, help="training examples per class")
        parser.add_argument("--per-class-test", type=_positive_int, default=None, help="test examples per class")
        parser.add_argument(
            "--grad-field", choices=["text", "answer", "prompt"], help="loss tokens (math: text; gsm: answer)"
        )
        parser.add_argument("--methods", type=_methods, default=None, metavar="LIST", help="comma-separated methods")
        parser.add_argument("--seed", type=_non_negative_int, default=0)
        parser.add_argument("--report-dir", type=Path, default=None, metavar="DIR", help="default fastinf-report-TASK")
        parser.add_argument("--no-progress", action="store_true")
        lds = parser.add_argument_group("lds")
        lds.add_argument("--subsets", type=_positive_int, default=None, help="retrained subsets S (32; --quick 8)")
        lds.add_argument("--fraction", type=float, default=None, help="share of the training set per subset (0.5)")
        lds.add_argument("--subset-seed", type=_non_negative_int, default=None, help="subset k uses seed this + k")
        lds.add_argument("--n-train", type=_positive_int, default=None, help="training examples (the demo's)")
        lds.add_argument("--n-test", type=_positive_int, default=None, help="test examples (the demo's)")
        lds.add_argument("--cache-dir", type=Path, default=None, metavar="DIR", help="retrained models (~/.cache)")

    def run(self, args: argparse.Namespace) -> int:
        from .eval import run_task
        from .eval.experiments import LDS_OPTIONS

        result = run_task(
            args.task,
            quick=args.quick,
            seed=args.seed,
            methods=args.methods,
            classes=args.classes,
            per_class=args.per_class,
            per_class_test=args.per_class_test,
            grad_field=args.grad_field,
            report_dir=args.report_dir,
            progress=not args.no_progress,
            log=lambda msg: print(msg, flush=True),
            **{k: getattr(args, k) for k in LDS_OPTIONS},
        )
        return _print_result(self.name, result)


@register_command
class GradsCommand(Command):
    name = "grads"
    help = "capture per-example LoRA gradients of a JSON-lines data set into a GradientStore"
    description = (
        "Loads a model (--model minilm | smollm2, or a local Hugging Face model directory) with a LoRA\n"
        "adapter — a saved peft adapter directory (--adapter) or a fresh one (--r, --targets) — and\n"
        "writes the per-example gradients of every row of --data (JSON lines; --text-field, and\n"
        "--label-field for classification) to --out, a resumable GradientStore (re-run the same command\n"
        "to resume after an interruption). Under torchrun every process captures its share of the\n"
        "batches into the same store."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--model", required=True, metavar="NAME|DIR", help="minilm | smollm2 | a local HF model dir"
        )
        parser.add_argument("--data", type=Path, required=True, help="JSON-lines file")
        parser.add_argument("--out", type=Path, required=True, help="GradientStore directory")
        parser.add_argument("--adapter", type=Path, default=None, help="peft adapter directory (save_pretrained)")
        parser.add_argument("--text-field", default="text")
        parser.add_argument("--label-field", default="label", help="class label field (minilm)")
        parser.add_argument("--num-labels", type=_positive_int, default=2, help="classes of minilm's fresh head")
        parser.add_argument("--targets", type=_names, metavar="LIST", help="modules to adapt (default: query, value)")
        parser.add_argument("--r", type=_positive_int, default=8, help="LoRA rank of a fresh adapter")
        parser.add_argument("--batch-size", type=_positive_int, default=16)
        parser.add_argument("--max-length", type=_positive_int, default=128)
        parser.add_argument("--projection", type=_positive_int, default=None, help="random projection dim per block")
        parser.add_argument(
            "--factors", action="store_true", help="also store the Kronecker factors (for --method kfac / ekfac)"
        )
        parser.add_argument("--overwrite", action="store_true", help="replace a store made with other arguments")
        parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of a fresh adapter's weights")
        parser.add_argument("--no-progress", action="store_true")

    def run(self, args: argparse.Namespace) -> int:
        from .eval.jobs import capture_jsonl

        store = capture_jsonl(
            args.model,
            args.data,
            args.out,
            adapter=args.adapter,
            text_field=args.text_field,
            label_field=args.label_field,
            num_labels=args.num_labels,
            r=args.r,
            batch_size=args.batch_size,
            max_length=args.max_length,
            projection=args.projection,
            targets=args.targets,
            overwrite=args.overwrite,
            seed=args.seed,
            progress=not args.no_progress,
            factors=args.factors,
        )
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
        parser.add_argument("--reduce", choices=["mean"], default=None, help="influence on the mean test loss (n,)")
        parser.add_argument("--topk", type=_positive_int, default=None, help="only the k largest per query")
        parser.add_argument("--smallest", action="store_true", help="with --topk: the k most helpful instead")
        parser.add_argument("--damping", type=_damping, default="auto", metavar="LAMBDA", help=DAMPING_HELP)
        parser.add_argument("--allow-mismatch", action="store_true", help="stores of different models/adapters")
        parser.add_argument("--allow-incomplete", action="store_true", help="stores whose capture has not finished")
        parser.add_argument(
            "--out", type=Path, required=True, help="output .safetensors, or .csv (with --topk also OUT.indices.csv)"
        )

    def run(self, args: argparse.Namespace) -> int:
        from .eval.jobs import score_stores

        res = score_stores(
            args.train,
            args.test,
            args.out,
            method=args.method,
            reduce=args.reduce,
            topk=args.topk,
            smallest=args.smallest,
            damping=args.damping,
            allow_mismatch=args.allow_mismatch,
            allow_incomplete=args.allow_incomplete,
        )
        print(f"{res['method']}: {res['shapes']} -> {', '.join(res['files'])} ({res['description']})")
        return 0


@register_command
class BenchCommand(Command):
    name = "bench"
    help = "run a benchmark script from the repository's bench/ directory"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from .eval.jobs import BENCHMARKS

        parser.add_argument("which", choices=BENCHMARKS)
        parser.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the script (e.g. --quick)")

    def run(self, args: argparse.Namespace) -> int:
        from .eval.jobs import run_benchmark

        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return run_benchmark(args.which, rest)


if __name__ == "__main__":
    sys.exit(main())
