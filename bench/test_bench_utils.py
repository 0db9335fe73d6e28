"""The contract every bench script keeps (``main(argv) -> int``) and the one CSV schema of bench/utils.py.

Run with ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench -q``; outside ``tests/``, so the main suite never
collects it. Seconds: only ``--help`` and a bad argument are run, nothing is benchmarked.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(HERE.parent))

from bench import utils as bu  # noqa: E402
from fastinf.utils import TimingStats  # noqa: E402

SCRIPTS = ["estimators", "ops", "capture", "traces"]


def _load(which: str):
    """Execute a script by path, as ``fastinf bench`` may (not registered in sys.modules: the strictest loader)."""
    spec = importlib.util.spec_from_file_location(f"_bench_contract_{which}", HERE / f"bench_{which}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("which", SCRIPTS)
def test_main_returns_exit_status_without_touching_argv(which, capsys):
    if which in ("capture", "traces"):
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    mod = _load(which)
    argv = list(sys.argv)
    assert mod.main(["--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    assert mod.main(["--no-such-option"]) == 2
    assert sys.argv == argv


def test_rows_and_csv_schema(tmp_path):
    rows = bu.RowBuilder()
    stats = TimingStats([0.3, 0.1, 0.2], peak_mb=12.34)
    row = rows.add(op="x", backend="torch", timing=stats, speedup=2.0, max_rel_err=1.5e-7, note="n")
    assert list(row) == list(bu.COLUMNS)
    assert (row["median_s"], row["p20_s"], row["peak_mem_mb"], row["speedup"]) == ("0.2", "0.14", "12.3", "2.00")
    assert row["max_rel_err"] == "1.500e-07" and row["baseline"] == "" and row["version"].startswith("fastinf ")
    with pytest.raises(ValueError, match="unknown CSV column"):
        rows.add(median_ms=1.0)
    path = tmp_path / "r.csv"
    bu.write_csv(rows.rows, path)
    bu.write_csv(rows.rows, path, append=True)
    got = list(csv.DictReader(path.open()))
    assert len(got) == 2 and got[0] == row
    old = tmp_path / "old.csv"
    old.write_text("method,median_ms\na,1\n")
    with pytest.raises(ValueError, match="older schema"):
        bu.write_csv(rows.rows, old, append=True)


def test_quick_runs_write_their_own_csv():
    import argparse

    ap = argparse.ArgumentParser()
    bu.add_output_args(ap, "bench_x", quick_help="q")
    assert bu.output_path(ap.parse_args([]), "bench_x") == bu.RESULTS / "bench_x.csv"
    assert bu.output_path(ap.parse_args(["--quick"]), "bench_x") == bu.RESULTS / "bench_x_quick.csv"
    assert bu.output_path(ap.parse_args(["--csv", "/tmp/a.csv"]), "bench_x") == Path("/tmp/a.csv")
