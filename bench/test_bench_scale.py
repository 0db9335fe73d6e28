"""Smoke test of bench/bench_scale.py at tiny n (seconds): the CSV schema, and the benchmark's top-k and
self-influence equal a direct computation on the same gradients held in memory.

Run with ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/test_bench_scale.py -q``; outside ``tests/``.
"""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # the repository root: ``bench.utils``
    sys.path.insert(0, str(HERE.parent))

import fastinf  # noqa: E402
from bench import utils as bu  # noqa: E402

N, M, K, BLOCKS, WIDTH = 3000, 8, 5, 4, 16


def _load():
    """Execute the script by path, as ``fastinf bench`` may (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location("_bench_scale_smoke", HERE / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mod = _load()
    tmp = tmp_path_factory.mktemp("scale")
    argv = [
        "--n", str(N), "--scaling", f"1000,{N}", "--m", str(M), "--k", str(K), "--blocks", str(BLOCKS),
        "--width", str(WIDTH), "--append-mib", "0.05", "--dist-procs", "0", "--scratch", str(tmp / "scratch"),
        "--out", str(tmp / "r.csv"), "--png", str(tmp / "r.png"), "--save-topk", str(tmp / "topk"),
    ]  # fmt: skip
    assert mod.main(argv) == 0
    return mod, tmp


def test_csv_schema_rows_and_plot(run):
    mod, tmp = run
    with open(tmp / "r.csv") as f:
        rdr = csv.DictReader(f)
        assert rdr.fieldnames == list(bu.COLUMNS)
        rows = list(rdr)
    ops = {(r["op"], r["method"], r["shape"].split()[0]) for r in rows}
    for n in (1000, N):
        assert ("write_store", "GradientStore.append", f"n={n}") in ops
        assert ("io_floor", "sequential read", f"n={n}") in ops
        for m in mod.TOPK_METHODS:
            assert (f"fit+topk(k={K})", m, f"n={n}") in ops
        for m in mod.SELF_METHODS:
            assert ("fit+self_influence", m, f"n={n}") in ops
    for r in rows:
        assert float(r["median_s"]) > 0 and r["version"].startswith("fastinf ")
        if r["op"].startswith("fit+"):
            assert r["baseline"] == "io_floor" and float(r["baseline_median_s"]) > 0
    assert (tmp / "r.png").stat().st_size > 0
    assert not any((tmp / "scratch").glob("store-n*")), "the stores are deleted after the run"


def _direct(mod):
    """The same gradients in memory, as the store holds them (bfloat16 values), and the test set."""
    spec = mod.Spec(BLOCKS, WIDTH)
    x = spec.train_rows(0, N).bfloat16().float()
    train = fastinf.GradientSet({k: v.contiguous() for k, v in spec.split(x).items()})
    return spec, train, spec.test_set(M)


def test_topk_equals_direct_computation(run):
    from safetensors.torch import load_file

    mod, tmp = run
    spec, train, test = _direct(mod)
    T = torch.cat([test[k] for k in spec.names], 1)
    G = torch.cat([train[k] for k in spec.names], 1)
    for method in mod.TOPK_METHODS:
        got = load_file(str(tmp / "topk" / f"{method}_topk.safetensors"))
        if method == "hessian_free":
            scores = -(T.double() @ G.double().T)  # the formula, no estimator
        else:
            scores = mod.make_estimator(method).fit(train).score(test).double()  # in memory, full (m, n)
        vals, idx = torch.topk(scores, K, dim=1)
        assert torch.equal(got["indices"], idx), method
        torch.testing.assert_close(got["values"].double(), vals, rtol=1e-4, atol=1e-4 * float(vals.abs().max()))


def test_self_influence_equals_direct_computation(run):
    from safetensors.torch import load_file

    mod, tmp = run
    spec, train, _ = _direct(mod)
    G = torch.cat([train[k] for k in spec.names], 1).double()
    for method in mod.SELF_METHODS:
        got = load_file(str(tmp / "topk" / f"{method}_self.safetensors"))["self"].double()
        want = -(G * G).sum(1) if method == "hessian_free" else mod.make_estimator(method).fit(train).self_influence()
        torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_rows_do_not_depend_on_the_append_size():
    mod = _load()
    spec = mod.Spec(BLOCKS, WIDTH)
    whole = spec.train_rows(0, 2500)
    parts = torch.cat([spec.train_rows(s, min(s + 700, 2500)) for s in range(0, 2500, 700)])
    assert torch.equal(whole, parts)


def test_main_returns_exit_status(capsys):
    mod = _load()
    assert mod.main(["--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    assert mod.main(["--no-such-option"]) == 2
    assert mod.main(["--self-methods", "datainf"]) == 2  # O(n²·D): refused, not run
