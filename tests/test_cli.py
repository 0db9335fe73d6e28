"""The command line: subprocess runs of `python -m fastinf[.cli]`, and in-process error handling."""

import json
import math
import os
import subprocess
import sys

import pytest

import fastinf
from fastinf import cli
from fastinf.eval import mislabel_auc, mislabel_task

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run(*args, module="fastinf.cli", timeout=120):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def assert_one_line_error(proc, code):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "error" in lines[0] and "Traceback" not in proc.stderr


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("demo", "info", "eval", "grads", "score", "bench"):
        assert name in proc.stdout
    proc = run("demo", "--help", module="fastinf")  # python -m fastinf (the __main__ module)
    assert proc.returncode == 0, proc.stderr
    for opt in ("--n-train", "--n-test", "--seed", "--quick", "--report-dir", "--synthetic"):
        assert opt in proc.stdout


def test_info_mentions_backends_and_methods():
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    assert fastinf.__version__ in proc.stdout
    for backend, state in fastinf.ops.backends().items():
        assert backend in proc.stdout and state in proc.stdout
    for m in fastinf.available_methods():
        assert m in proc.stdout
    proc = run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["backends"] == fastinf.ops.backends()
    assert data["methods"] == fastinf.available_methods()


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run("demo", "--synthetic", "--quick", "--no-progress", "--report-dir", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_demo_quick_reports_every_method(quick_demo):
    proc, data, report = quick_demo
    results = data["results"]
    table_rows = [ln.split()[0] for ln in proc.stdout.splitlines() if ln.strip()]
    for m in fastinf.available_methods():
        assert m in results, m
        r = results[m]
        if r["status"].startswith("skipped"):  # a method that does not work on gradients (loss traces)
            assert not isinstance(fastinf.get_estimator(m), fastinf.Estimator)
            continue
        assert r["status"] == "ok", (m, r["status"])
        assert math.isfinite(r["auc"]) and 0.0 <= r["auc"] <= 1.0, (m, r["auc"])
        assert m in table_rows, m
        assert m in report
    assert results["exact"]["pearson"] == pytest.approx(1.0) and results["exact"]["spearman"] == pytest.approx(1.0)
    rr = results["rrinf"]
    assert len(rr["seeds"]) == 3 and len(rr["aucs"]) == 3 and rr["auc_std"] is not None
    task = data["task"]
    assert (task["n_train"], task["n_test"], task["D"]) == (400, 100, sum(task["blocks"].values()))
    assert str(task["D"]) in proc.stdout and "λ" in proc.stdout


def test_demo_detects_flipped_labels(quick_demo):
    _, data, _ = quick_demo
    # measured: exact 0.90, datainf 0.985 at the quick defaults; chance is 0.5
    assert data["results"]["exact"]["auc"] > 0.7
    assert data["results"]["datainf"]["auc"] > 0.7


def test_demo_numbers_match_an_independent_run(quick_demo):
    _, data, _ = quick_demo
    task = mislabel_task(400, 100, seed=0)
    for m in ("exact", "datainf"):
        scores = fastinf.get_estimator(m).fit(task.train).score(task.test, reduce="mean")
        assert data["results"][m]["auc"] == pytest.approx(mislabel_auc(scores, task.is_flipped), abs=0.01)


def test_bad_arguments_exit_nonzero_with_one_line():
    assert_one_line_error(run("demo", "--n-train", "-5"), 2)
    assert_one_line_error(run("frobnicate"), 2)


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["demo", "--bogus"], 2, "unrecognized arguments"),
        (["demo", "--n-train", "abc"], 2, "positive integer"),
        (["demo", "--damping", "-1"], 2, "positive number"),
        ([], 2, "missing command"),
        (["demo", "--methods", "nope", "--quick"], 1, "unknown method"),
        (["demo", "--n-train", "2", "--quick", "--no-progress"], 1, "too small"),
    ],
)
def test_errors_in_process(capsys, argv, code, needle):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("fastinf"), err


def test_library_errors_become_one_line(capsys, monkeypatch):
    def boom(*a, **k):
        raise ValueError("block 'x': non-finite value\n in example 3")

    monkeypatch.setattr(cli.DemoCommand, "run", boom)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "fastinf demo: error: ValueError: block 'x': non-finite value in example 3"
    with pytest.raises(ValueError):
        cli.main(["demo", "--debug"])


def test_command_registry_is_extensible(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    @cli.register_command
    class Echo(cli.Command):
        name = "echo"
        help = "print the word"

        def add_arguments(self, parser):
            parser.add_argument("word")

        def run(self, args):
            print(args.word)
            return 0

    assert cli.main(["echo", "hi"]) == 0
    assert capsys.readouterr().out == "hi\n"
    with pytest.raises(SystemExit) as ex:
        cli.main(["--help"])
    assert ex.value.code == 0 and "echo" in capsys.readouterr().out
