"""pytest-benchmark entry for the estimator benchmark (tiny shape; seconds).

Run with ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench -q``; it lives outside ``tests/``, so the main
suite (``pytest tests``) never collects it. Each case times fastinf and the per-example loop baseline of
``bench_estimators.py`` (``fastinf.compat.reference_loops``) in the same benchmark group and checks that their
numbers agree.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("pytest_benchmark")

import bench_estimators as be  # noqa: E402

import fastinf  # noqa: E402
from fastinf.compat import reference_loops as loops  # noqa: E402

SHAPE = be.Shape(n=96, m=8, layers=2, rank=4, width=32, head=2)  # blocks of 128 (> n: n-space) and 64 (d-space)


@pytest.fixture(scope="module")
def grads():
    train, test = be.make_gradients(SHAPE, seed=0)
    return train, test, loops.example_dicts(train), loops.example_dicts(test)


def _check(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err, r = be.agreement(a, b)
    assert err <= tol, f"max rel err {err:.3e} > {tol:.1e}"
    assert r > 1 - 1e-6, f"pearson r {r}"


@pytest.mark.benchmark(group="datainf: fit+score(reduce=mean)")
@pytest.mark.parametrize("impl", ["fastinf", "loop"])
def test_datainf_mean(benchmark, grads, impl):
    train, test, tr, te = grads
    if impl == "fastinf":
        out = benchmark(lambda: fastinf.DataInf().fit(train).score(test, reduce="mean"))
    else:
        out = benchmark(lambda: loops.loop_method("datainf", tr, te, train.names))
    assert out.shape == (train.n,)
    _check(out, loops.loop_method("datainf", tr, te, train.names), 1e-5)


@pytest.mark.benchmark(group="exact: fit+score(reduce=mean), blockwise")
@pytest.mark.parametrize("impl", ["fastinf", "loop"])
def test_exact_blockwise_mean(benchmark, grads, impl):
    train, test, tr, te = grads
    names, n = train.names, train.n

    def loop_accurate() -> torch.Tensor:
        vbar = loops.loop_val_mean(te, names)
        hvp = {}
        for k in names:
            lam = loops.loop_lambda(tr, k)
            hvp[k] = loops.loop_solve_accurate(loops.loop_outer_sum(tr, k, n), vbar[k], lam, n, "eigh")
        return loops.loop_if(tr, hvp)

    if impl == "fastinf":
        out = benchmark(lambda: fastinf.Exact(blockwise=True).fit(train).score(test, reduce="mean"))
    else:
        out = benchmark(loop_accurate)
    truth = sum(loops.oracle_exact_mean(train[k], test[k]) for k in names)
    # fastinf solves in float64, but its auto λ sums float32 row norms (in float64): ~1e-8 relative to the oracle's
    # float64 λ, which moves the scores by ~5e-9. The loop's float32 eigh is the less accurate of the two.
    _check(out, truth, 5e-8 if impl == "fastinf" else 1e-3)
