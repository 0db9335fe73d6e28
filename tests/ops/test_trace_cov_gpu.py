"""Tier (c) for trace_cov / trace_cov_topk: the Triton kernels on a real GPU (skipped without one).

Fresh random inputs on every run (the seed is in the failure message). The kernels centre and accumulate in
float32 (3xTF32 products) whatever the input dtype, so every result is compared with the float64 reference on
the same (low-precision) inputs, with a tolerance taken from the error that the reference itself makes when
it accumulates in float32 (``dtype=torch.float32``) on those inputs: up to 4x that, plus a small floor for
the TF32 splitting. Outputs are checked finite after poisoning the allocator's memory with NaN, so an
unwritten element fails.

Run on a GPU machine with ``TRITON_INTERPRET=0 pytest -m gpu tests/ops/test_trace_cov_gpu.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastinf import ops
from fastinf.ops import _dispatch
from fastinf.testing import (
    assert_within_reference_error,
    poison_cuda_cache,
    reference_tolerance,
    require_backend,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = 5e-6  # relative; 3xTF32 products accumulated in float32 over up to ~1000 draws


def _traces(N: int, n: int, m: int, dtype: torch.dtype, offset: float = 0.5):
    """Loss-like traces on the GPU: per-example scales, queries correlated with training examples."""
    X = torch.randn(N, n, device="cuda") * (0.5 + torch.rand(n, device="cuda"))
    W = torch.randn(n, m, device="cuda") / n**0.5
    Y = X @ W + 0.5 * torch.randn(N, m, device="cuda")
    return (X + offset).to(dtype), (Y + offset).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape", [(200, 5000, 300), (1000, 1031, 129), (2, 77, 5), (33, 64, 1)])
def test_trace_cov(dtype, normalize, shape, fresh_seed):
    b = require_backend("triton")
    N, n, m = shape
    X, Y = _traces(N, n, m, dtype)
    exact = ops.trace_cov_reference(X.double(), Y.double(), normalize)
    ref32 = ops.trace_cov_reference(X, Y, normalize, dtype=torch.float32)
    poison_cuda_cache()
    got = ops.trace_cov(X, Y, normalize, backend=b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert_within_reference_error(got, exact, ref32, factor=4.0, floor=FLOOR, what="trace_cov", seed=fresh_seed)


def test_trace_cov_strided_inputs(fresh_seed):
    b = require_backend("triton")
    X, Y = _traces(150, 3000, 40, torch.float32)
    Xs, Yt = X[:, 100:2100], Y.T.contiguous().T
    exact = ops.trace_cov_reference(Xs.double(), Yt.double(), True)
    ref32 = ops.trace_cov_reference(Xs, Yt, True, dtype=torch.float32)
    got = ops.trace_cov(Xs, Yt, True, backend=b)
    assert_within_reference_error(got, exact, ref32, factor=4.0, floor=FLOOR, what="strided trace_cov", seed=fresh_seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 10, 64, 100])
@pytest.mark.parametrize("normalize,largest", [(False, True), (True, False)])
def test_trace_cov_topk(dtype, k, normalize, largest, fresh_seed):
    b = require_backend("triton")
    N, n, m = 300, 20011, 77
    X, Y = _traces(N, n, m, dtype)
    exact = ops.trace_cov_reference(X.double(), Y.double(), normalize)
    ref32 = ops.trace_cov_reference(X, Y, normalize, dtype=torch.float32)
    # the same rule in the max norm: 4x the float32 reference's largest error, plus the floor
    atol = reference_tolerance(float((ref32 - exact).abs().max()), factor=4.0, floor=FLOOR * float(exact.abs().max()))
    poison_cuda_cache()
    vals, idx = ops.trace_cov_topk(X, Y, k, normalize=normalize, largest=largest, backend=b)
    assert vals.shape == idx.shape == (m, k) and vals.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.isfinite(vals).all() and bool(((idx >= 0) & (idx < n)).all()), f"seed {fresh_seed}"
    ev = torch.topk(exact, k, dim=1, largest=largest).values
    # the k-th order statistics move by at most the scores' error; each index carries its returned score
    assert float((vals.double() - ev).abs().max()) <= atol, f"top-k values off; seed {fresh_seed}"
    assert float((exact.gather(1, idx) - vals.double()).abs().max()) <= atol, f"indices do not match; seed {fresh_seed}"
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all()), f"repeated indices; seed {fresh_seed}"


def test_trace_cov_topk_never_materialises_the_matrix(fresh_seed):
    b = require_backend("triton")
    N, n, m = 64, 400_000, 256
    X, Y = _traces(N, n, m, torch.float16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vals, idx = ops.trace_cov_topk(X, Y, 10, backend=b)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.1 * m * n * 4, f"peak extra memory {extra / 2**20:.0f} MiB: (m, n) materialised?"
    # spot check: the best score over all columns is at least the best over a slice, by the full kernel
    sv = ops.trace_cov(X[:, :5000], Y, backend=b).max(1).values
    assert bool((vals[:, 0] >= sv - 1e-5 * sv.abs().max()).all()), f"seed {fresh_seed}"
    assert bool((vals.diff(dim=1) <= 0).all()), f"values not sorted; seed {fresh_seed}"


def test_trace_cov_zero_variance_and_fallbacks(fresh_seed):
    b = require_backend("triton")
    X, Y = _traces(50, 300, 7, torch.float32)
    X[:, 211] = 1.5
    with pytest.raises(ValueError, match="train trace of example 211 has zero variance"):
        ops.trace_cov(X, Y, True, backend=b)
    with pytest.raises(ValueError, match="train trace of example 211 has zero variance"):
        ops.trace_cov_topk(X, Y, 5, normalize=True, backend=b)
    # float64 inputs or accumulation: auto runs the reference, an explicit triton request raises
    assert _dispatch.select("trace_cov", "auto", X.device, (X.double(), Y, False), {})[0] == "torch"
    assert _dispatch.select("trace_cov", "auto", X.device, (X, Y, False), {"dtype": torch.float64})[0] == "torch"
    with pytest.raises(RuntimeError, match="float64"):
        ops.trace_cov(X.double(), Y.double(), backend=b)
    os.environ.pop("FASTINF_BACKEND", None)
    chosen = _dispatch.select("trace_cov", "auto", X.device, (X, Y, False), {})[0]
    assert chosen == _dispatch.route("trace_cov", (X, Y, False)).order[0]  # no CUDA kernel: never "cuda"
