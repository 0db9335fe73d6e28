"""What the benchmark scripts share beyond :mod:`fastinf.utils` (timing, peak memory, provenance strings):
the one CSV schema of ``bench/results/*.csv``, the row builder, the CSV writer and argument helpers.

Every script writes tidy rows with the columns :data:`COLUMNS` (ARCHITECTURE.md: op, backend, shape,
dtype, device, median, p20, p80, peak memory, version, date, plus what some scripts need); a column a
script has nothing for stays empty. Times are in seconds everywhere.

Every script exposes ``main(argv: list[str] | None = None) -> int`` (the exit status), so that
``fastinf bench <which> -- args`` can import and call it; ``python bench/bench_<which>.py --quick`` works too.
Scripts import this module as ``bench.utils`` (they put the repository root on ``sys.path``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fastinf.utils import PeakMemory, TimingStats, atomic_write, device_string, version_string

__all__ = [
    "COLUMNS",
    "RESULTS",
    "LinePrinter",
    "RowBuilder",
    "add_output_args",
    "memory_doc",
    "now",
    "output_path",
    "parse_args",
    "run_script",
    "set_torch_threads",
    "timing_fields",
    "write_csv",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

#: The columns of every ``bench/results/*.csv``, in order.
COLUMNS: tuple[str, ...] = (
    "op",  # what is computed (e.g. fit+score(reduce=mean), datainf_inverse_sum, lora_capture, loss_table)
    "backend",  # who computes it: fastinf/<ops backend>, torch, triton, cuda, python-loop, ...
    "method",  # the estimator or implementation variant (bench_estimators, bench_capture, bench_traces)
    "shape",
    "dtype",
    "device",
    "median_s",  # wall (CPU) or CUDA-event (GPU) seconds per call: median, 20th and 80th percentile
    "p20_s",
    "p80_s",
    "peak_mem_mb",  # peak memory one call adds, MiB (fastinf.utils.PeakMemory)
    "baseline",  # the row this one is compared with (same run, same inputs)
    "baseline_median_s",
    "speedup",  # baseline median / this row's median
    "throughput",  # in `unit`
    "unit",
    "gflop",  # useful floating-point work per call (bench_ops)
    "gbytes",  # minimal bytes moved per call (bench_ops)
    "tflops",
    "gbps",
    "roofline_s",  # max(flop / GEMM rate, bytes / copy bandwidth), both measured in the same run
    "frac_roofline",  # roofline_s / median_s
    "max_rel_err",  # against the baseline (see the script's README section for the norm)
    "version",  # fastinf.utils.version_string()
    "date",  # UTC, ISO 8601
    "note",
)

#: How a float is written, per column (others: ``.6g``).
_FORMATS: dict[str, str] = {
    "peak_mem_mb": ".1f",
    "speedup": ".2f",
    "throughput": ".4g",
    "gflop": ".3f",
    "gbytes": ".4f",
    "tflops": ".3f",
    "gbps": ".1f",
    "frac_roofline": ".3f",
    "max_rel_err": ".3e",
}


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the ``date`` column)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cell(col: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return format(value, _FORMATS.get(col, ".6g"))


def timing_fields(stats: TimingStats) -> dict[str, float]:
    """``median_s, p20_s, p80_s, peak_mem_mb`` of a :class:`fastinf.utils.TimingStats`."""
    return {"median_s": stats.median, "p20_s": stats.p20, "p80_s": stats.p80, "peak_mem_mb": stats.peak_mb}


class RowBuilder:
    """Builds the rows of one run: ``device``, ``version`` and ``date`` filled once, floats formatted per
    column, unknown columns refused; ``rows`` holds them in order.

    ``printer``: called with every new row (e.g. a :class:`LinePrinter`), so long runs show progress.
    """

    def __init__(self, device: Any = None, *, printer: Any = None) -> None:
        self.device = device_string(device)
        self.version = version_string()
        self.date = now()
        self.rows: list[dict[str, str]] = []
        self.printer = printer

    def add(self, *, timing: TimingStats | None = None, **fields: Any) -> dict[str, str]:
        """Append a row: ``fields`` by column name (``timing``: its median/p20/p80/peak). Returns the row."""
        unknown = sorted(set(fields) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown CSV column(s) {unknown}; the columns are {list(COLUMNS)}")
        values: dict[str, Any] = {"device": self.device, "version": self.version, "date": self.date}
        if timing is not None:
            values.update(timing_fields(timing))
        values.update(fields)
        row = {c: _cell(c, values.get(c)) for c in COLUMNS}
        self.rows.append(row)
        if self.printer is not None:
            self.printer(row)
        return row


class LinePrinter:
    """Prints rows as they come, in fixed-width columns (``(column, width)`` pairs), the note last."""

    def __init__(self, columns: Sequence[tuple[str, int]], *, note: bool = True) -> None:
        self.columns = list(columns)
        self.note = note
        self._started = False

    def __call__(self, row: Mapping[str, Any]) -> None:
        if not self._started:
            hdr = " ".join(f"{c[:w]:<{w}}" for c, w in self.columns) + (" note" if self.note else "")
            print(hdr, flush=True)
            print("-" * len(hdr), flush=True)
            self._started = True
        line = " ".join(f"{str(row.get(c, ''))[:w]:<{w}}" for c, w in self.columns)
        print(f"{line} {row.get('note', '')}" if self.note else line.rstrip(), flush=True)


def write_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike, *, append: bool = False) -> Path:
    """Write ``rows`` (dicts keyed by :data:`COLUMNS`) to ``path`` atomically, with a header.

    ``append=True`` keeps the rows already in ``path``; a file with another header (an older schema) is
    refused rather than mixed.
    """
    path = Path(path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    old = ""
    if append and path.exists():
        old = path.read_text()
        header = old.splitlines()[0] if old else ""
        if old and next(csv.reader([header])) != list(COLUMNS):
            raise ValueError(
                f"{path} has other columns than bench/utils.py COLUMNS (an older schema): write to a new file "
                "or drop --append"
            )
        if old and not old.endswith("\n"):
            old += "\n"
    if not old:
        w.writeheader()
    for r in rows:
        unknown = sorted(set(r) - set(COLUMNS))
        if unknown:
            raise ValueError(f"row has unknown column(s) {unknown}")
        w.writerow({c: r.get(c, "") for c in COLUMNS})
    return atomic_write(path, old + buf.getvalue())


# ------------------------------------------------------------------------------------ arguments
def add_output_args(parser: argparse.ArgumentParser, name: str, *, quick_help: str) -> None:
    """``--quick``, ``--out`` (``--csv``) and ``--append``; the default output is
    ``bench/results/<name>.csv``, or ``<name>_quick.csv`` with ``--quick`` (quick runs never overwrite the
    committed full results)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out",
        "--csv",
        dest="out",
        default=None,
        help=f"output CSV (default bench/results/{name}.csv; --quick: bench/results/{name}_quick.csv)",
    )
    parser.add_argument("--append", action="store_true", help="append to the CSV instead of overwriting it")


def parse_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    resolve: Callable[[argparse.Namespace], Any] | None = None,
) -> Any:
    """``parser.parse_args(argv)`` (then ``resolve(args)``, which may call ``parser.error``), or the exit status
    where argparse would exit (``--help``: 0; a bad argument: 2, after argparse has printed why), so that
    ``main(argv)`` can return it instead of raising ``SystemExit``."""
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        return resolve(args) if resolve is not None else args
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)


def run_script(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    body: Callable[[Any], int],
    resolve: Callable[[argparse.Namespace], Any] | None = None,
) -> int:
    """The ``main(argv) -> int`` of every bench script: :func:`parse_args` (its exit status for ``--help`` or a
    bad argument), then ``body(args)`` (the resolved arguments)."""
    args = parse_args(parser, argv, resolve)
    return args if isinstance(args, int) else body(args)


def output_path(args: argparse.Namespace, name: str) -> Path:
    """The CSV ``args`` asks for (see :func:`add_output_args`)."""
    if args.out:
        return Path(args.out)
    return RESULTS / (f"{name}_quick.csv" if args.quick else f"{name}.csv")


def set_torch_threads() -> int:
    """torch's intra-op threads = ``OMP_NUM_THREADS`` (default 1: the benchmarks' setting); returns it."""
    import torch

    k = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(k)
    return k


def memory_doc() -> str:
    """What ``peak_mem_mb`` measures on this machine (the CPU counter :class:`PeakMemory` can use)."""
    with PeakMemory(cuda=False, collect=False) as probe:
        pass
    if probe.method == "VmHWM":
        return "peak RSS above the RSS at call start (/proc/self VmHWM, reset via clear_refs before each call)"
    return "resource.getrusage ru_maxrss delta over the call (0 when below an earlier peak)"
